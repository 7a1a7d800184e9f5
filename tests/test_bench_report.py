"""The benchmark's report: the table, its notes, the plot and the environment."""

from __future__ import annotations

import torch
from bench_helpers import run_main

from fused_gspo import bench


def test_sweep_and_plot(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    report = run_main(
        tmp_path, "--sweep-tokens", "32,64", "--contenders", "torch,floor", "--modes", "fwd_bwd", "--plot", str(plot)
    )
    assert [run["tokens"] for run in report["runs"]] == [32, 64]
    assert all(len(run["results"]) == 2 for run in report["runs"])
    assert all(set(run["plan"]) == {"fwd_bwd"} for run in report["runs"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in capsys.readouterr().err and not plot.exists()
    else:
        assert plot.read_bytes().startswith(b"\x89PNG")


def test_table_rows_and_labels():
    check = {"status": "pass", "tolerance": 1e-4, "rel_err": {"loss": 1e-7, "dweight": 3e-6}}
    failed = {"status": "FAIL", "tolerance": 1e-4, "rel_err": {"loss": 1e-7, "dweight": 3e-3}}
    assert bench.check_label(None) == "n/a"
    assert bench.check_label(check) == "pass (max rel err 3.0e-06)"
    assert bench.check_label(failed) == "FAIL (dweight rel err 3.0e-03 > 1e-04)"
    results = [
        bench.Result("torch", "fwd", "ok", times_ms=[1.0, 3.0], peak_mib=2.5, check=check, speedup_vs_eager=2.0),
        bench.Result("liger", "fwd", "unsupported: " + "x" * 200),
    ]
    lines = bench.format_table(results).splitlines()
    assert lines[0].split()[:3] == ["contender", "mode", "median"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == [
        "torch",
        "fwd",
        "2.00",
        "1.00-3.00",
        "2.5",
        "2.00x",
        "-",
        "pass",
        "(max",
        "rel",
        "err",
        "3.0e-06)",
    ]
    assert lines[3].startswith("liger      fwd   unsupported: xxx") and lines[3].endswith("...")
    assert bench.format_notes({}, results) == ""
    assert bench.format_notes({"torch_lce": "chunked path"}, []) == "note: torch_lce: chunked path"


def test_environment():
    info = bench.device_info(torch.device("cpu"))
    assert info["type"] == "cpu" and info["cores"] >= 1 and info["name"]
    versions = bench.library_versions()
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
