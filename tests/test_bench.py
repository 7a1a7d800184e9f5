"""The benchmark CLI (``fused-gspo-bench``) at tiny shapes, and pytest-benchmark timings of our two CPU backends."""

from __future__ import annotations

import json

import pytest
import torch

from fused_gspo import bench
from fused_gspo.config import PolicyLossConfig

TINY = ["--tokens", "64", "--hidden", "32", "--vocab", "384", "--seq-len", "16", "--device", "cpu"]
FAST = ["--repeats", "2", "--warmup", "0"]


def run_main(tmp_path, *args: str) -> dict:
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, *FAST, *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def results_of(report: dict, run: int = 0) -> dict[tuple[str, str], dict]:
    return {(r["contender"], r["mode"]): r for r in report["runs"][run]["results"]}


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_fwd_bwd_benchmark(benchmark, backend):
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    shape = bench.Shape(tokens=128, hidden=64, vocab=1000, seq_len=32, dtype=torch.float32)
    inputs = bench.make_inputs(shape, cfg, torch.device("cpu"), seed=1)
    run = bench.FusedGspo(backend).step("fwd_bwd", inputs, cfg)
    outputs = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    check = bench.check_outputs(outputs, bench.compute_reference(inputs, cfg), shape.dtype)
    assert check["status"] == "pass", check


def test_json_has_every_contender_checked(tmp_path, capsys):
    report = run_main(tmp_path, "--contenders", "eager,torch,trl,liger,floor")
    assert report["command"].startswith("fused-gspo-bench --tokens 64")
    assert report["device"]["type"] == "cpu"
    assert {"torch", "triton", "transformers", "trl", "liger-kernel", "fused-gspo"} <= set(report["versions"])
    assert report["config"]["loss"]["importance_sampling_level"] == "sequence"
    assert report["memory_method"]
    results = results_of(report)
    assert set(results) == {(c, m) for c in ("eager", "torch", "trl", "liger", "floor") for m in bench.MODES}
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
    table = capsys.readouterr().out
    assert "median ms" in table and "liger" in table and "pass" in table


def test_bf16_checks_pass_with_padding(tmp_path):
    report = run_main(
        tmp_path, "--dtype", "bf16", "--valid-frac", "0.5", "--contenders", "eager,torch,trl", "--modes", "fwd_bwd"
    )
    run = report["runs"][0]
    assert run["valid_tokens"] < run["tokens"]
    for r in run["results"]:
        assert r["check"]["status"] == "pass" and r["check"]["tolerance"] == bench.TOLERANCES[torch.bfloat16], r


def test_unavailable_backend_is_reported(tmp_path, monkeypatch):
    def no_triton(backend, device):
        if backend == "triton":
            raise RuntimeError("backend='triton' is not available: no kernels")
        return backend

    monkeypatch.setattr(bench, "resolve_backend", no_triton)
    results = results_of(run_main(tmp_path, "--contenders", "triton,floor", "--modes", "fwd,logprobs"))
    for mode in ("fwd", "logprobs"):
        assert results["triton", mode]["status"] == "unavailable: backend='triton' is not available: no kernels"
        assert results["triton", mode]["times_ms"] == []
        assert results["floor", mode]["status"] == "ok"


@pytest.mark.parametrize(
    "objective, reason",
    [(["--level", "sequence_token"], "sequence_token"), (["--loss-type", "gmpo", "--level", "token"], "gmpo")],
)
def test_objective_liger_cannot_run_is_unsupported(tmp_path, objective, reason):
    results = results_of(run_main(tmp_path, *objective, "--contenders", "liger,torch", "--modes", "fwd"))
    assert results["liger", "fwd"]["status"].startswith("unsupported:")
    assert reason in results["liger", "fwd"]["status"]
    assert results["torch", "fwd"]["check"]["status"] == "pass"


def test_out_of_memory_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    def oom(self, inputs, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench.FusedGspo, "loss", oom)
    results = results_of(run_main(tmp_path, "--contenders", "eager,trl", "--modes", "fwd"))
    assert results["eager", "fwd"]["status"] == "OOM"
    assert results["trl", "fwd"]["status"] == "ok" and results["trl", "fwd"]["speedup_vs_eager"] is None
    assert "OOM" in capsys.readouterr().out


def test_sweep_and_plot(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    report = run_main(
        tmp_path, "--sweep-tokens", "32,64", "--contenders", "torch,floor", "--modes", "fwd_bwd", "--plot", str(plot)
    )
    assert [run["tokens"] for run in report["runs"]] == [32, 64]
    assert all(len(run["results"]) == 2 for run in report["runs"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in capsys.readouterr().err and not plot.exists()
    else:
        assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contenders", "eager,nope"], "unknown contender"),
        (["--modes", "backward"], "unknown mode"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--tokens", "64", "--seq-len", "7"], "must divide"),
        (["--loss-type", "gmpo", "--level", "sequence"], "importance_sampling_level"),
        (["--sweep-tokens", "64,x"], "comma-separated integers"),
        (["--valid-frac", "0"], "--valid-frac"),
        (["--tokens", "0"], "--tokens must be >= 1"),
        (["--model", "qwen3-8b", "--hidden", "0"], "--hidden must be >= 1"),
        (["--vocab", "0"], "--vocab must be >= 1"),
    ],
)
def test_bad_argument_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_process_memory_probe_sees_a_fresh_buffer():
    probe = bench.ProcessMemory.create()
    if not isinstance(probe, bench.ProcessMemory):
        pytest.skip(probe.method)
    peak = probe.peak_mib(lambda: {"x": torch.ones(16 * 2**20)})  # 64 MiB, written
    assert 60 <= peak <= 80


def test_default_seq_len_divides_tokens():
    assert bench.default_seq_len(8192) == 512
    assert bench.default_seq_len(64) == 16
    assert 300 % bench.default_seq_len(300) == 0
