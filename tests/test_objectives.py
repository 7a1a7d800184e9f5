"""The shared loss math (``fused_gspo.objectives``) against TRL 1.16.0's own ``_compute_loss``.

TRL's real methods (``GRPOTrainer._compute_loss``, ``GMPOTrainer._compute_loss``, ``RLOOTrainer._compute_loss``) run
as unbound functions on a lightweight fake trainer that carries exactly the attributes they read, with a one-process
accelerator and ``_get_per_token_logps_and_entropies`` returning given float64 leaves. The same leaves go through
``policy_objective`` / ``policy_metrics`` (chained as ``api._finish`` chains them), and the test asserts the same loss,
the same gradients w.r.t. the log-probs and the entropies, and the same logged metrics.

GSPO-token (``importance_sampling_level="sequence_token"``), which TRL 1.16 lacks, is checked against a hand-written
float64 expression of its definition and against GSPO's gradient.

Inputs follow TRL's conventions: an integer ``completion_mask``, zeros at masked positions of the current log-probs
and entropies (other per-token inputs carry arbitrary finite values there, which must not matter). Two deliberate
departures from TRL's dtypes, both to compare at float64 precision rather than at TRL's incidental float32 rounding:
``num_items_in_batch`` is a float64 0-d tensor (TRL's is int64, and ``int64.clamp(min=1.0)`` makes the dapo normalizer
float32), and TRL's 0/1 indicator metrics (``clip_ratio/*``, ``cispo_clip_ratio``), which TRL averages in float32
(``bool.float()``), are compared after rounding ours to float32.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from trl import GRPOTrainer, RLOOTrainer
from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

from fused_gspo.config import PolicyLossConfig
from fused_gspo.objectives import Normalizers, PolicyBatch, high_entropy_mask, policy_metrics, policy_objective

F64 = torch.float64
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
TRL_LEVELS = ("token", "sequence")
FLOAT32_METRICS = {
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
    "cispo_clip_ratio",
}
REL = 1e-10
GMPO_EPSILON = GMPOConfig.__dataclass_fields__["epsilon"].default  # 0.4, in log space


# ----------------------------------------------------------------------------------------------------------- inputs


@st.composite
def problems(draw):
    """Random ``[B, T]`` inputs: masks with zeros (maybe a fully masked row), off-policy old log-probs, etc.

    Hypothesis draws the shapes, the mask density, a padded position, the noise scale and a seed; the mask bits and
    the float64 values come from a generator seeded with it (drawing each float through Hypothesis would cost most of
    the time budget)."""
    B = draw(st.integers(1, 5), label="B")
    T = draw(st.integers(1, 9), label="T")
    n = B * T
    density = draw(st.sampled_from([0.8, 0.6, 0.95]), label="mask density")
    noise = draw(st.sampled_from([0.3, 0.3, 0.1, 0.6]), label="off-policy noise scale")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1), label="seed"))
    mask = (torch.rand((B, T), generator=gen) < density).long()
    mask.view(-1)[draw(st.integers(0, n - 1), label="padded position")] = 0  # at least one padded position
    if draw(st.sampled_from([False, False, True]), label="fully masked row"):
        mask[draw(st.integers(0, B - 1), label="masked row")] = 0
    valid = mask.bool()

    def uniform(lo, hi, shape=(B, T)):  # in the open interval (lo, hi)
        u = torch.rand(shape, generator=gen, dtype=F64).clamp(1e-9, 1 - 1e-9)
        return lo + (hi - lo) * u

    def normal(scale):
        return scale * torch.randn((B, T), generator=gen, dtype=F64)

    def nonzero(shape):  # magnitudes in (0.05, 2), random signs: never exactly zero
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        return sign * uniform(0.05, 2.0, shape)

    def at_valid(x, fill):
        return torch.where(valid, x, fill)

    zero = torch.zeros((), dtype=F64)
    logps = at_valid(uniform(-8.0, -0.01), zero)
    junk = uniform(-8.0, -0.01)  # arbitrary finite values where the mask is 0: must not matter
    old = at_valid(logps + normal(noise), junk)
    sampling = at_valid(old + normal(noise), junk.flip(-1))
    ref = at_valid(logps + normal(noise), junk.flip(0))
    # Entropies on a 1/256 grid (exact in float32) and, in the scenarios, quantiles with a dyadic 1 - q: then TRL's
    # float32 quantile and ours (taken in the entropies' dtype, float64 here) are the same number. Otherwise they can
    # differ where the quantile falls exactly on a token (float32 0.6 * 25 = 15.000001), see test_high_entropy_mask_*.
    entropy = at_valid((uniform(0.01, 5.0) * 256).round().clamp(min=1) / 256, zero)
    ratio = torch.exp(normal(noise))
    for position in draw(st.lists(st.integers(0, n - 1), max_size=2), label="zero IS ratios"):
        ratio.view(-1)[position] = 0.0  # vLLM's token_mask mode zeroes out-of-range ratios
    return {
        "mask": mask,
        "logps": logps,
        "entropy": entropy,
        "old": old,
        "sampling": sampling,
        "ref": ref,
        "adv_seq": nonzero((B,)),
        "adv_tok": nonzero((B, T)),
        "is_token": at_valid(ratio, torch.ones((), dtype=F64)),  # TRL's ratio is exp(0) = 1 at padded positions
        "is_sequence": torch.exp(noise * torch.randn((B, 1), generator=gen, dtype=F64)),
        # num_items_in_batch spans the generation batch: this micro-batch's tokens and those of the others
        "num_items": float(mask.sum()) + draw(st.integers(0, 60), label="other micro-batches' tokens"),
    }


def _config(**overrides) -> PolicyLossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL-style advice (luspo at token level, vespo at sequence level, ...)
        return PolicyLossConfig(**overrides)


# --------------------------------------------------------------------------------------------------------- fake TRL


class _OneProcessAccelerator:
    """The collective operations TRL calls, for a single process."""

    def __init__(self, num_processes: int = 1):
        self.num_processes = num_processes
        self.sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        assert reduction == "sum"
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0, pad_first=False):
        return x


def _fake_trainer(cfg: PolicyLossConfig, logps: torch.Tensor, entropy: torch.Tensor, use_vllm: bool):
    """A stand-in for a TRL trainer ``self``: exactly the attributes ``_compute_loss`` reads, nothing more."""
    args = types.SimpleNamespace(
        delta=cfg.delta,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
        steps_per_generation=cfg.effective_steps_per_generation,
    )
    fake = types.SimpleNamespace(
        args=args,
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        epsilon_low=cfg.epsilon,
        epsilon_high=cfg.effective_epsilon_high,
        beta=cfg.beta,
        top_entropy_quantile=cfg.top_entropy_quantile,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=use_vllm,
        entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=cfg.entropy_coef != 0.0,
        aux_loss_enabled=False,
        current_gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_completion_length=cfg.max_completion_length,
        model=types.SimpleNamespace(training=True),
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=_OneProcessAccelerator(cfg.num_processes),
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    fake.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, fake)
    calls = []

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == logps.shape[1] and kwargs["compute_entropy"]
        calls.append(logits_to_keep)
        return logps, entropy, None

    fake._get_per_token_logps_and_entropies = per_token_logps_and_entropies
    fake.calls = calls
    return fake


def _trl_inputs(mask, advantages, **optional):
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.full((B, 3), 7, dtype=torch.long),
        "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.arange(B * T, dtype=torch.long).reshape(B, T) % 11 + 1,
        "completion_mask": mask,
        "advantages": advantages,
    }
    inputs.update({k: v for k, v in optional.items() if v is not None})
    return inputs


def _run_trl(method, cfg, logps, entropy, inputs, use_vllm=False):
    """TRL's loss, its gradients w.r.t. (logps, entropy), and its logged metrics (one value each)."""
    lp = logps.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    fake = _fake_trainer(cfg, lp, ent, use_vllm)
    loss = method(fake, fake.model, inputs)
    assert fake.calls, "TRL did not ask for the log-probs"
    grads = _grads(loss, lp, ent)
    metrics = {}
    for key, vals in fake._metrics["train"].items():
        assert len(vals) == 1, (key, vals)
        metrics[key] = vals[0]
    assert set(fake._metrics) == {"train"}
    return loss.detach(), grads, metrics


