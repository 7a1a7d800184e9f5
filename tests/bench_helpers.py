"""Shared by the benchmark's tests (tests/test_bench_*.py): a tiny CPU run of the CLI and its results by key."""

import json

from fused_gspo import bench

# a shape every contender runs in a second on CPU
TINY = ["--tokens", "64", "--hidden", "32", "--vocab", "384", "--seq-len", "16", "--device", "cpu"]
FAST = ["--repeats", "2", "--warmup", "0"]


def run_main(tmp_path, *args: str) -> dict:
    """``fused-gspo-bench`` at the tiny shape with ``args``; its JSON report."""
    path = tmp_path / "bench.json"
    assert bench.main([*TINY, *FAST, *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def results_of(report: dict, run: int = 0) -> dict[tuple[str, str], dict]:
    return {(r["contender"], r["mode"]): r for r in report["runs"][run]["results"]}
