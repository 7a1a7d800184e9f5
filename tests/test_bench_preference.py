"""The benchmark's preference objectives (``fused-gspo-bench --objective dpo|cpo``) at tiny CPU shapes: every available
contender passes its check, what a contender cannot compute is reported, bad options exit with status 2."""

from __future__ import annotations

import pytest
import torch
from bench_helpers import results_of, run_main

from fused_gspo import bench
from fused_gspo.bench.preference_contenders import PREFERENCE_CONTENDERS, PreferenceLiger
from fused_gspo.bench.preference_problem import (
    PreferenceObjective,
    compute_preference_reference,
    make_preference_inputs,
    preference_seq_len,
)
from fused_gspo.preference import CPOLossConfig, DPOLossConfig

# every contender but triton (the tests run Triton under its CPU interpreter: far too slow for a timing run)
NAMES = [name for name in PREFERENCE_CONTENDERS if name != "triton"]


def _assert_checked(results: dict, modes: tuple[str, ...]) -> None:
    assert set(results) == {(c, m) for c in NAMES for m in modes}
    for (contender, mode), r in results.items():
        assert r["status"] == "ok", (contender, mode, r["status"])
        assert len(r["times_ms"]) == 2 and r["peak_mib"] is not None
        if contender == "floor":
            assert r["check"] is None
        else:
            assert r["check"]["status"] == "pass", (contender, mode, r["check"])


def test_dpo_every_contender_passes_its_check(tmp_path, capsys):
    report = run_main(tmp_path, "--objective", "dpo", "--valid-frac", "0.5", "--contenders", ",".join(NAMES))
    assert report["config"]["family"] == "dpo"
    assert report["config"]["loss"]["loss_type"] == ["sigmoid"] and report["config"]["loss"]["beta"] == 0.1
    assert report["config"]["head"] == {"final_logit_softcapping": None, "workspace_bytes": "auto"}
    run = report["runs"][0]
    assert run["pairs"] * 2 == run["batch"] == 4 and run["valid_tokens"] < run["tokens"] == 64
    assert run["plan"] is None and "no entry point" in run["plan_note"]
    results = results_of(report)
    _assert_checked(results, bench.MODES)
    assert set(results["trl", "fwd_bwd"]["check"]["rel_err"]) == {"loss", "dhidden", "dweight"}
    assert set(results["liger", "logprobs"]["check"]["rel_err"]) == {"logps"}
    assert "ChunkedLogProbFunction" in run["contenders"]["trl"] and "is_top1" in run["contenders"]["trl"]
    assert "LigerFusedLinearDPOLoss" in run["contenders"]["liger"] and "reference pass" in run["notes"]["liger"]
    out = capsys.readouterr().out
    assert "2B=4 rows x T=16: 2 pairs" in out and "DPO loss_type=sigmoid beta=0.1" in out
    assert "note: liger: fwd and fwd_bwd include its reference pass" in out


def test_cpo_every_contender_passes_its_check(tmp_path):
    argv = ["--objective", "cpo", "--cpo-loss-type", "simpo", "--valid-frac", "0.5", "--contenders", ",".join(NAMES)]
    report = run_main(tmp_path, *argv)
    assert report["config"]["modes"] == ["fwd", "fwd_bwd"]  # no reference pass
    assert report["config"]["loss"]["loss_type"] == "simpo"
    run = report["runs"][0]
    _assert_checked(results_of(report), ("fwd", "fwd_bwd"))
    assert "CPOTrainer.cpo_loss" in run["contenders"]["trl"]
    assert "LigerFusedLinearSimPOLoss" in run["contenders"]["liger"]


def _tiny(objective: PreferenceObjective, dtype=torch.float32):
    shape = bench.Shape(tokens=64, hidden=32, vocab=384, seq_len=16, dtype=dtype)
    return make_preference_inputs(shape, objective, torch.device("cpu"), seed=3, valid_frac=0.5)


# options only some contenders can compute: the others pass, Liger reports what it lacks
@pytest.mark.parametrize(
    "loss, reason",
    [
        (DPOLossConfig(loss_type="ipo"), "'ipo'"),
        (DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), "several loss types"),
        (DPOLossConfig(ld_alpha=0.5), "ld_alpha"),
        (DPOLossConfig(use_weighting=True), "use_weighting"),
        (DPOLossConfig(f_divergence_type="js_divergence"), "f_divergence_type"),
        (CPOLossConfig(loss_type="hinge"), "'hinge'"),
        (CPOLossConfig(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1), "AlphaPO"),
    ],
    ids=["dpo-ipo", "dpo-sigmoid+sft", "ld-dpo", "wpo", "f-dpo-js", "cpo-hinge", "alphapo"],
)
def test_what_liger_lacks_is_unsupported_and_the_others_pass(loss, reason):
    objective = PreferenceObjective(loss)
    inputs = _tiny(objective)
    assert PreferenceLiger().prepare(inputs, objective) == f"unsupported: {PreferenceLiger().unsupported(objective)}"
    assert reason in PreferenceLiger().unsupported(objective)
    ref = compute_preference_reference(inputs, objective)
    modes = ("fwd_bwd", "logprobs") if objective.family == "dpo" else ("fwd_bwd",)
    for contender in bench.build_preference_contenders(["torch", "trl"]):
        assert contender.prepare(inputs, objective) is None
        for mode in modes:
            check = bench.check_outputs(contender.step(mode, inputs, objective)(), ref, torch.float32)
            assert check["status"] == "pass", (contender.name, mode, check)


