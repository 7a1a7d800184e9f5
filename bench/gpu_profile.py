"""Where the triton backend's time goes on a GPU: a kernel-by-kernel profile of one call, the device's idle time
within it, the planner's prediction beside the measurement, and the GEMM variants the chunked schedule runs.

    python bench/gpu_profile.py --json $OUT/gpu-profile.json [--tokens 8192 --hidden 4096 --vocab 151936]
    TRITON_INTERPRET=1 python bench/gpu_profile.py --device cpu --backend torch --tokens 64 --seq-len 16 \
        --hidden 32 --vocab 384      # a dry run of the script itself on CPU (no figure means anything)

1. ``torch.profiler`` around one ``fused_policy_loss`` forward+backward (GSPO, sequence level, off-policy) and one
   no-grad ``fused_logprobs``: device time per kernel name, summed.
2. The device's idle time within one call (``step_host_gaps.idle_us``: the gaps of more than 20 us between one
   kernel's end and the next kernel's start, from the call's first kernel to its last; ``idle_all_us`` counts every
   gap), for the training step at the default budget and at ``--lean-workspace`` (many chunks), and for the no-grad
   pass; with the host calls that wait for the device and the Python lines they come from.
3. The step's time against the three bare GEMMs (``floor_ms``) and the planner's prediction (``plan``: what
   ``fused_gspo.explain(..., device="cuda")`` predicts for this shape), and the step under bf16 autocast with fp32
   weights.
4. ``fused_logprobs`` as planned (cuBLAS into a staged tile, then the statistics kernel; the planner no longer
   chooses the fused kernel for the no-grad pass) against the fused matmul-epilogue kernel called directly.
5. The GEMMs of one chunk of ``--chunk`` tokens (default: the whole batch, as one chunk runs): the projection into a
   bf16 tile (``out=``) or fp32, ``dX`` / ``dW`` from the bf16 tile, ``dW`` accumulated into fp32 with ``addmm``, each
   next to the plain bf16 GEMM of the same shape.
Each part records an error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections import defaultdict

import torch

import fused_gspo
from fused_gspo import triton_ops
from fused_gspo.head import HeadParams


def bench(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on CUDA, a few ``perf_counter`` runs on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _activities(device: torch.device, host: bool = False) -> list:
    kinds = torch.profiler.ProfilerActivity
    if device.type == "cuda":
        return [kinds.CPU, kinds.CUDA] if host else [kinds.CUDA]
    return [kinds.CPU]


def _device_events(events, device: torch.device) -> list:
    """The kernels (CUDA) or, on CPU, the top-level operators."""
    if device.type == "cuda":
        return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]


def kernel_table(fn, device: torch.device, steps: int = 3) -> list[dict]:
    fn()
    _synchronize(device)
    with torch.profiler.profile(activities=_activities(device)) as prof:
        for _ in range(steps):
            fn()
        _synchronize(device)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in _device_events(prof.events(), device):
        entry = totals[event.name[:90]]
        time_us = getattr(event, "device_time", getattr(event, "cuda_time", 0.0)) if device.type == "cuda" else None
        if time_us is None:
            time_us = event.time_range.end - event.time_range.start
        entry[0] += time_us / 1e3 / steps
        entry[1] += 1
    rows = [{"kernel": k, "ms_per_call": v[0], "launches_per_call": v[1] / steps} for k, v in totals.items()]
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
GAP_US = 20  # a gap between kernels longer than this is counted as idle (launches back to back leave a few us)


def host_gaps(fn, device: torch.device) -> dict:
    """One call traced on host and device: where the device idles between its first and last kernel (gaps longer
    than :data:`GAP_US` in ``idle_us``, every gap in ``idle_all_us``), and the host calls that wait for the device
    (``.item()``/``.tolist()``/``float(t)`` land in ``aten::_local_scalar_dense``), with the Python lines they come
    from. On CPU there is no device to idle: only the host's waits are listed."""
    fn()
    _synchronize(device)
    # (with_stack on CUDA only: on CPU, under the Triton interpreter, it would record every Python call)
    with torch.profiler.profile(activities=_activities(device, host=True), with_stack=device.type == "cuda") as prof:
        fn()
        _synchronize(device)
    events = prof.events()
    kernels = sorted(_device_events(events, device), key=lambda e: e.time_range.start) if device.type == "cuda" else []
    gaps, all_gaps, busy_until, previous = [], 0.0, None, None
    for k in kernels:
        if busy_until is not None and k.time_range.start > busy_until:
            gap = k.time_range.start - busy_until
            all_gaps += gap
            if gap > GAP_US:
                gaps.append({"us": gap, "after": previous[:60], "before": k.name[:60]})
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
        "kernels": len(kernels),
        "idle_us": sum(g["us"] for g in gaps),
        "idle_all_us": all_gaps,
        "gap_threshold_us": GAP_US,
        "largest_gaps": gaps[:15],
        "syncs": dict(sorted(syncs.items(), key=lambda kv: -kv[1])),
    }


