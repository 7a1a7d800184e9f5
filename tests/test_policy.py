"""The policy loss through the head (``policy.py``): the strategy follows the objective's gradient coupling, the chunk
objective protocol, the token layout."""

from unittest import mock

import pytest
import torch
from conftest import draw_packed_problem, draw_problem, objectives, rel_err, run_policy_loss
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fused_gspo import fused_policy_loss
from fused_gspo.backends import tile_ops_for
from fused_gspo.chunked import SinglePassFunction
from fused_gspo.config import PolicyLossConfig
from fused_gspo.head import TokenStats
from fused_gspo.objectives import Normalizers, PolicyBatch, policy_objective
from fused_gspo.policy import PolicyChunkObjective, TokenLayout
from fused_gspo.rows import PackedRows, PaddedRows


def _count_single_pass(monkeypatch):
    calls = []
    original = SinglePassFunction.apply

    def spy(*args):
        calls.append(args[4].bounds)
        return original(*args)

    monkeypatch.setattr(SinglePassFunction, "apply", spy)
    return calls


# one objective per coupling: token (DAPO), on-policy GSPO (every ratio 1: token), off-policy GSPO and GMPO
# (sequence: chunks end at row ends), the entropy quantile (global: two phases)
@pytest.mark.parametrize(
    "cfg,opts,expect",
    [
        ({"loss_type": "dapo"}, {"off_policy": True}, "token"),
        ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {"off_policy": False}, "token"),
        ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {"off_policy": True}, "sequence"),
        ({"loss_type": "gmpo", "epsilon": 0.4}, {"off_policy": True}, "sequence"),
        ({"loss_type": "dapo", "top_entropy_quantile": 0.5}, {"off_policy": True}, "two-phase"),
    ],
)
def test_strategy_follows_gradient_coupling(monkeypatch, cfg, opts, expect):
    problem = draw_problem(3, 5, 8, 29, seed=7, **opts)
    calls = _count_single_pass(monkeypatch)
    workspace = 29 * 4 * 3 * 6  # six tokens per chunk with the torch tile ops (tile + 2 temporaries, fp32)
    out, _ = run_policy_loss(problem, torch.float32, "torch", **cfg, workspace_bytes=workspace)
    ref, _ = run_policy_loss(problem, torch.float64, "eager", **cfg)
    assert rel_err(out.loss, ref.loss) < 1e-5
    if expect == "two-phase":
        assert calls == []
        return
    assert len(calls) == 1
    bounds = calls[0]
    assert len(bounds) > 1, "the workspace should force several chunks"
    assert max(stop - start for start, stop in bounds) <= 6
    if expect == "sequence":
        row_ends = set(problem["completion_mask"].sum(1).cumsum(0).tolist())
        assert all(stop in row_ends for _, stop in bounds)


def test_sequence_longer_than_workspace_falls_back_to_two_phases(monkeypatch):
    cfg = {"loss_type": "grpo", "importance_sampling_level": "sequence"}
    problem = draw_problem(2, 9, 8, 29, seed=3)
    calls = _count_single_pass(monkeypatch)
    out, grads = run_policy_loss(problem, torch.float32, "torch", **cfg, workspace_bytes=29 * 4 * 3 * 2)
    ref, ref_grads = run_policy_loss(problem, torch.float64, "eager", **cfg)
    assert calls == []
    assert rel_err(out.loss, ref.loss) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


