"""``explain``: the plan for a shape on any device profile without a GPU, the targets the GPU plan is held to, and
agreement with what a real call does."""

import json

import pytest
import torch

import fused_gspo
from fused_gspo.plan import PROFILES
from fused_gspo.plan.devices import ALIASES

GIB = 1 << 30
# The reference shape: N=8192 tokens, the qwen3-8b head (H=4096, V=151936), bf16
REF = dict(tokens=8192, hidden=4096, vocab=151936)
GSPO = dict(loss_type="grpo", importance_sampling_level="sequence")
DAPO = dict(loss_type="dapo", epsilon_high=0.28)


# the two objectives at the reference shape
@pytest.mark.parametrize("objective", [GSPO, DAPO], ids=["gspo", "dapo"])
def test_h100_reference_shape_meets_the_plan_targets(objective):
    """Default budget: the logits staged in bf16, the whole batch in one chunk (2.3 GiB), the gradients written once
    in the backward; predicted <= 1.10x the bare GEMMs, and a peak no larger than the floor's own: the bf16
    gradient ``G`` [N, V], ``dW`` and ``dX`` in bf16, and O(N) statistics."""
    plan = fused_gspo.explain(**REF, device="h100", **objective)
    assert plan.strategy == "single_pass" and plan.workspace_auto and plan.logits_dtype == "bfloat16"
    assert plan.num_chunks == 1 and "written once" in str(plan), str(plan)
    assert plan.ratio <= 1.10, str(plan)
    n, h, v = REF["tokens"], REF["hidden"], REF["vocab"]
    floor_peak = 2 * n * v + 2 * v * h + 2 * n * h
    assert plan.peak_bytes <= floor_peak + n * 64, str(plan)


# DAPO's gradient is per token; GSPO's is per token on-policy (every ratio is 1), per sequence off-policy
@pytest.mark.parametrize(
    "objective,on_policy", [(DAPO, False), (GSPO, True), (GSPO, False)], ids=["dapo", "gspo_on_policy", "gspo"]
)
def test_h100_reference_shape_with_512_mib(objective, on_policy):
    """512 MiB holds 1,766 tokens of bf16 logits: 5 chunks (off-policy GSPO: whole 512-token sequences per chunk),
    each long enough to keep dW's fp32 read-modify-write near compute-bound: predicted <= 1.20x the bare GEMMs."""
    small = fused_gspo.explain(**REF, device="h100", workspace_bytes=512 << 20, on_policy=on_policy, **objective)
    assert small.ratio <= 1.20, str(small)
    assert small.chunk_tokens * REF["vocab"] * 2 <= 512 << 20
    if small.coupling == "token":
        assert small.num_chunks == 5
    else:
        assert small.chunk_tokens % 512 == 0 and small.chunk_tokens >= 1024


def test_autocast_plans_bf16_gemms_for_fp32_master_weights():
    """fp32 inputs under bf16 autocast: bf16 GEMMs and tile, as TRL's chunked head runs them; without autocast the
    same inputs run fp32 GEMMs, an order of magnitude slower on an H100."""
    under = fused_gspo.explain(**REF, device="h100", dtype=torch.float32, autocast=torch.bfloat16, **DAPO)
    plain = fused_gspo.explain(**REF, device="h100", dtype=torch.float32, **DAPO)
    assert (under.compute_dtype, under.logits_dtype) == ("bfloat16", "bfloat16")
    assert (plain.compute_dtype, plain.logits_dtype) == ("float32", "float32")
    assert plain.predicted_ms > 8 * under.predicted_ms
    kept = fused_gspo.explain(**REF, device="h100", logits_dtype="float32", **DAPO)
    assert kept.logits_dtype == "float32" and kept.compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="autocast"):
        fused_gspo.explain(8, 8, 8, autocast=torch.float32)


# every profile name and alias, in every mode
@pytest.mark.parametrize("device", sorted(set(PROFILES) | set(ALIASES)))
@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd", "logprobs"])
def test_every_profile_explains_on_this_machine(device, mode):
    plan = fused_gspo.explain(4096, 2048, 128256, device=device, mode=mode, **GSPO)
    text = str(plan)
    assert plan.predicted_ms > 0 and plan.floor_ms > 0 and plan.peak_bytes > 0
    for needle in ("projection", "total (predicted)", "floor (bare GEMMs)", plan.profile, plan.strategy):
        assert needle in text
    payload = json.loads(json.dumps(plan.to_dict(per_chunk=True)))
    assert payload["ratio"] == pytest.approx(plan.ratio) and len(payload["chunks"]) == len(plan.chunks)
    if mode == "logprobs":
        # the staged chunked path, the training pass's own (its log-probs must be the same bits)
        assert plan.strategy == "two_phase" and plan.num_chunks > 0 and set(plan.alternatives) == {"two_phase"}


def test_no_grad_logprobs_take_the_staged_chunked_path():
    """The no-grad pass scores through the same bf16 tile and statistics kernel as the training pass, with the
    training pass's budget and chunks: one chunk at the reference shape (the fused Triton kernel, 25.7 ms against
    cuBLAS plus statistics' 17.6 ms on an H100, bench/results/gpu-h100-profile.json, could not give the same bits)."""
    plan = fused_gspo.explain(**REF, device="h100", mode="logprobs", **GSPO)
    training = fused_gspo.explain(**REF, device="h100", on_policy=True, **GSPO)
    assert plan.strategy == "two_phase" and plan.logits_dtype == "bfloat16"
    assert (
        (plan.workspace_bytes, plan.num_chunks)
        == (training.workspace_bytes, training.num_chunks)
        == (
            training.workspace_bytes,
            1,
        )
    )
    assert plan.peak_bytes <= 2 * REF["tokens"] * REF["vocab"] + REF["tokens"] * 64 and plan.ratio <= 1.15, str(plan)
    with pytest.raises(ValueError, match="cannot hold one token"):
        fused_gspo.explain(**REF, device="h100", mode="logprobs", workspace_bytes=1 << 10, **GSPO)


