"""``fused_gspo.preference.statistics``: the per-token statistics the preference losses read (log-prob, entropy,
log sum p^2, mean logit, first-argmax), against TRL 1.16.0's chunked LM head, and zero where masked."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_max_close
from hypothesis import given
from hypothesis import strategies as st
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from fused_gspo.preference import token_statistics

F64 = torch.float64


# the eager statistics against TRL's fused head, with scale, softcap, temperature, bias and ties
@pytest.mark.parametrize(
    "head", [{}, {"temperature": 0.7, "logit_scale": 0.5}, {"softcap": 3.0, "temperature": 1.3, "bias": True}]
)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 12), vocab=st.integers(2, 40))
def test_token_statistics_match_trls_fused_head(head, seed, n, vocab):
    """The documented definitions are what TRL's chunked head computes (its torch path, float32), ties included."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 8, generator=gen)
    weight = torch.randn(vocab, 8, generator=gen)
    weight[vocab // 2] = weight[0]  # an exact tie: token vocab // 2 is never the (first) argmax
    bias = 0.3 * torch.randn(vocab, generator=gen) if head.get("bias") else None
    if bias is not None:
        bias[vocab // 2] = bias[0]
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[: n // 2] = torch.tensor([0, vocab // 2]).repeat(n)[: n // 2]
    temperature, scale, cap = head.get("temperature", 1.0), head.get("logit_scale", 1.0), head.get("softcap")
    outputs = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    theirs = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, 16, cap, scale, outputs)
    z = (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    ours = token_statistics(z / temperature, targets, torch.ones(n))
    for name, t in zip(("log_probs",) + outputs, theirs, strict=True):
        if name == "is_top1":
            assert torch.equal(ours[name], t)
        else:
            # TRL's side is float32: log sum p^2 (and the log-prob) can be near 0 with a
            # rounding error of a few float32 ulps of 1
            assert_max_close(ours[name], t, name, 1e-5, atol=1e-6)
    assert not ours["is_top1"][targets == vocab // 2].any()


def test_token_statistics_zero_where_masked():
    logits = torch.randn(2, 3, 5, dtype=F64)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    stats = token_statistics(logits, torch.full((2, 3), -100).where(mask == 0, 2), mask)
    for name, x in stats.items():
        assert not x[mask == 0].any(), name
    with pytest.raises(ValueError, match="outputs"):
        token_statistics(logits, torch.zeros(2, 3, dtype=torch.long), mask, outputs=("logits",))
