"""``TritonTileOps`` (the ``"triton"`` backend's tile ops) against the PyTorch tile ops evaluated in float64, and the
backend end to end through the public API.

The kernels themselves are tested module by module in ``tests/test_kernels_*.py``; here: what the class adds (the
gradient's dtype and layout, float64 and empty-chunk fallbacks, argument checks) and the contract the chunked driver
relies on (:class:`fused_gspo.tile_ops.TileOps`). Without CUDA these run under the Triton interpreter (conftest sets
``TRITON_INTERPRET=1``) at tiny shapes; buffers the kernels must fill are poisoned with NaN. ``@pytest.mark.gpu``
tests run realistic shapes on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HEAD_IDS, HEADS, assert_close, projection, row_grads, tile_shapes
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import fused_gspo  # noqa: E402
from fused_gspo import triton_ops  # noqa: E402
from fused_gspo.head import TorchTileOps, full_logprobs  # noqa: E402
from fused_gspo.kernels import logits_grad  # noqa: E402
from fused_gspo.tile_ops import TileOps, stats_dtype_for  # noqa: E402
from fused_gspo.triton_ops import TritonTileOps  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_buffers")

# dL/dy in bf16 / fp16: each element rounded to nearest (relative error at most the unit roundoff) on top of the fp32
# error; fp16's subnormals (below 2^-14) are rounded to a multiple of 2^-24 instead
NARROW_TOLERANCE = {torch.bfloat16: (2.0**-8, 0.0), torch.float16: (2.0**-11, 2.0**-25)}


def test_implements_the_tile_ops_contract():
    assert isinstance(TritonTileOps, TileOps)
    assert TritonTileOps.name == "triton" and TritonTileOps.temporaries == 0
    assert callable(TritonTileOps.fused_logprobs)


# ----------------------------------------------------------------------------------------------------------------------
# forward: log-sum-exp, log-prob and entropy in one sweep


# every head transform, through the class (the kernels' blockings: tests/test_kernels_logsumexp_stats.py)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@settings(max_examples=3)
# the tile shapes of conftest, rows padded (row stride V + 3) or not
@given(**tile_shapes, pad=st.sampled_from([0, 3]))
# one vocabulary entry: lse = z, logp = 0, entropy = 0
@example(n=1, vocab=1, seed=0, spread=3.0, pad=0)
# the largest tile, padded rows, peaked logits
@example(n=12, vocab=700, seed=1, spread=12.0, pad=3)
def test_forward_matches_float64(head, n, vocab, seed, spread, pad):
    y, targets = projection(n, vocab, seed, spread, pad)
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = TritonTileOps.forward(y, targets, head)
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert o.dtype == torch.float32
        assert_close(o, r, 1e-5, name)


# every head transform; float32 tiles through the kernels, float64 ones through the PyTorch fallback
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_statistics_match_the_torch_ops(head, dtype):
    y, targets = projection(9, 300, seed=3, spread=4.0, pad=3)
    y = y.to(dtype)
    got = TritonTileOps.statistics(y, targets, head)
    want = TorchTileOps.statistics(y.double(), targets, head)
    for name in ("logp", "entropy", "lse", "log_sum_sq_probs", "mean_logit"):
        assert_close(getattr(got, name), getattr(want, name), 1e-5 if dtype == torch.float32 else 1e-12, name)
    assert torch.equal(got.is_top1.cpu(), want.is_top1.cpu())


def test_forward_takes_any_tile_layout_and_checks_shapes():
    """A tile without unit column stride is copied (the forward leaves y alone); shapes are checked."""
    head = HEADS[3]
    y, targets = projection(5, 37, seed=8, spread=3.0)
    transposed = torch.empty(37, 5, device=DEVICE).t()
    transposed.copy_(y)
    ref = TorchTileOps.forward(y.double(), targets, head)
    for name, o, r in zip(
        ("logp", "entropy", "lse"), TritonTileOps.forward(transposed, targets, head), ref, strict=True
    ):
        assert_close(o, r, 1e-5, name)
    assert torch.equal(transposed, y)
    with pytest.raises(ValueError, match=r"\[n, V\]"):
        TritonTileOps.forward(y, targets[:-1], head)
    with pytest.raises(ValueError, match=r"\[n, V\]"):
        TritonTileOps.forward(y[0], targets[:1], head)


# ----------------------------------------------------------------------------------------------------------------------
# backward: dL/dy over the tile, in its own dtype or in bf16/fp16


def _backward_case(head, grads, n, vocab, seed, spread, pad):
    """The tile, its targets, float64 statistics and upstream gradients, the float64 reference gradient, and the atol
    that covers float32's ``p = 1 - O(eps |z|)`` where the exact gradient is 0 (one vocabulary entry)."""
    y, targets = projection(n, vocab, seed, spread, pad)
    _, entropy64, lse64 = TorchTileOps.forward(y.double(), targets, head)
    g_logp, g_ent = row_grads(n, seed, grads[0]), row_grads(n, seed + 7, grads[1])
    ref = TorchTileOps.backward_(
        y.double().clone(),
        targets,
        lse64,
        entropy64,
        None if g_logp is None else g_logp.double(),
        None if g_ent is None else g_ent.double(),
        head,
    )
    z_max = (y.abs().max() * abs(head.logit_scale) / head.temperature).item()
    g_max = max([1.0] + [g.abs().max().item() for g in (g_logp, g_ent) if g is not None])
    args = (targets, lse64.float(), entropy64.float(), g_logp, g_ent, head)
    return y, args, ref, 4e-7 * (1 + z_max) * g_max