def _run_ours(cfg, logps, entropy, batch, num_items):
    """Ours, chained as ``api._finish`` chains it."""
    lp = logps.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(ent.detach(), batch.mask, 1 - cfg.top_entropy_quantile)
    norms = Normalizers.of(batch, cfg, num_items, entropy_mask)
    terms = policy_objective(lp, ent, batch, cfg, norms, entropy_mask)
    metrics = policy_metrics(terms, ent.detach(), batch, cfg)
    return terms.loss.detach(), _grads(terms.loss, lp, ent), metrics


def _grads(loss, *leaves):
    if not loss.requires_grad:
        return tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True))


# ------------------------------------------------------------------------------------------------------ comparisons


def _assert_close(ours, theirs, what):
    ours, theirs = torch.as_tensor(ours, dtype=F64), torch.as_tensor(theirs, dtype=F64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), (what, ours, theirs)
    scale = float(torch.cat([ours.abs().flatten(), theirs.abs().flatten(), ours.new_zeros(1)]).max())
    err = float(torch.cat([(ours - theirs).abs().flatten(), ours.new_zeros(1)]).max())
    assert err <= REL * scale, f"{what}: max abs diff {err:.3e} at scale {scale:.3e}\nours={ours}\ntrl={theirs}"


def _assert_metrics_equal(ours: dict, theirs: dict):
    assert set(ours) == set(theirs), f"metric keys: ours {sorted(ours)} vs TRL {sorted(theirs)}"
    for key, expected in theirs.items():
        got = ours[key]
        if math.isnan(expected):
            assert math.isnan(got), (key, got, expected)
        elif key in FLOAT32_METRICS:  # TRL averages bool.float() indicators in float32
            assert np.float32(got) == np.float32(expected), (key, got, expected)
        else:
            assert math.isclose(got, expected, rel_tol=REL, abs_tol=1e-300), (key, got, expected)


