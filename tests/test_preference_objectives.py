"""The preference-loss math (``fused_gspo.preference``) against TRL 1.16.0's own DPO and CPO code.

DPO: ``DPOTrainer._compute_loss`` runs as an unbound function on a fake trainer that carries exactly the attributes
it reads, with a one-process accelerator and fake policy/reference models that return given float64 per-token
leaves (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ``log_sum_sq_probs``, ``aux_loss``), as TRL's fused
LM head returns them: zero where the label is ``-100``. The precomputed-reference path takes its sequence values from
TRL's own ``compute_ref_log_probs``. CPO: ``CPOTrainer.get_batch_loss_metrics`` (hence ``concatenated_forward``,
``get_batch_logps`` and ``cpo_loss``) runs on a fake model returning small float64 full logits; ours gets the
per-token statistics computed from the same logits by :func:`token_statistics`, so the gradient compared is w.r.t.
the logits. Loss, gradient and every logged metric must agree to 1e-10 relative.

Metrics TRL averages in float32 (``(a > b).float().mean()``, ``int64 / int64``) are float32 here too and compared
exactly. The one case TRL cannot run in float64 (``alpha_divergence`` with a coefficient other than 1: its clamp
table has no float64 entry) is compared in float32.
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections import defaultdict

import pytest
import torch
from conftest import assert_max_close
from hypothesis import assume, given
from hypothesis import strategies as st
from trl import DPOTrainer

from fused_gspo.preference import (
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    CPOLossConfig,
    DPOLossConfig,
    PreferenceBatch,
    evaluate_preference,
    preference_gradient_coupling,
    preference_metric_names,
    preference_objective,
    reference_logps,
    required_inputs,
    token_statistics,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: CPO lives in trl.experimental
    from trl.experimental.cpo import CPOTrainer

F64 = torch.float64
REL = 1e-10


# ----------------------------------------------------------------------------------------------------------- inputs


@st.composite
def pairs(draw):
    """Random ``[2B, T]`` per-token inputs in TRL's layout: masks with holes but a valid token in every row, negative
    varied log-probs, statistics consistent with them (``2 logp <= log sum p^2 <= 0``), zero where masked.

    Hypothesis draws the shapes, the mask density, the noise scale and a seed; the values come from a generator
    seeded with it (drawing each float through Hypothesis would cost most of the time budget)."""
    B = draw(st.integers(1, 4), label="B")
    T = draw(st.integers(1, 8), label="T")
    density = draw(st.sampled_from([0.7, 0.5, 0.9]), label="mask density")
    noise = draw(st.sampled_from([0.5, 0.2, 1.5]), label="reference noise")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1), label="seed"))
    mask = (torch.rand((2 * B, T), generator=gen) < density).long()
    mask[torch.arange(2 * B), torch.randint(0, T, (2 * B,), generator=gen)] = 1  # a valid token in every row
    valid = mask.bool()

    def uniform(lo, hi, shape=(2 * B, T)):
        u = torch.rand(shape, generator=gen, dtype=F64).clamp(1e-9, 1 - 1e-9)
        return lo + (hi - lo) * u

    def at_valid(x):
        return torch.where(valid, x, torch.zeros((), dtype=x.dtype))

    logps = at_valid(uniform(-4.0, -0.01))
    ref = at_valid(logps + noise * torch.randn((2 * B, T), generator=gen, dtype=F64))
    return {
        "mask": mask,
        "logps": logps,
        "ref": ref,
        "entropy": at_valid(uniform(0.01, 5.0)),
        "mean_logits": at_valid(uniform(-3.0, 3.0)),
        "is_top1": (torch.rand((2 * B, T), generator=gen) < 0.4) & valid,
        "log_sum_sq_probs": at_valid(2 * logps * uniform(0.0, 1.0)),  # in [2 logp, 0]
        # the unshifted completion_mask's first column: 1 when a completion starts at the first input position
        "first": (torch.rand((2 * B,), generator=gen) < 0.3).long(),
        "aux_loss": uniform(0.1, 2.0, ()),
    }


@st.composite
def pairs_with_empty_rows(draw):
    """:func:`pairs` with some rows scoring nothing (an empty prompt before a one-token completion): mask and every
    per-token field zero there; TRL's unshifted ``first`` column may still count one token."""
    p = draw(pairs())
    rows = p["mask"].shape[0]
    empty = sorted(draw(st.sets(st.integers(0, rows - 1), min_size=1, max_size=rows), label="empty rows"))
    out = dict(p)
    for key in ("mask", "logps", "ref", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"):
        out[key] = p[key].clone()
        out[key][empty] = 0
    return out


def _batch(p, cfg, ref_chosen, ref_rejected, **extra) -> PreferenceBatch:
    return PreferenceBatch(
        mask=p["mask"],
        entropy=p["entropy"],
        mean_logits=p["mean_logits"],
        is_top1=p["is_top1"],
        log_sum_sq_probs=p["log_sum_sq_probs"] if cfg.use_weighting else None,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        completion_lengths=p["mask"].sum(1) + p["first"],
        aux_loss=p["aux_loss"] if cfg.router_aux_loss_coef != 0.0 else None,
        **extra,
    )


# --------------------------------------------------------------------------------------------------------- fake TRL


class _OneProcessAccelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def autocast(self):
        return contextlib.nullcontext()


class _FusedHeadModel:
    """A model patched with TRL's fused LM head: returns the given per-token fields, checking TRL's labels."""

    is_gradient_checkpointing = False
    _modules: dict = {}  # accelerate's is_peft_model looks for compiled submodules

    def __init__(self, fields: dict, completion_mask: torch.Tensor, training: bool = True):
        self.fields, self.completion_mask, self.training, self.calls = fields, completion_mask, training, 0

    def __call__(self, *, input_ids, labels, fused_lm_head, **kwargs):
        assert fused_lm_head and not kwargs.get("use_cache", True)
        assert torch.equal(labels[:, 1:] != -100, self.completion_mask[:, 1:].bool())
        self.calls += 1
        return types.SimpleNamespace(**self.fields)


def _fake_dpo_trainer(cfg: DPOLossConfig, policy: _FusedHeadModel, ref: _FusedHeadModel, precompute: bool):
    return types.SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=_OneProcessAccelerator(),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=cfg.discopop_tau),
        aux_loss_enabled=cfg.router_aux_loss_coef != 0.0,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        precompute_ref_logps=precompute,
        ld_alpha=cfg.ld_alpha,
        f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        loss_types=list(cfg.loss_type),
        loss_weights=list(cfg.weights),
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        use_weighting=cfg.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _grads(loss, *leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True))


