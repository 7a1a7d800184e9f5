"""GSPO-token (``importance_sampling_level="sequence_token"``), which TRL 1.16 lacks: the shared loss math against a
hand-written float64 expression of its definition, and against GSPO's gradient (TRL's sequence level) where the two
must coincide (``tests/objective_helpers.py`` holds the inputs and the runs)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from hypothesis import assume, given
from objective_helpers import (
    F64,
    GRPO_LOSS_TYPES,
    SCENARIOS,
    OneProcessAccelerator,
    assert_close,
    grads_of,
    grpo_case,
    make_config,
    problems,
    run_ours,
    run_trl,
)
from trl import GRPOTrainer

from fused_gspo.config import PolicyLossConfig
from fused_gspo.objectives import PolicyBatch

# ------------------------------------------------------------------------------------------------------- GSPO-token


def _gspo_token_reference(logps, entropy, batch: PolicyBatch, cfg: PolicyLossConfig, num_items):
    """GSPO-token by its definition, written out in float64: TRL's token-level GRPO path with the log-weight
    ``logp - stopgrad(logp) + stopgrad(s_i)``, ``s_i`` the masked mean log-ratio of sequence ``i``.

    The masks and VESPO's weights are TRL's own static helpers; everything else is spelled out here."""
    mask = batch.mask
    B, T = mask.shape
    adv = batch.advantages if batch.advantages.dim() == 2 else batch.advantages[:, None]
    old = logps.detach() if batch.old_logps is None else batch.old_logps
    lengths = mask.sum(-1, keepdim=True).clamp(min=1.0)
    s = (((logps - old) * mask).sum(-1, keepdim=True) / lengths).detach()
    ratio = torch.exp(logps - logps.detach() + s)
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * logps
    elif cfg.loss_type == "sapo":
        tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif cfg.loss_type == "vespo":
        k_lambda = (cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg, cfg.vespo_lambda_neg)
        phi = GRPOTrainer.get_gamma_weights(adv, logps - old, mask, batch.importance_sampling_ratio, *k_lambda)
        per_token = -phi * adv * logps
    else:
        capped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        per_token = -torch.minimum(capped * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    if cfg.off_policy_mask_threshold is not None:
        sampling = old if batch.sampling_logps is None else batch.sampling_logps
        per_token = per_token * GRPOTrainer.get_off_policy_mask(
            adv, logps, sampling, mask, cfg.off_policy_mask_threshold
        )
    effective = mask
    if cfg.top_entropy_quantile < 1.0:
        one_process = types.SimpleNamespace(accelerator=OneProcessAccelerator())
        entropy_mask = GRPOTrainer.get_high_entropy_mask(one_process, entropy, mask, 1 - cfg.top_entropy_quantile)
        per_token = per_token * entropy_mask
        effective = mask * entropy_mask
    if batch.importance_sampling_ratio is not None and cfg.loss_type != "vespo":
        per_token = per_token * batch.importance_sampling_ratio
    if cfg.beta != 0.0:
        d = batch.ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.beta * (kl * ratio if cfg.use_bias_correction_kl else kl)
    ga = cfg.gradient_accumulation_steps
    spg = ga if cfg.steps_per_generation is None else cfg.steps_per_generation
    total = (per_token * mask).sum()
    if cfg.loss_type in ("grpo", "sapo"):
        loss = ((per_token * mask).sum(-1) / lengths[:, 0]).mean() / ga
    elif cfg.loss_type == "bnpo":
        loss = total / mask.sum().clamp(min=1.0) / ga
    elif cfg.loss_type == "dr_grpo":
        loss = total / (B * cfg.max_completion_length) / ga
    elif cfg.loss_type == "luspo":
        loss = (per_token * mask).sum(-1).mean() / ga
    else:  # dapo, cispo, vespo
        n = float(mask.sum()) if num_items is None else num_items
        loss = total / (max(n, 1.0) / cfg.num_processes * ga / spg)
    if cfg.entropy_coef != 0.0:
        loss = loss - cfg.entropy_coef * (entropy * effective).sum() / effective.sum().clamp(min=1.0) / ga
    return loss


GSPO_TOKEN_SCENARIOS = {
    "plain": ({}, {}),
    "on_policy_token_advantages": ({}, {"on_policy": True, "token_adv": True}),
    "kl_bias_corrected_token_advantages": ({"beta": 0.05, "use_bias_correction_kl": True}, {"token_adv": True}),
    "kl_uncorrected_delta_accumulation": (
        {
            "beta": 0.05,
            "use_bias_correction_kl": False,
            "delta": 1.25,
            "epsilon_high": 0.28,
            "gradient_accumulation_steps": 3,
            "steps_per_generation": 2,
        },
        {"num_items": True},
    ),
    "off_policy_mask_old_is_sequence": SCENARIOS["off_policy_mask_old_is_sequence"],
    "everything": SCENARIOS["everything"],
}


# GSPO-token against its definition, every clipped loss type and scenario
@pytest.mark.parametrize("scenario", list(GSPO_TOKEN_SCENARIOS))
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@given(p=problems())
def test_gspo_token_matches_its_definition(loss_type, scenario, p):
    cfg, logps, entropy, _, batch, num_items, _ = grpo_case(
        p, loss_type, "sequence_token", *GSPO_TOKEN_SCENARIOS[scenario]
    )
    lp_ref, ent_ref = logps.clone().requires_grad_(), entropy.clone().requires_grad_()
    expected = _gspo_token_reference(lp_ref, ent_ref, batch, cfg, num_items)
    expected_grads = grads_of(expected, lp_ref, ent_ref)
    loss, grads, _ = run_ours(cfg, logps, entropy, batch, num_items)
    assert_close(loss, expected.detach(), "loss")
    assert_close(grads[0], expected_grads[0], "dL/dlogps")
    assert_close(grads[1], expected_grads[1], "dL/dentropy")


# GSPO-token and GSPO share the value of every ratio; their gradients coincide whenever the advantage, the KL
# correction and the token weights are constant along each sequence. vespo never reads the ratio.
GSPO_TOKEN_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")


# with sequence advantages GSPO-token's gradient is GSPO's, with or without an uncorrected KL
@pytest.mark.parametrize("kl", ["none", "uncorrected"])
@pytest.mark.parametrize("loss_type", GSPO_TOKEN_LOSS_TYPES)
@given(p=problems())
def test_gspo_token_equals_gspo_with_sequence_advantages(loss_type, kl, p):
    """With one advantage per sequence, GSPO-token's gradient is GSPO's (TRL's sequence level)."""
    overrides = {"beta": 0.05, "use_bias_correction_kl": False} if kl == "uncorrected" else {}
    cfg_seq, logps, entropy, inputs, batch, num_items, _ = grpo_case(p, loss_type, "sequence", overrides, {})
    cfg_tok = make_config(**{**dataclasses.asdict(cfg_seq), "importance_sampling_level": "sequence_token"})
    trl_loss, (trl_grad, _), _ = run_trl(GRPOTrainer._compute_loss, cfg_seq, logps, entropy, inputs)
    loss, (grad, _), _ = run_ours(cfg_tok, logps, entropy, batch, num_items)
    assert_close(loss, trl_loss, "loss")
    assert_close(grad, trl_grad, "dL/dlogps")


# with per-token advantages it is not
@pytest.mark.parametrize("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo", "sapo", "luspo"))
@given(p=problems())
def test_gspo_token_differs_from_gspo_with_token_advantages(loss_type, p):
    """With per-token advantages GSPO-token credits each token with its own advantage; GSPO averages them.

    On-policy every ratio is 1 (nothing clipped), so a sequence of two or more tokens with distinct advantages
    must get a different gradient (cispo is excluded: its gradient does not pass through the ratio)."""
    mask = p["mask"].to(F64)
    adv = p["adv_tok"]
    valid = mask.bool()
    spread = torch.where(valid, adv, -math.inf).amax(-1) - torch.where(valid, adv, math.inf).amin(-1)
    assume(bool(((mask.sum(-1) >= 2) & (spread > 1e-3)).any()))
    batch = PolicyBatch(mask=mask, advantages=adv)
    grads = {}
    for level in ("sequence", "sequence_token"):
        cfg = make_config(loss_type=loss_type, importance_sampling_level=level)
        _, (grads[level], _), _ = run_ours(cfg, p["logps"], p["entropy"], batch, None)
    diff = (grads["sequence"] - grads["sequence_token"]).abs().max()
    assert diff > 1e-6 * grads["sequence_token"].abs().max()
