"""The benchmark CLI (``fused-gspo-bench``) end to end at tiny shapes: the JSON, the options, ``--explain``."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from bench_helpers import results_of, run_main

from fused_gspo import bench
from fused_gspo.bench import cli, contenders
from fused_gspo.config import PolicyLossConfig


def test_json_has_every_contender_checked(tmp_path, capsys):
    names = ("eager", "torch", "trl", "liger", "torch_lce", "floor")
    report = run_main(tmp_path, "--contenders", ",".join(names))
    assert report["command"].startswith("fused-gspo-bench --tokens 64")
    assert report["device"]["type"] == "cpu"
    assert {"torch", "triton", "transformers", "trl", "liger-kernel", "fused-gspo"} <= set(report["versions"])
    assert report["config"]["loss"]["importance_sampling_level"] == "sequence"
    assert report["memory_method"]
    results = results_of(report)
    assert set(results) == {(c, m) for c in names for m in bench.MODES}
    for (contender, mode), r in results.items():
        assert r["status"] == "ok", (contender, mode, r["status"])
        assert len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["ratio_to_floor"] > 0 and r["speedup_vs_eager"] > 0
        if contender == "floor":
            assert r["check"] is None
        else:
            assert r["check"]["status"] == "pass", (contender, mode, r["check"])
    assert set(results["torch", "fwd_bwd"]["check"]["rel_err"]) == {"loss", "dhidden", "dweight"}
    assert set(results["trl", "logprobs"]["check"]["rel_err"]) == {"logps"}
    assert set(results["torch_lce", "fwd_bwd"]["check"]["rel_err"]) == {"loss", "dhidden", "dweight"}
    table = capsys.readouterr().out
    assert "median ms" in table and "liger" in table and "pass" in table
    # torch_lce says which path PyTorch took, in the JSON and under the table
    run = report["runs"][0]
    assert "linear_cross_entropy" in run["contenders"]["torch_lce"]
    assert run["notes"]["torch_lce"] in run["contenders"]["torch_lce"]
    assert f"note: torch_lce: {run['notes']['torch_lce'][:40]}" in table


def test_every_run_records_the_plan_of_its_layout(tmp_path):
    report = run_main(tmp_path, "--valid-frac", "0.5", "--contenders", "torch", "--modes", "fwd_bwd,logprobs")
    run = report["runs"][0]
    assert sum(run["row_lengths"]) == run["valid_tokens"] < run["tokens"] and len(run["row_lengths"]) == run["batch"]
    assert set(run["plan"]) == {"fwd_bwd", "logprobs"}
    for mode, plan in run["plan"].items():
        assert plan["profile"] == "cpu" and plan["mode"] == mode and plan["backend"] == "torch"
        assert (plan["tokens"], plan["hidden"], plan["vocab"]) == (run["valid_tokens"], 32, 384)
        assert plan["predicted_ms"] > 0 and plan["chunks"] and plan["stages"]
    assert "off-policy" in run["plan"]["fwd_bwd"]["objective"]


def test_bf16_checks_pass_with_padding(tmp_path):
    report = run_main(
        tmp_path,
        "--dtype",
        "bf16",
        "--valid-frac",
        "0.5",
        "--contenders",
        "eager,torch,trl,torch_lce",
        "--modes",
        "fwd_bwd",
    )
    run = report["runs"][0]
    assert run["valid_tokens"] < run["tokens"]
    for r in run["results"]:
        assert r["check"]["status"] == "pass" and r["check"]["tolerance"] == bench.TOLERANCES[torch.bfloat16], r


def test_workspace_bytes_reaches_every_fused_contender_and_the_plan(tmp_path, monkeypatch):
    seen = []
    real = contenders.fused_policy_loss

    def spy(*args, config, **kwargs):
        seen.append(config.workspace_bytes)
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(contenders, "fused_policy_loss", spy)
    report = run_main(tmp_path, "--workspace-bytes", "65536", "--contenders", "torch,eager", "--modes", "fwd")
    assert seen and set(seen) == {65536}
    assert report["config"]["loss"]["workspace_bytes"] == 65536
    plan = report["runs"][0]["plan"]["fwd"]
    assert plan["workspace_bytes"] == 65536 and not plan["workspace_auto"]
    assert all(r["check"]["status"] == "pass" for r in report["runs"][0]["results"])


def test_autocast_row_runs_every_contender_under_autocast(tmp_path, monkeypatch):
    """``--dtype fp32 --autocast bf16``: fp32 master weights, every contender called under ``torch.autocast``, checked
    against the float64 reference of the bf16-rounded inputs with bf16's tolerance; the floor's GEMMs in bf16; the
    plan made for bf16 compute; recorded in the JSON. PyTorch's ``linear_cross_entropy``, where it ignores autocast
    (CPU, torch 2.13), is reported unsupported rather than timed in fp32."""
    seen = []
    real_loss = contenders.fused_policy_loss

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(contenders, "fused_policy_loss", spy)
    argv = ["--dtype", "fp32", "--autocast", "bf16", "--contenders", "eager,torch,trl,torch_lce,floor"]
    report = run_main(tmp_path, *argv, "--modes", "fwd_bwd,logprobs")
    assert report["config"]["autocast"] == "bf16" and report["config"]["dtype_name"] == "fp32"
    run = report["runs"][0]
    assert run["reference"].endswith("of the inputs rounded to bfloat16")
    assert seen and set(seen) == {(True, torch.bfloat16)}
    assert run["plan"]["fwd_bwd"]["compute_dtype"] == run["plan"]["fwd_bwd"]["logits_dtype"] == "bfloat16"
    for (contender, mode), r in results_of(report).items():
        if contender == "torch_lce" and r["status"].startswith("unsupported: linear_cross_entropy ignores"):
            continue
        assert r["status"] == "ok", (contender, mode, r["status"])
        if contender != "floor":
            assert r["check"]["status"] == "pass" and r["check"]["tolerance"] == bench.TOLERANCES[torch.bfloat16]
    # the floor: bf16 GEMMs on copies cast before the timed runs
    inputs = bench.make_inputs(bench.Shape(16, 8, 40, 4, torch.float32), PolicyLossConfig(), torch.device("cpu"))
    inputs.autocast = torch.bfloat16
    outputs = contenders.GemmFloor().step("fwd_bwd", inputs, PolicyLossConfig())()
    assert {t.dtype for t in outputs.values()} == {torch.bfloat16}
    assert bench.main([*argv[:4], "--explain", "--device-profile", "h100", "--modes", "fwd_bwd"]) == 0


# each option's bad value exits with status 2 and a message naming it
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contenders", "eager,nope"], "unknown contender"),
        (["--modes", "backward"], "unknown mode"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--tokens", "64", "--seq-len", "7"], "must divide"),
        (["--loss-type", "gmpo", "--level", "sequence"], "--loss-type, --level: importance_sampling_level"),
        # the config's errors name the option that set the field; --softcap is checked for every objective (dpo
        # took a bad one to a traceback)
        (["--epsilon-high", "-0.5"], "--epsilon-high: epsilon_high must be > 0"),
        (["--softcap", "0"], "--softcap must be a finite number > 0"),
        (["--objective", "dpo", "--softcap", "-1"], "--softcap must be a finite number > 0"),
        (["--sweep-tokens", "64,x"], "comma-separated integers"),
        (["--valid-frac", "0"], "--valid-frac"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--model", "qwen3-8b", "--hidden", "0"], "--hidden must be >= 1"),
        (["--vocab", "0"], "--vocab must be >= 1"),
        (["--workspace-bytes", "lots"], "'auto' or a positive number of bytes"),
        (["--workspace-bytes", "0"], "'auto' or a positive number of bytes"),
        (["--device-profile", "h100"], "only applies with --explain"),
        (["--explain", "--device-profile", "nope"], "unknown device profile 'nope'; choose from h100-sxm"),
        (["--autocast", "bf16"], "--autocast needs --dtype fp32"),
        (["--autocast", "bf16", "--dtype", "bf16"], "--autocast needs --dtype fp32"),
        (["--autocast", "bf16", "--dtype", "fp32", "--objective", "dpo"], "and a policy objective"),
        # issue 23: a budget the planner refuses was a traceback, --plot with --explain silently wrote nothing
        (["--explain", "--workspace-bytes", "100"], "--explain: workspace_bytes=100 cannot hold one token's logits"),
        (["--explain", "--plot", "plan.png"], "--plot draws measured time and memory, and --explain measures"),
    ],
)
def test_bad_argument_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""  # nothing printed before the usage error


def test_unknown_profile_message_lists_every_profile(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--explain", "--device-profile", "tpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in bench.profile_choices())


def _nothing_runs(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("--explain must not build inputs or run anything")

    monkeypatch.setattr(cli, "make_inputs", fail)
    monkeypatch.setattr(cli, "run_benchmark", fail)


def test_explain_defaults_to_the_gpu_shape_on_an_h100_profile(monkeypatch, capsys):
    _nothing_runs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--explain"]) == 0
    out = capsys.readouterr().out
    assert "device profile 'h100'" in out and out.count("device profile h100-sxm:") == 3
    assert "N=8192 tokens (B=16 x T=512, 8192 valid), H=4096, V=151936, bf16" in out
    for mode in bench.MODES:
        assert f"N=8192 tokens, H=4096, V=151936, bfloat16, {mode} |" in out
    assert "loss_type=grpo level=sequence off-policy" in out and "floor (bare GEMMs)" in out


def test_explain_json_has_the_per_chunk_plan(tmp_path, monkeypatch, capsys):
    _nothing_runs(monkeypatch)
    path = tmp_path / "plan.json"
    argv = ["--explain", "--device-profile", "b200", "--loss-type", "dapo", "--level", "token"]
    assert bench.main([*argv, "--workspace-bytes", str(1 << 28), "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["explain"] is True and report["device_profile"] == "b200"
    run = report["runs"][0]
    assert (run["tokens"], run["valid_tokens"], run["row_lengths"]) == (8192, 8192, [512] * 16)
    assert set(run["plan"]) == set(bench.MODES)
    plan = run["plan"]["fwd_bwd"]
    assert plan["profile"] == "b200" and plan["workspace_bytes"] == 1 << 28 and not plan["workspace_auto"]
    assert len(plan["chunks"]) == plan["num_chunks"] and plan["objective"].startswith("loss_type=dapo level=token")
    assert "device profile b200:" in capsys.readouterr().out


def test_explain_on_the_cpu_profile_takes_the_cpu_defaults(monkeypatch, capsys):
    _nothing_runs(monkeypatch)
    assert bench.main(["--explain", "--device", "cpu", "--modes", "fwd_bwd", "--valid-frac", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "device profile cpu:" in out and "H=256, V=8192, float32, fwd_bwd" in out
    shape = bench.Shape(512, 256, 8192, bench.default_seq_len(512), torch.float32)
    lengths, exact = bench.layout_row_lengths(shape, 0, 0.5)
    assert exact and f"{sum(lengths)} valid)" in out


# GMPO and RLOO take no importance-sampling level: without --level they run (issue 23: the GSPO default "sequence"
# was applied to them, and their config refused it), measured and explained
@pytest.mark.parametrize("loss_type", ["gmpo", "rloo"])
def test_sequence_trainers_run_without_a_level(tmp_path, monkeypatch, capsys, loss_type):
    report = run_main(tmp_path, "--loss-type", loss_type, "--contenders", "torch,eager", "--modes", "fwd_bwd")
    assert report["config"]["loss"]["loss_type"] == loss_type
    assert report["config"]["loss"]["importance_sampling_level"] == "token"
    assert all(r["check"]["status"] == "pass" for r in report["runs"][0]["results"])
    capsys.readouterr()
    _nothing_runs(monkeypatch)
    assert bench.main(["--explain", "--device", "cpu", "--loss-type", loss_type, "--modes", "fwd_bwd"]) == 0
    assert f"loss_type={loss_type} level=token" in capsys.readouterr().out


# A named --loss-type is that objective as GRPOConfig sets it up: --loss-type dapo was DAPO at sequence level (a
# variant TRL warns about, and not what the name promises) until the default level followed the loss type.
@pytest.mark.parametrize(
    ("argv", "level"),
    [
        ([], "sequence"),
        (["--loss-type", "dapo"], "token"),
        (["--loss-type", "grpo"], "token"),
        (["--loss-type", "cispo"], "token"),
        (["--loss-type", "luspo"], "sequence"),
        (["--loss-type", "dapo", "--level", "sequence_token"], "sequence_token"),
    ],
)
def test_the_default_level_follows_the_loss_type(monkeypatch, capsys, argv, level):
    _nothing_runs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no TRL-style warning about a sum over a sequence-level ratio
        assert bench.main(["--explain", "--device", "cpu", "--modes", "fwd_bwd", *argv]) == 0
    assert f"level={level}" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli():
    argv = ["--explain", "--device-profile", "a100", "--modes", "logprobs", "--tokens", "1024"]
    done = subprocess.run(
        [sys.executable, "-m", "fused_gspo.bench", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "device profile a100-80gb:" in done.stdout and "N=1024 tokens" in done.stdout
