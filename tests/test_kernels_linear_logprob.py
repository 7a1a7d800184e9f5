"""``kernels/linear_logprob.py``: log-prob, entropy and log-sum-exp straight from ``hidden @ weight.T + bias`` (no
gradient; the logits tile never leaves the chip), against float64 on the same (rounded) inputs.

Run under the Triton interpreter without CUDA (bf16 dots in fp32 there: ``bf16_dot_in_fp32`` in the launch table).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HEADS, assert_close
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fused_gspo.head import full_logprobs  # noqa: E402
from fused_gspo.kernels import launch_config, linear_logprob  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_buffers")

# the table's blocks, and small ones: token blocks, vocabulary tiles and K-steps all several, plus 3 vocabulary splits
LINEAR_BLOCKINGS = [dict(), dict(block_n=16, block_v=64, block_h=16, num_splits=3)]


def _reference(hidden, weight, bias, targets, head):
    """``(logp, entropy, lse)`` in float64 from the (already rounded) inputs."""
    h, w = hidden.double(), weight.double()
    b = None if bias is None else bias.double()
    logp, entropy = full_logprobs(h, w, b, targets, head)
    lse = torch.logsumexp(head.transform(h @ w.t() + (0 if b is None else b)), dim=-1)
    return logp, entropy, lse


def _check(out, ref, rtol=1e-5):
    for name, o, r in zip(("logp", "entropy", "lse"), out, ref, strict=True):
        assert o.dtype == torch.float32
        assert_close(o, r, rtol, name)


# every operand dtype (fp32: 3xTF32 dots on a GPU; bf16/fp16: fp32 accumulation)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
# the table's blocks, and small ones (see LINEAR_BLOCKINGS)
@pytest.mark.parametrize("blocking", LINEAR_BLOCKINGS, ids=["table", "small"])
@settings(max_examples=4)
# up to one small token block, hidden sizes below and above one K-step of 16, one entry or several vocabulary tiles
@given(
    n=st.integers(1, 16),
    hidden_size=st.integers(1, 40),
    vocab=st.one_of(st.just(1), st.integers(2, 300)),
    seed=st.integers(0, 2**31 - 1),
    head=st.sampled_from(HEADS),
    with_bias=st.booleans(),
)
# a full token block of the small blocking, two K-steps, softcap and bias
@example(n=16, hidden_size=32, vocab=300, seed=0, head=HEADS[3], with_bias=True)
def test_linear_logprob_matches_float64(dtype, blocking, n, hidden_size, vocab, seed, head, with_bias):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, hidden_size, generator=gen) + 0.01).to(dtype).to(DEVICE)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.5 + 0.01).to(dtype).to(DEVICE)
    bias = (torch.randn(vocab, generator=gen) + 0.01).to(dtype).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[-1] = vocab - 1
    targets = targets.to(DEVICE)
    out = linear_logprob.linear_logprob(
        hidden, weight, bias, targets, head.logit_scale, head.softcap, head.temperature, **blocking
    )
    _check(out, _reference(hidden, weight, bias, targets, head))


# operands of each dtype as non-contiguous views: hidden transposed (column stride N), weight a column slice of a wider
# matrix (row stride 2H) or transposed (row stride 1, column stride V)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# the weight's two non-contiguous layouts
@pytest.mark.parametrize("weight_layout", ["sliced", "transposed"])
def test_linear_logprob_any_strides(dtype, weight_layout):
    n, hidden_size, vocab = 7, 24, 130
    head = HEADS[3]
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(hidden_size, n, generator=gen).to(dtype).to(DEVICE).t()
    if weight_layout == "sliced":
        weight = (torch.randn(vocab, 2 * hidden_size, generator=gen) * 0.5).to(dtype).to(DEVICE)[:, :hidden_size]
    else:
        weight = (torch.randn(hidden_size, vocab, generator=gen) * 0.5).to(dtype).to(DEVICE).t()
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    out = linear_logprob.linear_logprob(
        hidden, weight, None, targets, head.logit_scale, head.softcap, head.temperature, block_h=16
    )
    _check(out, _reference(hidden, weight, None, targets, head))


def test_linear_logprob_buffers_and_errors():
    head = HEADS[1]
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 16, generator=gen).to(DEVICE)
    weight = torch.randn(70, 16, generator=gen).to(DEVICE)
    targets = torch.randint(0, 70, (5,), generator=gen).to(DEVICE)
    args = (hidden, weight, None, targets, head.logit_scale, head.softcap, head.temperature)
    splits, _ = launch_config.vocab_splits(1, 70, 64, hidden.device, 2)
    scratch = linear_logprob.new_partials(5, splits, hidden.device)
    out = tuple(torch.empty(5, device=DEVICE) for _ in range(3))
    result = linear_logprob.linear_logprob(*args, block_v=64, num_splits=2, out=out, scratch=scratch)
    assert all(a is b for a, b in zip(result, out, strict=True))
    _check(result, _reference(hidden, weight, None, targets, head))
    with pytest.raises(ValueError, match="scratch"):
        linear_logprob.linear_logprob(
            *args, block_v=64, num_splits=2, scratch=linear_logprob.new_partials(5, 1, hidden.device)
        )
    with pytest.raises(ValueError, match="one dtype"):
        linear_logprob.linear_logprob(hidden.bfloat16(), weight, None, targets)
    with pytest.raises(ValueError, match="one dtype"):
        linear_logprob.linear_logprob(hidden.double(), weight.double(), None, targets)
    empty = linear_logprob.linear_logprob(hidden[:0], weight, None, targets[:0])
    assert all(t.shape == (0,) for t in empty)
