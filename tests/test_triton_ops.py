"""The Triton tile ops and kernels against the PyTorch tile ops evaluated in float64.

Without CUDA these run under the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``) at tiny shapes; the
interpreter's cost grows with block iterations, so the table's large interpreter blocks are used, plus a small-block
configuration that makes rows span several blocks and vocabulary splits. Buffers the kernels must fill are poisoned
with NaN (``launch_config.POISON_BUFFERS``), so an element left unwritten fails. ``@pytest.mark.gpu`` tests run
realistic shapes on a CUDA device.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import fused_gspo  # noqa: E402
from fused_gspo.head import HeadParams, TorchTileOps, full_logprobs  # noqa: E402
from fused_gspo.kernels import launch_config, linear_logprob, logits_grad, logsumexp_stats  # noqa: E402
from fused_gspo.triton_ops import TritonTileOps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

HEADS = [
    HeadParams(),
    HeadParams(temperature=0.7),
    HeadParams(logit_scale=1.7),
    HeadParams(temperature=1.3, logit_scale=0.6, softcap=2.5),
    HeadParams(temperature=0.9, softcap=30.0),
]
HEAD_IDS = ["plain", "temperature", "logit_scale", "softcap_small", "softcap_30"]

# (block_v, num_splits): None = the launch table; small blocks make rows span blocks and splits
BLOCKINGS = [(None, None), (64, 3), (128, 64)]


@pytest.fixture(autouse=True, scope="module")
def _poison_buffers():
    previous = launch_config.POISON_BUFFERS
    launch_config.POISON_BUFFERS = True
    yield
    launch_config.POISON_BUFFERS = previous


def _assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str, atol: float = 1e-7) -> None:
    """``||out - ref|| <= rtol * ||ref|| + atol * sqrt(numel)`` (the floor for an all-zero reference); NaN fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values (unwritten or NaN)"
    err = (out64 - ref64).norm().item()
    bound = rtol * ref64.norm().item() + atol * math.sqrt(max(ref64.numel(), 1))
    assert err <= bound, f"{what}: ||out - ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref64.norm().item():.3e})"


def _projection(n: int, vocab: int, seed: int, spread: float, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A nonzero float32 ``[n, V]`` projection (a view with row stride ``V + pad``) and targets hitting both ends."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * spread
    y = torch.where(y == 0, torch.full_like(y, 0.25), y).float()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[-1] = vocab - 1
    targets[0] = 0 if n > 1 else targets[0]
    buffer = torch.full((n, vocab + pad), 123.0, device=DEVICE)
    view = buffer[:, :vocab]
    view.copy_(y)
    return view, targets.to(DEVICE)


def _row_grads(n: int, seed: int, present: bool) -> torch.Tensor | None:
    if not present:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.where(g == 0, torch.full_like(g, 0.5), g).float().to(DEVICE)


shapes = dict(
    n=st.integers(1, 12),
    vocab=st.one_of(st.just(1), st.integers(2, 700)),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.5, 3.0, 12.0]),
)


# ----------------------------------------------------------------------------------------------------------------------
# forward: log-sum-exp, log-prob and entropy in one sweep


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@settings(max_examples=6)
@given(**shapes, pad=st.sampled_from([0, 3]))
@example(n=1, vocab=1, seed=0, spread=3.0, pad=0)
@example(n=12, vocab=700, seed=1, spread=12.0, pad=3)
def test_forward_matches_float64(head, n, vocab, seed, spread, pad):
    y, targets = _projection(n, vocab, seed, spread, pad)
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = TritonTileOps.forward(y, targets, head)
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert o.dtype == torch.float32
        _assert_close(o, r, 1e-5, name)


@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["table", "v64x3", "v128x64"])
@settings(max_examples=4)
@given(**shapes)
@example(n=5, vocab=700, seed=2, spread=3.0)
def test_split_stats_any_blocking(head, blocking, n, vocab, seed, spread):
    """Rows spanning several blocks and vocabulary splits, merged; outputs and partials poisoned."""
    block_v, num_splits = blocking
    y, targets = _projection(n, vocab, seed, spread)
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = logsumexp_stats.logsumexp_stats(
        y, targets, head.logit_scale, head.softcap, head.temperature, block_v=block_v, num_splits=num_splits
    )
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        _assert_close(o, r, 1e-5, name)


