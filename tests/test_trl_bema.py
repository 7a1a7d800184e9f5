"""``trl.BEMACallback`` alongside the fused loss: GRPOTrainer and DPOTrainer with the callback, flag off vs on.

BEMA (bias-corrected EMA) keeps, next to the trained model, a snapshot ``theta_0``, an EMA of the weights and a running
copy of the model (``EMA + alpha_t * (theta_t - theta_0)``), updated from the trained weights after optimizer steps.
With the flag on, training must be exactly as with it off: same logged values, same final weights, and so the same
weights in every BEMA buffer.
"""

import pytest
import torch

trl = pytest.importorskip("trl")

from test_trl_dpo import train_dpo  # noqa: E402
from trl_helpers import assert_same_training, train  # noqa: E402

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import fused_calls_fixture as fused_calls_fixture  # noqa: E402
from trl_helpers import model_path_fixture as model_path_fixture  # noqa: E402
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402
from trl_helpers import tokenizer_fixture as tokenizer_fixture  # noqa: E402


def bema():
    """Snapshot after step 1, update after steps 2 and 3 (3 steps are trained)."""
    return trl.BEMACallback(update_freq=1, update_after=1, lag=2, ema_power=0.5, bias_power=0.2)


def bema_weights(callback) -> dict[str, torch.Tensor]:
    weights = {f"running.{k}": v.detach().clone() for k, v in callback.running_model.state_dict().items()}
    for name, theta0, ema in zip(callback.param_names, callback.theta0_params, callback.ema_params, strict=True):
        weights[f"theta0.{name}"], weights[f"ema.{name}"] = theta0.clone(), ema.clone()
    return weights


def assert_same_bema(off, on, final) -> None:
    assert off.keys() == on.keys() and off
    for name, tensor in off.items():
        torch.testing.assert_close(on[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    # the EMA did move away from the step-1 snapshot, and the BEMA model is not the trained one
    assert any(not torch.equal(on[f"ema.{n}"], on[f"theta0.{n}"]) for n in final)
    assert any(not torch.equal(on[f"running.{n}"], final[n]) for n in final if f"running.{n}" in on)


def test_bema_with_grpo(tokenizer, model_path, fused_calls, tmp_path):
    runs = {}
    for flag in (False, True):
        callback = bema()
        logs, weights = train(
            trl.GRPOTrainer,
            trl.GRPOConfig,
            tokenizer,
            model_path,
            flag,
            trainer_kwargs={"callbacks": [callback]},
            output_dir=str(tmp_path / f"grpo-{flag}"),
            loss_type="grpo",
            steps_per_generation=2,
            gradient_accumulation_steps=1,
            epsilon=0.05,
        )
        runs[flag] = (logs, weights), bema_weights(callback)
    assert fused_calls["loss"] >= 3
    assert_same_training(runs[False][0], runs[True][0])
    assert_same_bema(runs[False][1], runs[True][1], runs[True][0][1])
    assert (tmp_path / "grpo-True" / "bema").is_dir()


def test_bema_with_dpo(tokenizer, model_path, tmp_path, monkeypatch):
    import fused_gspo.trl.dpo as adapter

    calls = []
    original = adapter.compute_preference_loss
    monkeypatch.setattr(adapter, "compute_preference_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    runs = {}
    for flag in (False, True):
        callback = bema()
        logs, weights = train_dpo(
            tokenizer,
            model_path,
            flag,
            trainer_kwargs={"callbacks": [callback]},
            output_dir=str(tmp_path / f"dpo-{flag}"),
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, 0.2],
        )
        runs[flag] = (logs, weights), bema_weights(callback)
    assert len(calls) >= 4
    assert_same_training(runs[False][0], runs[True][0])
    assert_same_bema(runs[False][1], runs[True][1], runs[True][0][1])
    assert (tmp_path / "dpo-True" / "bema").is_dir()