def _run_dpo(cfg: DPOLossConfig, p: dict, precompute: bool, dtype=F64):
    """TRL's and our (loss, dL/dlogps, metrics) on the same inputs; TRL's reference sequence values when
    precomputed."""
    mask = p["mask"]
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in p.items()}
    completion_mask = torch.cat([p["first"][:, None], mask], dim=1)
    input_ids = torch.arange(completion_mask.numel()).reshape(completion_mask.shape) % 13 + 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
    }
    fields = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    trl_logps = cast["logps"].clone().requires_grad_()
    aux = cast["aux_loss"].clone().requires_grad_() if cfg.router_aux_loss_coef != 0.0 else None
    policy = _FusedHeadModel({"log_probs": trl_logps, "aux_loss": aux, **{k: cast[k] for k in fields}}, completion_mask)
    ref_model = _FusedHeadModel({"log_probs": cast["ref"]}, completion_mask)
    fake = _fake_dpo_trainer(cfg, policy, ref_model, precompute)
    if precompute:
        trl_ref = DPOTrainer.compute_ref_log_probs(fake, ref_model, inputs)
        ours_ref = reference_logps(cast["ref"], mask, cfg.ld_alpha)
        for a, b in zip(ours_ref, trl_ref, strict=True):
            _assert_close(a, b, "reference_logps")
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = trl_ref
    trl_loss = DPOTrainer._compute_loss(fake, policy, inputs, return_outputs=False)
    assert policy.calls == 1 and ref_model.calls == 1
    trl_grad = _grads(trl_loss, trl_logps)[0]
    trl_metrics = {k: v[0] for k, v in fake._metrics["train"].items()}
    assert all(len(v) == 1 for v in fake._metrics["train"].values())
    assert trl_metrics.pop("num_tokens") == completion_mask.numel()  # the trainer's own counter, not the loss's

    if precompute:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_chosen, ref_rejected = reference_logps(cast["ref"], mask, cfg.ld_alpha)
    logps = cast["logps"].clone().requires_grad_()
    batch = _batch(cast, cfg, ref_chosen, ref_rejected)
    terms, metrics = evaluate_preference(logps, batch, cfg)
    assert tuple(metrics) == preference_metric_names(cfg)
    grad = _grads(terms.loss, logps)[0]
    assert not grad[~mask.bool()].any(), "masked positions must get no gradient"
    valid = mask.bool()
    return (terms.loss.detach(), grad[valid], metrics), (trl_loss.detach(), trl_grad[valid], trl_metrics)


