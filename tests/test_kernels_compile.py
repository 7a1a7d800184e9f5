"""Every kernel compiled for CUDA offline (Triton's CUDA backend and ptxas, no GPU needed).

The interpreter runs Python, not the compiler: a kernel can pass every other test and still not compile (a
non-constexpr global, an unsupported construct, mismatched types across a constexpr branch). This compiles each
kernel with its flags off and on and the launch table's GPU blocks for sm_90 (and the linear kernel's tiles for sm_80,
whose shared memory is smaller), including the variants a GPU actually runs:

- ``logits_grad``: the fp32 in-place variant and the 16-bit one over the first half of each fp32 row
  (``NARROW_IN_PLACE``, a ``*bf16`` / ``*fp16`` ``g_ptr``, hardware rounding), which must keep its barrier between
  load and store and round to nearest (``cvt.rn``);
- ``linear_logprob``: at launch Triton specializes integer arguments equal to 1 as constants (and marks multiples of
  16 as such), so contiguous inputs run a variant where ``stride_xh`` and ``stride_wh`` are the constant 1: built
  here with ``ASTSource`` constants, next to the general-stride build.

Where ``cuobjdump`` is at hand, no build may spill registers to local memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

# Runs in a fresh interpreter with TRITON_INTERPRET=0: argv[1] picks half of the builds (two processes share the work)
_OFFLINE_COMPILE = r"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_gspo.kernels import launch_config, linear_logprob, logits_grad, logsumexp_stats, scale_cast

gpu = launch_config.LAUNCH_CONFIGS["gpu"]
# integer arguments marked divisible by 16, as Triton specializes multiples of 16 at launch (row strides of V =
# 151,936 or H = 4,096, such sizes themselves, splits of whole blocks)
ALIGNED = {"stride_row", "stride_xn", "stride_wv", "stride_y_row", "stride_g_row"}
ALIGNED_SIZES = ALIGNED | {"hidden_size", "vocab", "split_size"}


def _cuobjdump():
    from triton.backends.nvidia import compiler as nvidia

    bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


CUOBJDUMP = _cuobjdump()
builds = []


def build(what, kernel, types, consts, cfg, arch, aligned=ALIGNED):
    sig = {name: ("constexpr" if name in consts else types(name)) for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name in aligned}
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    if CUOBJDUMP is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
        local = re.search(r"LOCAL:(\d+)", usage.stdout)
        assert local is not None, usage.stdout + usage.stderr
        assert int(local.group(1)) == 0, f"{what}: spills ({usage.stdout.strip()})"
    builds.append(what)
    return compiled


def row_types(name):
    if name.endswith("_ptr"):
        return "*i64" if name == "targets_ptr" else "*fp32"
    return "fp32" if name.endswith("scale") else ("i64" if name.startswith("stride") else "i32")


def grad_types(g_dtype, strides="i64"):
    def types(name):
        if name == "g_ptr":
            return "*" + g_dtype
        return strides if name.startswith("stride") else row_types(name)
    return types


def linear_types(dtype, strides="i64"):
    def types(name):
        if name in ("x_ptr", "w_ptr", "b_ptr"):
            return "*" + dtype
        if name.startswith("stride"):
            return strides
        return row_types(name)
    return types


def stats_builds():
    for flag in (False, True):
        for extra in (False, True):  # the extra statistics of the preference losses
            cfg = gpu["logsumexp_stats"]
            consts = dict(HAS_SOFTCAP=flag, EXTRA=extra, BLOCK_V=cfg["BLOCK_V"])
            what = f"split_stats softcap={flag} extra={extra}"
            build(what, logsumexp_stats._split_stats_kernel, row_types, consts, cfg, 90)
    cfg = gpu["merge_stats"]
    for extra in (False, True):
        consts = dict(EXTRA=extra, BLOCK_R=cfg["BLOCK_R"], BLOCK_S=launch_config.MAX_SPLITS)
        build(f"merge_stats extra={extra}", logsumexp_stats.merge_stats_kernel, row_types, consts, cfg, 90)


def grad_builds():
    cfg = gpu["logits_grad"]
    for g_dtype in ("fp32", "bf16", "fp16"):
        narrow = g_dtype != "fp32"
        for flag in (False, True):
            consts = dict(HAS_SOFTCAP=flag, HAS_GRAD_LOGP=flag, HAS_GRAD_ENTROPY=flag, NARROW_IN_PLACE=narrow,
                          SOFTWARE_BF16_ROUNDING=False, BLOCK_V=cfg["BLOCK_V"])
            what = f"logits_grad {g_dtype} flags={flag}"
            if flag:  # as launched for V = 151,936: i32 strides, V and both row strides multiples of 16
                types, aligned = grad_types(g_dtype, "i32"), ALIGNED_SIZES
            else:
                types, aligned = grad_types(g_dtype), ALIGNED
            ptx = build(what, logits_grad._logits_grad_kernel, types, consts, cfg, 90, aligned).asm["ptx"]
            if narrow and flag:
                # the row is overwritten as it is read: every thread's load of a block before any thread's store
                assert re.search(r"\bbar(rier)?\.sync", ptx), f"{what}: no barrier between load and store"
                assert re.search(r"cvt\.rn\.(bf16|f16)", ptx), f"{what}: not rounded to nearest"


def scale_cast_builds():
    cfg = gpu["scale_cast"]
    for out in ("bf16", "fp16"):
        def types(name, out=out):
            return {"acc_ptr": "*fp32", "out_ptr": "*" + out, "scale_ptr": "*fp32"}.get(name, "i32")
        consts = dict(SOFTWARE_BF16_ROUNDING=False, BLOCK_SIZE=cfg["BLOCK_SIZE"])
        ptx = build(f"scale_cast {out}", scale_cast._scale_cast_kernel, types, consts, cfg, 90).asm["ptx"]
        assert re.search(r"cvt\.rn\.(bf16|f16)", ptx), f"scale_cast {out}: not rounded to nearest"


def linear_builds(unit_strides):
    for dtype, arch in (("bf16", 90), ("fp16", 90), ("fp32", 90), ("bf16", 80)):
        if dtype == "fp16" and not unit_strides:
            continue
        cfg = gpu["linear_logprob_fp32" if dtype == "fp32" else "linear_logprob"]
        torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
        precision = linear_logprob._DOT_PRECISION[getattr(linear_logprob.torch, torch_dtype)]
        consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, DOT_PRECISION=precision, DOT_IN_FP32=False,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"],
                      NUM_STAGES=cfg["num_stages"])
        what = f"linear_logprob {dtype} sm_{arch}"
        if unit_strides:
            # contiguous hidden [N, H] and weight [V, H]: what the launcher compiles (ints below 2^31 are i32)
            consts.update(stride_xh=1, stride_wh=1)
            build(what + " unit strides", linear_logprob._linear_split_stats_kernel, linear_types(dtype, "i32"),
                  consts, cfg, arch, aligned=ALIGNED_SIZES)
        else:
            build(what, linear_logprob._linear_split_stats_kernel, linear_types(dtype), consts, cfg, arch)


if sys.argv[1] == "0":
    stats_builds()
    grad_builds()
    scale_cast_builds()
    linear_builds(unit_strides=False)
else:
    linear_builds(unit_strides=True)
print("compiled:", ", ".join(builds))
"""