def test_vocab_splits_cover_the_vocabulary():
    for vocab in (1, 7, 64, 65, 700, 151_936, 262_144):
        for block in (64, 2048):
            for rows in (1, 3, 100_000):
                for requested in (None, 1, 5, 1000):
                    splits, size = launch_config.vocab_splits(rows, vocab, block, torch.device("cpu"), requested)
                    assert 1 <= splits <= launch_config.MAX_SPLITS
                    assert size % block == 0
                    assert (splits - 1) * size < vocab <= splits * size  # every split non-empty, all covered


# ----------------------------------------------------------------------------------------------------------------------
# backward: dL/dy in place


@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True), (False, False)], ids=lambda g: str(g))
@settings(max_examples=3)
@given(**shapes, pad=st.sampled_from([0, 3]))
@example(n=3, vocab=1, seed=0, spread=3.0, pad=0)
def test_backward_matches_float64(head, grads, n, vocab, seed, spread, pad):
    y, targets = _projection(n, vocab, seed, spread, pad)
    _, entropy64, lse64 = TorchTileOps.forward(y.double(), targets, head)
    g_logp, g_ent = _row_grads(n, seed, grads[0]), _row_grads(n, seed + 7, grads[1])
    ref = TorchTileOps.backward_(
        y.double().clone(),
        targets,
        lse64,
        entropy64,
        None if g_logp is None else g_logp.double(),
        None if g_ent is None else g_ent.double(),
        head,
    )
    base = y._base
    # one vocabulary entry (V = 1): the exact gradient is 0, float32 leaves p = 1 - O(eps * |z|)
    z_max = (y.abs().max() * abs(head.logit_scale) / head.temperature).item()
    g_max = max([1.0] + [g.abs().max().item() for g in (g_logp, g_ent) if g is not None])
    out = TritonTileOps.backward_(y, targets, lse64.float(), entropy64.float(), g_logp, g_ent, head)
    assert out.data_ptr() == y.data_ptr(), "backward_ must overwrite y in place"
    _assert_close(out, ref, 1e-5, "dL/dy", atol=4e-7 * (1 + z_max) * g_max)
    if pad:
        assert (base[:, vocab:] == 123.0).all(), "the kernel wrote past the row's vocabulary"


@pytest.mark.parametrize("block_v", [64, 256])
def test_backward_rows_spanning_blocks(block_v):
    head = HEADS[3]
    y, targets = _projection(4, 700, seed=5, spread=3.0)
    _, entropy64, lse64 = TorchTileOps.forward(y.double(), targets, head)
    g_logp, g_ent = _row_grads(4, 5, True), _row_grads(4, 9, True)
    ref = TorchTileOps.backward_(y.double().clone(), targets, lse64, entropy64, g_logp.double(), g_ent.double(), head)
    out = logits_grad.logits_grad_(
        y, targets, lse64.float(), entropy64.float(), g_logp, g_ent, head.logit_scale, head.softcap,
        head.temperature, block_v=block_v,
    )  # fmt: skip
    _assert_close(out, ref, 1e-5, "dL/dy")


def test_float64_and_empty_chunks_fall_back_or_pass_through():
    head = HEADS[3]
    y, targets = _projection(5, 37, seed=3, spread=3.0)
    y = y.double()
    for o, r in zip(TritonTileOps.forward(y, targets, head), TorchTileOps.forward(y, targets, head), strict=True):
        assert o.dtype == torch.float64
        _assert_close(o, r, 1e-12, "float64 fallback")
    _, entropy, lse = TorchTileOps.forward(y, targets, head)
    g = torch.linspace(-1, 1, 5, dtype=torch.float64, device=y.device)
    ref = TorchTileOps.backward_(y.clone(), targets, lse, entropy, g, g, head)
    _assert_close(TritonTileOps.backward_(y, targets, lse, entropy, g, g, head), ref, 1e-12, "float64 fallback")

    empty = torch.empty(0, 11, device=DEVICE)
    no_targets = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert all(t.shape == (0,) for t in TritonTileOps.forward(empty, no_targets, head))
    none = torch.empty(0, device=DEVICE)
    assert TritonTileOps.backward_(empty, no_targets, none, none, none, none, head).shape == (0, 11)


def test_lengths_are_runtime_arguments():
    """Only block sizes and feature flags are tl.constexpr: no recompilation per sequence length or vocabulary."""
    kernels = [
        logsumexp_stats._split_stats_kernel,
        logsumexp_stats.merge_stats_kernel,
        logits_grad._logits_grad_kernel,
        linear_logprob._linear_split_stats_kernel,
    ]
    for kernel in kernels:
        fn = getattr(kernel, "fn", kernel)
        for name, param in inspect.signature(fn).parameters.items():
            if param.annotation in (tl.constexpr, "tl.constexpr"):
                assert name.startswith(("BLOCK_", "HAS_", "DOT_", "NUM_STAGES")), (
                    f"{fn.__name__}: {name} is a constexpr"
                )