# ------------------------------------------------------------------------------------------------------ comparisons


def _assert_close(ours, theirs, what, rel=REL):
    assert_max_close(ours, theirs, what, rel)


def _assert_same(ours, theirs, rel=REL):
    (loss_o, grad_o, metrics_o), (loss_t, grad_t, metrics_t) = ours, theirs
    _assert_close(loss_o, loss_t, "loss", rel)
    _assert_close(grad_o, grad_t, "dL/dlogps", rel)
    assert set(metrics_o) == set(metrics_t), f"metric keys: ours {sorted(metrics_o)} vs TRL {sorted(metrics_t)}"
    for key, expected in metrics_t.items():
        got = metrics_o[key]
        assert got.dim() == 0, key
        if got.dtype == torch.float32 and rel == REL:  # TRL's float32 averages, computed the same way
            assert float(got) == expected, (key, float(got), expected)
        else:
            # float32 runs: sums in another order (TRL sums the selected tokens, ours zeros the others) near 0
            abs_tol = 1e-12 if rel == REL else rel
            assert math.isclose(float(got), expected, rel_tol=rel, abs_tol=abs_tol), (key, float(got), expected)


# ------------------------------------------------------------------------------------------------------------- DPO

_ALL_F = list(F_DIVERGENCE_LOSS_TYPES)
_WEIGHTABLE = [t for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired", "hinge", "sft")]
_SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.15, "aot_unpaired": 0.2}

# name -> (config, precompute the reference)
DPO_SCENARIOS = {
    **{f"{t}": ({"loss_type": t, "label_smoothing": _SMOOTHING.get(t, 0.0)}, False) for t in DPO_LOSS_TYPES},
    "aot_both_no_smoothing": ({"loss_type": ["aot", "aot_unpaired"], "beta": 0.5}, True),
    "sigmoid_str_beta0.5_precomputed": ({"loss_type": "sigmoid", "beta": 0.5}, True),
    "mpo": ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, False),
    "sft_ipo_hinge_default_weights": ({"loss_type": ["sft", "ipo", "hinge"], "beta": 0.3}, True),
    "discopop_tau_exo_pair_ls0.3": (
        {"loss_type": ["discopop", "exo_pair"], "discopop_tau": 0.2, "label_smoothing": 0.3, "beta": 2.0}, False
    ),
    **{
        f"f_{kind}_all_types": (
            {"loss_type": _ALL_F, "loss_weights": [0.5 + 0.25 * i for i in range(len(_ALL_F))],
             "label_smoothing": 0.1, "f_divergence_type": kind, "f_alpha_divergence_coef": 1.0},
            kind == "forward_kl",
        )
        for kind in ("forward_kl", "js_divergence", "alpha_divergence")
    },
    **{f"ld_alpha_{a}": ({"loss_type": ["sigmoid", "ipo", "sft"], "ld_alpha": a}, a == 0.3) for a in (0.0, 0.3)},
    "ld_alpha_aot": ({"loss_type": ["aot", "nca_pair"], "ld_alpha": 0.7, "label_smoothing": 0.1}, False),
    "weighting_all_types": (
        {"loss_type": _WEIGHTABLE, "use_weighting": True, "label_smoothing": 0.05, "beta": 0.3}, True
    ),
    "weighting_ld_alpha_f_js": (
        {"loss_type": ["sigmoid", "robust", "sigmoid_norm"], "use_weighting": True, "ld_alpha": 0.4,
         "label_smoothing": 0.2, "f_divergence_type": "js_divergence"},
        False,
    ),
    "aux_loss": ({"loss_type": ["sigmoid", "sft"], "router_aux_loss_coef": 0.01}, True),
}  # fmt: skip