def _ptxas_available() -> bool:
    """Triton's own lookup (``TRITON_PTXAS_PATH``, then the copy bundled with the wheel); Triton 3.9 raises
    ``RuntimeError("Cannot find ptxas")`` without one."""
    from triton import knobs  # noqa: PLC0415

    try:
        knobs.nvidia.ptxas  # noqa: B018
    except RuntimeError:
        return False
    except AttributeError:  # another Triton layout: the compile's own error tells
        pass
    return True


def test_kernels_compile_for_cuda_offline(tmp_path):
    import triton  # noqa: PLC0415

    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels for real")
    if "nvidia" not in getattr(getattr(triton, "backends", None), "backends", {}):
        pytest.skip("this Triton has no CUDA backend")
    if not _ptxas_available():
        pytest.skip("ptxas is not available")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    # the two halves in parallel (compiling is single-threaded)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _OFFLINE_COMPILE, half],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half in ("0", "1")
    ]
    results = [(run, *run.communicate()) for run in runs]
    for run, _, stderr in results:
        if run.returncode != 0 and re.search(r"cannot find ptxas|ptxas.*not found", stderr, re.IGNORECASE):
            pytest.skip("ptxas is not available")
    for run, stdout, stderr in results:
        assert run.returncode == 0 and "compiled" in stdout, stderr[-4000:]
    built = ", ".join(stdout for _, stdout, _ in results)
    for expected in (
        "logits_grad bf16 flags=True",
        "logits_grad fp16 flags=True",
        "logits_grad fp32 flags=False",
        "linear_logprob bf16 sm_90 unit strides",
        "linear_logprob bf16 sm_80 unit strides",
        "merge_stats",
        "scale_cast bf16",
    ):
        assert expected in built, built
