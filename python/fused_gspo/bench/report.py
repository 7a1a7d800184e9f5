"""Reporting: the progress bar, the table, the plot, library versions and device information."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .measure import Result


class Progress:
    """A one-line progress bar on stderr (rewritten in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.start = time.perf_counter()

    def show(self, label: str) -> None:
        """Redraw the bar with ``label``, without counting a step."""
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.start:5.1f}s {label}"
        self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        self.stream.flush()

    def step(self, label: str) -> None:
        """Show ``label`` (the step about to run) and count it."""
        self.show(label)
        self.done += 1

    def close(self) -> None:
        self.done = self.total
        self.show("done")
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _clip(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def check_label(check: dict | None) -> str:
    if check is None:
        return "n/a"
    worst_name, worst = max(check["rel_err"].items(), key=lambda kv: kv[1])
    if check["status"] == "pass":
        return f"pass (max rel err {worst:.1e})"
    return f"FAIL ({worst_name} rel err {worst:.1e} > {check['tolerance']:.0e})"


def format_table(results: list[Result]) -> str:
    """One row per contender and mode; a contender that did not run gets its status across the figures."""
    header = ("contender", "mode", "median ms", "spread (min-max)", "peak MiB", "vs eager", "/ floor", "check")
    rows, notes = [], {}
    for r in results:
        if r.status != "ok":
            notes[len(rows)] = _clip(r.status)
            rows.append((r.contender, r.mode))
            continue
        rows.append(
            (
                r.contender,
                r.mode,
                _fmt(r.median_ms, ".2f"),
                f"{min(r.times_ms):.2f}-{max(r.times_ms):.2f}",
                _fmt(r.peak_mib, ".1f"),
                _fmt(r.speedup_vs_eager, ".2f", "x"),
                _fmt(r.ratio_to_floor, ".2f", "x"),
                check_label(r.check),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows] if i < len(row)) for i in range(len(header))]

    def line(cells, note: str = "") -> str:
        # names left-aligned, figures right-aligned, the check column left-aligned
        padded = [
            cell.ljust(width) if i in (0, 1, 7) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join([*padded, note]).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    lines += [line(row, notes.get(i, "")) for i, row in enumerate(rows)]
    return "\n".join(lines)


def format_notes(notes: dict[str, str], results: list[Result]) -> str:
    """The lines under the table: each contender's note (``Contender.note``), then what a check run warned (once
    per contender and message, with the modes that warned it). Empty when there is nothing to say."""
    lines = [f"note: {name}: {_clip(text, 200)}" for name, text in notes.items() if text]
    warned: dict[tuple[str, str], list[str]] = {}
    for r in results:
        for message in r.warnings:
            warned.setdefault((r.contender, message), []).append(r.mode)
    for (name, message), modes in warned.items():
        lines.append(f"warning: {name} ({','.join(modes)}): {_clip(message, 200)}")
    return "\n".join(lines)


def library_versions() -> dict[str, str | None]:
    versions = {}
    for dist in ("torch", "triton", "transformers", "trl", "liger-kernel", "fused-gspo"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        versions["fused-gspo git"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        versions["fused-gspo git"] = None
    return versions


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), name)
    except OSError:
        pass
    return {"type": "cpu", "name": name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def write_plot(path: str, runs: list[dict], modes: list[str], title: str = "") -> str:
    """Time and peak memory per contender: bars for one token count, lines across token counts with a sweep."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written"
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 3.6 * len(modes)), squeeze=False)
    sweep = len(runs) > 1
    for row, mode in enumerate(modes):
        for col, (key, label) in enumerate((("median_ms", "median time (ms)"), ("peak_mib", "peak memory (MiB)"))):
            ax = axes[row][col]
            series: dict[str, tuple[list, list]] = {}
            for run in runs:
                for r in run["results"]:
                    if r["mode"] == mode and r.get(key) is not None:
                        xs, ys = series.setdefault(r["contender"], ([], []))
                        xs.append(run["tokens"])
                        ys.append(r[key])
            if sweep:
                for name, (xs, ys) in series.items():
                    ax.plot(xs, ys, marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens")
                ax.legend(fontsize=8)
            else:
                names = list(series)
                ax.bar(names, [series[n][1][0] for n in names])
            ax.set_title(f"{mode}: {label}")
            ax.set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