@pytest.mark.parametrize("quantile", [0.5, 1.0])
def test_a_process_with_nothing_to_score_still_joins_the_entropy_gather(quantile):
    """Every process takes part in the entropy quantile's gather (TRL's get_high_entropy_mask does): one whose
    micro-batch has no valid token (all truncated, say) must too, or the processes with tokens wait forever."""
    from fused_gspo.policy import CrossProcess, compute_policy_loss

    problem = draw_problem(2, 4, 8, 29, seed=5)
    gathered = []

    def gather_values(values):
        gathered.append(values.numel())
        return torch.cat([values, torch.rand(6, dtype=values.dtype)])  # another process's entropies

    hidden = problem["hidden"].float().requires_grad_()
    weight = problem["weight"].float().requires_grad_()
    out = compute_policy_loss(
        hidden, weight, problem["completion_ids"], problem["advantages"].float(),
        torch.zeros_like(problem["completion_mask"]), old_logps=problem["old_logps"].float(),
        config=PolicyLossConfig(loss_type="dapo", top_entropy_quantile=quantile), backend="torch",
        cross_process=CrossProcess(gather_values=gather_values),
    )  # fmt: skip
    out.loss.backward()
    assert gathered == ([0] if quantile < 1 else [])
    assert out.loss.item() == 0.0
    # the head still gets its (zero) gradient: under ZeRO-3 every process reduces one
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_a_workspace_smaller_than_one_row_is_refused():
    problem = draw_problem(2, 3, 4, 50, seed=1)
    with pytest.raises(ValueError, match="workspace_bytes=100 cannot hold one token"):
        run_policy_loss(problem, torch.float32, "torch", loss_type="dapo", workspace_bytes=100)


def test_chunk_objective_gradient_is_the_whole_objective_s():
    """grad() of a chunk equals the gradient of the objective over the whole batch at that chunk's tokens."""
    problem = draw_problem(3, 4, 2, 5, seed=5)
    valid = problem["completion_mask"].bool()
    config = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    batch = PolicyBatch(problem["completion_mask"].double(), problem["advantages"], old_logps=problem["old_logps"])
    layout = TokenLayout(valid, batch.rows)
    norms = Normalizers.of(batch, config)
    n = int(valid.sum())
    logp = problem["old_logps"][valid] + 0.1 * torch.randn(n, dtype=torch.float64)
    entropy = torch.rand(n, dtype=torch.float64)
    leaf = logp.clone().requires_grad_()
    full = policy_objective(layout.scatter(leaf), layout.scatter(entropy), batch, config, norms)
    (expected,) = torch.autograd.grad(full.loss, [leaf])
    objective = PolicyChunkObjective(layout, batch, config, norms)
    rows = problem["completion_mask"].sum(1).tolist()
    start = 0
    for count in rows:  # chunks of one whole row each (sequence coupling)
        if count:
            chunk = slice(start, start + count)
            grad_logp, grad_entropy = objective.grad(start, start + count, TokenStats(logp[chunk], entropy[chunk]))
            assert grad_entropy is None
            assert rel_err(grad_logp, expected[start : start + count]) < 1e-12
        start += count
    loss = objective.finish(TokenStats(logp, entropy))
    assert rel_err(loss, full.loss) < 1e-12 and not loss.requires_grad
    assert torch.equal(objective.logps, layout.scatter(logp))


def test_token_layout_is_row_major_over_the_mask():
    valid = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    layout = TokenLayout(valid, PaddedRows(valid.float()))
    assert layout.row_counts() == [2, 0, 2]
    # the rows a chunk of valid tokens touches, on the host (row 1 has none)
    assert [layout.row_range(a, b) for a, b in [(0, 1), (0, 2), (1, 3), (2, 4), (3, 4)]] == [
        (0, 1), (0, 1), (0, 3), (2, 3), (2, 3)
    ]  # fmt: skip
    scattered = layout.scatter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(scattered, torch.tensor([[1.0, 0, 2.0], [0, 0, 0], [3.0, 4.0, 0]]))
    hidden = torch.arange(18.0).view(3, 3, 2)
    assert torch.equal(layout.gather(hidden), hidden[valid])


