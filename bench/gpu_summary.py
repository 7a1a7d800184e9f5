"""The targets of issues 21 and 20 read off one GPU run's results (``bench/gpu_issue21.sh`` writes them into one
folder): a short table to paste into the README, each figure with the file it comes from.

    python bench/gpu_summary.py DIR [--json summary.json]

DIR holds ``steps.json`` (each step's status and seconds), ``pytest.log``, ``findings.jsonl``, the benchmark JSONs
``bench-<config>.json``, ``gpu-profile.json`` and ``trainer.json``; whatever is missing is reported "not measured".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# the benchmark configurations of bench/gpu_issue21.sh, by the name of their JSON (bench-<name>.json)
GSPO_8B, DAPO_8B, GSPO_06B = "gspo-qwen3-8b", "dapo-qwen3-8b", "gspo-qwen3-0.6b"
DPO_8B, GSPO_32K, GSPO_512, AUTOCAST = "dpo-qwen3-8b", "gspo-qwen3-8b-32k", "gspo-qwen3-8b-ws512", "gspo-autocast"


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Results:
    """The figures of one run's folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.bench = {p.stem.removeprefix("bench-"): _load(p) for p in sorted(folder.glob("bench-*.json"))}
        self.profile = _load(folder / "gpu-profile.json")
        self.trainer = _load(folder / "trainer.json")
        self.steps = _load(folder / "steps.json") or []
        self.findings = []
        if (folder / "findings.jsonl").exists():
            for line in (folder / "findings.jsonl").read_text().splitlines():
                try:
                    self.findings.append(json.loads(line))
                except ValueError:
                    pass

    def result(self, config: str, contender: str, mode: str, run: int = 0) -> dict | None:
        report = self.bench.get(config)
        if not report or not report.get("runs") or len(report["runs"]) <= run:
            return None
        for r in report["runs"][run]["results"]:
            if r["contender"] == contender and r["mode"] == mode:
                return r
        return None

    def median(self, config: str, contender: str, mode: str) -> float | None:
        r = self.result(config, contender, mode)
        return r.get("median_ms") if r and r.get("status") == "ok" else None

    def peak(self, config: str, contender: str, mode: str) -> float | None:
        r = self.result(config, contender, mode)
        return r.get("peak_mib") if r and r.get("status") == "ok" else None

    def predicted(self, config: str, mode: str) -> float | None:
        report = self.bench.get(config)
        try:
            return report["runs"][0]["plan"][mode]["predicted_ms"]
        except (KeyError, IndexError, TypeError):
            return None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(value, spec=".2f", suffix=""):
    return "not measured" if value is None else f"{value:{spec}}{suffix}"


def _verdict(ok) -> str:
    return "" if ok is None else ("met" if ok else "**missed**")


def targets(res: Results) -> list[tuple[str, str, str, str]]:
    """``(metric, target, measured, verdict)`` rows: the issue's target table."""
    rows = []

    def ratio_row(name, config, target, limit):
        value = _ratio(res.median(config, "triton", "fwd_bwd"), res.median(config, "floor", "fwd_bwd"))
        rows.append((name, target, _fmt(value, ".3f", "x"), _verdict(None if value is None else value <= limit)))

    ratio_row("GSPO fwd+bwd / floor, qwen3-8b head", GSPO_8B, "<= 1.10", 1.10)
    ratio_row("DAPO fwd+bwd / floor, qwen3-8b head", DAPO_8B, "<= 1.10", 1.10)
    for name, config in (("GSPO", GSPO_8B), ("DAPO", DAPO_8B), ("DPO", DPO_8B)):
        value = _ratio(res.median(config, "trl", "fwd_bwd"), res.median(config, "triton", "fwd_bwd"))
        verdict = _verdict(None if value is None else value >= 1.4)
        rows.append((f"{name}: TRL's chunked head time / ours (fwd+bwd)", ">= 1.4x", _fmt(value, ".2f", "x"), verdict))
    ours = _ratio(res.median(GSPO_8B, "triton", "logprobs"), res.median(GSPO_8B, "floor", "logprobs"))
    trl = _ratio(res.median(GSPO_8B, "trl", "logprobs"), res.median(GSPO_8B, "floor", "logprobs"))
    ok = None if ours is None or trl is None else ours <= 1.06 and ours < trl
    rows.append(("no-grad log-probs / one GEMM (TRL's)", "<= 1.06, below TRL's",
                 f"{_fmt(ours, '.3f', 'x')} ({_fmt(trl, '.3f', 'x')})", _verdict(ok)))  # fmt: skip
    ratio_row("GSPO fwd+bwd / floor, qwen3-0.6b head (H=1024)", GSPO_06B, "<= 1.35", 1.35)
    peak, floor_peak = res.peak(GSPO_8B, "triton", "fwd_bwd"), res.peak(GSPO_8B, "floor", "fwd_bwd")
    peak_32k = res.peak(GSPO_32K, "triton", "fwd_bwd")
    ok = None if peak is None or floor_peak is None else peak <= 1.05 * floor_peak
    rows.append(("peak above inputs, qwen3-8b, default budget (floor's)", "<= floor's + 5%",
                 f"{_fmt(peak, ',.0f', ' MiB')} ({_fmt(floor_peak, ',.0f', ' MiB')})", _verdict(ok)))  # fmt: skip
    rows.append(("peak at N=32768 / at N=8192 (flat)", "flat", _fmt(_ratio(peak_32k, peak), ".2f", "x") +
                 f" ({_fmt(peak_32k, ',.0f', ' MiB')})", ""))  # fmt: skip
    lean = _ratio(res.median(GSPO_512, "triton", "fwd_bwd"), res.median(GSPO_512, "floor", "fwd_bwd"))
    lean_peak = res.peak(GSPO_512, "triton", "fwd_bwd")
    ok = None if lean is None or lean_peak is None else lean <= 1.20 and lean_peak <= 3072
    rows.append(("GSPO at workspace 512 MiB: time / floor, peak", "<= 1.20x, <= 3,072 MiB",
                 f"{_fmt(lean, '.3f', 'x')}, {_fmt(lean_peak, ',.0f', ' MiB')}", _verdict(ok)))  # fmt: skip
    idle = None
    gaps = res.profile.get("step_host_gaps") if isinstance(res.profile, dict) else None
    if isinstance(gaps, dict) and gaps.get("kernels"):  # no kernels: a CPU dry run, nothing idles
        idle = gaps.get("idle_us")
    idle_ms = None if idle is None else idle / 1e3
    rows.append(("device idle within one call (profile, gaps > 20 us)", "<= 0.5 ms", _fmt(idle_ms, ".3f", " ms"),
                 _verdict(None if idle_ms is None else idle_ms <= 0.5)))  # fmt: skip
    for name, config in (("GSPO", GSPO_8B), ("DAPO", DAPO_8B)):
        value = _ratio(res.predicted(config, "fwd_bwd"), res.median(config, "triton", "fwd_bwd"))
        ok = None if value is None else abs(value - 1) <= 0.10
        rows.append((f"planner prediction / measured, {name} fwd+bwd", "within 10%", _fmt(value, ".3f"), _verdict(ok)))
    on_off = None
    if isinstance(res.trainer, dict):
        on_off = res.trainer.get("completion_scan", {}).get("longest_on_over_off")
    rows.append(("longest completion at batch 8, GRPOTrainer: on / off", ">= 4x", _fmt(on_off, ".2f", "x"),
                 _verdict(None if on_off is None else on_off >= 4)))  # fmt: skip
    ac = _ratio(res.median(AUTOCAST, "triton", "fwd_bwd"), res.median(AUTOCAST, "floor", "fwd_bwd"))
    ac_trl = _ratio(res.median(AUTOCAST, "trl", "fwd_bwd"), res.median(AUTOCAST, "triton", "fwd_bwd"))
    rows.append(("autocast (fp32 weights, bf16): ours / bf16 floor; TRL / ours", "(issue 20: a row)",
                 f"{_fmt(ac, '.3f', 'x')}; {_fmt(ac_trl, '.2f', 'x')}", ""))  # fmt: skip
    return rows