# every head transform (the softcap's sech^2 factor among them)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
# each upstream term alone, both, and neither (an all-zero gradient)
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True), (False, False)], ids=lambda g: str(g))
@settings(max_examples=3)
# the tile shapes of conftest, rows padded (the kernel must not write into the padding) or not
@given(**tile_shapes, pad=st.sampled_from([0, 3]))
# one vocabulary entry (V = 1): the exact gradient is 0, float32 leaves p = 1 - O(eps * |z|)
@example(n=3, vocab=1, seed=0, spread=3.0, pad=0)
def test_backward_matches_float64(head, grads, n, vocab, seed, spread, pad):
    y, args, ref, atol = _backward_case(head, grads, n, vocab, seed, spread, pad)
    base = y._base
    out = TritonTileOps.backward_(y, *args)
    assert out.data_ptr() == y.data_ptr(), "backward_ must overwrite y in place"
    assert out.dtype == torch.float32 and out.stride() == y.stride()
    assert_close(out, ref, 1e-5, "dL/dy", atol=atol)
    if pad:
        assert (base[:, vocab:] == 123.0).all(), "the kernel wrote past the row's vocabulary"


# both 16-bit gradient dtypes (bf16 rounded in software under the interpreter)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# every head transform
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
# fp16: lanes past the vocabulary (masked, never stored) hold exp(-lse), which NumPy may overflow casting to fp16
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@settings(max_examples=3)
# the tile shapes of conftest, padded or not, with at least one upstream term drawn
@given(**tile_shapes, pad=st.sampled_from([0, 3]), grads=st.sampled_from([(True, True), (True, False), (False, True)]))
# one vocabulary entry: a [n, 1] view with row stride 2
@example(n=3, vocab=1, seed=0, spread=3.0, pad=0, grads=(True, True))
# padded rows of odd length: row r of the view starts at 16-bit element 2r(V + 3)
@example(n=12, vocab=699, seed=1, spread=12.0, pad=3, grads=(True, True))
def test_backward_narrow_matches_float64(grad_dtype, head, n, vocab, seed, spread, pad, grads):
    y, args, ref, atol = _backward_case(head, grads, n, vocab, seed, spread, pad)
    base = y._base
    out = TritonTileOps.backward_(y, *args, grad_dtype=grad_dtype)
    assert out.dtype == grad_dtype and out.shape == (n, vocab)
    assert out.data_ptr() == y.data_ptr() and out.stride() == (2 * (vocab + pad), 1), "not the view over y's rows"
    rtol, subnormal = NARROW_TOLERANCE[grad_dtype]
    assert_close(out, ref, 1e-5 + rtol, f"{grad_dtype} dL/dy", atol=atol + subnormal)
    if pad:
        assert (base[:, vocab:] == 123.0).all(), "the kernel wrote past the row's vocabulary"


