"""The GPU session's scripts under ``bench/`` at toy sizes on CPU: the real-trainer benchmark (``gpu_trainer.py
--tiny``) and the summary of a run's results (``gpu_summary.py``). ``bench/gpu_issue21.sh --dry-run`` runs them all,
with the benchmark and the profile, end to end."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_benchmark_tiny_on_cpu(tmp_path, monkeypatch):
    """A GRPOTrainer on a toy Qwen3, flag off vs on: the same loss and gradient norm, and the length scan stopping
    at the first out-of-memory error (stood in for: flag off fails past 8 tokens per row)."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from fused_gspo.trl import is_patched, unpatch_trl

    trainer = _load("gpu_trainer")
    real_step = trainer.run_step
    tried = []

    def run_step(tr, inputs, flag):
        length = inputs["completion_ids"].shape[1]
        tried.append((flag, length))
        if not flag and length > 8:
            raise torch.OutOfMemoryError("stand-in: CUDA out of memory")
        return real_step(tr, inputs, flag)

    monkeypatch.setattr(trainer, "run_step", run_step)
    path = tmp_path / "trainer.json"
    was_patched = is_patched()
    try:
        argv = [
            "--tiny",
            "--device",
            "cpu",
            "--completion",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--scan-lengths",
            "8,16,32",
        ]
        assert trainer.main([*argv, "--json", str(path)]) == 0
    finally:
        if not was_patched:
            unpatch_trl()
    report = json.loads(path.read_text())
    assert report["command"].startswith("python bench/gpu_trainer.py --tiny")
    assert report["device"]["type"] == "cpu" and report["versions"]["trl"] == "1.16.0"
    assert report["model"]["vocab_size"] == 512 and report["model"]["num_hidden_layers"] == 2
    timed = report["timed_step"]
    off, on = timed["flag_off"], timed["flag_on"]
    assert off["status"] == on["status"] == "ok" and len(on["times_ms"]) == 1
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-2) and timed["grad_norm_rel_diff"] < 1e-2
    scan = report["completion_scan"]
    assert scan["flag_off"]["longest_that_fits"] == 8 and scan["flag_on"]["longest_that_fits"] == 32
    assert [s["status"] for s in scan["flag_off"]["steps"]] == ["ok", "OOM"]  # 32 never tried after the OOM
    assert scan["longest_on_over_off"] == 4.0
    assert (False, 32) not in tried and (True, 32) in tried


def _bench_report(device: str, rows: dict, predicted: float | None = None) -> dict:
    """A benchmark JSON with ``rows[(contender, mode)] = (median_ms, peak_mib)``."""
    results = [
        {"contender": c, "mode": m, "status": "ok", "median_ms": ms, "peak_mib": peak, "check": {"status": "pass"}}
        for (c, m), (ms, peak) in rows.items()
    ]
    plan = {"fwd_bwd": {"predicted_ms": predicted}} if predicted else {}
    return {"device": {"name": device}, "runs": [{"tokens": 8192, "results": results, "plan": plan}]}


def test_summary_reads_the_targets_off_a_run(tmp_path, capsys):
    """``gpu_summary.py`` on a folder like the one ``gpu_issue21.sh`` fills: each target's figure and verdict, and
    "not measured" for what is missing (here the DPO, 0.6B, 32k, 512 MiB and autocast runs)."""
    summary = _load("gpu_summary")
    rows = {("triton", "fwd_bwd"): (46.0, 3700.0), ("floor", "fwd_bwd"): (42.0, 3626.0),
            ("trl", "fwd_bwd"): (68.0, 4074.0), ("triton", "logprobs"): (14.5, 300.0),
            ("floor", "logprobs"): (14.0, 2374.0), ("trl", "logprobs"): (16.5, 256.0)}  # fmt: skip
    (tmp_path / "bench-gspo-qwen3-8b.json").write_text(json.dumps(_bench_report("NVIDIA H200", rows, 44.0)))
    rows[("triton", "fwd_bwd")] = (50.0, 3700.0)
    (tmp_path / "bench-dapo-qwen3-8b.json").write_text(json.dumps(_bench_report("NVIDIA H200", rows)))
    (tmp_path / "gpu-profile.json").write_text(json.dumps({"step_host_gaps": {"idle_us": 320.0, "kernels": 30}}))
    scan = {"completion_scan": {"longest_on_over_off": 2.0}}
    (tmp_path / "trainer.json").write_text(json.dumps(scan))
    steps = [{"name": "tests", "seconds": 95, "status": "ok"}, {"name": "dpo-8b", "seconds": 0, "status": "skipped"}]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    (tmp_path / "pytest.log").write_text("XFAIL tests/test_api.py::x - cuBLAS\n=== 40 passed, 1 xfailed in 90s ===\n")
    (tmp_path / "findings.jsonl").write_text(json.dumps({"finding": "bits", "cases": {}}) + "\n")
    assert summary.main([str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "pytest: 40 passed, 1 xfailed in 90s" in out and "XFAIL tests/test_api.py::x" in out
    assert 'finding: {"finding": "bits"' in out and "on NVIDIA H200" in out
    table = {row["metric"]: row for row in json.loads((tmp_path / "s.json").read_text())}
    gspo = table["GSPO fwd+bwd / floor, qwen3-8b head"]
    assert (gspo["measured"], gspo["verdict"]) == ("1.095x", "met")
    assert table["DAPO fwd+bwd / floor, qwen3-8b head"]["verdict"] == "**missed**"
    assert table["GSPO: TRL's chunked head time / ours (fwd+bwd)"]["measured"] == "1.48x"
    assert table["no-grad log-probs / one GEMM (TRL's)"]["measured"] == "1.036x (1.179x)"
    assert table["device idle within one call (profile, gaps > 20 us)"]["measured"] == "0.320 ms"
    assert table["planner prediction / measured, GSPO fwd+bwd"]["measured"] == "0.957"
    assert table["longest completion at batch 8, GRPOTrainer: on / off"]["verdict"] == "**missed**"
    assert table["DPO: TRL's chunked head time / ours (fwd+bwd)"]["measured"] == "not measured"
    assert table["GSPO fwd+bwd / floor, qwen3-0.6b head (H=1024)"]["verdict"] == ""