# every DPO loss type, combination and option (see DPO_SCENARIOS)
@pytest.mark.parametrize("scenario", list(DPO_SCENARIOS))
@given(p=pairs())
def test_dpo_matches_trl(scenario, p):
    overrides, precompute = DPO_SCENARIOS[scenario]
    cfg = DPOLossConfig(**overrides)
    ours, theirs = _run_dpo(cfg, p, precompute)
    _assert_same(ours, theirs)


# rows with nothing to score: TRL's log-prob is 0 there and its normalizers clamp to 1; ours too
@pytest.mark.parametrize("scenario", list(DPO_SCENARIOS))
@given(p=pairs_with_empty_rows())
def test_dpo_matches_trl_with_rows_that_score_nothing(scenario, p):
    overrides, precompute = DPO_SCENARIOS[scenario]
    cfg = DPOLossConfig(**overrides)
    B = p["mask"].shape[0] // 2
    assume("sft" not in cfg.loss_type or p["mask"][:B].any())  # else TRL's sft term is NaN, which ours refuses
    ours, theirs = _run_dpo(cfg, p, precompute)
    _assert_same(ours, theirs)


@given(p=pairs(), coef=st.sampled_from([0.5, 1.8, -0.5]))
def test_dpo_alpha_divergence_matches_trl_in_float32(p, coef):
    """TRL's alpha-divergence has a float32 clamp table only: compare in float32, where both compute the same.
    (A milder reference: with large log-ratios both overflow float32 alike, to the same NaN.)"""
    p = {**p, "ref": p["logps"] + 0.2 * (p["ref"] - p["logps"])}
    cfg = DPOLossConfig(
        loss_type=_ALL_F, label_smoothing=0.1, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=coef
    )
    ours, theirs = _run_dpo(cfg, p, precompute=False, dtype=torch.float32)
    _assert_same(ours, theirs, rel=2e-5)


@given(p=pairs())
def test_trl_fails_where_ours_departs_or_refuses(p):
    """Pins the TRL 1.16 behaviours behind our documented choices: no float64 alpha-divergence (ours computes it),
    and use_weighting's in-place product failing with sft (forward) and hinge (backward) (ours refuses both)."""
    cfg = DPOLossConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    with pytest.raises(KeyError, match="float64"):
        _run_dpo(cfg, p, precompute=False)
    for loss_type in ("sft", "hinge") if p["mask"].shape[0] > 2 else ("hinge",):  # sft's expand(1) is fine
        cfg = DPOLossConfig(loss_type=loss_type)
        cfg.use_weighting = True  # past our validation, to reach TRL
        with pytest.raises(RuntimeError, match="memory location|inplace"):
            _run_dpo(cfg, p, precompute=False)


@given(p=pairs())
def test_dpo_alpha_divergence_float64_is_the_float32_function(p):
    """In float64 ours evaluates the same function (same clamp) at float64 precision."""
    cfg = DPOLossConfig(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    losses = []
    for dtype in (F64, torch.float32):
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in p.items()}
        chosen, rejected = reference_logps(cast["ref"], p["mask"])
        losses.append(preference_objective(cast["logps"], _batch(cast, cfg, chosen, rejected), cfg).loss)
    assert losses[0].dtype == F64 and losses[1].dtype == torch.float32
    _assert_close(losses[0], losses[1], "float64 vs float32", rel=2e-5)