def _assert_same(ours, theirs):
    (loss_o, (glp_o, gent_o), metrics_o), (loss_t, (glp_t, gent_t), metrics_t) = ours, theirs
    _assert_close(loss_o, loss_t, "loss")
    _assert_close(glp_o, glp_t, "dL/dlogps")
    _assert_close(gent_o, gent_t, "dL/dentropy")
    _assert_metrics_equal(metrics_o, metrics_t)


# ----------------------------------------------------------------------------------------------------- GRPOTrainer

# name -> (config overrides, input options)
SCENARIOS = {
    "plain": ({}, {}),
    "on_policy": ({}, {"on_policy": True}),
    "kl_bias_corrected": ({"beta": 0.05, "use_bias_correction_kl": True}, {}),
    "kl_uncorrected_delta_eps_high": (
        {"beta": 0.07, "use_bias_correction_kl": False, "delta": 1.25, "epsilon_high": 0.28},
        {},
    ),
    "entropy_quantile_bonus": ({"top_entropy_quantile": 0.75, "entropy_coef": 0.03}, {}),
    "entropy_bonus_on_policy": ({"entropy_coef": -0.02, "beta": 0.04}, {"on_policy": True}),
    "off_policy_mask_sampling_is_token": ({"off_policy_mask_threshold": 0.05}, {"sampling": True, "is": "token"}),
    "off_policy_mask_old_is_sequence": ({"off_policy_mask_threshold": 0.0}, {"is": "sequence"}),
    "accumulation_token_advantages": (
        {"gradient_accumulation_steps": 3, "steps_per_generation": 2, "num_processes": 2},
        {"num_items": True, "token_adv": True},
    ),
    "accumulation_default_spg": ({"gradient_accumulation_steps": 4, "max_completion_length": 16}, {"num_items": True}),
    "everything": (
        {
            "beta": 0.03,
            "use_bias_correction_kl": True,
            "delta": 1.6,
            "epsilon_high": 0.28,
            "top_entropy_quantile": 0.5,
            "off_policy_mask_threshold": 0.02,
            "entropy_coef": 0.01,
            "gradient_accumulation_steps": 2,
            "steps_per_generation": 3,
        },
        {"sampling": True, "is": "token", "num_items": True, "token_adv": True},
    ),
}