def test_softcap_is_unsupported_by_liger_in_the_table(tmp_path):
    argv = ["--objective", "dpo", "--softcap", "30", "--contenders", "liger,trl", "--modes", "fwd"]
    results = results_of(run_main(tmp_path, *argv))
    assert results["liger", "fwd"]["status"] == "unsupported: final_logit_softcapping (its logits are hidden @ W.T)"
    assert results["trl", "fwd"]["check"]["status"] == "pass"


def test_dpo_bf16_checks_pass():
    objective = PreferenceObjective(DPOLossConfig(loss_type="bco_pair"))
    inputs = _tiny(objective, torch.bfloat16)
    ref = compute_preference_reference(inputs, objective)
    for contender in bench.build_preference_contenders(["eager", "trl", "liger"]):
        assert contender.prepare(inputs, objective) is None
        for mode in ("fwd_bwd", "logprobs"):
            check = bench.check_outputs(contender.step(mode, inputs, objective)(), ref, torch.bfloat16)
            assert check["status"] == "pass", (contender.name, mode, check)


def test_preference_seq_len_leaves_an_even_number_of_rows():
    assert preference_seq_len(512) == 128 and preference_seq_len(8192) == 512
    for tokens in (2, 6, 24, 96, 1000, 8190):
        seq_len = preference_seq_len(tokens)
        assert tokens % seq_len == 0 and (tokens // seq_len) % 2 == 0, tokens
    assert preference_seq_len(63) is None


# each bad option exits with status 2 and a message naming it
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--objective", "dpo", "--explain"], "--explain covers the policy objectives only"),
        (["--objective", "sft"], "invalid choice"),
        (["--objective", "dpo", "--loss-type", "dapo"], "--loss-type: only with --objective policy"),
        (["--objective", "dpo", "--temperature", "0.7"], "--temperature: only with --objective policy"),
        (["--dpo-loss-type", "sigmoid"], "--dpo-loss-type: only with --objective dpo"),
        (["--objective", "cpo", "--ld-alpha", "0.5"], "--ld-alpha: only with --objective dpo"),
        (["--objective", "dpo", "--simpo-gamma", "1"], "--simpo-gamma: only with --objective cpo"),
        (["--label-smoothing", "0.1"], "--label-smoothing: only with --objective dpo or cpo"),
        (["--objective", "dpo", "--dpo-loss-type", "sigmoid,nope"], "unknown DPO loss type 'nope'"),
        (["--objective", "dpo", "--loss-weights", "1,x"], "comma-separated numbers"),
        (["--objective", "dpo", "--dpo-loss-type", "ipo,sft", "--loss-weights", "1"], "loss_weights must have"),
        (["--objective", "dpo", "--ld-alpha", "1.5"], "ld_alpha must be in [0.0, 1.0]"),
        (["--objective", "dpo", "--dpo-loss-type", "aot", "--use-weighting"], "use_weighting=True is not"),
        (["--objective", "dpo", "--dpo-loss-type", "exo_pair"], "label_smoothing must be in (0, 1)"),
        (["--objective", "cpo", "--cpo-loss-type", "dpo"], "invalid choice"),
        (["--objective", "cpo", "--cpo-loss-type", "simpo", "--beta", "0"], "beta must be != 0"),
        (["--objective", "cpo", "--modes", "logprobs"], "CPO has no reference model"),
        (["--objective", "dpo", "--contenders", "torch_lce"], "not a contender for --objective dpo"),
        (["--objective", "dpo", "--tokens", "63"], "need an even token count"),
        (["--objective", "cpo", "--tokens", "48", "--seq-len", "16"], "odd number of rows"),
    ],
)
def test_bad_preference_option_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_workspace_bytes_reaches_the_fused_preference_contenders(tmp_path, monkeypatch):
    from fused_gspo.bench import preference_contenders  # noqa: PLC0415

    seen = []
    real_loss, real_logprobs = preference_contenders.fused_preference_loss, preference_contenders.fused_logprobs

    def spy_loss(*args, workspace_bytes, **kwargs):
        seen.append(("loss", workspace_bytes))
        return real_loss(*args, workspace_bytes=workspace_bytes, **kwargs)

    def spy_logprobs(*args, workspace_bytes, **kwargs):
        seen.append(("logprobs", workspace_bytes))
        return real_logprobs(*args, workspace_bytes=workspace_bytes, **kwargs)

    monkeypatch.setattr(preference_contenders, "fused_preference_loss", spy_loss)
    monkeypatch.setattr(preference_contenders, "fused_logprobs", spy_logprobs)
    argv = ["--objective", "dpo", "--workspace-bytes", "65536", "--contenders", "torch", "--modes", "fwd,logprobs"]
    report = run_main(tmp_path, *argv, "--sweep-tokens", "32,64", "--plot", str(tmp_path / "sweep.png"))
    assert {kind for kind, _ in seen} == {"loss", "logprobs"} and {b for _, b in seen} == {65536}
    assert report["config"]["head"]["workspace_bytes"] == 65536
    assert [run["tokens"] for run in report["runs"]] == [32, 64] and (tmp_path / "sweep.png").exists()
    assert all(r["check"]["status"] == "pass" for run in report["runs"] for r in run["results"])
