"""The problem every contender solves: shapes and model presets, the random inputs, the reference and the check."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..api import fused_logprobs, fused_policy_loss
from ..config import PolicyLossConfig

MODES = ("fwd", "fwd_bwd", "logprobs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# ||out - ref|| / ||ref|| a contender must stay under, by input dtype
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Above this many logits the float64 eager reference is too big; the float32 torch backend stands in
REFERENCE_FP64_MAX_LOGITS = 1 << 25
# Replaying make_inputs' random draws to find its sequence lengths without running (--explain, valid_frac < 1) costs
# one draw per element of hidden and weight: done up to this many, else the layout is taken as full rows
REPLAY_MAX_ELEMENTS = 1 << 26


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


def default_seq_len(tokens: int) -> int:
    """512 tokens per sequence, fewer for small N (at least 4 sequences), always a divisor of N."""
    seq_len = max(1, min(512, tokens // 4))
    while tokens % seq_len:
        seq_len -= 1
    return seq_len


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
    # --autocast: every contender runs under torch.autocast(device, autocast) (fp32 master weights, 16-bit compute);
    # the reference takes the inputs rounded to it, the check its tolerance
    autocast: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def valid_tokens(self) -> int:
        return self.x_valid.shape[0]

    @property
    def row_lengths(self) -> list[int]:
        """Valid tokens per sequence: the layout the planner sees."""
        return [int(n) for n in self.mask.sum(-1).tolist()]


def _lengths(gen: torch.Generator, batch: int, seq_len: int, valid_frac: float) -> torch.Tensor:
    return torch.randint(max(1, math.ceil(valid_frac * seq_len)), seq_len + 1, (batch,), generator=gen)


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
    lengths = _lengths(gen, B, T, valid_frac)
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


def layout_row_lengths(shape: Shape, seed: int = 0, valid_frac: float = 1.0) -> tuple[list[int], bool]:
    """The sequence lengths :func:`make_inputs` draws for this shape and seed, without building the inputs, and
    whether they are exact. ``valid_frac == 1``: every row is full. Otherwise the generator is replayed (the same
    draws, in the same order) when that is cheap (:data:`REPLAY_MAX_ELEMENTS`); past that, full rows (an upper
    bound) and ``False``."""
    B, T, H, V = shape.batch, shape.seq_len, shape.hidden, shape.vocab
    if valid_frac >= 1.0:
        return [T] * B, True
    if B * T * H + V * H > REPLAY_MAX_ELEMENTS:
        return [T] * B, False
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.randn(B, T, H, generator=gen)
    torch.randn(V, H, generator=gen)
    torch.randint(0, V, (B, T), generator=gen)
    return [int(n) for n in _lengths(gen, B, T, valid_frac).tolist()], True


@dataclass
class Reference:
    kind: str
    loss: torch.Tensor
    dhidden: torch.Tensor
    dweight: torch.Tensor
    logps: torch.Tensor  # [n] at the valid tokens


def reference_precision(valid_tokens: int, vocab: int) -> tuple[torch.dtype, str, str]:
    """``(dtype, backend, description)`` of the reference: float64 eager (full logits) while the logits stay under
    :data:`REFERENCE_FP64_MAX_LOGITS`, else float32 on our torch backend (chunked)."""
    if valid_tokens * vocab <= REFERENCE_FP64_MAX_LOGITS:
        return torch.float64, "eager", "float64 eager (full logits)"
    return torch.float32, "torch", "float32 torch backend (chunked)"


def compute_reference(inputs: Inputs, cfg: PolicyLossConfig) -> Reference:
    """Loss, gradients and log-probs from the float64 eager path (small shapes) or our float32 torch backend; under
    ``--autocast``, of the inputs rounded to the autocast dtype (what every contender's GEMMs see)."""
    dtype, backend, kind = reference_precision(inputs.valid_tokens, inputs.weight.shape[0])
    hidden, weight = inputs.hidden.detach(), inputs.weight.detach()
    if inputs.autocast is not None:
        hidden, weight = hidden.to(inputs.autocast), weight.to(inputs.autocast)
        kind += f" of the inputs rounded to {str(inputs.autocast).removeprefix('torch.')}"
    hidden = hidden.to(dtype).requires_grad_()
    weight = weight.to(dtype).requires_grad_()
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
