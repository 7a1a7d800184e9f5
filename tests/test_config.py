"""PolicyLossConfig: TRL's names and defaults, validation of every field and combination."""

import dataclasses

import pytest
from conftest import draw_problem

from fused_gspo import PolicyLossConfig, fused_policy_loss


def _good():
    problem = draw_problem(2, 3, 4, 6, seed=0)
    return problem, None


# one bad field each, and the option combinations TRL's trainers refuse
@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "group"}, "importance_sampling_level"),
        ({"beta": 0.1}, "ref_logps"),
        ({"loss_type": "gmpo", "delta": 2.0}, "delta"),
        ({"loss_type": "rloo", "beta": 0.1}, "beta"),
        ({"loss_type": "gmpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_entropy_quantile": 0.0}, "top_entropy_quantile"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"workspace_bytes": 0}, "workspace_bytes"),
    ],
)
def test_bad_configuration_raises_value_error(cfg, match):
    problem, _ = _good()
    with pytest.raises(ValueError, match=match):
        fused_policy_loss(**problem, backend="torch", **cfg)


def test_trl_warnings_are_kept_as_warnings():
    with pytest.warns(UserWarning, match="sequence"):
        PolicyLossConfig(loss_type="dr_grpo", importance_sampling_level="sequence")


def test_defaults_follow_trl_grpo_config():
    trl = pytest.importorskip("trl")
    ours = PolicyLossConfig()
    theirs = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    shared = [f.name for f in dataclasses.fields(ours) if f.name in theirs and f.name != "gradient_accumulation_steps"]
    assert len(shared) >= 19, shared
    for name in shared:
        assert getattr(ours, name) == theirs[name], name
    assert ours.epsilon_low == ours.epsilon and ours.effective_epsilon_high == ours.epsilon


def test_replace_validates_and_rejects_unknown_fields():
    cfg = PolicyLossConfig(loss_type="grpo")
    assert cfg.replace(epsilon_high=0.28).effective_epsilon_high == 0.28
    with pytest.raises(TypeError, match="nonsense"):
        cfg.replace(nonsense=1)
    with pytest.raises(ValueError, match="beta"):
        cfg.replace(beta=-1.0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        cfg.replace(gradient_accumulation_steps=0)