# The interpreter runs Python, not the compiler: a kernel can pass every test above and still not compile (a
# non-constexpr global, an unsupported construct). This compiles each kernel with its flags off and on, with the
# launch table's GPU blocks, for sm_90 (and the linear kernel's bf16 tiles for sm_80) through Triton's CUDA backend
# and ptxas -- no GPU needed.
_OFFLINE_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_gspo.kernels import launch_config, linear_logprob, logits_grad, logsumexp_stats

gpu = launch_config.LAUNCH_CONFIGS["gpu"]
ALIGNED = {"stride_row", "stride_xn", "stride_wv"}  # as Triton specializes multiples of 16 at launch


def build(kernel, types, consts, cfg, arch):
    sig = {name: ("constexpr" if name in consts else types(name)) for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
             if ty.startswith("*") or name in ALIGNED}
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3))
    triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def row_types(name):
    if name.endswith("_ptr"):
        return "*i64" if name == "targets_ptr" else "*fp32"
    return "fp32" if name.endswith("scale") else ("i64" if name.startswith("stride") else "i32")


def linear_types(dtype):
    def types(name):
        if name in ("x_ptr", "w_ptr", "b_ptr"):
            return "*" + dtype
        return row_types(name)
    return types


for flag in (False, True):
    cfg = gpu["logsumexp_stats"]
    build(logsumexp_stats._split_stats_kernel, row_types, dict(HAS_SOFTCAP=flag, BLOCK_V=cfg["BLOCK_V"]), cfg, 90)
cfg = gpu["merge_stats"]
build(logsumexp_stats.merge_stats_kernel, row_types, dict(BLOCK_R=cfg["BLOCK_R"], BLOCK_S=launch_config.MAX_SPLITS),
      cfg, 90)
cfg = gpu["logits_grad"]
for flag in (False, True):
    consts = dict(HAS_SOFTCAP=flag, HAS_GRAD_LOGP=flag, HAS_GRAD_ENTROPY=flag, BLOCK_V=cfg["BLOCK_V"])
    build(logits_grad._logits_grad_kernel, row_types, consts, cfg, 90)
for dtype, arch in (("bf16", 90), ("fp32", 90), ("bf16", 80)):  # sm_80: the 16-bit tiles' shared memory fits an A100
    cfg = gpu["linear_logprob_fp32" if dtype == "fp32" else "linear_logprob"]
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    precision = linear_logprob._DOT_PRECISION[getattr(linear_logprob.torch, torch_dtype)]
    consts = dict(HAS_BIAS=True, HAS_SOFTCAP=True, DOT_PRECISION=precision, DOT_IN_FP32=False,
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_H=cfg["BLOCK_H"], NUM_STAGES=cfg["num_stages"])
    build(linear_logprob._linear_split_stats_kernel, linear_types(dtype), consts, cfg, arch)
