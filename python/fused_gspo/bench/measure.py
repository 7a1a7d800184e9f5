"""Measuring a contender: timing, peak-memory probes, the :class:`Result` record, ``measure`` and ``summarize``."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..config import PolicyLossConfig
from .contenders import Contender, Outputs
from .problem import Inputs, Reference, check_outputs

# Nominal LM-head FLOPs per token and per H*V, by mode (docs/design.md, "Strategy"): what the GEMM floor does
FLOPS_PER_NHV = {"fwd": 2, "fwd_bwd": 6, "logprobs": 2}


def time_runs(run: Callable[[], Outputs], repeats: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``repeats`` calls: CUDA events around each call on GPU, perf_counter on CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = run()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            out = run()
            times.append((time.perf_counter() - start_s) * 1e3)
        del out
    return times


class MemoryProbe:
    """Peak memory of one call, in MiB above what was allocated before it. ``method`` says how it is measured."""

    method = "not measured"

    def peak_mib(self, run: Callable[[], Outputs]) -> float | None:
        run()
        return None


class CudaMemory(MemoryProbe):
    method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the call"

    def __init__(self, device: torch.device):
        self.device = device

    def peak_mib(self, run):
        gc.collect()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return peak / 2**20


class ProcessMemory(MemoryProbe):
    """CPU: the kernel's peak-RSS counter (``VmHWM``), reset by writing 5 to ``/proc/self/clear_refs`` after
    ``malloc_trim`` has returned freed heap pages, minus ``VmRSS`` before the call. Counts pages touched, so a
    buffer allocated but never written does not show."""

    method = "process peak RSS: /proc/self/status VmHWM (reset via /proc/self/clear_refs after malloc_trim) - VmRSS"

    def __init__(self):
        try:
            self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._malloc_trim = None

    @classmethod
    def create(cls) -> MemoryProbe:
        """A ProcessMemory if the peak counter can be reset here, else a probe that measures nothing."""
        probe = cls()
        try:
            probe._reset()
            probe._read("VmHWM")
        except (OSError, KeyError) as exc:
            fallback = MemoryProbe()
            fallback.method = f"not measured on CPU (cannot reset VmHWM: {exc})"
            return fallback
        return probe

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def _reset(self) -> None:
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def peak_mib(self, run):
        self._reset()
        before = self._read("VmRSS")
        out = run()
        peak = self._read("VmHWM") - before
        del out
        return peak / 2**20


def memory_probe(device: torch.device) -> MemoryProbe:
    return CudaMemory(device) if device.type == "cuda" else ProcessMemory.create()


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@dataclass
class Result:
    contender: str
    mode: str
    status: str  # "ok", "OOM", "unavailable: ...", "unsupported: ...", "error: ..."
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    check: dict | None = None
    speedup_vs_eager: float | None = None
    ratio_to_floor: float | None = None
    tflops: float | None = None
    warnings: list[str] = field(default_factory=list)  # what the check run warned (each message once)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def to_json(self) -> dict:
        out = asdict(self)
        if self.times_ms:
            q1, _, q3 = statistics.quantiles(self.times_ms, n=4) if len(self.times_ms) > 1 else [self.times_ms[0]] * 3
            out.update(
                median_ms=self.median_ms, min_ms=min(self.times_ms), max_ms=max(self.times_ms), q1_ms=q1, q3_ms=q3
            )
        return out


def under_autocast(run: Callable[[], Outputs], device: torch.device, dtype: torch.dtype) -> Callable[[], Outputs]:
    """``run`` under ``torch.autocast(device.type, dtype)`` (``--autocast``: fp32 master weights, 16-bit compute)."""

    def autocast_run() -> Outputs:
        with torch.autocast(device.type, dtype=dtype):
            return run()

    return autocast_run


def _recording(run: Callable[[], Outputs]) -> tuple[Outputs, list[str]]:
    """Call ``run`` once, recording its warnings (each distinct message once, in order)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = run()
    messages = [f"{w.category.__name__}: {' '.join(str(w.message).split())}" for w in caught]
    return outputs, list(dict.fromkeys(messages))


def measure(
    contender: Contender,
    mode: str,
    inputs: Inputs,
    cfg: PolicyLossConfig,
    ref: Reference | None,
    repeats: int,
    warmup: int,
    memory: MemoryProbe,
) -> Result:
    """Check one contender in one mode against the reference, measure its peak memory, warm up, then time it."""
    result = Result(contender.name, mode, "ok")
    autocast = getattr(inputs, "autocast", None)
    try:
        run = contender.step(mode, inputs, cfg)
        if autocast is not None:
            run = under_autocast(run, inputs.device, autocast)
        outputs, result.warnings = _recording(run)
        if ref is not None:
            result.check = check_outputs(outputs, ref, autocast or inputs.hidden.dtype)
        del outputs
        # After the check run (one-time allocations such as workspaces are made), before the warm-up (so the
        # timed runs do not pay for the pages the CPU probe hands back to the OS)
        result.peak_mib = memory.peak_mib(run)
        for _ in range(warmup):
            run()
        result.times_ms = time_runs(run, repeats, inputs.device)
    except Exception as exc:  # a contender failing must not stop the others
        result.status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"
    finally:
        gc.collect()
        if inputs.device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def summarize(results: list[Result], inputs: Inputs) -> None:
    """Fill in speed-up over eager, ratio to the GEMM floor and nominal TFLOP/s for each timed result."""
    median = {(r.contender, r.mode): r.median_ms for r in results if r.median_ms}
    nhv = inputs.valid_tokens * inputs.hidden.shape[-1] * inputs.weight.shape[0]
    for r in results:
        if not r.median_ms:
            continue
        if ("eager", r.mode) in median:
            r.speedup_vs_eager = median[("eager", r.mode)] / r.median_ms
        if ("floor", r.mode) in median:
            r.ratio_to_floor = r.median_ms / median[("floor", r.mode)]
        r.tflops = FLOPS_PER_NHV[r.mode] * nhv / (r.median_ms * 1e-3) / 1e12
