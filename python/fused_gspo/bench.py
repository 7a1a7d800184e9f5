"""``fused-gspo-bench``: time and memory of the LM-head policy loss, ours side by side with the alternatives.

For one objective (loss type, importance-sampling level, beta) and one shape (``N`` tokens, hidden size ``H``,
vocabulary ``V``, dtype), every contender runs up to three modes on the same random inputs:

- ``fwd``: the forward of a training step. The inputs require grad, so whatever a contender does in its forward for
  the backward's sake (keeping the logits, or forming the gradient on the spot) is counted;
- ``fwd_bwd``: that forward plus ``torch.autograd.grad`` of the loss with respect to ``hidden`` and ``weight``;
- ``logprobs``: the no-grad pass that scores the valid tokens (how ``old_logps`` / ``ref_logps`` are computed).

Contenders:

- ``eager``: ``fused_policy_loss(backend="eager")``, the full ``[N, V]`` logits in the input dtype;
- ``torch`` / ``triton``: ``fused_policy_loss(backend="torch" | "triton")``;
- ``trl``: TRL 1.16's own chunked LM head (``trl.kernels.ChunkedLogProbFunction``, called as ``add_fused_lm_head``
  calls it) on the valid tokens, scattered back to ``[B, T]``, then the loss math in eager PyTorch;
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its own chunked head and loss);
- ``floor``: the bare GEMMs of the same shapes and dtype, ``X @ W.T`` (+ ``G @ W`` and ``G.T @ X`` for fwd_bwd).

Method: warm-up runs are excluded; each figure is the median of ``--repeats`` runs with its min/max; CUDA events
(with a synchronize before each run) on GPU, ``time.perf_counter`` on CPU. Before a contender is timed its loss,
``dL/dhidden`` and ``dL/dweight`` (or its log-probs) are compared with a reference: the float64 eager path at small
shapes, else our ``torch`` backend on float32 copies of the inputs. Peak memory is measured in a separate run, above
what was allocated before it (inputs, reference): ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .api import fused_logprobs, fused_policy_loss, resolve_backend
from .config import LEVELS, LOSS_TYPES, PolicyLossConfig
from .objectives import PolicyBatch, evaluate

CONTENDERS = ("eager", "torch", "triton", "trl", "liger", "floor")
MODES = ("fwd", "fwd_bwd", "logprobs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||out - ref|| / ||ref|| a contender must stay under, by input dtype
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Nominal LM-head FLOPs per token and per H*V, by mode (DESIGN.md section 3): what the GEMM floor does
FLOPS_PER_NHV = {"fwd": 2, "fwd_bwd": 6, "logprobs": 2}
# Above this many logits the float64 eager reference is too big; the float32 torch backend stands in
REFERENCE_FP64_MAX_LOGITS = 1 << 25


@dataclass(frozen=True)
class ModelPreset:
    hidden: int
    vocab: int
    softcap: float | None = None


MODELS = {
    "qwen3-0.6b": ModelPreset(1024, 151936),
    "qwen3-8b": ModelPreset(4096, 151936),
    "llama3-8b": ModelPreset(4096, 128256),
    "llama3.2-1b": ModelPreset(2048, 128256),
    "gemma2-2b": ModelPreset(2304, 256000, softcap=30.0),
}
# Defaults: the qwen3-8b head at 8192 tokens in bf16 on a GPU; on CPU a shape whose whole default run takes ~1 min
GPU_DEFAULTS = {"model": "qwen3-8b", "tokens": 8192, "dtype": "bf16", "repeats": 20, "warmup": 3}
CPU_DEFAULTS = {"tokens": 512, "hidden": 256, "vocab": 8192, "dtype": "fp32", "repeats": 5, "warmup": 1}


# --------------------------------------------------------------------------------------------------------------------
# Inputs and reference


@dataclass(frozen=True)
class Shape:
    tokens: int  # N = B * T positions
    hidden: int
    vocab: int
    seq_len: int
    dtype: torch.dtype

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len


@dataclass
class Inputs:
    """One random batch, shared by every contender. ``hidden`` and ``weight`` are leaves that require grad."""

    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    ids: torch.Tensor  # [B, T] int64, valid ids everywhere (Liger scores masked positions too)
    mask: torch.Tensor  # [B, T] float32 0/1
    advantages: torch.Tensor  # [B] float32
    old_logps: torch.Tensor  # [B, T] float32: current log-probs plus noise, so the ratios are off-policy
    ref_logps: torch.Tensor | None  # [B, T] float32, when beta != 0
    x_valid: torch.Tensor  # [n, H] the valid tokens' hidden states (detached): what the logprobs mode scores
    ids_valid: torch.Tensor  # [n]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def valid_tokens(self) -> int:
        return self.x_valid.shape[0]


def make_inputs(
    shape: Shape, cfg: PolicyLossConfig, device: torch.device, seed: int = 0, valid_frac: float = 1.0
) -> Inputs:
    """Random inputs (never zeros): unit-scale hidden states, logits of standard deviation ~2, random sequence
    lengths in ``[valid_frac * T, T]``, advantages ~ N(0.3, 1), and old/ref log-probs that are the current ones plus
    per-token and per-sequence noise (std 0.05 each: off-policy, mostly inside the clip range)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B, T, H, V = shape.batch, shape.seq_len, shape.hidden, shape.vocab

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=gen) * std

    hidden = randn(B, T, H).to(device, shape.dtype).requires_grad_()
    weight = randn(V, H, std=2.0 / math.sqrt(H)).to(device, shape.dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    lengths = torch.randint(max(1, math.ceil(valid_frac * T)), T + 1, (B,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float().to(device)
    advantages = (randn(B) + 0.3).to(device)
    valid = mask.bool()
    x_valid, ids_valid = hidden.detach()[valid], ids[valid]

    with torch.no_grad():
        logps = torch.zeros(B, T, device=device)
        logps[valid] = fused_logprobs(
            x_valid.float(),
            weight.detach().float(),
            ids_valid,
            temperature=cfg.temperature,
            logit_scale=cfg.logit_scale,
            final_logit_softcapping=cfg.final_logit_softcapping,
            backend="torch",
        )

    def perturbed():
        noise = randn(B, T, std=0.05) + randn(B, 1, std=0.05)
        return (logps + noise.to(device)) * mask

    old_logps = perturbed()
    ref_logps = perturbed() if cfg.beta != 0.0 else None
    return Inputs(hidden, weight, ids, mask, advantages, old_logps, ref_logps, x_valid, ids_valid)


@dataclass
class Reference:
    kind: str
    loss: torch.Tensor
    dhidden: torch.Tensor
    dweight: torch.Tensor
    logps: torch.Tensor  # [n] at the valid tokens


def compute_reference(inputs: Inputs, cfg: PolicyLossConfig) -> Reference:
    """Loss, gradients and log-probs from the float64 eager path (small shapes) or our float32 torch backend."""
    if inputs.valid_tokens * inputs.weight.shape[0] <= REFERENCE_FP64_MAX_LOGITS:
        dtype, backend, kind = torch.float64, "eager", "float64 eager (full logits)"
    else:
        dtype, backend, kind = torch.float32, "torch", "float32 torch backend (chunked)"
    hidden = inputs.hidden.detach().to(dtype).requires_grad_()
    weight = inputs.weight.detach().to(dtype).requires_grad_()
    out = fused_policy_loss(
        hidden,
        weight,
        inputs.ids,
        inputs.advantages,
        inputs.mask,
        old_logps=inputs.old_logps,
        ref_logps=inputs.ref_logps,
        config=cfg,
        backend=backend,
    )
    dhidden, dweight = torch.autograd.grad(out.loss, (hidden, weight))
    return Reference(kind, out.loss.detach(), dhidden, dweight, out.logps[inputs.mask.bool()])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` (Frobenius norms, in the reference's dtype); NaN/inf in ``out`` gives inf."""
    out = out.detach().to(ref.dtype)
    if not bool(torch.isfinite(out).all()):
        return math.inf
    denom = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(out - ref)) / max(denom, 1e-30)


def check_outputs(outputs: dict[str, torch.Tensor], ref: Reference, dtype: torch.dtype) -> dict:
    """Compare a contender's outputs (any of loss, dhidden, dweight, logps) with the reference."""
    tol = TOLERANCES[dtype]
    errors = {name: relative_error(value, getattr(ref, name)) for name, value in outputs.items()}
    passed = all(err <= tol for err in errors.values())
    return {"status": "pass" if passed else "FAIL", "tolerance": tol, "rel_err": errors}


# --------------------------------------------------------------------------------------------------------------------
# Contenders

Outputs = dict[str, torch.Tensor]


class Contender:
    """A way of computing the loss. Subclasses give ``loss`` and ``logprobs``; ``step`` turns them into modes."""

    name = ""
    description = ""

    def prepare(self, inputs: Inputs, cfg: PolicyLossConfig) -> str | None:
        """Get ready to run on these inputs; return why it cannot ("unavailable: ..." / "unsupported: ..."), or None."""
        return None

    def loss(self, inputs: Inputs, cfg: PolicyLossConfig) -> torch.Tensor:
        raise NotImplementedError

    def logprobs(self, inputs: Inputs, cfg: PolicyLossConfig) -> torch.Tensor:
        raise NotImplementedError

    def step(self, mode: str, inputs: Inputs, cfg: PolicyLossConfig) -> Callable[[], Outputs]:
        """A no-argument callable running one ``mode`` and returning what the check compares."""
        if mode == "logprobs":

            def run() -> Outputs:
                with torch.no_grad():
                    return {"logps": self.logprobs(inputs, cfg)}

        elif mode == "fwd":

            def run() -> Outputs:
                with torch.enable_grad():
                    return {"loss": self.loss(inputs, cfg)}

        else:

            def run() -> Outputs:
                with torch.enable_grad():
                    loss = self.loss(inputs, cfg)
                    dhidden, dweight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight))
                return {"loss": loss.detach(), "dhidden": dhidden, "dweight": dweight}

        return run


class FusedGspo(Contender):
    """Our ``fused_policy_loss`` / ``fused_logprobs`` with one backend."""

    def __init__(self, backend: str):
        self.name = self.backend = backend
        self.description = f"fused_gspo.fused_policy_loss(backend={backend!r})"
        if backend == "eager":
            self.description += ": full [N, V] logits in the input dtype, autograd"

    def prepare(self, inputs, cfg):
        try:
            resolve_backend(self.backend, inputs.device)
        except RuntimeError as exc:
            return f"unavailable: {exc}"
        if self.backend == "triton" and inputs.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "unavailable: no GPU (on CPU the Triton kernels only run under TRITON_INTERPRET=1, far too slow)"
        return None

    def loss(self, inputs, cfg):
        return fused_policy_loss(
            inputs.hidden,
            inputs.weight,
            inputs.ids,
            inputs.advantages,
            inputs.mask,
            old_logps=inputs.old_logps,
            ref_logps=inputs.ref_logps,
            config=cfg,
            backend=self.backend,
        ).loss

    def logprobs(self, inputs, cfg):
        logp, _entropy = fused_logprobs(
            inputs.x_valid,
            inputs.weight,
            inputs.ids_valid,
            temperature=cfg.temperature,
            logit_scale=cfg.logit_scale,
            final_logit_softcapping=cfg.final_logit_softcapping,
            return_entropy=True,
            backend=self.backend,
            workspace_bytes=cfg.workspace_bytes,
        )
        return logp


class TrlChunked(Contender):
    """TRL 1.16's default: its chunked LM head, then the loss in eager PyTorch.

    The head is ``trl.kernels.ChunkedLogProbFunction`` called as ``trl.trainer.utils.add_fused_lm_head`` calls it
    (valid tokens only, vocabulary tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``, ``outputs=("log_probs", "entropy")`` as
    ``GRPOTrainer`` patches the policy model). For the loss math we reuse ``fused_gspo.objectives.policy_objective``
    and ``policy_metrics`` rather than instantiating a trainer: they mirror ``GRPOTrainer._compute_loss`` term for
    term and are cross-checked against TRL's own ``_compute_loss`` in the test suite.
    """

    name = "trl"
    outputs = ("log_probs", "entropy")

    def __init__(self):
        self.description = "trl.kernels.ChunkedLogProbFunction + TRL's loss math (fused_gspo.objectives)"

    def prepare(self, inputs, cfg):
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: PLC0415
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: TRL's chunked LM head cannot be imported ({exc})"
        self.function, self.chunk_size = ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE
        self.description = (
            f"trl.kernels.ChunkedLogProbFunction (vocab tile {self.chunk_size}, outputs={self.outputs}) "
            "+ TRL's loss math (fused_gspo.objectives.policy_objective)"
        )
        return None

    def _head(self, x, weight, targets, cfg):
        logp, entropy, *_ = self.function.apply(
            x,
            weight,
            None,
            targets,
            cfg.temperature,
            self.chunk_size,
            cfg.final_logit_softcapping,
            cfg.logit_scale,
            self.outputs,
        )
        return logp, entropy

    def loss(self, inputs, cfg):
        valid = inputs.mask.bool()
        logp, entropy = self._head(inputs.hidden[valid], inputs.weight, inputs.ids[valid], cfg)
        logps = logp.new_zeros(valid.shape).masked_scatter(valid, logp)
        entropy = entropy.new_zeros(valid.shape).masked_scatter(valid, entropy)
        batch = PolicyBatch(inputs.mask, inputs.advantages, inputs.old_logps, inputs.ref_logps).to(torch.float32)
        terms, _metrics, _ = evaluate(logps, entropy, batch, cfg)  # the metrics too: TRL logs them every step
        return terms.loss

    def logprobs(self, inputs, cfg):
        return self._head(inputs.x_valid, inputs.weight, inputs.ids_valid, cfg)[0]


class Liger(Contender):
    """Liger-Kernel's ``LigerFusedLinearGRPOLoss``: chunks of ``chunk_size`` sequences, each through a vocabulary-
    chunked log-prob function and the loss, with the gradient formed in the forward. Its defaults are kept
    (``chunk_size=1``; ``compiled=True``, which torch.compiles the loss math, on GPU only: on CPU it would only add
    compile time). Its log-prob pass (``chunk_forward``) has no entropy."""

    name = "liger"
    SUPPORTED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

    def __init__(self):
        self.description = "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss"

    def prepare(self, inputs, cfg):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: PLC0415
            from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: liger-kernel cannot be imported ({exc})"
        why = self.unsupported(inputs, cfg)
        if why:
            return f"unsupported: {why}"
        compiled = inputs.device.type == "cuda"
        self.module = LigerFusedLinearGRPOLoss(
            beta=cfg.beta,
            compiled=compiled,
            use_ref_model=cfg.beta != 0.0,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.effective_epsilon_high,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length or inputs.hidden.shape[1],
            importance_sampling_level=cfg.importance_sampling_level,
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
            temperature=cfg.temperature,
            delta=cfg.delta,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            vespo_k_pos=cfg.vespo_k_pos,
            vespo_lambda_pos=cfg.vespo_lambda_pos,
            vespo_k_neg=cfg.vespo_k_neg,
            vespo_lambda_neg=cfg.vespo_lambda_neg,
        )
        self.chunk_forward = LigerFusedLinearPPOBase.chunk_forward
        self.description = f"liger_kernel LigerFusedLinearGRPOLoss(chunk_size=1, compiled={compiled})"
        return None

    def unsupported(self, inputs: Inputs, cfg: PolicyLossConfig) -> str | None:
        """What of the objective LigerFusedLinearGRPOLoss (0.8.x) has no parameter or code path for."""
        if cfg.loss_type not in self.SUPPORTED_LOSSES:
            return f"loss_type={cfg.loss_type!r} (it has {', '.join(self.SUPPORTED_LOSSES)})"
        if cfg.importance_sampling_level not in ("token", "sequence"):
            return f"importance_sampling_level={cfg.importance_sampling_level!r} (it has 'token' and 'sequence')"
        if cfg.importance_sampling_level == "sequence" and cfg.loss_type in ("cispo", "sapo", "vespo"):
            return f"importance_sampling_level='sequence' with loss_type={cfg.loss_type!r}"
        if cfg.final_logit_softcapping is not None or cfg.logit_scale != 1.0:
            return "final_logit_softcapping / logit_scale (its head is hidden @ W.T / temperature)"
        if cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef != 0.0:
            return "entropy masking or an entropy bonus (it computes no entropy)"
        if cfg.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold"
        if cfg.num_processes != 1 or cfg.gradient_accumulation_steps != 1 or cfg.steps_per_generation not in (None, 1):
            return "TRL's accumulation/process normalizers"
        if inputs.advantages.dim() != 1:
            return "per-token advantages"
        return None

    def loss(self, inputs, cfg):
        loss, _metrics = self.module(
            inputs.hidden,
            inputs.weight,
            inputs.ids,
            inputs.mask,
            inputs.advantages,
            ref_per_token_logps=inputs.ref_logps,
            old_per_token_logps=inputs.old_logps,
        )
        return loss

    def logprobs(self, inputs, cfg):
        x, ids = inputs.x_valid.unsqueeze(0), inputs.ids_valid.unsqueeze(0)
        return self.chunk_forward(x, inputs.weight, ids, temperature=cfg.temperature).squeeze(0)


class GemmFloor(Contender):
    """The bare LM-head GEMMs at the valid tokens' shape and the input dtype: the time no implementation beats."""

    name = "floor"
    description = "bare GEMMs: X @ W.T (fwd, logprobs); + G @ W and G.T @ X with G the [n, V] product (fwd_bwd)"

    def step(self, mode, inputs, cfg):
        x, w = inputs.x_valid, inputs.weight.detach()

        def run() -> Outputs:
            with torch.no_grad():
                y = x @ w.t()
                if mode != "fwd_bwd":
                    return {}
                return {"dx": y @ w, "dw": y.t() @ x}

        return run


def build_contenders(names: list[str]) -> list[Contender]:
    makers = {
        "eager": lambda: FusedGspo("eager"),
        "torch": lambda: FusedGspo("torch"),
        "triton": lambda: FusedGspo("triton"),
        "trl": TrlChunked,
        "liger": Liger,
        "floor": GemmFloor,
    }
    return [makers[name]() for name in names]


# --------------------------------------------------------------------------------------------------------------------
# Measurement


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
    try:
        run = contender.step(mode, inputs, cfg)
        outputs = run()
        if ref is not None:
            result.check = check_outputs(outputs, ref, inputs.hidden.dtype)
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


# --------------------------------------------------------------------------------------------------------------------
# Reporting


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
            notes[len(rows)] = r.status if len(r.status) <= 110 else r.status[:107] + "..."
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


# --------------------------------------------------------------------------------------------------------------------
# Command line


def _csv(kind: str, allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad) or text!r}; choose from {allowed}")
        return list(dict.fromkeys(items))

    return parse


def _token_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-gspo-bench",
        description="Time forward, forward+backward and the no-grad log-prob pass of a GRPO-family loss through the "
        "LM head, and its peak memory, for fused_gspo's backends, TRL's chunked head, Liger and the bare GEMMs.",
        epilog="Defaults: on a GPU the qwen3-8b head (H=4096, V=151936) at 8192 tokens in bf16; on CPU "
        f"{CPU_DEFAULTS['tokens']} tokens, H={CPU_DEFAULTS['hidden']}, V={CPU_DEFAULTS['vocab']}, fp32. "
        "The objective defaults to GSPO (loss_type=grpo, level=sequence).",
    )
    shape = parser.add_argument_group("shape")
    shape.add_argument("--model", choices=sorted(MODELS), help="take H, V (and softcapping) from a model's LM head")
    shape.add_argument("--tokens", type=int, help="N, tokens per micro-batch (B * T)")
    shape.add_argument("--hidden", type=int, help="H, hidden size (overrides --model)")
    shape.add_argument("--vocab", type=int, help="V, vocabulary size (overrides --model)")
    shape.add_argument("--seq-len", type=int, help="T, tokens per sequence; B = tokens / T (default min(512, N/4))")
    shape.add_argument(
        "--valid-frac", type=float, default=1.0, help="sequence lengths drawn in [frac*T, T] (default 1: no padding)"
    )
    shape.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    shape.add_argument("--sweep-tokens", type=_token_list, help="comma list of token counts to run in turn")
    obj = parser.add_argument_group("objective")
    obj.add_argument("--loss-type", choices=LOSS_TYPES, default="grpo")
    obj.add_argument("--level", choices=LEVELS, default="sequence", help="importance_sampling_level")
    obj.add_argument("--beta", type=float, default=0.0, help="KL coefficient (needs ref log-probs, drawn at random)")
    obj.add_argument("--epsilon", type=float, default=PolicyLossConfig.epsilon)
    obj.add_argument("--epsilon-high", type=float, default=None)
    obj.add_argument("--temperature", type=float, default=1.0)
    obj.add_argument("--softcap", type=float, default=None, help="final_logit_softcapping (default: the model's)")
    run = parser.add_argument_group("run")
    run.add_argument(
        "--contenders", type=_csv("contender", CONTENDERS), default=list(CONTENDERS), help=",".join(CONTENDERS)
    )
    run.add_argument("--modes", type=_csv("mode", MODES), default=list(MODES), help=",".join(MODES))
    run.add_argument("--repeats", type=int, help="timed runs per figure (default 20 on GPU, 5 on CPU)")
    run.add_argument("--warmup", type=int, help="untimed runs first, after the check run (default 3 GPU, 1 CPU)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", metavar="PATH", help="write every figure, the config and the environment as JSON")
    run.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory per contender (needs matplotlib)")
    return parser


@dataclass
class Settings:
    """Everything a run needs, with the device-dependent defaults filled in."""

    device: torch.device
    model: str | None
    token_counts: list[int]
    hidden: int
    vocab: int
    seq_len: int | None  # None: default_seq_len(tokens)
    dtype_name: str
    valid_frac: float
    contenders: list[str]
    modes: list[str]
    repeats: int
    warmup: int
    seed: int
    config: PolicyLossConfig

    def objective(self) -> str:
        cfg = self.config
        text = f"loss_type={cfg.loss_type} level={cfg.importance_sampling_level} beta={cfg.beta} "
        text += f"epsilon={cfg.epsilon}/{cfg.effective_epsilon_high}"
        if cfg.temperature != 1.0:
            text += f" temperature={cfg.temperature}"
        if cfg.final_logit_softcapping is not None:
            text += f" softcap={cfg.final_logit_softcapping}"
        return text


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Fill the device-dependent defaults and validate what argparse cannot (errors exit through the parser)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    model_name = args.model or defaults.get("model")
    model = MODELS.get(model_name) if model_name else None
    # `is None`, not `or`: an explicit 0 must reach the checks below, not fall back to a default
    hidden = args.hidden if args.hidden is not None else (model.hidden if model else defaults["hidden"])
    vocab = args.vocab if args.vocab is not None else (model.vocab if model else defaults["vocab"])
    softcap = args.softcap if args.softcap is not None else (model.softcap if model else None)
    token_counts = args.sweep_tokens or [args.tokens if args.tokens is not None else defaults["tokens"]]
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    for name, value in (
        ("--hidden", hidden),
        ("--vocab", vocab),
        ("--repeats", repeats),
        ("--tokens", token_counts[0]),
    ):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        parser.error(f"--warmup must be >= 0, got {warmup}")
    if not 0.0 < args.valid_frac <= 1.0:
        parser.error(f"--valid-frac must be in (0, 1], got {args.valid_frac}")
    if args.seq_len is not None:
        if args.seq_len < 1:
            parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
        bad = [n for n in token_counts if n % args.seq_len]
        if bad:
            parser.error(f"--seq-len {args.seq_len} must divide the token count(s) {bad}")
    try:
        config = PolicyLossConfig(
            loss_type=args.loss_type,
            importance_sampling_level=args.level,
            beta=args.beta,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            temperature=args.temperature,
            final_logit_softcapping=softcap,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return Settings(
        device=torch.device("cuda" if on_gpu else "cpu"),
        model=model_name,
        token_counts=token_counts,
        hidden=hidden,
        vocab=vocab,
        seq_len=args.seq_len,
        dtype_name=args.dtype or defaults["dtype"],
        valid_frac=args.valid_frac,
        contenders=args.contenders,
        modes=args.modes,
        repeats=repeats,
        warmup=warmup,
        seed=args.seed,
        config=config,
    )


def default_seq_len(tokens: int) -> int:
    """512 tokens per sequence, fewer for small N (at least 4 sequences), always a divisor of N."""
    seq_len = max(1, min(512, tokens // 4))
    while tokens % seq_len:
        seq_len -= 1
    return seq_len


def run_benchmark(settings: Settings) -> tuple[list[dict], str]:
    """Run every contender in every mode at each token count: one dict per token count, and the memory method."""
    contenders = build_contenders(settings.contenders)
    memory = CudaMemory(settings.device) if settings.device.type == "cuda" else ProcessMemory.create()
    progress = Progress(len(settings.token_counts) * len(contenders) * len(settings.modes))
    runs = []
    for tokens in settings.token_counts:
        seq_len = settings.seq_len or default_seq_len(tokens)
        shape = Shape(tokens, settings.hidden, settings.vocab, seq_len, DTYPES[settings.dtype_name])
        progress.show(f"N={tokens}: inputs and reference")
        inputs = make_inputs(shape, settings.config, settings.device, settings.seed, settings.valid_frac)
        ref = compute_reference(inputs, settings.config)
        results = []
        for contender in contenders:
            reason = contender.prepare(inputs, settings.config)
            for mode in settings.modes:
                progress.step(f"N={tokens}: {contender.name} {mode}")
                if reason:
                    results.append(Result(contender.name, mode, reason))
                    continue
                check_ref = None if isinstance(contender, GemmFloor) else ref
                args = (settings.config, check_ref, settings.repeats, settings.warmup, memory)
                results.append(measure(contender, mode, inputs, *args))
        summarize(results, inputs)
        runs.append(
            {
                "tokens": tokens,
                "batch": shape.batch,
                "seq_len": seq_len,
                "valid_tokens": inputs.valid_tokens,
                "inputs_mib": sum(t.numel() * t.element_size() for t in (inputs.hidden, inputs.weight)) / 2**20,
                "reference": ref.kind,
                "contenders": {c.name: c.description for c in contenders},
                "results": results,
            }
        )
        del inputs, ref
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    return runs, memory.method


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fused-gspo-bench``; returns the exit status (argument errors exit with status 2)."""
    parser = build_parser()
    command = ["fused-gspo-bench", *(sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(command[1:])
    settings = resolve_settings(args, parser)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            f"warning: --plot needs matplotlib, which is not installed: {args.plot} will not be written",
            file=sys.stderr,
        )
    torch.manual_seed(settings.seed)

    runs, memory_method = run_benchmark(settings)

    device = device_info(settings.device)
    timer = "CUDA events, synchronize before each run" if settings.device.type == "cuda" else "time.perf_counter"
    shape = f"H={settings.hidden}, V={settings.vocab}, {settings.dtype_name}"
    for run in runs:
        tokens = f"N={run['tokens']} tokens (B={run['batch']} x T={run['seq_len']}, {run['valid_tokens']} valid)"
        print(f"\n{device['name']} ({settings.device.type}) | {tokens}, {shape} | {settings.objective()}")
        print(f"time: {timer}, median of {settings.repeats} runs after {settings.warmup} warm-up")
        print(f"memory: {memory_method}")
        print(f"check: ||out - ref|| / ||ref|| against {run['reference']}")
        print(format_table(run["results"]))

    json_runs = [{**run, "results": [r.to_json() for r in run["results"]]} for run in runs]
    if args.json:
        config = asdict(settings)
        config.update(device=str(settings.device), loss=config.pop("config"))
        report = {
            "command": shlex.join(command),
            "argv": command,
            "device": device,
            "versions": library_versions(),
            "timer": timer,
            "memory_method": memory_method,
            "config": config,
            "runs": json_runs,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    if args.plot:
        title = f"{device['name']} | {shape} | {settings.objective()}"
        print(write_plot(args.plot, json_runs, settings.modes, title), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
