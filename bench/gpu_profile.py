"""Where the triton backend's time goes on a GPU: a kernel-by-kernel profile of one call, and the GEMM variants the
chunked schedule runs, each timed alone against the plain bf16 GEMM of the same shape.

    python bench/gpu_profile.py --json $OUT/gpu-profile.json [--tokens 8192 --hidden 4096 --vocab 151936]

1. ``torch.profiler`` around one ``fused_policy_loss`` forward+backward (GSPO, sequence level) and one no-grad
   ``fused_logprobs``: device time per kernel name, summed.
2. ``fused_logprobs`` as planned against the fused matmul-epilogue kernel called directly (the chunked path is
   cuBLAS's projection, then the statistics kernel), both timed with ``do_bench`` medians.
3. The GEMMs of one chunk (``C`` tokens): the projection with fp32 out, ``dX`` from the 16-bit gradient at row
   stride ``2V``, ``dW`` accumulated into fp32 with ``addmm``; each next to the bf16-out GEMM of the same shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from triton.testing import do_bench

import fused_gspo
from fused_gspo import triton_ops
from fused_gspo.head import HeadParams


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def kernel_table(fn, steps: int = 3) -> list[dict]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals[event.name[:90]]
            entry[0] += getattr(event, "device_time", getattr(event, "cuda_time", 0.0)) / 1e3 / steps
            entry[1] += 1
    rows = [{"kernel": k, "ms_per_call": v[0], "launches_per_call": v[1] / steps} for k, v in totals.items()]
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")


def host_gaps(fn) -> dict:
    """One call traced on host and device: where the device idles (gaps between kernels), and the host calls that
    wait for the device (``.item()``/``.tolist()``/``float(t)`` land in ``aten::_local_scalar_dense``), with the
    Python lines they come from."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA], with_stack=True
    ) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted(
        (e for e in events if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    gaps, busy_until, previous = [], None, None
    for k in kernels:
        if busy_until is not None and k.time_range.start - busy_until > 20:
            gaps.append({"us": k.time_range.start - busy_until, "after": previous[:60], "before": k.name[:60]})
        if busy_until is None or k.time_range.end > busy_until:
            busy_until, previous = k.time_range.end, k.name
    span = kernels[-1].time_range.end - kernels[0].time_range.start if kernels else 0
    syncs: dict[str, int] = defaultdict(int)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name in SYNC_EVENTS:
            where = [line for line in (e.stack or []) if "fused_gspo" in line][:3]
            syncs[f"{e.name} <- {' <- '.join(where) or '?'}"] += 1
    gaps.sort(key=lambda g: -g["us"])
    return {
        "device_span_us": span,
        "idle_us": sum(g["us"] for g in gaps),
        "largest_gaps": gaps[:15],
        "syncs": dict(sorted(syncs.items(), key=lambda kv: -kv[1])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--json")
    args = parser.parse_args()
    n, hsz, v, c = args.tokens, args.hidden, args.vocab, args.chunk
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    b = n // 512
    hidden = torch.randn(b, 512, hsz, device=dev, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(v, hsz, device=dev, generator=gen) * 0.02).bfloat16().requires_grad_()
    ids = torch.randint(0, v, (b, 512), device=dev, generator=gen)
    adv = torch.randn(b, device=dev, generator=gen)
    mask = torch.ones(b, 512, device=dev)
    old = torch.randn(b, 512, device=dev, generator=gen) * 0.05 - 12.0
    result: dict = {"shape": {"tokens": n, "hidden": hsz, "vocab": v, "chunk": c}}

    def step():
        out = fused_gspo.fused_policy_loss(hidden, weight, ids, adv, mask, old_logps=old, backend="triton")
        out.loss.backward()
        hidden.grad = weight.grad = None

    def logprobs():
        with torch.no_grad():
            return fused_gspo.fused_logprobs(hidden, weight, ids, backend="triton")

    result["step_ms"] = bench(step)
    result["step_kernels"] = kernel_table(step)
    result["step_host_gaps"] = host_gaps(step)
    result["logprobs_planned_ms"] = bench(logprobs)
    result["logprobs_planned_kernels"] = kernel_table(logprobs)
    flat_h, flat_ids = hidden.detach().reshape(n, hsz), ids.reshape(n)

    def fused():
        return triton_ops.TritonTileOps.fused_logprobs(flat_h, weight.detach(), None, flat_ids, HeadParams())

    result["logprobs_fused_ms"] = bench(fused)
    result["logprobs_fused_kernels"] = kernel_table(fused)

    x = torch.randn(c, hsz, device=dev, generator=gen).bfloat16()
    w = weight.detach()
    y32 = torch.empty(c, v, device=dev)
    g16 = torch.randn(c, 2 * v, device=dev, generator=gen).bfloat16()[:, :v]  # dL/dy over the first half of each row
    g16c = g16.contiguous()
    acc = torch.randn(v, hsz, device=dev, generator=gen)
    gemms = {
        "projection bf16 out": lambda: torch.mm(x, w.t()),
        "projection fp32 out": lambda: torch.mm(x, w.t(), out_dtype=torch.float32, out=y32),
        "dX contiguous G": lambda: torch.mm(g16c, w),
        "dX G row stride 2V": lambda: torch.mm(g16, w),
        "dW bf16 out": lambda: torch.mm(g16c.t(), x),
        "dW addmm fp32 acc, G stride 2V": lambda: torch.addmm(acc, g16.t(), x, out_dtype=torch.float32, out=acc),
        "dW addmm fp32 acc, contiguous G": lambda: torch.addmm(acc, g16c.t(), x, out_dtype=torch.float32, out=acc),
        "dW fp32 mm then add_": lambda: acc.add_(torch.mm(g16c.t(), x)),
        "cast dW fp32->bf16": lambda: acc.to(torch.bfloat16),
    }
    flops = 2 * c * hsz * v
    result["gemms"] = {}
    for name, fn in gemms.items():
        ms = bench(fn)
        result["gemms"][name] = {"ms": ms, "tflops": flops / ms / 1e9}
    print(json.dumps({k: result[k] for k in result if not k.endswith(("kernels", "gaps"))}, indent=1))
    print("== step_host_gaps")
    print(json.dumps(result["step_host_gaps"], indent=1))
    for key in ("step_kernels", "logprobs_planned_kernels", "logprobs_fused_kernels"):
        print(f"== {key}")
        for row in result.get(key, [])[:14]:
            print(f"{row['ms_per_call']:8.3f} ms  x{row['launches_per_call']:<5g} {row['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