def _grpo_case(p, loss_type, level, overrides, opts):
    overrides = dict(overrides)
    if loss_type == "cispo" and "epsilon_high" in overrides:
        overrides["epsilon_high"] = 1.2  # cispo's epsilon_high caps the ratio itself
    cfg = _config(loss_type=loss_type, importance_sampling_level=level, **overrides)
    mask, logps, entropy = p["mask"], p["logps"], p["entropy"]
    advantages = p["adv_tok"] if opts.get("token_adv") else p["adv_seq"]
    old = None if opts.get("on_policy") else p["old"]
    ref = p["ref"] if cfg.beta != 0.0 else None
    sampling = p["sampling"] if opts.get("sampling") else None
    is_ratio = {None: None, "token": p["is_token"], "sequence": p["is_sequence"]}[opts.get("is")]
    num_items = p["num_items"] if opts.get("num_items") else None
    inputs = _trl_inputs(
        mask,
        advantages,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        sampling_per_token_logps=sampling,
        importance_sampling_ratio=is_ratio,
        num_items_in_batch=torch.tensor(float(mask.sum()) if num_items is None else num_items, dtype=F64),
    )
    batch = PolicyBatch(
        mask=mask.to(F64),
        advantages=advantages,
        old_logps=old,
        ref_logps=ref,
        sampling_logps=sampling,
        importance_sampling_ratio=is_ratio,
    )
    return cfg, logps, entropy, inputs, batch, num_items, is_ratio is not None


# every GRPO-family loss type x importance-sampling level x scenario (KL, vLLM ratios, masks, accumulation, ...)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("level", TRL_LEVELS)
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@given(p=problems())
def test_grpo_family_matches_trl(loss_type, level, scenario, p):
    cfg, logps, entropy, inputs, batch, num_items, use_vllm = _grpo_case(p, loss_type, level, *SCENARIOS[scenario])
    theirs = _run_trl(GRPOTrainer._compute_loss, cfg, logps, entropy, inputs, use_vllm=use_vllm)
    ours = _run_ours(cfg, logps, entropy, batch, num_items)
    _assert_same(ours, theirs)


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
    cfg = _config(loss_type="gmpo", epsilon=GMPO_EPSILON, **overrides)
    mask, logps, entropy, advantages = p["mask"], p["logps"], p["entropy"], p["adv_seq"]
    old = None if opts.get("on_policy") else p["old"]
    ref = p["ref"] if cfg.beta != 0.0 else None
    inputs = _trl_inputs(
        mask,
        advantages,
        old_per_token_logps=old,
        ref_per_token_logps=ref,
        num_items_in_batch=torch.tensor(float(mask.sum()), dtype=F64),
    )
    batch = PolicyBatch(mask=mask.to(F64), advantages=advantages, old_logps=old, ref_logps=ref)
    theirs = _run_trl(GMPOTrainer._compute_loss, cfg, logps, entropy, inputs)
    ours = _run_ours(cfg, logps, entropy, batch, None)
    _assert_same(ours, theirs)


# ----------------------------------------------------------------------------------------------------- RLOOTrainer