def test_stage_rows_add_up():
    plan = fused_gspo.explain(**REF, device="b200", **DAPO)
    assert sum(row.ms for row in plan.stages) == pytest.approx(plan.predicted_ms)
    per_chunk = [sum(s.flops for s in chunk) for chunk in plan.chunks]
    assert sum(per_chunk) == pytest.approx(sum(row.flops for row in plan.stages))
    assert sum(row.flops for row in plan.stages) == pytest.approx(6 * 8192 * 4096 * 151936)  # 6NHV


def test_sequence_coupling_follows_row_lengths():
    """Off-policy GSPO cuts only between sequences: rows of 3,000 tokens make chunks whole multiples of them; on-policy
    every ratio is 1 and the chunks may cut anywhere."""
    rows = [3000] * 4
    budget = 3 * GIB // 2  # 5,300 tokens of bf16 logits
    off = fused_gspo.explain(12000, 4096, 151936, device="h100", row_lengths=rows, workspace_bytes=budget, **GSPO)
    assert off.coupling == "sequence" and off.chunk_tokens % 3000 == 0
    on = fused_gspo.explain(
        12000, 4096, 151936, device="h100", row_lengths=rows, workspace_bytes=budget, on_policy=True, **GSPO
    )
    assert on.coupling == "token" and on.chunk_tokens == 4000
    # a row longer than the whole workspace: only two phases can score it
    long = fused_gspo.explain(12000, 4096, 151936, device="h100", row_lengths=[12000], workspace_bytes=GIB, **GSPO)
    assert long.strategy == "two_phase"


# on-policy with the sampler's log-probs, an off-policy mask reads each whole sequence: explain must plan what runs
def test_explain_plans_what_an_on_policy_call_with_sampling_logps_runs(monkeypatch):
    from conftest import cast_problem, draw_problem, workspace_for

    import fused_gspo.chunked as chunked

    ran = []
    for name in ("LogProbFunction", "SinglePassFunction"):
        cls = getattr(chunked, name)
        apply = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _n=name, _f=apply: (ran.append((_n, a[4].bounds)), _f(*a))[1])
    problem = draw_problem(3, 6, 16, 50, seed=2, off_policy=False, with_sampling=True)
    budget = workspace_for(2, "torch", torch.float32, 50, 16)  # 2 tokens per chunk: shorter than every row
    cfg = dict(loss_type="dapo", off_policy_mask_threshold=0.3)
    fused_gspo.fused_policy_loss(**cast_problem(problem, torch.float32), backend="torch", workspace_bytes=budget, **cfg)
    rows = problem["completion_mask"].sum(1).tolist()
    plan = fused_gspo.explain(sum(rows), 16, 50, dtype=torch.float32, device="cpu", workspace_bytes=budget,
                              row_lengths=rows, on_policy=True, sampling_logps=True, **cfg)  # fmt: skip
    assert plan.coupling == "sequence"  # was "token": a single pass explained, two phases run
    name, bounds = ran[0]
    strategy = "single_pass" if name == "SinglePassFunction" else "two_phase"
    assert (plan.strategy, plan.num_chunks) == (strategy, len(bounds)) == ("two_phase", 7)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="tokens"):
        fused_gspo.explain(-1, 8, 8)
    with pytest.raises(ValueError, match="vocab"):
        fused_gspo.explain(8, 8, 0)
    with pytest.raises(ValueError, match="mode"):
        fused_gspo.explain(8, 8, 8, mode="backward")
    with pytest.raises(ValueError, match="row_lengths"):
        fused_gspo.explain(8, 8, 8, row_lengths=[3, 3])
    with pytest.raises(ValueError, match="workspace_bytes"):
        fused_gspo.explain(8, 8, 8, workspace_bytes="lots")
    with pytest.raises(ValueError, match="unknown device profile"):
        fused_gspo.explain(8, 8, 8, device="tpu")
    with pytest.raises(TypeError, match="unknown PolicyLossConfig"):
        fused_gspo.explain(8, 8, 8, no_such_option=1)


def test_explain_matches_what_a_call_does(monkeypatch):
    """On CPU, explain(device="cpu") gives the chunks fused_policy_loss really runs."""
    from fused_gspo.chunked import SinglePassFunction

    seen = []
    original = SinglePassFunction.apply

    def spy(*args):
        seen.append(args[4].bounds)
        return original(*args)

    monkeypatch.setattr(SinglePassFunction, "apply", spy)
    B, T, H, V = 4, 10, 8, 97
    workspace = 13 * V * 4 * 3
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g)
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T)
    old = torch.full((B, T), -4.0)
    fused_gspo.fused_policy_loss(
        hidden, weight, ids, torch.ones(B), mask, old_logps=old, backend="torch", workspace_bytes=workspace, **GSPO
    )
    plan = fused_gspo.explain(
        B * T, H, V, dtype=torch.float32, device="cpu", row_lengths=T, workspace_bytes=workspace, **GSPO
    )
    assert plan.backend == "torch" and len(seen) == 1
    assert (plan.num_chunks, plan.chunk_tokens) == (len(seen[0]), max(b - a for a, b in seen[0])) == (4, 10)
