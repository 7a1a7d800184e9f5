"""``kernels/logsumexp_stats.py``: the split online log-sum-exp/entropy kernel and the merge kernel, against float64.

Without CUDA these run under the Triton interpreter at tiny shapes with the table's large interpreter blocks, plus
small blocks that make rows span several blocks and vocabulary splits. The buffers the kernels must fill (outputs,
partials) are poisoned with NaN, so an element left unwritten fails.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HEAD_IDS, HEADS, assert_close, projection, tile_shapes
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fused_gspo.head import TorchTileOps  # noqa: E402
from fused_gspo.kernels import launch_config, logsumexp_stats  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_buffers")

# (block_v, num_splits): None = the launch table; small blocks make rows span blocks and splits (64 splits of 128
# entries need V > 8064: at these vocabularies the count is capped by the number of blocks)
BLOCKINGS = [(None, None), (64, 3), (128, 64)]


# every head transform, on rows with and without padding between them (the row stride is a runtime argument)
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
@settings(max_examples=6)
# the tile shapes of conftest, rows padded (row stride V + 3) or not
@given(**tile_shapes, pad=st.sampled_from([0, 3]))
# one vocabulary entry: lse = z, logp = 0, entropy = 0
@example(n=1, vocab=1, seed=0, spread=3.0, pad=0)
# the largest tile, padded rows, peaked logits
@example(n=12, vocab=700, seed=1, spread=12.0, pad=3)
def test_logsumexp_stats_matches_float64(head, n, vocab, seed, spread, pad):
    y, targets = projection(n, vocab, seed, spread, pad)
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = logsumexp_stats.logsumexp_stats(y, targets, head.logit_scale, head.softcap, head.temperature)
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert o.dtype == torch.float32
        assert_close(o, r, 1e-5, name)
    if pad:
        assert (y._base[:, vocab:] == 123.0).all(), "the forward wrote into the projection"


# without and with the softcap
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
# the table's blocking, and blockings that split every row (see BLOCKINGS)
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["table", "v64x3", "v128x64"])
@settings(max_examples=4)
# the tile shapes of conftest
@given(**tile_shapes)
# 11 blocks of 64: three splits of 4 blocks, the last one short
@example(n=5, vocab=700, seed=2, spread=3.0)
def test_split_stats_any_blocking(head, blocking, n, vocab, seed, spread):
    """Rows spanning several blocks and vocabulary splits, merged; outputs and partials poisoned."""
    block_v, num_splits = blocking
    y, targets = projection(n, vocab, seed, spread)
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = logsumexp_stats.logsumexp_stats(
        y, targets, head.logit_scale, head.softcap, head.temperature, block_v=block_v, num_splits=num_splits
    )
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert_close(o, r, 1e-5, name)


def test_split_stats_max_splits():
    """MAX_SPLITS splits of one block each, the last one short; targets in the first and the last split."""
    head = HEADS[3]
    vocab = 64 * launch_config.MAX_SPLITS - 5
    splits, size = launch_config.vocab_splits(2, vocab, 64, torch.device(DEVICE), launch_config.MAX_SPLITS)
    assert (splits, size) == (launch_config.MAX_SPLITS, 64)
    y, targets = projection(2, vocab, seed=9, spread=3.0)
    assert targets.tolist() == [0, vocab - 1]
    ref = TorchTileOps.forward(y.double(), targets, head)
    out = logsumexp_stats.logsumexp_stats(
        y, targets, head.logit_scale, head.softcap, head.temperature, block_v=64, num_splits=launch_config.MAX_SPLITS
    )
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert_close(o, r, 1e-5, name)


def _float64_partials(z: torch.Tensor, targets: torch.Tensor, cuts: list[int]):
    """Float64 ``(m, s, u)`` of each split ``[cuts[k], cuts[k + 1])`` of each row, as the merge kernel expects them."""
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        zs = z[:, lo:hi]
        m = zs.amax(-1, keepdim=True)
        e = torch.exp(zs - m)
        parts.append(torch.stack([m.squeeze(-1), e.sum(-1), (e * (m - zs)).sum(-1)], dim=-1))
    partials = torch.stack(parts, dim=-1)  # [n, 3, S]
    return partials.float().to(DEVICE), z.gather(1, targets[:, None]).squeeze(1).float().to(DEVICE)


# one merge program per row, rows straddling programs with a tail (9 rows in blocks of 4), the table's block
@pytest.mark.parametrize("block_r", [1, 4, None], ids=["r1", "r4", "table"])
# one split (a plain copy), a few uneven ones, all MAX_SPLITS
@pytest.mark.parametrize("num_splits", [1, 5, launch_config.MAX_SPLITS])
def test_merge_stats_matches_float64(block_r, num_splits):
    gen = torch.Generator().manual_seed(num_splits)
    n, vocab = 9, 3 * launch_config.MAX_SPLITS
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 4
    z[:, 5] += 20.0  # one split's maximum far above the others': theirs are rescaled by e^-20
    targets = torch.randint(0, vocab, (n,), generator=gen)
    inner = torch.randperm(vocab - 1, generator=gen)[: num_splits - 1] + 1
    cuts = [0, *sorted(inner.tolist()), vocab]
    partials, target_logit = _float64_partials(z, targets, cuts)
    out = tuple(torch.full((n,), float("nan"), device=DEVICE) for _ in range(3))
    logp, entropy, lse = logsumexp_stats.merge_stats(partials, target_logit, out=out, block_r=block_r)
    assert all(o is t for o, t in zip((logp, entropy, lse), out, strict=True)), "merge_stats must fill `out`"
    ref_lse = torch.logsumexp(z, -1)
    log_p = z - ref_lse[:, None]
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    ref_logp = log_p.gather(1, targets[:, None]).squeeze(1)
    for name, o, r in zip(
        ("logp", "entropy", "lse"), (logp, entropy, lse), (ref_logp, ref_entropy, ref_lse), strict=True
    ):
        assert_close(o, r, 1e-5, name)


def test_merge_stats_refuses_more_than_max_splits():
    partials = torch.zeros(2, 3, launch_config.MAX_SPLITS + 1, device=DEVICE)
    with pytest.raises(ValueError, match="splits"):
        logsumexp_stats.merge_stats(partials, torch.zeros(2, device=DEVICE))


def test_caller_buffers_and_determinism():
    """``out`` and ``scratch`` are filled, not replaced; two runs agree bit for bit (no atomics)."""
    head = HEADS[3]
    y, targets = projection(6, 300, seed=4, spread=3.0)
    args = (y, targets, head.logit_scale, head.softcap, head.temperature)
    splits, _ = launch_config.vocab_splits(6, 300, 64, y.device, 4)
    scratch = logsumexp_stats.new_partials(6, splits, y.device)
    assert scratch[0].isnan().all() and scratch[1].isnan().all(), "the poison_buffers fixture is not in effect"
    out = tuple(torch.empty(6, device=DEVICE) for _ in range(3))
    first = logsumexp_stats.logsumexp_stats(*args, block_v=64, num_splits=4, out=out, scratch=scratch)
    assert all(a is b for a, b in zip(first, out, strict=True))
    assert torch.isfinite(scratch[0]).all() and torch.isfinite(scratch[1]).all()
    second = logsumexp_stats.logsumexp_stats(*args, block_v=64, num_splits=4)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="scratch"):
        logsumexp_stats.logsumexp_stats(
            *args, block_v=64, num_splits=4, scratch=logsumexp_stats.new_partials(6, 1, y.device)
        )


def test_rejects_other_tiles_and_passes_empty_ones():
    y, targets = projection(3, 40, seed=1, spread=1.0)
    with pytest.raises(ValueError, match="float32"):
        logsumexp_stats.logsumexp_stats(y.double(), targets)
    transposed = torch.empty(40, 3, device=DEVICE).t()
    with pytest.raises(ValueError, match="unit column stride"):
        logsumexp_stats.logsumexp_stats(transposed, targets)
    empty = logsumexp_stats.logsumexp_stats(torch.empty(0, 40, device=DEVICE), targets[:0])
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in empty)


# ----------------------------------------------------------------------------------------------------------------------
# EXTRA: the preference losses' statistics from the same read (log sum p^2, the mean logit, the first argmax)


def _extra_reference(y, targets, head):
    z = head.transform(y.double())
    log_p = torch.log_softmax(z, -1)
    return torch.logsumexp(2 * log_p, -1), z.mean(-1), z.argmax(-1) == targets


# without and with the softcap
@pytest.mark.parametrize("head", [HEADS[0], HEADS[3]], ids=[HEAD_IDS[0], HEAD_IDS[3]])
# the table's blocking, and blockings that split every row
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["table", "v64x3", "v128x64"])
@settings(max_examples=4)
# the tile shapes of conftest, rows padded or not
@given(**tile_shapes, pad=st.sampled_from([0, 3]))
# one vocabulary entry: p = 1, the target is the argmax
@example(n=1, vocab=1, seed=0, spread=3.0, pad=0)
def test_extra_statistics_match_float64(head, blocking, n, vocab, seed, spread, pad):
    block_v, num_splits = blocking
    y, targets = projection(n, vocab, seed, spread, pad)
    logp, entropy, lse, extras = logsumexp_stats.logsumexp_stats(
        y, targets, head.logit_scale, head.softcap, head.temperature, extra=True, block_v=block_v,
        num_splits=num_splits,
    )  # fmt: skip
    ref = TorchTileOps.forward(y.double(), targets, head)
    for name, o, r in zip(("logp", "entropy", "lse"), (logp, entropy, lse), ref, strict=True):
        assert_close(o, r, 1e-5, name)  # the extras change nothing else
    log_sum_sq, mean, top1 = _extra_reference(y, targets, head)
    assert extras.shape == (n, 3) and extras.dtype == torch.float32
    assert_close(extras[:, 0], log_sum_sq, 1e-5, "log sum p^2")
    assert_close(extras[:, 1], mean, 1e-5, "mean logit", atol=1e-6)
    assert torch.equal(extras[:, 2].cpu() == 1.0, top1.cpu()), "top-1"
    assert bool(((extras[:, 2] == 0) | (extras[:, 2] == 1)).all())


# a tie for the maximum: the target counts as top-1 only as the first of the tied entries, as torch.argmax picks;
# the tied entries in different splits of small blocks too
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=["table", "v64x3", "v128x64"])
def test_top1_is_the_first_argmax(blocking):
    block_v, num_splits = blocking
    y = torch.zeros(4, 700, device=DEVICE)
    y[:, 5] = y[:, 600] = 9.0
    targets = torch.tensor([5, 600, 7, 600], device=DEVICE)
    y[3, 5] = 8.0  # row 3: the target is the unique maximum
    *_, extras = logsumexp_stats.logsumexp_stats(y, targets, extra=True, block_v=block_v, num_splits=num_splits)
    assert extras[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]