# every compute dtype: the dtype grad_dtype names is the dtype backward_ writes, over the tile's storage
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_grad_dtype_is_what_backward_writes(compute_dtype):
    expected = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}.get(compute_dtype)
    grad_dtype = TritonTileOps.grad_dtype(compute_dtype)
    assert grad_dtype == (expected or stats_dtype_for(compute_dtype))
    head = HEADS[3]
    stats_dtype = stats_dtype_for(compute_dtype)
    y, targets = projection(4, 50, seed=2, spread=3.0)
    y = y.to(stats_dtype)
    _, entropy, lse = TorchTileOps.forward(y.double(), targets, head)
    g = torch.linspace(-1, 1, 4, dtype=torch.float64, device=DEVICE)
    ref = TorchTileOps.backward_(y.double().clone(), targets, lse, entropy, g, g, head)
    stats = [t.to(stats_dtype) for t in (lse, entropy, g, g)]
    out = TritonTileOps.backward_(y, targets, *stats[:2], stats[2], stats[3], head, grad_dtype)
    assert out.dtype == grad_dtype and out.shape == y.shape and out.data_ptr() == y.data_ptr()
    rtol, subnormal = NARROW_TOLERANCE.get(grad_dtype, (0.0, 0.0))
    assert_close(out, ref, 1e-5 + rtol, "dL/dy", atol=1e-7 + subnormal)


def test_backward_refuses_what_it_cannot_write():
    head = HEADS[0]
    y, targets = projection(3, 20, seed=4, spread=1.0)
    _, entropy, lse = TorchTileOps.forward(y.double(), targets, head)
    g = torch.ones(3, dtype=torch.float64, device=DEVICE)
    y64 = y.double()
    # a float64 tile is written in float64 only (the fallback has no 16-bit path)
    for grad_dtype in (torch.bfloat16, torch.float16, torch.float32):
        with pytest.raises(ValueError, match="float64"):
            TritonTileOps.backward_(y64, targets, lse, entropy, g, g, head, grad_dtype)
    # a float32 tile is not written in float64
    with pytest.raises(ValueError, match="out_dtype"):
        TritonTileOps.backward_(y, targets, lse.float(), entropy.float(), g.float(), None, head, torch.float64)
    # no unit column stride: refused before anything is written (the driver's workspace rows always have one)
    transposed = torch.empty(20, 3, device=DEVICE).t()
    transposed.copy_(y)
    for grad_dtype in (None, torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="unit column stride"):
            TritonTileOps.backward_(
                transposed, targets, lse.float(), entropy.float(), g.float(), None, head, grad_dtype
            )
        assert torch.equal(transposed, y)


def test_float64_and_empty_chunks_fall_back_or_pass_through():
    head = HEADS[3]
    y, targets = projection(5, 37, seed=3, spread=3.0)
    y = y.double()
    for o, r in zip(TritonTileOps.forward(y, targets, head), TorchTileOps.forward(y, targets, head), strict=True):
        assert o.dtype == torch.float64
        assert_close(o, r, 1e-12, "float64 fallback")
    _, entropy, lse = TorchTileOps.forward(y, targets, head)
    g = torch.linspace(-1, 1, 5, dtype=torch.float64, device=y.device)
    ref = TorchTileOps.backward_(y.clone(), targets, lse, entropy, g, g, head)
    out = TritonTileOps.backward_(y, targets, lse, entropy, g, g, head)
    assert out.data_ptr() == y.data_ptr() and out.dtype == torch.float64
    assert_close(out, ref, 1e-12, "float64 fallback")
    out = TritonTileOps.backward_(y.clone(), targets, lse, entropy, g, None, head, torch.float64)
    ref = TorchTileOps.backward_(y.clone(), targets, lse, entropy, g, None, head)
    assert_close(out, ref, 1e-12, "float64 fallback, no entropy term")

    empty = torch.empty(0, 11, device=DEVICE)
    no_targets = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert all(t.shape == (0,) for t in TritonTileOps.forward(empty, no_targets, head))
    assert all(t.shape == (0,) for t in TritonTileOps.forward(empty.double(), no_targets, head))
    none = torch.empty(0, device=DEVICE)
    assert TritonTileOps.backward_(empty, no_targets, none, none, none, none, head).shape == (0, 11)
    for grad_dtype in (torch.bfloat16, torch.float16):
        out = TritonTileOps.backward_(empty, no_targets, none, none, none, none, head, grad_dtype)
        assert out.shape == (0, 11) and out.dtype == grad_dtype


# ----------------------------------------------------------------------------------------------------------------------
# fused linear + log-prob (no grad): the kernel is tested in tests/test_kernels_linear_logprob.py


