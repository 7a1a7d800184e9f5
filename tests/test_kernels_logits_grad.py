"""``kernels/logits_grad.py``: ``dL/dy`` written over the projection, in fp32 in place or in bf16/fp16 over the first
half of each fp32 row.

The fp32 result is checked against the PyTorch tile ops in float64; the 16-bit results against the fp32 kernel's,
rounded to nearest even by PyTorch: they must agree bit for bit (under the interpreter the kernel rounds bf16 in
software, see ``launch_config.LAUNCH_CONFIGS["interpreter"]["logits_grad"]``). Run under the Triton interpreter
without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HEAD_IDS, HEADS, assert_close, projection, row_grads, tile_shapes
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fused_gspo.head import HeadParams, TorchTileOps  # noqa: E402
from fused_gspo.kernels import logits_grad  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_buffers")

SENTINEL = 123.0

# which upstream gradients are present: (grad_logp, grad_entropy)
GRADS = [(True, True), (True, False), (False, True), (False, False)]
GRAD_IDS = ["both", "logp_only", "entropy_only", "none"]


def _stats(y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
    _, entropy64, lse64 = TorchTileOps.forward(y.double(), targets, head)
    return entropy64, lse64


def _launch(y, targets, entropy64, lse64, g_logp, g_ent, head, **kwargs):
    return logits_grad.logits_grad_(
        y, targets, lse64.float(), entropy64.float(), g_logp, g_ent, head.logit_scale, head.softcap,
        head.temperature, **kwargs,
    )  # fmt: skip


def _reference(y, targets, entropy64, lse64, g_logp, g_ent, head):
    return TorchTileOps.backward_(
        y.double().clone(),
        targets,
        lse64,
        entropy64,
        None if g_logp is None else g_logp.double(),
        None if g_ent is None else g_ent.double(),
        head,
    )


def _assert_same_bits(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Equal bit patterns (so +0 != -0, and every rounding decision must agree); NaNs compared as NaN."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{what}: {out.dtype}{tuple(out.shape)}"
    out_bits, ref_bits = out.view(torch.int16).cpu(), ref.view(torch.int16).cpu()
    nan = ref.isnan().cpu()
    assert torch.equal(out.isnan().cpu(), nan), f"{what}: NaNs differ"
    differ = (out_bits != ref_bits) & ~nan
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} of {out.numel()} values differ, e.g. {out[differ.to(out.device)][:4].tolist()} "
        f"!= {ref[differ.to(ref.device)][:4].tolist()}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# float32, in place


# the table's block (one block per row) and small blocks (rows spanning 3 and 11 blocks, one program each)
@pytest.mark.parametrize("block_v", [None, 64, 256])
def test_backward_rows_spanning_blocks(block_v):
    head = HEADS[3]
    y, targets = projection(4, 700, seed=5, spread=3.0)
    entropy64, lse64 = _stats(y, targets, head)
    g_logp, g_ent = row_grads(4, 5, True), row_grads(4, 9, True)
    ref = _reference(y, targets, entropy64, lse64, g_logp, g_ent, head)
    out = _launch(y, targets, entropy64, lse64, g_logp, g_ent, head, block_v=block_v)
    assert out is y, "a float32 gradient is written in place and y returned"
    assert_close(out, ref, 1e-5, "dL/dy")


# more vocabulary blocks than grid axis 1 allows (capped at 2 here, 65535 on CUDA): programs loop over blocks c, c + 2
@pytest.mark.parametrize("head", [HEADS[1], HEADS[3]], ids=[HEAD_IDS[1], HEAD_IDS[3]])
def test_backward_programs_loop_over_blocks(monkeypatch, head):
    monkeypatch.setattr(logits_grad, "_MAX_GRID_1", 2)
    y, targets = projection(3, 700, seed=6, spread=3.0, pad=5)
    entropy64, lse64 = _stats(y, targets, head)
    g_logp, g_ent = row_grads(3, 1, True), row_grads(3, 2, True)
    ref = _reference(y, targets, entropy64, lse64, g_logp, g_ent, head)
    out = _launch(y, targets, entropy64, lse64, g_logp, g_ent, head, block_v=64)
    assert_close(out, ref, 1e-5, "dL/dy")
    assert (y._base[:, 700:] == SENTINEL).all(), "the kernel wrote past the row's vocabulary"


# ----------------------------------------------------------------------------------------------------------------------
# bf16 / fp16 over the first half of each fp32 row


def _padded_tile(n: int, vocab: int, seed: int, spread: float, tail: int = 64):
    """A contiguous float32 ``[n, V]`` tile at the start of a buffer whose ``tail`` further floats hold a sentinel."""
    y, targets = projection(n, vocab, seed, spread)
    buffer = torch.full((n * vocab + tail,), SENTINEL, device=DEVICE)
    tile = buffer[: n * vocab].view(n, vocab)
    tile.copy_(y)
    return tile, targets, buffer


# (head, block_v): the plain head with the table's block (a row in one block); the softcap's sech^2 factor, temperature
# and scale with 64 (each row walks 8 blocks, the last one short, left to right, overwriting what it has read)
NARROW_CASES = [(HEADS[0], None), (HEADS[3], 64)]


# both cases of NARROW_CASES
@pytest.mark.parametrize("case", NARROW_CASES, ids=["plain-table", "softcap-v64"])
# each upstream term alone, both, and neither (an all-zero gradient)
@pytest.mark.parametrize("grads", GRADS, ids=GRAD_IDS)
# both 16-bit dtypes: bf16 (rounded in software under the interpreter) and fp16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_narrow_grad_is_the_float32_grad_rounded(dtype, grads, case):
    head, block_v = case
    n, vocab = 3, 450
    tile, targets, buffer = _padded_tile(n, vocab, seed=3, spread=3.0)
    entropy64, lse64 = _stats(tile, targets, head)
    g_logp, g_ent = row_grads(n, 3, grads[0]), row_grads(n, 8, grads[1])
    full = _launch(tile.clone(), targets, entropy64, lse64, g_logp, g_ent, head)  # elementwise: any block will do
    out = _launch(tile, targets, entropy64, lse64, g_logp, g_ent, head, block_v=block_v, out_dtype=dtype)
    assert out.data_ptr() == tile.data_ptr(), "row 0 of the gradient starts where row 0 of y does"
    assert out.shape == (n, vocab) and out.stride() == (2 * vocab, 1), out.stride()
    _assert_same_bits(out, full.to(dtype), f"{dtype} dL/dy")
    assert (buffer[n * vocab :] == SENTINEL).all(), "the kernel wrote past the tile"


# any shape, rows padded or not (the view's row stride is twice the tile's)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# fp16: lanes past the vocabulary (masked, never stored) hold exp(-lse), which NumPy may overflow casting to fp16
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@settings(max_examples=3)
# the tile shapes of conftest, padded or not, any head
@given(**tile_shapes, pad=st.sampled_from([0, 3]), head=st.sampled_from(HEADS))
# one vocabulary entry: a [n, 1] view with row stride 2 (pad 0)
@example(n=3, vocab=1, seed=0, spread=3.0, pad=0, head=HEADS[0])
# odd V and padded rows: row r of the view starts at 16-bit element 2r(V + 3)
@example(n=12, vocab=699, seed=1, spread=12.0, pad=3, head=HEADS[3])
def test_narrow_grad_any_shape(dtype, n, vocab, seed, spread, pad, head):
    y, targets = projection(n, vocab, seed, spread, pad)
    entropy64, lse64 = _stats(y, targets, head)
    g_logp, g_ent = row_grads(n, seed, True), row_grads(n, seed + 7, True)
    full = _launch(y.clone(), targets, entropy64, lse64, g_logp, g_ent, head)
    out = _launch(y, targets, entropy64, lse64, g_logp, g_ent, head, block_v=64, out_dtype=dtype)
    assert out.data_ptr() == y.data_ptr() and out.stride() == (2 * (vocab + pad), 1)
    _assert_same_bits(out, full.to(dtype), f"{dtype} dL/dy")
    if pad:
        assert (y._base[:, vocab:] == SENTINEL).all(), "the kernel wrote into the padding"


def _bits(*patterns: int) -> torch.Tensor:
    return torch.tensor(patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


# fp32 values whose rounding is decided by the last bits: ties to even (down and up), just off a tie, negative ties,
# overflow to inf, subnormals, and the largest fp32 subnormal rounding up to the smallest normal
ROUNDING_CASES = {
    torch.bfloat16: _bits(
        0x3F808000,  # 1 + 2^-8: a tie, down to the even 1
        0x3F818000,  # 1 + 3 * 2^-8: a tie, up to the even 1 + 2^-6
        0x3F808001,  # just above a tie: up
        0x3F807FFF,  # just below a tie: down
        0xBF808000,  # negative ties
        0xBF818000,
        0x7F7FFFFF,  # fp32's largest: past bf16's largest + half an ulp, to inf
        0x7F7F7FFF,  # just below that halfway point: bf16's largest
        0x7F7F8000,  # the halfway point: a tie to the even (inf)
        0xFF7F8000,  # and to -inf
        0x00008000,  # subnormal ties
        0x00018000,
        0x007FFFFF,  # fp32's largest subnormal: up to the smallest normal
        0x00000001,  # fp32's smallest subnormal: down to 0
    ),
    torch.float16: torch.tensor(
        [
            1 + 2**-11,  # a tie, down to the even 1
            1 + 3 * 2**-11,  # a tie, up to the even 1 + 2^-9
            1 + 2**-11 + 2**-20,  # just above a tie: up
            -(1 + 3 * 2**-11),  # a negative tie
            65504.0,  # fp16's largest
            65519.0,  # just below the halfway point to 2^16: fp16's largest
            65520.0,  # the halfway point: a tie to the even (inf)
            -65520.0,  # and to -inf
            2.0**-25,  # half the smallest subnormal: a tie, down to 0
            3 * 2.0**-25,  # a subnormal tie, up to 2^-23
            2.0**-24,  # the smallest subnormal
            1e-8,  # below half of it: 0
            2.0**-14 - 2.0**-25,  # a tie between the largest subnormal and the smallest normal, up (even)
        ],
        dtype=torch.float32,
    ),
}


# each dtype's cases from ROUNDING_CASES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # NumPy, on the overflow cases
def test_narrow_grad_rounds_to_nearest_even(dtype):
    """With ``lse`` huge every ``p`` is 0, so ``dL/dy`` is ``grad_logp`` at the target and 0 elsewhere (plain head):
    the rows carry chosen fp32 values to the rounding. A row with a NaN ``lse`` must come out NaN."""
    values = ROUNDING_CASES[dtype].to(DEVICE)
    n, vocab = values.numel() + 1, 8
    tile = torch.randn(n, vocab, device=DEVICE)
    targets = torch.arange(n, device=DEVICE) % vocab
    lse = torch.full((n,), 1e30, device=DEVICE)
    lse[-1] = float("nan")
    g_logp = torch.cat([values, torch.ones(1, device=DEVICE)])
    args = (targets, lse, torch.zeros(n, device=DEVICE), g_logp, None)
    full = logits_grad.logits_grad_(tile.clone(), *args)
    assert torch.equal(full[:-1].gather(1, targets[:-1, None]).squeeze(1), values), "p must be exactly 0"
    assert full[-1].isnan().all()
    out = logits_grad.logits_grad_(tile, *args, out_dtype=dtype)
    _assert_same_bits(out, full.to(dtype), f"{dtype} rounding")


def test_rejects_other_tiles_and_dtypes():
    y, targets = projection(2, 16, seed=0, spread=1.0)
    stats = (targets, torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="out_dtype"):
        logits_grad.logits_grad_(y, *stats, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="float32"):
        logits_grad.logits_grad_(y.double(), *stats)
    transposed = torch.empty(16, 2, device=DEVICE).t()
    with pytest.raises(ValueError, match="unit column stride"):
        logits_grad.logits_grad_(transposed, *stats, out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="narrow_view"):
        logits_grad.narrow_view(y.double(), torch.bfloat16)
    with pytest.raises(ValueError, match="narrow_view"):
        logits_grad.narrow_view(transposed, torch.float16)


# every out dtype: an empty tile gives an empty [0, V] gradient of that dtype, without a launch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_empty_tile(dtype):
    empty = torch.empty(0, 11, device=DEVICE)
    none = torch.empty(0, device=DEVICE)
    out = logits_grad.logits_grad_(empty, none.long(), none, none, none, none, out_dtype=dtype)
    assert out.shape == (0, 11) and out.dtype == dtype