def bench_table(res: Results) -> list[str]:
    """Per configuration: each contender's medians (fwd+bwd, no-grad) and fwd+bwd peak, and any failed check."""
    lines = []
    for config, report in res.bench.items():
        if not report or not report.get("runs"):
            lines.append(f"{config}: no result")
            continue
        for i, run in enumerate(report["runs"]):
            lines.append(f"{config} (N={run['tokens']}): contender  fwd_bwd ms  peak MiB  logprobs ms  /floor  check")
            contenders = dict.fromkeys(r["contender"] for r in run["results"])
            for name in contenders:
                fb = res.result(config, name, "fwd_bwd", i) or {}
                lp = res.result(config, name, "logprobs", i) or {}
                floor = res.result(config, "floor", "fwd_bwd", i) or {}
                checks = [r.get("check") or {} for r in run["results"] if r["contender"] == name]
                failed = [c.get("status") for c in checks if c.get("status") not in (None, "pass")]
                status = fb.get("status", "-")
                if status != "ok":
                    lines.append(f"  {name:9s} {status[:90]}")
                    continue
                over = _ratio(fb.get("median_ms"), floor.get("median_ms"))
                check = "n/a" if name == "floor" else ("FAIL" if failed else "pass")
                lines.append(f"  {name:9s} {_fmt(fb.get('median_ms'), '10.2f')}  {_fmt(fb.get('peak_mib'), '8,.0f')}"
                             f"  {_fmt(lp.get('median_ms'), '11.2f')}  {_fmt(over, '5.3f')}  {check}")  # fmt: skip
    return lines


def pytest_lines(folder: Path) -> list[str]:
    log = folder / "pytest.log"
    if not log.exists():
        return ["pytest: not run"]
    text = log.read_text(errors="replace").splitlines()
    counts = [ln for ln in text if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    failed = [ln for ln in text if ln.startswith(("FAILED", "ERROR", "XFAIL"))]
    return [f"pytest: {counts[-1].strip('= ') if counts else 'no summary line (killed?)'}", *failed[:30]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--json", help="write the target rows as JSON too")
    args = parser.parse_args(argv)
    res = Results(Path(args.folder))
    print("== steps (seconds, status)")
    for step in res.steps:
        print(f"  {step['name']:16s} {step.get('seconds', 0):6.0f} s  {step['status']}")
    print("== " + "\n".join(pytest_lines(res.folder)))
    for finding in res.findings:
        print(f"finding: {json.dumps(finding, default=str)[:400]}")
    print("== benchmark (triton = ours)")
    print("\n".join(bench_table(res)))
    rows = targets(res)
    device = next((r["device"].get("name") for r in res.bench.values() if r and "device" in r), None)
    print(f"== targets (issue 21; autocast: issue 20) on {device or 'an unknown device'}")
    print("| metric | target | measured | |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(("metric", "target", "measured", "verdict"), r, strict=True))
                                               for r in rows], indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
