"""What the objective tests share: hypothesis inputs in TRL's conventions, a fake one-process TRL trainer on which
TRL 1.16.0's own ``_compute_loss`` methods run, our objective run on the same float64 leaves, and the comparisons
(``tests/test_objectives.py`` against TRL, ``tests/test_objectives_gspo_token.py`` against GSPO-token's definition).

Inputs follow TRL's conventions: an integer ``completion_mask``, zeros at masked positions of the current log-probs
and entropies (other per-token inputs carry arbitrary finite values there, which must not matter). Two deliberate
departures from TRL's dtypes, both to compare at float64 precision rather than at TRL's incidental float32 rounding:
``num_items_in_batch`` is a float64 0-d tensor (TRL's is int64, and ``int64.clamp(min=1.0)`` makes the dapo normalizer
float32), and TRL's 0/1 indicator metrics (``clip_ratio/*``, ``cispo_clip_ratio``), which TRL averages in float32
(``bool.float()``), are compared after rounding ours to float32.
"""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict

import numpy as np
import torch
from hypothesis import strategies as st
from trl import GRPOTrainer
from trl.experimental.gmpo import GMPOConfig

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


def make_config(**overrides) -> PolicyLossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL-style advice (luspo at token level, vespo at sequence level, ...)
        return PolicyLossConfig(**overrides)


# --------------------------------------------------------------------------------------------------------- fake TRL


class OneProcessAccelerator:
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


def fake_trainer(cfg: PolicyLossConfig, logps: torch.Tensor, entropy: torch.Tensor, use_vllm: bool):
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
        accelerator=OneProcessAccelerator(cfg.num_processes),
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


def trl_inputs(mask, advantages, **optional):
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


def run_trl(method, cfg, logps, entropy, inputs, use_vllm=False):
    """TRL's loss, its gradients w.r.t. (logps, entropy), and its logged metrics (one value each)."""
    lp = logps.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    fake = fake_trainer(cfg, lp, ent, use_vllm)
    loss = method(fake, fake.model, inputs)
    assert fake.calls, "TRL did not ask for the log-probs"
    grads = grads_of(loss, lp, ent)
    metrics = {}
    for key, vals in fake._metrics["train"].items():
        assert len(vals) == 1, (key, vals)
        metrics[key] = vals[0]
    assert set(fake._metrics) == {"train"}
    return loss.detach(), grads, metrics


def run_ours(cfg, logps, entropy, batch, num_items):
    """Ours, chained as ``api._finish`` chains it."""
    lp = logps.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    entropy_mask = None
    if cfg.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(ent.detach(), batch.mask, 1 - cfg.top_entropy_quantile)
    norms = Normalizers.of(batch, cfg, num_items, entropy_mask)
    terms = policy_objective(lp, ent, batch, cfg, norms, entropy_mask)
    metrics = policy_metrics(terms, ent.detach(), batch, cfg)
    return terms.loss.detach(), grads_of(terms.loss, lp, ent), metrics


def grads_of(loss, *leaves):
    if not loss.requires_grad:
        return tuple(torch.zeros_like(x) for x in leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True))


# ------------------------------------------------------------------------------------------------------ comparisons


def assert_close(ours, theirs, what):
    ours, theirs = torch.as_tensor(ours, dtype=F64), torch.as_tensor(theirs, dtype=F64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), (what, ours, theirs)
    scale = float(torch.cat([ours.abs().flatten(), theirs.abs().flatten(), ours.new_zeros(1)]).max())
    err = float(torch.cat([(ours - theirs).abs().flatten(), ours.new_zeros(1)]).max())
    assert err <= REL * scale, f"{what}: max abs diff {err:.3e} at scale {scale:.3e}\nours={ours}\ntrl={theirs}"


def assert_metrics_equal(ours: dict, theirs: dict):
    assert set(ours) == set(theirs), f"metric keys: ours {sorted(ours)} vs TRL {sorted(theirs)}"
    for key, expected in theirs.items():
        got = ours[key]
        if math.isnan(expected):
            assert math.isnan(got), (key, got, expected)
        elif key in FLOAT32_METRICS:  # TRL averages bool.float() indicators in float32
            assert np.float32(got) == np.float32(expected), (key, got, expected)
        else:
            assert math.isclose(got, expected, rel_tol=REL, abs_tol=1e-300), (key, got, expected)


def assert_same(ours, theirs):
    (loss_o, (glp_o, gent_o), metrics_o), (loss_t, (glp_t, gent_t), metrics_t) = ours, theirs
    assert_close(loss_o, loss_t, "loss")
    assert_close(glp_o, glp_t, "dL/dlogps")
    assert_close(gent_o, gent_t, "dL/dentropy")
    assert_metrics_equal(metrics_o, metrics_t)


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


def grpo_case(p, loss_type, level, overrides, opts):
    overrides = dict(overrides)
    if loss_type == "cispo" and "epsilon_high" in overrides:
        overrides["epsilon_high"] = 1.2  # cispo's epsilon_high caps the ratio itself
    cfg = make_config(loss_type=loss_type, importance_sampling_level=level, **overrides)
    mask, logps, entropy = p["mask"], p["logps"], p["entropy"]
    advantages = p["adv_tok"] if opts.get("token_adv") else p["adv_seq"]
    old = None if opts.get("on_policy") else p["old"]
    ref = p["ref"] if cfg.beta != 0.0 else None
    sampling = p["sampling"] if opts.get("sampling") else None
    is_ratio = {None: None, "token": p["is_token"], "sequence": p["is_sequence"]}[opts.get("is")]
    num_items = p["num_items"] if opts.get("num_items") else None
    inputs = trl_inputs(
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