# RLOO's old log-probs as per-sequence sums, per token, or on-policy
@pytest.mark.parametrize("old_form", ["sums", "per_token", "on_policy"])
@pytest.mark.parametrize(
    "overrides", [{}, {"epsilon_high": 0.28, "gradient_accumulation_steps": 4}], ids=["plain", "eps_high_accumulation"]
)
@given(p=problems())
def test_rloo_matches_trl(old_form, overrides, p):
    cfg = _config(loss_type="rloo", **overrides)
    mask, logps, entropy, advantages = p["mask"], p["logps"], p["entropy"], p["adv_seq"]
    # TRL's RLOO inputs carry the old log-probs summed over the mask; ours also takes them per token, or None
    per_token_old = logps if old_form == "on_policy" else p["old"]
    old_sums = (per_token_old * mask).sum(1)
    ours_old = {"sums": old_sums, "per_token": p["old"], "on_policy": None}[old_form]
    inputs = _trl_inputs(mask, advantages, old_logps=old_sums)
    batch = PolicyBatch(mask=mask.to(F64), advantages=advantages, old_logps=ours_old)
    theirs = _run_trl(RLOOTrainer._compute_loss, cfg, logps, entropy, inputs)
    ours = _run_ours(cfg, logps, entropy, batch, None)
    _assert_same(ours, theirs)


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
        one_process = types.SimpleNamespace(accelerator=_OneProcessAccelerator())
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
    cfg, logps, entropy, _, batch, num_items, _ = _grpo_case(
        p, loss_type, "sequence_token", *GSPO_TOKEN_SCENARIOS[scenario]
    )
    lp_ref, ent_ref = logps.clone().requires_grad_(), entropy.clone().requires_grad_()
    expected = _gspo_token_reference(lp_ref, ent_ref, batch, cfg, num_items)
    expected_grads = _grads(expected, lp_ref, ent_ref)
    loss, grads, _ = _run_ours(cfg, logps, entropy, batch, num_items)
    _assert_close(loss, expected.detach(), "loss")
    _assert_close(grads[0], expected_grads[0], "dL/dlogps")
    _assert_close(grads[1], expected_grads[1], "dL/dentropy")


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
    cfg_seq, logps, entropy, inputs, batch, num_items, _ = _grpo_case(p, loss_type, "sequence", overrides, {})
    cfg_tok = _config(**{**dataclasses.asdict(cfg_seq), "importance_sampling_level": "sequence_token"})
    trl_loss, (trl_grad, _), _ = _run_trl(GRPOTrainer._compute_loss, cfg_seq, logps, entropy, inputs)
    loss, (grad, _), _ = _run_ours(cfg_tok, logps, entropy, batch, num_items)
    _assert_close(loss, trl_loss, "loss")
    _assert_close(grad, trl_grad, "dL/dlogps")


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
        cfg = _config(loss_type=loss_type, importance_sampling_level=level)
        _, (grads[level], _), _ = _run_ours(cfg, p["logps"], p["entropy"], batch, None)
    diff = (grads["sequence"] - grads["sequence_token"]).abs().max()
    assert diff > 1e-6 * grads["sequence_token"].abs().max()


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
    fake = _fake_trainer(_config(), p["logps"], entropy, False)
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
        types.SimpleNamespace(accelerator=_OneProcessAccelerator()), entropy[None], mask, 0.6
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
        cfg = _config(loss_type="dapo", importance_sampling_level="sequence")
        norms = Normalizers.of(batch, cfg)
        part = policy_objective(logps[:3], torch.zeros(3, dtype=F64), selected, cfg, norms)
        whole_mask = torch.cat([mask[:3], torch.zeros(3, dtype=F64)])  # rows 0-2 only: the rest weighs nothing
        rest = PolicyBatch(whole_mask, advantages, old_logps=old, cu_seqlens=cu)
        whole = policy_objective(logps, torch.zeros(6, dtype=F64), rest, cfg, norms)
        assert torch.allclose(part.loss, whole.loss, rtol=1e-14, atol=0)
        assert torch.equal(selected.advantages, advantages[:3]) and torch.equal(selected.old_logps, old[:3])
        assert selected.is_per_row("advantages") == (advantages.shape == (4,))
        assert not selected.is_per_row("old_logps")