# junk at masked positions changes nothing, for a DPO and a CPO loss
@pytest.mark.parametrize(
    "cfg",
    [DPOLossConfig(loss_type=["sigmoid", "sft", "ipo"], ld_alpha=0.5, use_weighting=False), CPOLossConfig("simpo")],
    ids=["dpo", "cpo"],
)
@given(p=pairs(), junk=st.sampled_from([float("nan"), -30.0, 7.0]))
def test_masked_positions_do_not_matter(cfg, p, junk):
    """Values at masked positions (TRL's head writes zeros there; ours must not rely on it) change nothing."""
    masked = ~p["mask"].bool()
    results = []
    for fill in (0.0, junk):
        logps = torch.where(masked, fill, p["logps"]).requires_grad_()
        if isinstance(cfg, DPOLossConfig):
            chosen, rejected = reference_logps(torch.where(masked, fill, p["ref"]), p["mask"], cfg.ld_alpha)
            batch = _batch(p, cfg, chosen, rejected)
        else:
            batch = PreferenceBatch(mask=p["mask"])
        loss = preference_objective(logps, batch, cfg).loss
        results.append((loss.detach(), _grads(loss, logps)[0]))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------------------------- CPO


@st.composite
def cpo_problems(draw):
    """Small float64 full logits ``[2B, L, V]`` and TRL's labels (``-100`` on the prompt, holes and padding)."""
    B = draw(st.integers(1, 3), label="B")
    L = draw(st.integers(2, 7), label="L")
    V = draw(st.integers(2, 9), label="V")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**63 - 1), label="seed"))
    logits = 1.5 * torch.randn((2 * B, L, V), generator=gen, dtype=F64) + 0.7
    input_ids = torch.randint(0, V, (2 * B, L), generator=gen)
    scored = torch.rand((2 * B, L - 1), generator=gen) < 0.7
    scored[torch.arange(2 * B), torch.randint(0, L - 1, (2 * B,), generator=gen)] = True
    labels = input_ids.clone()
    labels[:, 0] = -100
    labels[:, 1:][~scored] = -100
    return {"logits": logits, "input_ids": input_ids, "labels": labels, "aux_loss": torch.rand((), generator=gen) + 0.1}


def _fake_cpo_trainer(cfg: CPOLossConfig, logits: torch.Tensor, aux_loss):
    def model(input_ids, attention_mask, use_cache, **kwargs):
        assert input_ids.shape == logits.shape[:2] and not use_cache
        assert kwargs.get("output_router_logits", False) == (aux_loss is not None)
        return types.SimpleNamespace(logits=logits, aux_loss=aux_loss)

    fake = types.SimpleNamespace(
        accelerator=_OneProcessAccelerator(),
        is_encoder_decoder=False,
        pad_token_id=0,
        aux_loss_enabled=aux_loss is not None,
        aux_loss_coef=cfg.router_aux_loss_coef,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        loss_type=cfg.loss_type,
        cpo_alpha=cfg.cpo_alpha,
        simpo_gamma=cfg.simpo_gamma,
        alpha=cfg.alpha,
        concatenated_inputs=CPOTrainer.concatenated_inputs,
        get_batch_logps=CPOTrainer.get_batch_logps,
    )
    fake.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, fake)
    fake.concatenated_forward = types.MethodType(CPOTrainer.concatenated_forward, fake)
    return fake, model


CPO_SCENARIOS = {
    "sigmoid": {},
    "sigmoid_smoothing_nll0.5": {"label_smoothing": 0.1, "cpo_alpha": 0.5, "beta": 0.5},
    "hinge": {"loss_type": "hinge", "beta": 0.7},
    "ipo": {"loss_type": "ipo", "beta": 0.3},
    "simpo": {"loss_type": "simpo", "simpo_gamma": 0.8, "beta": 2.0, "cpo_alpha": 0.0},
    "simpo_smoothing_nll": {"loss_type": "simpo", "label_smoothing": 0.2, "cpo_alpha": 1.0},
    "alphapo_recipe": {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5, "simpo_gamma": 0.1},
    "alpha_sigmoid_nll": {"alpha": 0.3, "beta": 0.2, "label_smoothing": 0.05},
    "alpha_negative_ipo": {"loss_type": "ipo", "alpha": -0.2, "cpo_alpha": 0.0},
    "alpha_hinge": {"loss_type": "hinge", "alpha": 0.5, "beta": 0.4},
    "aux_loss": {"router_aux_loss_coef": 0.02},
}


