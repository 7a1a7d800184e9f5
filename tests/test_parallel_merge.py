"""The cross-rank statistics of a vocabulary split (``parallel/merge.py``) and the logits gradient of a shard, in one
process: a tile cut into shards (uneven, empty, ties across shards), each shard reduced by the backend's tile ops,
the partials merged, against the same tile ops on the whole tile."""

import pytest
import torch
from conftest import HEAD_IDS, HEADS, assert_close

from fused_gspo.head import HeadParams, TorchTileOps
from fused_gspo.parallel.merge import merge_partials, shard_partials

SPLITS = {  # shard sizes over a vocabulary of 23
    "even-ish": (12, 11),
    "uneven four": (6, 6, 6, 5),
    "an empty shard": (8, 8, 7, 0),
    "one-row shards": (1, 20, 1, 1),
}


def tile(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 ``[n, V]`` projection with exact ties between row 0 and row V - 1 at half the tokens (the first
    argmax is row 0 there), and targets at the first argmax, at its tie in the last shard, and random."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    y[: n // 2, 0] = y[: n // 2].amax(-1) + 1.0
    y[:, vocab - 1] = y[:, 0]
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[0::4] = y[0::4].argmax(-1)
    targets[1::4] = vocab - 1
    return y, targets


def merged(ops, y, targets, head, sizes, extras):
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    partials = [
        shard_partials(ops, y[:, a:b].clone(), targets - a, head, extras)
        for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]
    return merge_partials(torch.stack(partials), y.shape[1])


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("head", HEADS + [HeadParams(logit_scale=-0.7)], ids=HEAD_IDS + ["negative_scale"])
def test_merged_statistics_equal_the_whole_tile(split, head):
    y, targets = tile(16, 23, seed=len(split))
    whole = TorchTileOps.statistics(y.clone(), targets, head)
    ours = merged(TorchTileOps, y, targets, head, SPLITS[split], extras=True)
    for name in ("logp", "entropy", "lse", "log_sum_sq_probs", "mean_logit"):
        assert_close(getattr(ours, name), getattr(whole, name), 1e-12, name, atol=1e-13)
    assert torch.equal(ours.is_top1, whole.is_top1)
    if head.logit_scale > 0:  # ties across shards at the first argmax: some hits, some misses
        assert 0 < int(whole.is_top1.sum()) < len(targets)
    plain = merged(TorchTileOps, y, targets, head, SPLITS[split], extras=False)
    for name in ("logp", "entropy", "lse"):
        assert torch.equal(getattr(plain, name), getattr(ours, name)), name


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
def test_a_target_outside_the_shard_selects_no_column(split):
    """Each shard's logits gradient with the merged statistics, side by side, is the whole tile's gradient."""
    head = HeadParams(temperature=0.8, logit_scale=1.2, softcap=3.0)
    y, targets = tile(12, 23, seed=3)
    g = torch.Generator().manual_seed(5)
    grad_logp, grad_entropy = torch.randn(2, 12, generator=g, dtype=torch.float64)
    stats = TorchTileOps.statistics(y.clone(), targets, head)
    whole = TorchTileOps.backward_(y.clone(), targets, stats.lse, stats.entropy, grad_logp, grad_entropy, head)
    parts, start = [], 0
    for size in SPLITS[split]:
        shard = y[:, start : start + size].clone()
        local = targets - start  # outside [0, size) where another shard holds the target
        if size:  # (an empty shard has no gradient: VocabParallelTileOps does not call the tile ops)
            shard = TorchTileOps.backward_(shard, local, stats.lse, stats.entropy, grad_logp, grad_entropy, head)
        parts.append(shard)
        start += size
    assert_close(torch.cat(parts, dim=1), whole, 1e-13, "dL/dy", atol=1e-14)


def test_triton_shards_merge_to_the_whole_tile():
    """The Triton tile ops (under the interpreter on CPU) on float32 shards, one of them empty."""
    pytest.importorskip("triton")
    from fused_gspo.triton_ops import TritonTileOps

    head = HeadParams(temperature=0.9, softcap=5.0)
    y, targets = tile(6, 23, seed=11)
    y = y.float()
    whole = TritonTileOps.statistics(y.clone(), targets, head)
    ours = merged(TritonTileOps, y, targets, head, (10, 13, 0), extras=True)
    for name in ("logp", "entropy", "lse", "log_sum_sq_probs", "mean_logit"):
        assert_close(getattr(ours, name), getattr(whole, name), 2e-6, name, atol=1e-6)
    assert torch.equal(ours.is_top1, whole.is_top1)
