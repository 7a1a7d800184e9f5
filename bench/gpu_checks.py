"""What to check first on a GPU, in one call: the machine's two ceilings, the mixed-dtype GEMMs the chunked backends
rely on, and the Triton kernels' registers and spills.

    python bench/gpu_checks.py --json $OUT/gpu-checks.json

1. Ceilings (METHOD: measure them once, on the machine): a device-to-device copy (bytes read + written) and a bf16
   GEMM at the LM head's shape, against the planner's profile for this GPU.
2. ``torch.mm(..., out_dtype=fp32)`` and ``torch.addmm(acc, a, b, out_dtype=fp32, out=acc)`` with bf16/fp16
   operands (run only on CUDA by ``chunked._project``/``_matmul_into``) against float64.
3. After a realistic single pass, ``n_regs``/``n_spills`` of every compiled Triton kernel.
Each check records an error instead of stopping the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
import triton
from triton.testing import do_bench

import fused_gspo
from fused_gspo.plan.devices import profile_for_device


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def ceilings(device: torch.device) -> dict:
    profile = profile_for_device(device)
    n_bytes = 2 * 2**30
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    m, k, n = 8192, 4096, 151_936
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    gemm_ms = do_bench(lambda: a @ b.t(), warmup=50, rep=300, return_mode="median")
    mm = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    square_ms = do_bench(lambda: mm @ mm, warmup=50, rep=300, return_mode="median")
    return {
        "device": torch.cuda.get_device_name(device),
        "profile": profile.name,
        "copy_gb_s": 2 * n_bytes / copy_ms / 1e6,
        "profile_bandwidth_gb_s": profile.bandwidth / 1e9,
        "profile_stream_bandwidth_gb_s": profile.stream_bandwidth / 1e9,
        "gemm_lm_head_bf16_ms": gemm_ms,
        "gemm_lm_head_bf16_tflops": 2 * m * k * n / gemm_ms / 1e9,
        "gemm_8192_bf16_tflops": 2 * 8192**3 / square_ms / 1e9,
        "profile_bf16_tflops": profile.gemm_flops("bf16") / 1e12,
    }


def mixed_gemms(device: torch.device) -> dict:
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(1024, 2048, device=device, dtype=dtype)
        b = torch.randn(2048, 4096, device=device, dtype=dtype)
        ref = a.double() @ b.double()
        mm = torch.empty(1024, 4096, device=device)
        torch.mm(a, b, out_dtype=torch.float32, out=mm)
        acc = torch.randn(1024, 4096, device=device)
        ref_acc = acc.double() + ref
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        name = str(dtype).removeprefix("torch.")
        out[f"mm_out_fp32_{name}_rel_err"] = _rel(mm, ref)
        out[f"addmm_inplace_fp32_{name}_rel_err"] = _rel(acc, ref_acc)
    out["ok"] = all(v < 1e-5 for k, v in out.items() if k.endswith("rel_err"))
    return out


def kernel_resources(device: torch.device) -> dict:
    n, hidden, vocab = 2048, 4096, 151_936
    h = torch.randn(n // 512, 512, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_()
    ids = torch.randint(0, vocab, (n // 512, 512), device=device)
    adv = torch.randn(n // 512, device=device)
    mask = torch.ones(n // 512, 512, device=device)
    for level in ("token", "sequence"):
        out = fused_gspo.fused_policy_loss(h, w, ids, adv, mask, backend="triton", importance_sampling_level=level)
        out.loss.backward()
    with torch.no_grad():
        fused_gspo.fused_logprobs(h, w, ids, backend="triton")
        # the fused matmul-epilogue kernel, which the planner no longer picks for the no-grad pass: called directly
        from fused_gspo.head import HeadParams
        from fused_gspo.triton_ops import TritonTileOps

        TritonTileOps.fused_logprobs(h.detach().reshape(n, hidden), w.detach(), None, ids.reshape(n), HeadParams())
    torch.cuda.synchronize(device)
    from fused_gspo.kernels import linear_logprob, logits_grad, logsumexp_stats, scale_cast

    report = {}
    for module in (linear_logprob, logits_grad, logsumexp_stats, scale_cast):
        for name, fn in vars(module).items():
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                for key, compiled in dev_cache[0].items():
                    compiled._init_handles()
                    report[f"{name}[{len(report)}]"] = {
                        "n_regs": compiled.n_regs,
                        "n_spills": compiled.n_spills,
                        "shared": compiled.metadata.shared,
                        "num_warps": compiled.metadata.num_warps,
                        "key": str(key)[:300],
                    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    failed = False
    for name, check in (("ceilings", ceilings), ("mixed_gemms", mixed_gemms), ("kernels", kernel_resources)):
        try:
            result[name] = check(device)
            failed |= result[name].get("ok") is False
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            failed = True
        print(f"== {name}\n{json.dumps(result[name], indent=1)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
