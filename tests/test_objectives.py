"""The shared loss math (``fused_gspo.objectives``) against TRL 1.16.0's own ``_compute_loss``.

TRL's real methods (``GRPOTrainer._compute_loss``, ``GMPOTrainer._compute_loss``, ``RLOOTrainer._compute_loss``) run
as unbound functions on a lightweight fake trainer that carries exactly the attributes they read, with a one-process
accelerator and ``_get_per_token_logps_and_entropies`` returning given float64 leaves (``tests/objective_helpers.py``).
The same leaves go through ``policy_objective`` / ``policy_metrics`` (chained as ``api._finish`` chains them), and the
test asserts the same loss, the same gradients w.r.t. the log-probs and the entropies, and the same logged metrics.
GSPO-token, which TRL 1.16 lacks, is in ``tests/test_objectives_gspo_token.py``.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from objective_helpers import (
    F64,
    GMPO_EPSILON,
    GRPO_LOSS_TYPES,
    SCENARIOS,
    TRL_LEVELS,
    OneProcessAccelerator,
    assert_same,
    fake_trainer,
    grpo_case,
    make_config,
    problems,
    run_ours,
    run_trl,
    trl_inputs,
)
from trl import GRPOTrainer, RLOOTrainer
from trl.experimental.gmpo import GMPOTrainer

from fused_gspo.objectives import Normalizers, PolicyBatch, high_entropy_mask, policy_objective


# every GRPO-family loss type x importance-sampling level x scenario (KL, vLLM ratios, masks, accumulation, ...)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("level", TRL_LEVELS)
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@given(p=problems())
def test_grpo_family_matches_trl(loss_type, level, scenario, p):
    cfg, logps, entropy, inputs, batch, num_items, use_vllm = grpo_case(p, loss_type, level, *SCENARIOS[scenario])
    theirs = run_trl(GRPOTrainer._compute_loss, cfg, logps, entropy, inputs, use_vllm=use_vllm)
    ours = run_ours(cfg, logps, entropy, batch, num_items)
    assert_same(ours, theirs)


# ----------------------------------------------------------------------------------------------------- GMPOTrainer

GMPO_SCENARIOS = {
    "plain": ({}, {}),
    "on_policy": ({}, {"on_policy": True}),
    "kl_eps_high": ({"beta": 0.05, "epsilon_high": 0.3}, {}),
    "entropy_quantile_accumulation": ({"top_entropy_quantile": 0.75, "gradient_accumulation_steps": 3}, {}),
    "everything": (
        {"beta": 0.02, "use_bias_correction_kl": False, "top_entropy_quantile": 0.25, "gradient_accumulation_steps": 2},
        {},
    ),
}


# GMPO's scenarios: on- and off-policy, KL, the entropy quantile, accumulation
@pytest.mark.parametrize("scenario", list(GMPO_SCENARIOS))
@given(p=problems())
def test_gmpo_matches_trl(scenario, p):
    overrides, opts = GMPO_SCENARIOS[scenario]
    cfg = make_config(loss_type="gmpo", epsilon=GMPO_EPSILON, **overrides)
    mask, logps, entropy, advantages = p["mask"], p["logps"], p["entropy"], p["adv_seq"]
    old = None if opts.get("on_policy") else p["old"]
    ref = p["ref"] if cfg.beta != 0.0 else None
    inputs = trl_inputs(
        mask,
        advantages,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=torch.tensor(float(mask.sum()), dtype=F64),
    )
    batch = PolicyBatch(mask=mask.to(F64), advantages=advantages, old_logps=old, ref_logps=ref)
    theirs = run_trl(GMPOTrainer._compute_loss, cfg, logps, entropy, inputs)
    ours = run_ours(cfg, logps, entropy, batch, None)
    assert_same(ours, theirs)


# ----------------------------------------------------------------------------------------------------- RLOOTrainer


# RLOO's old log-probs as per-sequence sums, per token, or on-policy
@pytest.mark.parametrize("old_form", ["sums", "per_token", "on_policy"])
@pytest.mark.parametrize(
    "overrides", [{}, {"epsilon_high": 0.28, "gradient_accumulation_steps": 4}], ids=["plain", "eps_high_accumulation"]
)
@given(p=problems())
def test_rloo_matches_trl(old_form, overrides, p):
    cfg = make_config(loss_type="rloo", **overrides)
    mask, logps, entropy, advantages = p["mask"], p["logps"], p["entropy"], p["adv_seq"]
    # TRL's RLOO inputs carry the old log-probs summed over the mask; ours also takes them per token, or None
    per_token_old = logps if old_form == "on_policy" else p["old"]
    old_sums = (per_token_old * mask).sum(1)
    ours_old = {"sums": old_sums, "per_token": p["old"], "on_policy": None}[old_form]
    inputs = trl_inputs(mask, advantages, old_logps=old_sums)
    batch = PolicyBatch(mask=mask.to(F64), advantages=advantages, old_logps=ours_old)
    theirs = run_trl(RLOOTrainer._compute_loss, cfg, logps, entropy, inputs)
    ours = run_ours(cfg, logps, entropy, batch, None)
    assert_same(ours, theirs)


# ------------------------------------------------------------------------------------------------ entropy quantile


# quantiles that keep most, half and few of the tokens
@pytest.mark.parametrize("quantile", [0.2, 0.6, 0.75])
@given(p=problems(), seed=st.integers(0, 2**31 - 1))
def test_high_entropy_mask_matches_trl(quantile, p, seed):
    """TRL's ``get_high_entropy_mask`` on float32 entropies with arbitrary values (TRL's own dtype): the same tokens.

    With float64 entropies ours deliberately takes the quantile in float64 and TRL in float32; the two can then
    disagree on a token that sits exactly on the quantile (see test_high_entropy_mask_float64_departure)."""
    mask = p["mask"]
    entropy = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 4
    entropy = entropy * mask
    fake = fake_trainer(make_config(), p["logps"], entropy, False)
    expected = fake.get_high_entropy_mask(entropy, mask, 1 - quantile)
    assert torch.equal(high_entropy_mask(entropy, mask.to(F64), 1 - quantile), expected)
    assert torch.equal(high_entropy_mask(entropy, mask, 1 - quantile), expected)


def test_high_entropy_mask_float64_departure():
    """The one known difference, pinned: 26 float64 entropies, quantile 0.6 -> rank 0.6 * 25 = 15, exactly on the
    16th smallest (1.0; the next is 4.0). TRL computes the rank in float32 (15.000001), so its cutoff is
    1 + 1e-6 * 3 and drops that token; ours, in float64, keeps it. (TRL's own entropies are float32, where ours
    agrees: test above.)"""
    entropy = torch.cat([torch.arange(1, 16, dtype=F64) / 16, torch.ones(1, dtype=F64), 4 + torch.arange(10) / 8])
    mask = torch.ones(1, 26, dtype=torch.long)
    theirs = GRPOTrainer.get_high_entropy_mask(
        types.SimpleNamespace(accelerator=OneProcessAccelerator()), entropy[None], mask, 0.6
    )
    ours = high_entropy_mask(entropy[None], mask.to(F64), 0.6)
    assert not theirs[0, 15] and ours[0, 15]
    assert torch.equal(ours[0, 16:], theirs[0, 16:]) and not ours[0, :15].any() and not theirs[0, :15].any()


# ------------------------------------------------------------------------------------------------ packed selections


def test_a_selection_of_packed_rows_reads_its_inputs_as_the_whole_batch_does():
    """Sequences of 1, 0, 2 and 3 tokens; rows 0-2 hold 3 positions, as many as rows. Their selection keeps per-token
    inputs per token and per-row ones per row, as decided on the whole batch (issue 23), and its objective is the
    whole batch's restricted to those rows."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, 1, 3, 6])
    mask = torch.ones(6, dtype=F64)
    logps = -torch.rand(6, generator=g, dtype=F64)
    old = logps + 0.1 * torch.randn(6, generator=g, dtype=F64)
    for advantages in (torch.randn(6, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)):
        batch = PolicyBatch(mask, advantages, old_logps=old, cu_seqlens=cu)
        selected = batch.select_rows(0, 3)
        cfg = make_config(loss_type="dapo", importance_sampling_level="sequence")
        norms = Normalizers.of(batch, cfg)
        part = policy_objective(logps[:3], torch.zeros(3, dtype=F64), selected, cfg, norms)
        whole_mask = torch.cat([mask[:3], torch.zeros(3, dtype=F64)])  # rows 0-2 only: the rest weighs nothing
        rest = PolicyBatch(whole_mask, advantages, old_logps=old, cu_seqlens=cu)
        whole = policy_objective(logps, torch.zeros(6, dtype=F64), rest, cfg, norms)
        assert torch.allclose(part.loss, whole.loss, rtol=1e-14, atol=0)
        assert torch.equal(selected.advantages, advantages[:3]) and torch.equal(selected.old_logps, old[:3])
        assert selected.is_per_row("advantages") == (advantages.shape == (4,))
        assert not selected.is_per_row("old_logps")
