"""The benchmark's measurement: memory probes, the Result record, OOM and warnings, summarize."""

from __future__ import annotations

import warnings

import pytest
import torch
from bench_helpers import results_of, run_main

from fused_gspo import bench
from fused_gspo.bench import measure
from fused_gspo.config import PolicyLossConfig


def test_process_memory_probe_sees_a_fresh_buffer():
    probe = bench.ProcessMemory.create()
    if not isinstance(probe, bench.ProcessMemory):
        pytest.skip(probe.method)
    peak = probe.peak_mib(lambda: {"x": torch.ones(16 * 2**20)})  # 64 MiB, written
    assert 60 <= peak <= 80


def test_out_of_memory_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    def oom(self, inputs, cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench.FusedGspo, "loss", oom)
    results = results_of(run_main(tmp_path, "--contenders", "eager,trl", "--modes", "fwd"))
    assert results["eager", "fwd"]["status"] == "OOM"
    assert results["trl", "fwd"]["status"] == "ok" and results["trl", "fwd"]["speedup_vs_eager"] is None
    assert "OOM" in capsys.readouterr().out


def test_is_oom():
    assert measure.is_oom(MemoryError()) and measure.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not measure.is_oom(RuntimeError("shape mismatch")) and not measure.is_oom(ValueError("out of memory"))


class Warns(bench.Contender):
    name = "warns"

    def step(self, mode, inputs, cfg):
        def run():
            warnings.warn("slow path taken", UserWarning, stacklevel=1)
            warnings.warn("slow path taken", UserWarning, stacklevel=1)
            return {}

        return run


def test_measure_records_the_check_runs_warnings_once():
    cfg = PolicyLossConfig()
    shape = bench.Shape(tokens=32, hidden=8, vocab=64, seq_len=8, dtype=torch.float32)
    inputs = bench.make_inputs(shape, cfg, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the timed runs warn too; only the check run's are recorded
        result = measure.measure(Warns(), "fwd", inputs, cfg, None, 2, 0, bench.MemoryProbe())
    assert result.status == "ok" and result.warnings == ["UserWarning: slow path taken"]
    assert result.to_json()["warnings"] == ["UserWarning: slow path taken"]
    notes = bench.format_notes({"warns": ""}, [result])
    assert notes == "warning: warns (fwd): UserWarning: slow path taken"


def test_result_json_and_summarize():
    cfg = PolicyLossConfig()
    shape = bench.Shape(tokens=32, hidden=8, vocab=64, seq_len=8, dtype=torch.float32)
    inputs = bench.make_inputs(shape, cfg, torch.device("cpu"))
    results = [
        bench.Result("eager", "fwd", "ok", times_ms=[4.0, 2.0, 6.0, 8.0]),
        bench.Result("floor", "fwd", "ok", times_ms=[1.0]),
        bench.Result("torch", "fwd", "ok", times_ms=[2.0, 3.0]),
        bench.Result("liger", "fwd", "unsupported: x"),
    ]
    bench.summarize(results, inputs)
    eager, floor, torch_, liger = results
    assert eager.median_ms == 5.0 and eager.ratio_to_floor == 5.0 and eager.speedup_vs_eager == 1.0
    assert torch_.speedup_vs_eager == 2.0 and torch_.ratio_to_floor == 2.5
    assert floor.tflops == pytest.approx(2 * 32 * 8 * 64 / 1e-3 / 1e12)
    assert liger.median_ms is None and liger.tflops is None
    out = eager.to_json()
    assert (out["min_ms"], out["max_ms"], out["median_ms"]) == (2.0, 8.0, 5.0) and out["q1_ms"] <= out["q3_ms"]
    assert floor.to_json()["q1_ms"] == floor.to_json()["q3_ms"] == 1.0
    assert "median_ms" not in liger.to_json() and liger.to_json()["times_ms"] == []