# every CPO loss type and option (see CPO_SCENARIOS), in train and eval
@pytest.mark.parametrize("scenario", list(CPO_SCENARIOS))
@given(p=cpo_problems(), train_eval=st.sampled_from(["train", "eval"]))
def test_cpo_matches_trl(scenario, p, train_eval):
    cfg = CPOLossConfig(**CPO_SCENARIOS[scenario])
    B = p["logits"].shape[0] // 2
    aux = p["aux_loss"] if scenario == "aux_loss" else None
    ids, labels = p["input_ids"], p["labels"]
    trl_batch = {
        "chosen_input_ids": ids[:B],
        "chosen_attention_mask": torch.ones_like(ids[:B]),
        "chosen_labels": labels[:B],
        "rejected_input_ids": ids[B:],
        "rejected_attention_mask": torch.ones_like(ids[B:]),
        "rejected_labels": labels[B:],
    }
    trl_logits = p["logits"].clone().requires_grad_()
    fake, model = _fake_cpo_trainer(cfg, trl_logits, aux)
    trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(fake, model, trl_batch, train_eval=train_eval)
    trl_grad = _grads(trl_loss, trl_logits)[0]

    logits = p["logits"].clone().requires_grad_()
    mask = (labels[:, 1:] != -100).long()
    stats = token_statistics(logits[:, :-1], labels[:, 1:], mask, outputs=("log_probs",))
    batch = PreferenceBatch(mask=mask, position_mean_logits=logits.detach().mean(-1), aux_loss=aux)
    terms, metrics = evaluate_preference(stats["log_probs"], batch, cfg, train_eval=train_eval)
    assert tuple(metrics) == preference_metric_names(cfg, train_eval)
    grad = _grads(terms.loss, logits)[0]
    _assert_same((terms.loss.detach(), grad, metrics), (trl_loss.detach(), trl_grad, trl_metrics))


# rows with nothing to score (every label -100): a sum over no token is 0 in TRL and here; TRL's averages divide by
# zero (NaN), which ours refuses by name
@pytest.mark.parametrize("scenario", list(CPO_SCENARIOS))
@given(p=cpo_problems(), data=st.data())
def test_cpo_rows_that_score_nothing(scenario, p, data):
    cfg = CPOLossConfig(**CPO_SCENARIOS[scenario])
    labels = p["labels"].clone()
    rows = labels.shape[0]
    empty = sorted(data.draw(st.sets(st.integers(0, rows - 1), min_size=1, max_size=rows), label="empty rows"))
    labels[empty] = -100
    B = rows // 2
    ids = p["input_ids"]
    trl_batch = {
        "chosen_input_ids": ids[:B], "chosen_attention_mask": torch.ones_like(ids[:B]), "chosen_labels": labels[:B],
        "rejected_input_ids": ids[B:], "rejected_attention_mask": torch.ones_like(ids[B:]),
        "rejected_labels": labels[B:],
    }  # fmt: skip
    aux = p["aux_loss"] if scenario == "aux_loss" else None
    trl_logits = p["logits"].clone().requires_grad_()
    fake, model = _fake_cpo_trainer(cfg, trl_logits, aux)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of a mean over no element in TRL's NLL
        trl_loss, trl_metrics = CPOTrainer.get_batch_loss_metrics(fake, model, trl_batch)

    logits = p["logits"].clone().requires_grad_()
    mask = (labels[:, 1:] != -100).long()
    stats = token_statistics(logits[:, :-1], labels[:, 1:], mask, outputs=("log_probs",))
    batch = PreferenceBatch(mask=mask, position_mean_logits=logits.detach().mean(-1), aux_loss=aux)
    refused = cfg.averages_log_probs or (cfg.cpo_alpha != 0 and not mask[:B].any())
    if refused:
        assert not torch.isfinite(trl_loss)
        with pytest.raises(ValueError, match="mask"):
            evaluate_preference(stats["log_probs"], batch, cfg)
        return
    trl_grad = _grads(trl_loss, trl_logits)[0]
    terms, metrics = evaluate_preference(stats["log_probs"], batch, cfg)
    grad = _grads(terms.loss, logits)[0]
    assert torch.isfinite(terms.loss)
    _assert_same((terms.loss.detach(), grad, metrics), (trl_loss.detach(), trl_grad, trl_metrics))


