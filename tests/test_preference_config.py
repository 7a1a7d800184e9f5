"""DPOLossConfig / CPOLossConfig: TRL 1.16.0's names and defaults, validation of every field and combination."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from fused_gspo.preference import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    CPOLossConfig,
    DPOLossConfig,
)

trl = pytest.importorskip("trl")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRLExperimentalWarning: CPO lives in trl.experimental
    from trl.experimental.cpo import CPOConfig

# Resolved by the trainer (TRL's None means "the model config's"), here the value itself
RESOLVED = {"router_aux_loss_coef"}


def _trl_defaults(config_class) -> dict:
    out = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# each config class against the TRL config it mirrors
@pytest.mark.parametrize(
    "ours,theirs,minimum",
    [(DPOLossConfig, trl.DPOConfig, 9), (CPOLossConfig, CPOConfig, 6)],
    ids=["dpo", "cpo"],
)
def test_defaults_follow_trl(ours, theirs, minimum):
    defaults = _trl_defaults(theirs)
    cfg = ours()
    shared = [f.name for f in dataclasses.fields(cfg) if f.name in defaults and f.name not in RESOLVED]
    assert len(shared) >= minimum, shared
    for name in shared:
        assert getattr(cfg, name) == defaults[name], name


def test_every_trl_loss_type_is_known():
    """The loss types TRL's help strings list are exactly ours."""
    dpo_help = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}["loss_type"].metadata["help"]
    for name in DPO_LOSS_TYPES:
        assert f"'{name}'" in dpo_help, name
    assert dpo_help.count("`'") == len(DPO_LOSS_TYPES)
    cpo_choices = {f.name: f for f in dataclasses.fields(CPOConfig)}["loss_type"].metadata["choices"]
    assert tuple(cpo_choices) == CPO_LOSS_TYPES


def test_dpo_loss_type_string_or_list():
    assert DPOLossConfig(loss_type="ipo").loss_type == ["ipo"]
    assert DPOLossConfig(loss_type=("sigmoid", "sft")).loss_type == ["sigmoid", "sft"]
    cfg = DPOLossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert cfg.weights == (0.8, 0.2, 1.0)
    assert DPOLossConfig(loss_type=["sigmoid", "sft"]).weights == (1.0, 1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations in TrainingArguments
def test_alphapo_is_cpo_configs_shorthand():
    """TRL's paper-index recipe; CPOConfig turns loss_type="alphapo" into simpo with cpo_alpha=0, keeping alpha."""
    recipe = {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5, "simpo_gamma": 0.1, "cpo_alpha": 0.7}
    ours = CPOLossConfig(**recipe)
    theirs = CPOConfig(output_dir="unused", bf16=False, use_cpu=True, report_to=[], **recipe)
    for name in ("loss_type", "alpha", "beta", "simpo_gamma", "cpo_alpha"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.loss_type, ours.cpo_alpha, ours.alpha) == ("simpo", 0.0, 0.25)
    assert ours.averages_log_probs
    assert CPOLossConfig(loss_type="alphapo").alpha == 0.0  # plain SimPO without the NLL term
    assert not CPOLossConfig(loss_type="hinge").averages_log_probs


# one bad DPO option each, and the combinations TRL refuses or cannot compute
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "kto_pair"}, "loss_type"),
        ({"loss_type": []}, "loss_type"),
        ({"loss_type": ["sigmoid", "dpo"]}, "loss_type"),
        ({"loss_type": 3}, "loss_type"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_weights": [float("nan")]}, "loss_weights"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": "0.1"}, "beta"),
        ({"label_smoothing": float("nan")}, "label_smoothing"),
        ({"f_divergence_type": "kl"}, "f_divergence_type"),
        ({"f_divergence_type": "forward_kl", "loss_type": ["sigmoid", "bco_pair"]}, "f_divergence_type"),
        ({"f_divergence_type": "js_divergence", "loss_type": "aot"}, "f_divergence_type"),
        ({"f_alpha_divergence_coef": float("nan")}, "f_alpha_divergence_coef"),
        ({"ld_alpha": 1.5}, "ld_alpha"),
        ({"ld_alpha": -0.1}, "ld_alpha"),
        ({"use_weighting": True, "loss_type": "aot"}, "use_weighting"),
        ({"use_weighting": True, "loss_type": ["sigmoid", "aot_unpaired"]}, "use_weighting"),
        ({"use_weighting": True, "loss_type": "hinge"}, "use_weighting"),
        ({"use_weighting": True, "loss_type": ["sigmoid", "sft"]}, "use_weighting"),
        ({"use_weighting": 1}, "use_weighting"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "exo_pair", "label_smoothing": 1.0}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "beta": 0.0}, "beta"),
        ({"loss_type": "sppo_hard", "beta": 0.0}, "beta"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau"),
        ({"router_aux_loss_coef": None}, "router_aux_loss_coef"),
    ],
)
def test_bad_dpo_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOLossConfig(**kwargs)