def test_fused_logprobs_tile_op_promotes_and_falls_back():
    head = HEADS[1]
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 24, generator=gen).bfloat16().to(DEVICE)
    weight = (torch.randn(130, 24, generator=gen) * 0.4).to(DEVICE)  # float32: promoted
    bias = torch.randn(130, generator=gen).to(DEVICE)
    targets = torch.randint(0, 130, (9,), generator=gen).to(DEVICE)
    ref = full_logprobs(hidden.double(), weight.double(), bias.double(), targets, head)
    logp, entropy, lse = TritonTileOps.fused_logprobs(hidden, weight, bias, targets, head)
    assert_close(logp, ref[0], 1e-5, "logp")
    assert_close(entropy, ref[1], 1e-5, "entropy")
    logp64, entropy64, _ = TritonTileOps.fused_logprobs(hidden.double(), weight.double(), bias, targets, head)
    assert logp64.dtype == torch.float64
    assert_close(logp64, ref[0], 1e-12, "float64 logp")
    assert_close(entropy64, ref[1], 1e-12, "float64 entropy")
    with pytest.raises(ValueError, match="hidden must be"):
        TritonTileOps.fused_logprobs(hidden, weight[:, :5], bias, targets, head)
    with pytest.raises(ValueError, match="targets must be"):
        TritonTileOps.fused_logprobs(hidden, weight, bias, targets[:3], head)


# ----------------------------------------------------------------------------------------------------------------------
# end to end through the public API

