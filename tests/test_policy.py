"""The policy loss through the head (``policy.py``): the strategy follows the objective's gradient coupling, the chunk
objective protocol, the token layout."""

import pytest
import torch
from conftest import draw_problem, rel_err, run_policy_loss

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
