"""The head's PyTorch math: the transform, the chunk statistics and the in-place logits gradient."""

import pytest
import torch
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st

from fused_gspo.head import HeadParams, TorchTileOps, full_logprobs

heads = st.builds(
    HeadParams,
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    logit_scale=st.sampled_from([1.0, 0.25, 3.0]),
    softcap=st.sampled_from([None, 2.0, 30.0]),
)


@given(head=heads, n=st.integers(1, 6), vocab=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_tile_forward_matches_log_softmax(head, n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4
    targets = torch.randint(0, vocab, (n,), generator=g)
    tile = y.clone()
    logp, entropy, lse = TorchTileOps.forward(tile, targets, head)
    assert torch.equal(tile, y), "forward leaves the tile as it found it"
    z = head.transform(y)
    logp_all = torch.log_softmax(z, -1)
    assert rel_err(logp, logp_all.gather(-1, targets[:, None]).squeeze(-1)) < 1e-12
    assert rel_err(entropy, -(logp_all.exp() * logp_all).sum(-1), floor=1.0) < 1e-12
    assert rel_err(lse, torch.logsumexp(z, -1)) < 1e-12


@given(head=heads, n=st.integers(1, 6), vocab=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_tile_statistics_add_the_preference_extras(head, n, vocab, seed):
    """``statistics``: the forward's three plus log sum p^2, the mean logit and the first-argmax flag."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4
    y[0, vocab // 2 :] = y[0, : vocab - vocab // 2].max() + 1.0  # a tie for the maximum in row 0
    targets = torch.randint(0, vocab, (n,), generator=g)
    stats = TorchTileOps.statistics(y.clone(), targets, head)
    base = TorchTileOps.forward(y.clone(), targets, head)
    assert all(torch.equal(a, b) for a, b in zip((stats.logp, stats.entropy, stats.lse), base, strict=True))
    z = head.transform(y)
    log_p = torch.log_softmax(z, -1)
    assert rel_err(stats.log_sum_sq_probs, torch.logsumexp(2 * log_p, -1), floor=1.0) < 1e-12
    assert rel_err(stats.mean_logit, z.mean(-1), floor=1.0) < 1e-12
    assert torch.equal(stats.is_top1, z.argmax(-1) == targets)


# each upstream term alone and both together
@pytest.mark.parametrize("terms", ["logp", "entropy", "both"])
@given(head=heads, n=st.integers(1, 6), vocab=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_tile_backward_matches_autograd(terms, head, n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    grad_logp = torch.randn(n, generator=g, dtype=torch.float64) if terms != "entropy" else None
    grad_entropy = torch.randn(n, generator=g, dtype=torch.float64) if terms != "logp" else None
    logp_all = torch.log_softmax(head.transform(y), -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    objective = sum((out * w).sum() for out, w in ((logp, grad_logp), (entropy, grad_entropy)) if w is not None)
    (expected,) = torch.autograd.grad(objective, [y])
    tile = y.detach().clone()
    _, entropy, lse = TorchTileOps.forward(tile, targets, head)
    got = TorchTileOps.backward_(tile, targets, lse, entropy, grad_logp, grad_entropy, head)
    assert got.data_ptr() == tile.data_ptr(), "the gradient overwrites the tile in place"
    # the entropy term's gradient, -p_j (log p_j + H), is ~1e-8 on a peaked row while log p_j = z_j - lse carries
    # rounding of order eps |z| (|z| up to ~50 here, ~1e-14): hence an absolute floor of 1e-4 (error <= 1e-14)
    assert rel_err(got, expected, floor=1e-4) < 1e-10


def test_full_logprobs_promotes_mixed_dtypes_and_keeps_float64():
    hidden, weight = torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.randn(9, 4)
    targets = torch.randint(0, 9, (2, 3))
    logp, entropy = full_logprobs(hidden, weight, None, targets, HeadParams())
    assert logp.shape == (2, 3) and logp.dtype == torch.float32 and (entropy > 0).all()
    logp64, _ = full_logprobs(hidden.double(), weight.double(), None, targets, HeadParams())
    assert logp64.dtype == torch.float64 and rel_err(logp, logp64) < 1e-6
