"""The planner: budgets obeyed, a larger budget never predicted slower, the single pass where it belongs, balanced
chunks that respect rows, and the default budget."""

import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fused_gspo.plan import planner
from fused_gspo.plan.cost import Problem
from fused_gspo.plan.devices import PROFILES, get_profile
from fused_gspo.plan.runtime import chunk_format
from fused_gspo.triton_ops import TritonTileOps

MIB = 1 << 20
GPU_PROFILES = sorted(PROFILES)
FMT = chunk_format(TritonTileOps, torch.bfloat16, True, torch.bfloat16)


def _rows(draw, tokens: int, longest: int) -> list[int]:
    """Row lengths summing to ``tokens``, each at most ``longest``, drawn from one seed (a batch has many rows)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    shortest = draw(st.integers(1, longest))
    rows, left = [], tokens
    while left:
        rows.append(min(left, rng.randint(shortest, longest)))
        left -= rows[-1]
    return rows


@st.composite
def problems(draw, realistic: bool = False):
    """A shape, an objective's coupling, row lengths, a budget and a GPU profile. ``realistic``: LLM heads, batches of
    thousands of tokens and budgets of a GiB or more."""
    if realistic:
        # N*H*V >= 1.0e12: a projection costs far more than the host takes to launch the objective's few dozen
        # kernels per chunk (at N=4096, H=2048, V=32000 on a B200 it does not: the device waits for the host there,
        # and two phases, with no per-chunk objective, are rightly predicted faster)
        tokens = draw(st.integers(8192, 65536))
        hidden = draw(st.sampled_from([4096, 8192]))
        vocab = draw(st.integers(32000, 262144))
        budget = draw(st.integers(1 << 30, 8 << 30))
    else:
        tokens = draw(st.integers(1, 20000))
        hidden = draw(st.integers(1, 8192))
        vocab = draw(st.integers(1, 262144))
        budget = draw(st.integers(1, 4 << 30))
    coupling = draw(st.sampled_from(["token", "sequence", "global"]))
    rows = _rows(draw, tokens, 512 if realistic else 2048)
    problem = Problem(tokens, hidden, vocab, torch.bfloat16, bias=draw(st.booleans()), softcap=draw(st.booleans()))
    return problem, coupling, rows, budget, get_profile(draw(st.sampled_from(GPU_PROFILES)))


def _choose(problem, coupling, rows, budget, profile, mode="fwd_bwd"):
    return planner.choose(
        problem, FMT, coupling=coupling, row_counts=rows, workspace_bytes=budget, profile=profile, mode=mode
    )


def _fits(problem, budget):
    return budget >= FMT.bytes_per_token(problem.vocab, problem.hidden)


@settings(max_examples=60)
@given(case=problems(), mode=st.sampled_from(["fwd_bwd", "fwd", "logprobs"]))
def test_the_plan_never_exceeds_the_budget(case, mode):
    problem, coupling, rows, budget, profile = case
    if not _fits(problem, budget):
        with pytest.raises(ValueError, match="workspace_bytes"):
            _choose(problem, coupling, rows, budget, profile, "fwd_bwd")
        return
    plan = _choose(problem, coupling, rows, budget, profile, mode)
    assert plan.chunk_tokens * FMT.bytes_per_token(problem.vocab, problem.hidden) <= budget
    # the chunks tile the tokens in order
    assert [b for chunk in plan.bounds for b in chunk] == sorted(b for chunk in plan.bounds for b in chunk)
    assert plan.bounds == [] or (plan.bounds[0][0], plan.bounds[-1][1]) == (0, problem.tokens)
    if plan.strategy == "single_pass" and coupling == "sequence":
        ends = {0}
        for count in rows:
            ends.add(max(ends) + count)
        assert all(start in ends and stop in ends for start, stop in plan.bounds), "a row was cut"


@settings(max_examples=60)
@given(case=problems(), factor=st.floats(1.0, 16.0))
def test_a_larger_budget_is_never_predicted_slower(case, factor):
    problem, coupling, rows, budget, profile = case
    assume(_fits(problem, budget))
    small = _choose(problem, coupling, rows, budget, profile)
    large = _choose(problem, coupling, rows, int(budget * factor), profile)
    assert large.costing.ms <= small.costing.ms * (1 + 1e-12)


@settings(max_examples=40)
@given(case=problems(realistic=True))
def test_single_pass_whenever_the_coupling_allows_and_the_rows_fit(case):
    problem, coupling, rows, budget, profile = case
    plan = _choose(problem, coupling, rows, budget, profile)
    capacity = planner.capacity_tokens(problem, FMT, budget)
    if coupling == "global" or max(rows) > capacity:
        assert plan.strategy == "two_phase"
    else:
        assert plan.strategy == "single_pass", plan.alternatives
        assert plan.alternatives["single_pass"] < plan.alternatives["two_phase"]


def test_tiny_problems_where_launches_dominate_may_take_two_phases():
    """The model's one case for two phases with the single pass allowed: chunks so small that the objective's few
    dozen tiny kernels per chunk outweigh a projection. On CPU the rule is fixed instead: single pass."""
    tiny = Problem(64, 8, 32, torch.bfloat16)
    budget = 8 * FMT.bytes_per_token(32, 8)
    on_gpu = _choose(tiny, "token", None, budget, get_profile("h100"))
    assert on_gpu.strategy == "two_phase" and on_gpu.alternatives["two_phase"] < on_gpu.alternatives["single_pass"]
    assert _choose(tiny, "token", None, budget, get_profile("cpu")).strategy == "single_pass"


@pytest.mark.parametrize("coupling", ["token", "sequence", "global"])
def test_nothing_to_score_takes_the_strategy_whose_collectives_the_other_processes_make(coupling):
    """No token: no chunk either way, but the globally coupled objective gathers every process's entropies in the
    two phases only, so a process without tokens takes them too."""
    problem = Problem(0, 64, 100, torch.bfloat16)
    for profile in ("cpu", "h100"):
        plan = _choose(problem, coupling, [0, 0], 1 << 20, get_profile(profile))
        assert plan.strategy == ("two_phase" if coupling == "global" else "single_pass") and plan.bounds == []
        assert (
            _choose(problem, coupling, [0, 0], 1 << 20, get_profile(profile), mode="logprobs").strategy != "single_pass"
        )


def test_chunks_are_balanced():
    assert planner.token_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert planner.token_bounds(0, 3) == [] and planner.token_bounds(2, 5) == [(0, 1), (1, 2)]
    # rows of 5, 5, 5, 1 in chunks of up to 10: greedy gives [10, 6]; two balanced chunks are as narrow as [5+5, 5+1]
    assert planner.row_bounds([5, 5, 5, 1], 10) == [(0, 10), (10, 16)]
    assert planner.balanced_row_bounds([4, 4, 4, 4], 2, 16) == [(0, 8), (8, 16)]
    # an empty row never starts a chunk of its own
    assert planner.row_bounds([3, 0, 0, 2], 3) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="does not fit"):
        planner.row_bounds([4, 9], 8)


def test_fewest_chunks_the_budget_allows_balanced():
    problem = Problem(1000, 64, 100, torch.bfloat16)
    per_token = FMT.bytes_per_token(100, 64)
    plan = _choose(problem, "token", None, 300 * per_token, get_profile("cpu"))
    assert plan.num_chunks == 4 and plan.chunk_tokens == 250


def test_bad_plans_are_refused():
    problem = Problem(10, 4, 1000, torch.bfloat16)
    with pytest.raises(ValueError, match=r"cannot hold one token's logits row \(\d+ bytes at V=1000\)"):
        _choose(problem, "token", None, 100, get_profile("h100"))
    split = Problem(10, 4, 250, torch.bfloat16, tensor_parallel=4)  # the row of one rank's shard, not V's
    with pytest.raises(ValueError, match=r"\(\d+ bytes at 250 rows, the largest shard\)"):
        _choose(split, "token", None, 100, get_profile("h100"))
    with pytest.raises(ValueError, match="row_counts"):
        _choose(problem, "sequence", None, 1 << 20, get_profile("h100"))
    with pytest.raises(ValueError, match="coupling"):
        _choose(problem, "chunk", None, 1 << 20, get_profile("h100"))
    # the no-grad pass scores through the staged tile like the training pass (its log-probs must be the same bits),
    # so it needs a row's workspace too
    with pytest.raises(ValueError, match="cannot hold one token"):
        _choose(problem, "global", None, 1, get_profile("h100"), "logprobs")
    assert _choose(problem, "global", None, 1 << 20, get_profile("h100"), "logprobs").strategy == "two_phase"


REFERENCE = Problem(8192, 4096, 151936, torch.bfloat16)


def _auto(problem, profile, free=None, coupling="token", rows=None):
    return planner.auto_workspace_bytes(
        problem, FMT, coupling=coupling, row_counts=rows, profile=profile, mode="fwd_bwd", free_bytes=free
    )


def test_default_budget_on_cpu_is_what_always_worked():
    assert _auto(REFERENCE, get_profile("cpu")) == planner.AUTO_CPU_BYTES == 512 * MIB


def test_default_budget_on_a_gpu():
    h100 = get_profile("h100")
    budget = _auto(REFERENCE, h100)
    best = _choose(REFERENCE, "token", None, 64 << 30, h100).costing.ms
    chosen = _choose(REFERENCE, "token", None, budget, h100)
    # within the slack of the fastest plan the model knows, and no larger than it takes to get there
    assert chosen.costing.ms <= best * (1 + planner.AUTO_SLACK)
    smaller = _choose(REFERENCE, "token", None, budget - FMT.bytes_per_token(151936, 4096), h100)
    assert smaller.costing.ms > best * (1 + planner.AUTO_SLACK)
    # a quarter of the free memory at most
    assert _auto(REFERENCE, h100, free=2 << 30) == (2 << 30) // 4
    # never below one token's row, even on a nearly full device
    assert _auto(REFERENCE, h100, free=1000) == FMT.bytes_per_token(151936, 4096)


@settings(max_examples=40)
@given(case=problems())
def test_no_grad_and_training_passes_cut_the_same_chunks(case):
    """Over the same tokens with the same budget (explicit, or ``"auto"``), the no-grad pass and a token-coupled
    training pass get the same chunks on every GPU profile, so their projections are the same GEMMs (the GPU
    planner used to cost a few chunk counts and could pick 1 for one pass and 2 for the other)."""
    problem, _, _, budget, profile = case
    assume(planner.capacity_tokens(problem, FMT, budget) >= 1)
    no_grad = planner.choose(
        problem, FMT, coupling="global", row_counts=None, workspace_bytes=budget, profile=profile, mode="logprobs"
    )
    training = _choose(problem, "token", None, budget, profile)
    assert no_grad.bounds == training.bounds
    auto = [
        planner.auto_workspace_bytes(problem, FMT, coupling=c, row_counts=None, profile=profile, mode=m)
        for c, m in (("global", "logprobs"), ("token", "fwd_bwd"))
    ]
    assert auto[0] == auto[1]