def _part(result: dict, name: str, fn) -> None:
    """``result[name] = fn()``, or the error it raised (the other parts still run)."""
    try:
        result[name] = fn()
    except Exception as exc:  # noqa: BLE001
        result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "traceback": traceback.format_exc()[-2000:]}
        print(f"!! {name}: {type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, help="tokens of the chunk whose GEMMs are timed (default: --tokens)")
    parser.add_argument("--lean-workspace", type=int, default=512 << 20, help="a second budget profiled (bytes)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", default="triton", help="the fused calls' backend (default triton)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    n, t, hsz, v = args.tokens, args.seq_len, args.hidden, args.vocab
    c = args.chunk or n
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    b = n // t
    hidden = torch.randn(b, t, hsz, device=dev, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(v, hsz, device=dev, generator=gen) * 0.02).bfloat16().requires_grad_()
    ids = torch.randint(0, v, (b, t), device=dev, generator=gen)
    adv = torch.randn(b, device=dev, generator=gen)
    mask = torch.ones(b, t, device=dev)
    old = torch.randn(b, t, device=dev, generator=gen) * 0.05 - 12.0
    from fused_gspo.bench.report import library_versions

    result: dict = {
        "versions": library_versions(),
        "shape": {"tokens": n, "seq_len": t, "hidden": hsz, "vocab": v, "chunk": c},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "command": " ".join(["python", "bench/gpu_profile.py", *(sys.argv[1:] if argv is None else argv)]),
    }

    def step(workspace="auto", h=hidden, w=weight):
        out = fused_gspo.fused_policy_loss(
            h, w, ids, adv, mask, old_logps=old, backend=args.backend, workspace_bytes=workspace
        )
        out.loss.backward()
        h.grad = w.grad = None

    def logprobs():
        with torch.no_grad():
            return fused_gspo.fused_logprobs(hidden, weight, ids, backend=args.backend)

    lean = args.lean_workspace
    _part(result, "step_ms", lambda: bench(step, dev))
    _part(result, "step_kernels", lambda: kernel_table(step, dev))
    _part(result, "step_host_gaps", lambda: host_gaps(step, dev))
    _part(result, "step_lean_workspace_ms", lambda: bench(lambda: step(lean), dev))
    _part(result, "step_lean_workspace_host_gaps", lambda: host_gaps(lambda: step(lean), dev))
    result["lean_workspace_bytes"] = lean
    _part(result, "logprobs_planned_ms", lambda: bench(logprobs, dev))
    _part(result, "logprobs_planned_kernels", lambda: kernel_table(logprobs, dev))
    _part(result, "logprobs_host_gaps", lambda: host_gaps(logprobs, dev))

    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()

    def autocast_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            step(h=h32, w=w32)

    _part(result, "step_autocast_fp32_weights_ms", lambda: bench(autocast_step, dev))

    flat_h, flat_ids = hidden.detach().reshape(n, hsz), ids.reshape(n)
    w = weight.detach()

    def fused():
        return triton_ops.TritonTileOps.fused_logprobs(flat_h, w, None, flat_ids, HeadParams())

    _part(result, "logprobs_fused_kernel_ms", lambda: bench(fused, dev))

    def floor():
        g = torch.randn(n, v, device=dev, generator=gen).bfloat16()
        floor = {
            "projection": bench(lambda: flat_h @ w.t(), dev),
            "dX": bench(lambda: g @ w, dev),
            "dW": bench(lambda: g.t() @ flat_h, dev),
        }
        floor["fwd_bwd"] = floor["projection"] + floor["dX"] + floor["dW"]
        return floor

    _part(result, "floor_ms", floor)

    def plan():
        predicted = {}
        for mode in ("fwd_bwd", "logprobs"):
            for budget in ("auto", lean):
                p = fused_gspo.explain(n, hsz, v, device="cuda" if dev.type == "cuda" else "cpu", mode=mode,
                                       workspace_bytes=budget, row_lengths=[t] * b)  # fmt: skip
                d = p.to_dict()
                key = f"{mode} workspace={budget}"
                keep = ("profile", "strategy", "num_chunks", "chunk_tokens", "workspace_bytes", "predicted_ms",
                        "floor_ms", "ratio")  # fmt: skip
                predicted[key] = {k: d[k] for k in keep}
        return predicted

    _part(result, "plan", plan)

    def measured_vs_predicted():
        out = {}
        floor_ms = result["floor_ms"]["fwd_bwd"]
        pairs = (("fwd_bwd workspace=auto", "step_ms"), (f"fwd_bwd workspace={lean}", "step_lean_workspace_ms"),
                 ("logprobs workspace=auto", "logprobs_planned_ms"))  # fmt: skip
        for key, measured in pairs:
            predicted = result["plan"][key]["predicted_ms"]
            ms = result[measured]
            floor = floor_ms if key.startswith("fwd_bwd") else result["floor_ms"]["projection"]
            out[key] = {"measured_ms": ms, "predicted_ms": predicted, "predicted_over_measured": predicted / ms,
                        "measured_over_floor": ms / floor, "measured_floor_ms": floor}  # fmt: skip
        return out

    _part(result, "measured_vs_predicted", measured_vs_predicted)

    def gemms():
        x = torch.randn(c, hsz, device=dev, generator=gen).bfloat16()
        tile = torch.empty(c, v, device=dev, dtype=torch.bfloat16)
        y32 = torch.empty(c, v, device=dev)
        g16 = torch.randn(c, v, device=dev, generator=gen).bfloat16()
        acc = torch.randn(v, hsz, device=dev, generator=gen)
        variants = {
            "projection bf16 out": lambda: torch.mm(x, w.t()),
            "projection into a bf16 tile (out=)": lambda: torch.mm(x, w.t(), out=tile),
            "projection fp32 out": lambda: torch.mm(x, w.t(), out_dtype=torch.float32, out=y32),
            "dX from the bf16 tile": lambda: torch.mm(g16, w),
            "dW bf16 out from the bf16 tile (one chunk)": lambda: torch.mm(g16.t(), x),
            "dW fp32 out from the bf16 tile": lambda: torch.mm(g16.t(), x, out_dtype=torch.float32),
            "dW addmm fp32 acc (several chunks)": lambda: torch.addmm(
                acc, g16.t(), x, out_dtype=torch.float32, out=acc
            ),
            "cast dW fp32->bf16": lambda: acc.to(torch.bfloat16),
        }
        flops = 2 * c * hsz * v
        out = {}
        for name, fn in variants.items():
            try:
                ms = bench(fn, dev)
                out[name] = {"ms": ms, "tflops": flops / ms / 1e9}
            except Exception as exc:  # noqa: BLE001  (e.g. no fp32-output bf16 GEMM on CPU)
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        return out

    _part(result, "gemms", gemms)

    print(json.dumps({k: result[k] for k in result if not k.endswith(("kernels", "gaps"))}, indent=1, default=str))
    for key in ("step_host_gaps", "step_lean_workspace_host_gaps", "logprobs_host_gaps"):
        gaps = result.get(key, {})
        print(f"== {key}: idle {gaps.get('idle_us')} us (every gap: {gaps.get('idle_all_us')} us) over a span of "
              f"{gaps.get('device_span_us')} us, {gaps.get('kernels')} kernels")  # fmt: skip
        for gap in gaps.get("largest_gaps", [])[:5]:
            print(f"   {gap['us']:8.1f} us  after {gap['after']}  before {gap['before']}")
        for where, count in list(gaps.get("syncs", {}).items())[:5]:
            print(f"   x{count} {where}")
    for key in ("step_kernels", "logprobs_planned_kernels"):
        rows = result.get(key)
        print(f"== {key}")
        for row in rows[:14] if isinstance(rows, list) else []:
            print(f"{row['ms_per_call']:8.3f} ms  x{row['launches_per_call']:<5g} {row['kernel']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    failed = [k for k, value in result.items() if isinstance(value, dict) and "error" in value]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