def test_trl_trainer_checks_are_ours():
    """The checks DPOTrainer.__init__ / DPOConfig.__post_init__ make, phrased on the same fields."""
    with pytest.raises(ValueError, match="loss_weights"):
        trl.DPOConfig(output_dir="unused", bf16=False, use_cpu=True, report_to=[], loss_type=["sigmoid", "sft"],
                      loss_weights=[1.0])  # fmt: skip
    # Every f-divergence loss type accepts every f-divergence; the others none
    for kind in ("forward_kl", "js_divergence", "alpha_divergence"):
        DPOLossConfig(loss_type=list(F_DIVERGENCE_LOSS_TYPES), f_divergence_type=kind, label_smoothing=0.1)
        for other in sorted(set(DPO_LOSS_TYPES) - set(F_DIVERGENCE_LOSS_TYPES)):
            with pytest.raises(ValueError, match="f_divergence_type"):
                DPOLossConfig(loss_type=other, f_divergence_type=kind)


# one bad CPO option each
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_type": "kto_pair"}, "loss_type"),
        ({"loss_type": ["sigmoid"]}, "loss_type"),
        ({"beta": float("nan")}, "beta"),
        ({"cpo_alpha": None}, "cpo_alpha"),
        ({"simpo_gamma": float("inf")}, "simpo_gamma"),
        ({"alpha": "0.25"}, "alpha"),
        ({"label_smoothing": float("nan")}, "label_smoothing"),
        ({"loss_type": "ipo", "beta": 0.0}, "beta"),
        ({"loss_type": "simpo", "beta": 0.0}, "beta"),
        ({"loss_type": "alphapo", "beta": 0.0}, "beta"),
        ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef"),
    ],
)
def test_bad_cpo_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPOLossConfig(**kwargs)


def test_trl_warnings_are_kept_as_warnings():
    with pytest.warns(UserWarning, match="robust"):
        DPOLossConfig(loss_type="robust", label_smoothing=0.6)
    with pytest.warns(UserWarning, match="label smoothing"):
        CPOLossConfig(loss_type="hinge", label_smoothing=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPOLossConfig(loss_type="robust", label_smoothing=0.1)
        CPOLossConfig(loss_type="sigmoid", label_smoothing=0.1)
        CPOLossConfig(loss_type="hinge", beta=0.0)  # hinge and sigmoid do not divide by beta


def test_replace_validates_and_rejects_unknown_fields():
    cfg = DPOLossConfig(loss_type=["sigmoid", "sft"])
    assert cfg.replace(loss_weights=[0.5, 1.0]).weights == (0.5, 1.0)
    assert cfg.replace(loss_type="ipo").loss_type == ["ipo"]
    assert cfg.loss_type == ["sigmoid", "sft"]  # the original is untouched
    with pytest.raises(TypeError, match="nonsense"):
        cfg.replace(nonsense=1)
    with pytest.raises(ValueError, match="loss_weights"):
        cfg.replace(loss_weights=[1.0])
    with pytest.raises(ValueError, match="use_weighting"):
        cfg.replace(use_weighting=True)
    cpo = CPOLossConfig(loss_type="alphapo", alpha=0.25)
    assert cpo.replace(beta=2.5).cpo_alpha == 0.0
    assert cpo.replace(cpo_alpha=1.0).cpo_alpha == 1.0  # already simpo, as CPOConfig is after __post_init__
    with pytest.raises(TypeError, match="ld_alpha"):
        cpo.replace(ld_alpha=0.5)
    with pytest.raises(ValueError, match="beta"):
        cpo.replace(beta=0.0)