# --------------------------------------------------------------------------------------------------------- coupling


_PAIRED = [t for t in DPO_LOSS_TYPES if not t.startswith("aot")]
# Sums of every loss type of a coupling: a term reaching across pairs would show in the sum's gradient
COUPLING_CONFIGS = {
    "dpo_all_paired": DPOLossConfig(loss_type=_PAIRED, label_smoothing=0.1, ld_alpha=0.6),
    "dpo_weighted": DPOLossConfig(loss_type=_WEIGHTABLE, label_smoothing=0.1, use_weighting=True),
    "dpo_f_js": DPOLossConfig(loss_type=_ALL_F, label_smoothing=0.1, f_divergence_type="js_divergence"),
    **{f"cpo_{t}": CPOLossConfig(loss_type=t, alpha=0.2) for t in ("sigmoid", "hinge", "ipo", "simpo")},
}


# every config said to be pair-coupled
@pytest.mark.parametrize("name", list(COUPLING_CONFIGS))
@given(p=pairs())
def test_pair_coupling_is_what_it_claims(name, p):
    """ "pair": changing another pair's log-probs leaves pair 0's gradient unchanged."""
    cfg = COUPLING_CONFIGS[name]
    assert preference_gradient_coupling(cfg) == "pair"
    B = p["mask"].shape[0] // 2
    if B < 2:
        return
    rows = [0, B]

    def grad_of_pair0(logps):
        logps = logps.clone().requires_grad_()
        if isinstance(cfg, DPOLossConfig):
            batch = _batch(p, cfg, *reference_logps(p["ref"], p["mask"]))
        else:
            batch = PreferenceBatch(mask=p["mask"])
        return _grads(preference_objective(logps, batch, cfg).loss, logps)[0][rows]

    other = p["logps"].clone()
    other[[1, B + 1]] = torch.where(p["mask"][[1, B + 1]].bool(), other[[1, B + 1]] - 0.37, 0.0)
    torch.testing.assert_close(grad_of_pair0(p["logps"]), grad_of_pair0(other), rtol=1e-12, atol=1e-15)


# the two sorting loss types, the only global ones
@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_gradient_depends_on_other_pairs(loss_type):
    """The sort makes "global" real: swapping which pair has the larger log-ratio moves pair 0's gradient."""
    cfg = DPOLossConfig(loss_type=loss_type)
    assert preference_gradient_coupling(cfg) == "global"
    assert preference_gradient_coupling(cfg.replace(loss_type=["sigmoid", loss_type])) == "global"
    mask = torch.ones(4, 1, dtype=torch.long)
    ref = PreferenceBatch(mask=mask, ref_chosen_logps=torch.tensor([-1.0, -1.0], dtype=F64),
                          ref_rejected_logps=torch.tensor([-2.0, -4.0], dtype=F64))  # fmt: skip
    grads = []
    for pair1 in (-0.5, -9.0):
        logps = torch.tensor([[-1.0], [pair1], [-1.5], [-1.5]], dtype=F64, requires_grad=True)
        grads.append(_grads(preference_objective(logps, ref, cfg).loss, logps)[0][[0, 2]])
    assert not torch.allclose(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------- required inputs


def test_required_inputs():
    assert required_inputs(DPOLossConfig()) == (
        "ref_chosen_logps", "ref_rejected_logps", "entropy", "mean_logits", "is_top1"
    )  # fmt: skip
    assert "log_sum_sq_probs" in required_inputs(DPOLossConfig(use_weighting=True), metrics=False)
    assert "aux_loss" in required_inputs(DPOLossConfig(router_aux_loss_coef=0.1))
    assert required_inputs(CPOLossConfig()) == ("position_mean_logits",)
    assert required_inputs(CPOLossConfig(), metrics=False) == ()
    with pytest.raises(TypeError):
        preference_gradient_coupling(object())