print("compiled")
"""


def test_kernels_compile_for_cuda_offline(tmp_path):
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    import triton  # noqa: PLC0415

    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels for real")
    if "nvidia" not in getattr(getattr(triton, "backends", None), "backends", {}):
        pytest.skip("this Triton has no CUDA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", _OFFLINE_COMPILE], env=env, capture_output=True, text=True)
    if run.returncode != 0 and ("ptxas" in run.stderr and "not found" in run.stderr.lower()):
        pytest.skip("ptxas is not available")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-4000:]


# ----------------------------------------------------------------------------------------------------------------------
# fused linear + log-prob (no grad): the logits tile never leaves the chip

LINEAR_BLOCKINGS = [dict(), dict(block_n=16, block_v=64, block_h=16, num_splits=3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocking", LINEAR_BLOCKINGS, ids=["table", "small"])
@settings(max_examples=4)
@given(
    n=st.integers(1, 16),
    hidden_size=st.integers(1, 40),
    vocab=st.one_of(st.just(1), st.integers(2, 300)),
    seed=st.integers(0, 2**31 - 1),
    head=st.sampled_from(HEADS),
    with_bias=st.booleans(),
)
@example(n=16, hidden_size=32, vocab=300, seed=0, head=HEADS[3], with_bias=True)
def test_linear_logprob_matches_float64(dtype, blocking, n, hidden_size, vocab, seed, head, with_bias):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, hidden_size, generator=gen) + 0.01).to(dtype).to(DEVICE)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5 + 0.01).to(dtype).to(DEVICE)
    bias = (torch.randn(vocab, generator=gen) + 0.01).to(dtype).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[-1] = vocab - 1
    targets = targets.to(DEVICE)
    ref_logp, ref_entropy = full_logprobs(
        hidden.double(), weight.double(), None if bias is None else bias.double(), targets, head
    )
    z = head.transform(hidden.double() @ weight.double().t() + (0 if bias is None else bias.double()))
    ref_lse = torch.logsumexp(z, dim=-1)
    out = linear_logprob.linear_logprob(
        hidden, weight, bias, targets, head.logit_scale, head.softcap, head.temperature, **blocking
    )
    for name, o, r in zip(("logp", "entropy", "lse"), out, (ref_logp, ref_entropy, ref_lse), strict=True):
        assert o.dtype == torch.float32
        _assert_close(o, r, 1e-5, name)


def test_fused_logprobs_tile_op_promotes_and_falls_back():
    head = HEADS[1]
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 24, generator=gen).bfloat16().to(DEVICE)
    weight = (torch.randn(130, 24, generator=gen) * 0.4).to(DEVICE)  # float32: promoted
    bias = torch.randn(130, generator=gen).to(DEVICE)
    targets = torch.randint(0, 130, (9,), generator=gen).to(DEVICE)
    ref = full_logprobs(hidden.double(), weight.double(), bias.double(), targets, head)
    logp, entropy, lse = TritonTileOps.fused_logprobs(hidden, weight, bias, targets, head)
    _assert_close(logp, ref[0], 1e-5, "logp")
    _assert_close(entropy, ref[1], 1e-5, "entropy")
    logp64, entropy64, _ = TritonTileOps.fused_logprobs(hidden.double(), weight.double(), bias, targets, head)
    assert logp64.dtype == torch.float64
    _assert_close(logp64, ref[0], 1e-12, "float64 logp")
    _assert_close(entropy64, ref[1], 1e-12, "float64 entropy")


# ----------------------------------------------------------------------------------------------------------------------
# end to end through the public API

E2E_CASES = {
    "dapo_token": dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01, temperature=0.8),
    "grpo_sequence": dict(
        loss_type="grpo", importance_sampling_level="sequence", final_logit_softcapping=6.0, logit_scale=1.3
    ),
    "dr_grpo_sequence_token_chunked": dict(
        loss_type="dr_grpo", importance_sampling_level="sequence_token", beta=0.04, workspace_bytes=4096
    ),
}


def _e2e_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    batch, length, hidden_size, vocab = 3, 6, 16, 257
    hidden = torch.randn(batch, length, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.4
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    ids[0, 0] = vocab - 1
    mask = torch.ones(batch, length)
    mask[1, 4:] = 0
    advantages = torch.randn(batch, generator=gen)
    return [t.to(DEVICE) for t in (hidden, weight, ids, advantages, mask)]


def _head_options(options: dict) -> dict:
    keys = ("temperature", "logit_scale", "final_logit_softcapping")
    return {key: options[key] for key in keys if key in options}


@pytest.mark.parametrize("case", list(E2E_CASES), ids=list(E2E_CASES))
def test_policy_loss_triton_matches_eager(case):
    options = dict(E2E_CASES[case])
    hidden, weight, ids, advantages, mask = _e2e_inputs(seed=len(case))
    with torch.no_grad():
        current = fused_gspo.fused_logprobs(hidden, weight, ids, backend="eager", **_head_options(options))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(current.shape, generator=gen).to(DEVICE)
    extra = {}
    if options.get("importance_sampling_level") != "token" or options.get("loss_type") == "grpo":
        extra["old_logps"] = current + 0.05 * noise  # ratios near 1: some clipped, most not
    if options.get("beta", 0.0):
        extra["ref_logps"] = current - 0.1 * noise.abs()

    results = {}
    for backend in ("triton", "eager"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = fused_gspo.fused_policy_loss(h, w, ids, advantages, mask, backend=backend, **extra, **options)
        out.loss.backward()
        results[backend] = (out.loss.detach(), h.grad, w.grad, out.logps, out.entropy)
    for name, t, e in zip(("loss", "d hidden", "d weight", "logps", "entropy"), *results.values(), strict=True):
        assert e.abs().sum() > 0, f"{name}: the reference is all zeros, the comparison would be vacuous"
        _assert_close(t, e, 1e-4, name)


def test_fused_logprobs_triton_matches_eager():
    hidden, weight, ids, _, _ = _e2e_inputs(seed=4)
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    options = dict(temperature=0.9, logit_scale=1.2, final_logit_softcapping=4.0, return_entropy=True)
    results = {}
    for backend in ("triton", "eager"):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        logp, entropy = fused_gspo.fused_logprobs(h, w, ids, bias=b, backend=backend, **options)
        (
            logp.sum() + 0.3 * (entropy * torch.linspace(-1, 1, entropy.numel(), device=DEVICE).view_as(entropy)).sum()
        ).backward()
        results[backend] = (logp.detach(), entropy.detach(), h.grad, w.grad, b.grad)
    for name, t, e in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), *results.values(), strict=True):
        _assert_close(t, e, 1e-4, name)


# ----------------------------------------------------------------------------------------------------------------------
# GPU test mode: realistic shapes


def _reference_rows(y, targets, head, rows):
    return TorchTileOps.forward(y[rows].double(), targets[rows], head)


@pytest.mark.gpu
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
def test_gpu_tile_ops_realistic(head):
    n, vocab = 4096, 151_936
    gen = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(n, vocab, device="cuda", generator=gen) * 4
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    targets[-1] = vocab - 1
    logp, entropy, lse = TritonTileOps.forward(y, targets, head)
    g_logp = torch.randn(n, device="cuda", generator=gen)
    g_ent = torch.randn(n, device="cuda", generator=gen)
    rows = torch.cat([torch.arange(0, 256), torch.arange(n - 256, n)]).cuda()
    ref = _reference_rows(y, targets, head, rows)
    for name, o, r in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref, strict=True):
        _assert_close(o[rows], r, 1e-5, name)
    ref_grad = TorchTileOps.backward_(
        y[rows].double(), targets[rows], ref[2], ref[1], g_logp[rows].double(), g_ent[rows].double(), head
    )
    TritonTileOps.backward_(y, targets, lse, entropy, g_logp, g_ent, head)
    _assert_close(y[rows], ref_grad, 1e-5, "dL/dy")


@pytest.mark.gpu
def test_gpu_int64_indexing_past_2_31_elements():
    n, vocab = 16_384, 151_936  # n * V = 2.49e9 > 2^31
    head = HEADS[1]
    y = torch.randn(n, vocab, device="cuda") * 3
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[-1] = vocab - 1
    logp, entropy, lse = TritonTileOps.forward(y, targets, head)
    rows = torch.arange(n - 64, n, device="cuda")
    ref = _reference_rows(y, targets, head, rows)
    _assert_close(logp[rows], ref[0], 1e-5, "logp")
    _assert_close(entropy[rows], ref[1], 1e-5, "entropy")
    g = torch.ones(n, device="cuda")
    ref_grad = TorchTileOps.backward_(y[rows].double(), targets[rows], ref[2], ref[1], g[rows].double(), None, head)
    TritonTileOps.backward_(y, targets, lse, entropy, g, None, head)
    _assert_close(y[rows], ref_grad, 1e-5, "dL/dy")


@pytest.mark.gpu
def test_gpu_linear_logprob_realistic():
    n, hidden_size, vocab = 4096, 4096, 151_936
    head = HEADS[3]
    hidden = torch.randn(n, hidden_size, device="cuda").bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.02).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    logp, entropy, lse = TritonTileOps.fused_logprobs(hidden, weight, None, targets, head)
    rows = slice(n - 512, n)
    y = torch.mm(hidden[rows], weight.t(), out_dtype=torch.float32)
    ref = TorchTileOps.forward(y.double(), targets[rows], head)
    for name, o, r in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref, strict=True):
        _assert_close(o[rows], r, 1e-4, name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["dapo_token", "grpo_sequence"])
def test_gpu_policy_loss_realistic(case):
    batch, length, hidden_size, vocab = 8, 512, 2048, 151_936
    options = dict(E2E_CASES[case])
    hidden = torch.randn(batch, length, hidden_size, device="cuda").bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.02).bfloat16()
    ids = torch.randint(0, vocab, (batch, length), device="cuda")
    mask = (torch.rand(batch, length, device="cuda") < 0.9).float()
    advantages = torch.randn(batch, device="cuda")
    extra = {}
    if case == "grpo_sequence":
        with torch.no_grad():
            current = fused_gspo.fused_logprobs(hidden, weight, ids, backend="torch", **_head_options(options))
        extra["old_logps"] = current.float() + 0.05 * torch.randn_like(current.float())
    results = {}
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        out = fused_gspo.fused_policy_loss(h, w, ids, advantages, mask, backend=backend, **extra, **options)
        out.loss.backward()
        results[backend] = (out.loss.detach(), h.grad, w.grad)
    for name, t, e in zip(("loss", "d hidden", "d weight"), *results.values(), strict=True):
        _assert_close(t, e, 1e-2, name)