# the single pass (token-level DAPO, entropy bonus, temperature); two phases for a sequence-level ratio (softcap,
# scale); several chunks of a small workspace (a 10,000-byte budget) with a KL term
E2E_CASES = {
    "dapo_token": dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01, temperature=0.8),
    "grpo_sequence": dict(
        loss_type="grpo", importance_sampling_level="sequence", final_logit_softcapping=6.0, logit_scale=1.3
    ),
    "dr_grpo_sequence_token_chunked": dict(
        loss_type="dr_grpo", importance_sampling_level="sequence_token", beta=0.04, workspace_bytes=10_000
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


def _policy_extra(options: dict, hidden, weight, ids) -> dict:
    """old/ref log-probs near the current ones: ratios near 1, some clipped, most not."""
    with torch.no_grad():
        current = fused_gspo.fused_logprobs(hidden, weight, ids, backend="eager", **_head_options(options)).float()
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(current.shape, generator=gen).to(DEVICE)
    extra = {}
    if options.get("importance_sampling_level") != "token" or options.get("loss_type") == "grpo":
        extra["old_logps"] = current + 0.05 * noise
    if options.get("beta", 0.0):
        extra["ref_logps"] = current - 0.1 * noise.abs()
    return extra


def _policy_run(backend, hidden, weight, ids, advantages, mask, extra, options):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_gspo.fused_policy_loss(h, w, ids, advantages, mask, backend=backend, **extra, **options)
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad, out.logps, out.entropy


# every case of E2E_CASES, float32 inputs, against the eager reference (full logits, autograd)
@pytest.mark.parametrize("case", list(E2E_CASES), ids=list(E2E_CASES))
def test_policy_loss_triton_matches_eager(case):
    options = dict(E2E_CASES[case])
    hidden, weight, ids, advantages, mask = _e2e_inputs(seed=len(case))
    extra = _policy_extra(options, hidden, weight, ids)
    results = {
        backend: _policy_run(backend, hidden, weight, ids, advantages, mask, extra, options)
        for backend in ("triton", "eager")
    }
    for name, t, e in zip(("loss", "d hidden", "d weight", "logps", "entropy"), *results.values(), strict=True):
        assert e.abs().sum() > 0, f"{name}: the reference is all zeros, the comparison would be vacuous"
        assert_close(t, e, 1e-4, name)


# bf16 inputs: both backends stage the logits in bf16 and write dL/dy in place over them (the triton kernel, and the
# torch ops from a float32 copy); the single pass and several chunks of a small workspace
@pytest.mark.parametrize("case", ["dapo_token", "dr_grpo_sequence_token_chunked"])
def test_policy_loss_bf16_gradient_through_the_driver(monkeypatch, case):
    written = []

    def spy(*args, **kwargs):
        written.append(kwargs.get("out_dtype"))
        return logits_grad.logits_grad_(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "logits_grad_", spy)
    options = dict(E2E_CASES[case])
    hidden, weight, ids, advantages, mask = (t.bfloat16() if t.is_floating_point() else t for t in _e2e_inputs(7))
    extra = _policy_extra(options, hidden, weight, ids)
    results = {
        backend: _policy_run(backend, hidden, weight, ids, advantages, mask, extra, options)
        for backend in ("triton", "torch")
    }
    assert written and set(written) == {torch.bfloat16}, f"the triton backend wrote dL/dy in {set(written)}"
    assert results["triton"][1].dtype == torch.bfloat16 and results["triton"][2].dtype == torch.bfloat16
    for name, t, e, rtol in zip(
        ("loss", "d hidden", "d weight", "logps", "entropy"),
        *results.values(),
        (1e-4, 1e-2, 1e-2, 1e-4, 1e-4),
        strict=True,
    ):
        assert e.abs().sum() > 0, f"{name}: the reference is all zeros, the comparison would be vacuous"
        assert_close(t, e, rtol, name)


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
        assert_close(t, e, 1e-4, name)


# ----------------------------------------------------------------------------------------------------------------------
# GPU test mode: realistic shapes


def _reference_rows(y, targets, head, rows):
    return TorchTileOps.forward(y[rows].double(), targets[rows], head)


def _grad_tolerance(grad_dtype) -> tuple[float, float]:
    rtol, subnormal = NARROW_TOLERANCE.get(grad_dtype, (0.0, 0.0))
    return 1e-5 + rtol, 1e-7 + subnormal


@pytest.mark.gpu
# without and with the softcap
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
# dL/dy in place in fp32, and in bf16 over the first half of each row
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grad", "bf16_grad"])
def test_gpu_tile_ops_realistic(head, grad_dtype):
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
        assert_close(o[rows], r, 1e-5, name)
    ref_grad = TorchTileOps.backward_(
        y[rows].double(), targets[rows], ref[2], ref[1], g_logp[rows].double(), g_ent[rows].double(), head
    )
    grad = TritonTileOps.backward_(y, targets, lse, entropy, g_logp, g_ent, head, grad_dtype)
    assert grad.dtype == grad_dtype and grad.data_ptr() == y.data_ptr()
    rtol, atol = _grad_tolerance(grad_dtype)
    assert_close(grad[rows], ref_grad, rtol, "dL/dy", atol=atol)


@pytest.mark.gpu
# the fp32 in-place gradient, and the bf16 view (row offsets of 2V 16-bit elements)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grad", "bf16_grad"])
def test_gpu_int64_indexing_past_2_31_elements(grad_dtype):
    n, vocab = 16_384, 151_936  # n * V = 2.49e9 > 2^31 (and 2 n V 16-bit elements in the narrow view)
    head = HEADS[1]
    y = torch.randn(n, vocab, device="cuda") * 3
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[-1] = vocab - 1
    logp, entropy, lse = TritonTileOps.forward(y, targets, head)
    rows = torch.arange(n - 64, n, device="cuda")
    ref = _reference_rows(y, targets, head, rows)
    assert_close(logp[rows], ref[0], 1e-5, "logp")
    assert_close(entropy[rows], ref[1], 1e-5, "entropy")
    g = torch.ones(n, device="cuda")
    ref_grad = TorchTileOps.backward_(y[rows].double(), targets[rows], ref[2], ref[1], g[rows].double(), None, head)
    grad = TritonTileOps.backward_(y, targets, lse, entropy, g, None, head, grad_dtype)
    rtol, atol = _grad_tolerance(grad_dtype)
    assert_close(grad[rows], ref_grad, rtol, "dL/dy", atol=atol)


@pytest.mark.gpu
# both 16-bit gradient dtypes (cvt.rn.bf16 / cvt.rn.f16 on the GPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_narrow_grad_is_the_float32_grad_rounded(dtype):
    """The hardware's round-to-nearest-even conversion, bit for bit against PyTorch's."""
    n, vocab = 512, 151_936
    head = HEADS[3]
    gen = torch.Generator(device="cuda").manual_seed(1)
    y = torch.randn(n, vocab, device="cuda", generator=gen) * 4
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    _, entropy, lse = TritonTileOps.forward(y, targets, head)
    g_logp, g_ent = torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
    full = TritonTileOps.backward_(y.clone(), targets, lse, entropy, g_logp, g_ent, head, torch.float32)
    out = TritonTileOps.backward_(y, targets, lse, entropy, g_logp, g_ent, head, dtype)
    assert out.stride() == (2 * vocab, 1)
    assert torch.equal(out.view(torch.int16), full.to(dtype).view(torch.int16))


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
        assert_close(o[rows], r, 1e-4, name)


@pytest.mark.gpu
# the single pass, and two phases for a sequence-level ratio
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
        assert_close(t, e, 1e-2, name)