def test_token_layout_of_packed_rows():
    valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    rows = PackedRows(valid.float(), torch.tensor([0, 2, 2, 5, 6]))
    layout = TokenLayout(valid, rows)
    assert layout.row_counts() == [1, 0, 2, 1]
    assert [layout.row_range(a, b) for a, b in [(0, 1), (0, 2), (1, 3), (2, 4), (3, 4)]] == [
        (0, 1), (0, 3), (2, 3), (2, 4), (3, 4)
    ]  # fmt: skip
    assert torch.equal(layout.scatter(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([1.0, 0, 2, 3, 0, 4]))


# ---------------------------------------------------------------------------------------------------------------
# Packed batches with empty sequences, chunked: each chunk's objective reads per-row and per-token inputs as the whole
# batch does (issue 23: a chunk whose rows hold as many positions as there are rows read per-token values as per-row)


def _assert_packed_equals_padded(packed, padded, keep, backend, dtype, tol, cfg, tokens_per_chunk):
    """The packed call, chunked by a budget of ``tokens_per_chunk``, against the float64 eager padded twin: loss,
    log-probs and the gradients of hidden (at the positions both hold), weight and bias. Returns the chunk bounds of
    the single pass (None: two phases)."""
    ops = tile_ops_for(backend)
    workspace = tokens_per_chunk * packed["weight"].shape[0] * dtype.itemsize * (1 + ops.temporaries)
    calls = []
    original = SinglePassFunction.apply

    def spy(*args):
        calls.append(args[4].bounds)
        return original(*args)

    with mock.patch.object(SinglePassFunction, "apply", spy):  # a fixture's monkeypatch would outlive one example
        out, grads = run_policy_loss(packed, dtype, backend, **cfg, workspace_bytes=workspace)
    ref, ref_grads = run_policy_loss(padded, torch.float64, "eager", **cfg)
    assert rel_err(out.loss, ref.loss, floor=0.1) < tol, (out.loss, ref.loss)
    assert rel_err(out.logps, ref.logps[keep], floor=1.0) < tol
    assert rel_err(grads[0], ref_grads[0][keep]) < tol, "hidden"
    assert (ref_grads[0][~keep] == 0).all()
    assert len(grads) == len(ref_grads) == (3 if "bias" in packed else 2)
    for name, got, want in zip(("weight", "bias")[: len(grads) - 1], grads[1:], ref_grads[1:], strict=True):
        assert rel_err(got, want) < tol, name
    return calls[0] if calls else None


# the recipe: sequences of 1, 0, 2 and 3 tokens, float64, 3-token chunks; one case per failure it listed
@pytest.mark.parametrize(
    "cfg,opts",
    [
        ({"loss_type": "dapo"}, {"off_policy": True}),
        (
            {"loss_type": "grpo", "importance_sampling_level": "sequence"},
            {"per_token_advantages": True, "off_policy": False},
        ),
        ({"loss_type": "rloo"}, {"off_policy": True}),
    ],
    ids=["dapo-sequence-advantages", "gspo-token-advantages", "rloo-token-old-logps"],
)
def test_packed_empty_sequence_chunked_gives_the_padded_gradients(cfg, opts):
    packed, padded, keep = draw_packed_problem([1, 0, 2, 3], 8, 23, seed=4, holes=False, **opts)
    bounds = _assert_packed_equals_padded(packed, padded, keep, "torch", torch.float64, 1e-12, cfg, 3)
    assert bounds is not None and len(bounds) > 1, "the budget should force a single pass of several chunks"


# A row, one or two empty rows, a row: as many positions as rows, so a chunk over them has the shapes of a slice of
# per-row values (issue 23); around them, random lengths with more empty and one-token sequences
_SHAPE_TRAP = st.integers(1, 2).flatmap(
    lambda zeros: st.integers(1, zeros + 1).map(lambda first: [first, *[0] * zeros, zeros + 2 - first])
)
_SOME_LENGTHS = st.lists(st.sampled_from([0, 1, 1, 2, 3, 5]), max_size=3)
packed_lengths = st.tuples(_SOME_LENGTHS, _SHAPE_TRAP, _SOME_LENGTHS).map(lambda parts: [n for p in parts for n in p])


_PACKED_DRAWS = dict(
    objective=objectives(),
    lengths=packed_lengths,
    holes=st.booleans(),
    tokens_per_chunk=st.integers(1, 5),
    sequence_old_logps=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def _packed_equals_padded(backend, dtype, tol, objective, lengths, holes, tokens_per_chunk, sequence_old_logps, seed):
    cfg, opts = objective
    assume(len(lengths) != sum(lengths))  # as many sequences as positions: refused (tests/test_api.py)
    sequence_old_logps = sequence_old_logps and cfg["loss_type"] == "rloo" and opts["off_policy"]
    packed, padded, keep = draw_packed_problem(
        lengths, 8, 23, seed=seed, sequence_old_logps=sequence_old_logps, holes=holes, **opts
    )
    cfg = {**cfg, "max_completion_length": keep.shape[1]}  # dr_grpo's normalizer, which a packed batch cannot infer
    _assert_packed_equals_padded(packed, padded, keep, backend, dtype, tol, cfg, tokens_per_chunk)


# Packed batches with empty and one-token sequences, per-token and per-sequence inputs, any objective, any budget:
# the padded reference to float64 rounding on both chunked backends (the Triton backend's float64 chunks go to the
# PyTorch tile ops, under its own planning). 60 examples (a few seconds): about one draw in ten lands a chunk on the
# shape trap with an input it would misread
@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=max(60, settings().max_examples))
@given(**_PACKED_DRAWS)
def test_packed_batches_with_empty_sequences_equal_the_padded_reference(backend, **draws):
    _packed_equals_padded(backend, torch.float64, 1e-12, **draws)


# the same in float32 through the Triton kernels (interpreted: the default number of examples)
@given(**_PACKED_DRAWS)
def test_packed_batches_with_empty_sequences_through_the_triton_kernels(**draws):
    _packed_equals_padded("triton", torch.float32, 1e-5, **draws)


# Every tensor input that may carry a gradient: the head's, and the objective's own when they require grad
# (advantages, old / reference / sampler log-probs, the vLLM ratio): the eager gradient on each chunked backend and
# strategy, to float64 rounding (the Triton backend's float64 chunks go to the PyTorch tile ops) and in float32 through
# the Triton kernels; None exactly where eager gives None (the off-policy mask only compares the sampler's
# log-probs). Issue 23: the single pass gave the objective's inputs none.
@pytest.mark.parametrize(
    "backend,dtype,tol",
    [("torch", torch.float64, 1e-12), ("triton", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)],
)
@pytest.mark.parametrize(
    "cfg,strategy",
    [
        ({"loss_type": "dapo", "beta": 0.04, "off_policy_mask_threshold": 0.02}, "single_pass"),  # token coupling
        ({"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04}, "single_pass"),  # sequence
        ({"loss_type": "bnpo", "beta": 0.04, "top_entropy_quantile": 0.5}, "two_phase"),  # global
    ],
    ids=["token", "sequence", "two-phase"],
)
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_every_input_that_requires_grad_gets_the_eager_gradient(backend, dtype, tol, cfg, strategy,
                                                                per_token_advantages):  # fmt: skip
    problem = draw_problem(3, 5, 8, 23, seed=6, per_token_advantages=per_token_advantages, with_ref=True,
                           with_sampling=True, is_ratio_shape="token", with_bias=True)  # fmt: skip
    ops = tile_ops_for(backend)
    workspace = 5 * 23 * dtype.itemsize * (1 + ops.temporaries)  # chunks of up to a row's 5 tokens

    def grads(backend, dtype, **options):
        # the reference sees the backend's rounded inputs, in float64
        leaves = {k: v.to(dtype).to(dtype if backend != "eager" else torch.float64).requires_grad_()
                  for k, v in problem.items() if v.is_floating_point()}  # fmt: skip
        out = fused_policy_loss(**{**problem, **leaves}, backend=backend, **cfg, **options)
        return out.loss, dict(zip(leaves, torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True),
                                  strict=True))  # fmt: skip

    calls = []
    original = SinglePassFunction.apply

    def spy(*args):
        calls.append(args[4].bounds)
        return original(*args)

    with mock.patch.object(SinglePassFunction, "apply", spy):
        loss, got = grads(backend, dtype, workspace_bytes=workspace)
    assert (len(calls) == 1 and len(calls[0]) > 1) if strategy == "single_pass" else calls == []
    ref_loss, want = grads("eager", dtype)
    assert rel_err(loss, ref_loss, floor=0.1) < tol
    assert set(want) == {"hidden", "weight", "bias", "advantages", "old_logps", "ref_logps", "sampling_logps",
                         "importance_sampling_ratio"}  # fmt: skip
    for name, ref_grad in want.items():
        if name == "sampling_logps":
            assert ref_grad is None and got[name] is None
            continue
        assert ref_grad is not None and float(ref_grad.norm()) > 0 and got[name] is not None, name
        assert got[name].dtype == dtype and rel_err(got[name], ref_grad) < tol, name
