"""The ``"triton"`` backend's tile operations: the chunked driver's statistics and logits gradient as Triton kernels.

:class:`TritonTileOps` implements :class:`fused_gspo.tile_ops.TileOps`. Its forward reads a chunk's projection
once (split online log-sum-exp with a running ``sum z e^z``, partials merged by a second kernel) and its backward
overwrites the chunk with ``dL/dy``, for bf16/fp16 inputs straight in that dtype over the first half of each fp32 row
(the GEMMs' operand, written once); neither allocates anything of the chunk's size (``temporaries = 0``).
The kernels live in :mod:`fused_gspo.kernels` (``logsumexp_stats``, ``logits_grad``, ``linear_logprob``).

The kernels take float32 chunks, or logits staged in bf16/fp16 (the default for 16-bit compute), whose gradient they
write in place. Float64 chunks (float64 inputs, a reference mode) go to the PyTorch tile ops, a quarter of the rows at
a time so their temporaries stay within the chunk's size. CPU tensors need the Triton interpreter
(``TRITON_INTERPRET=1`` before triton is imported).
"""

from __future__ import annotations

from dataclasses import astuple

import torch
import triton  # noqa: F401  (an ImportError here tells backends.triton_tile_ops the backend is unavailable)

from .head import HeadParams, TokenStats, TorchTileOps
from .kernels.launch_config import interpreting
from .kernels.linear_logprob import linear_logprob
from .kernels.logits_grad import logits_grad_
from .kernels.logsumexp_stats import logsumexp_stats
from .kernels.scale_cast import scale_cast
from .precision import HALF_DTYPES, stats_dtype_for

# Float64 chunks go through TorchTileOps in this many row slices (its temporaries: 3 slices' worth of logits)
_FALLBACK_SLICES = 4
# Tiles the kernels read: fp32, or logits staged in 16 bits (folded in fp32 on load)
_KERNEL_TILES = (torch.float32, *HALF_DTYPES)


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "backend='triton' got CPU tensors but Triton's interpreter is off: set TRITON_INTERPRET=1 before "
            "triton is imported, move the inputs to a GPU, or use backend='torch'"
        )


def _row_slices(n: int):
    step = max(1, -(-n // _FALLBACK_SLICES))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _head_args(head: HeadParams) -> tuple:
    return head.logit_scale, head.softcap, head.temperature


class TritonTileOps:
    """Chunk statistics and logits gradient as Triton kernels; see :class:`fused_gspo.tile_ops.TileOps`."""

    name = "triton"
    # [n, V] temporaries these ops allocate next to the tile (none: O(n) statistics only), for any tile dtype
    temporaries = 0
    half_tile_temporaries = 0

    @staticmethod
    def grad_dtype(compute_dtype: torch.dtype, tile_dtype: torch.dtype | None = None) -> torch.dtype:
        if tile_dtype in HALF_DTYPES:  # in place over the staged tile
            return tile_dtype
        if compute_dtype in HALF_DTYPES:  # over the first half of each fp32 row
            return compute_dtype
        return stats_dtype_for(compute_dtype)

    @staticmethod
    def forward(y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
        """``y``: ``[n, V]`` projection (float32, or a 16-bit staged tile). Returns ``logp``, ``entropy``, ``lse``,
        each ``[n]`` float32."""
        if y.dim() != 2 or targets.shape != y.shape[:1]:
            raise ValueError(f"y must be [n, V] and targets [n], got {tuple(y.shape)} and {tuple(targets.shape)}")
        if y.dtype not in _KERNEL_TILES:
            return TritonTileOps._fallback_forward(y, targets, head)
        _check_runnable(y)
        if y.stride(1) != 1:
            y = y.contiguous()
        return logsumexp_stats(y, targets.long(), *_head_args(head))

    @staticmethod
    def statistics(y: torch.Tensor, targets: torch.Tensor, head: HeadParams) -> TokenStats:
        """Every :class:`fused_gspo.head.TokenStats` field from the same one read of ``y`` as :meth:`forward`."""
        if y.dtype not in _KERNEL_TILES:
            parts = [TorchTileOps.statistics(y[a:b], targets[a:b], head) for a, b in _row_slices(y.shape[0])]
            if not parts:
                return TorchTileOps.statistics(y, targets, head)
            return TokenStats(*(torch.cat(column) for column in zip(*(astuple(p) for p in parts), strict=True)))
        _check_runnable(y)
        if y.stride(1) != 1:
            y = y.contiguous()
        logp, entropy, lse, extras = logsumexp_stats(y, targets.long(), *_head_args(head), extra=True)
        return TokenStats(logp, entropy, lse, extras[:, 0], extras[:, 1], extras[:, 2] > 0.5)

    @staticmethod
    def backward_(y, targets, lse, entropy, grad_logp, grad_entropy, head: HeadParams, grad_dtype=None) -> torch.Tensor:
        """``dL/dy`` over ``y``: in place when ``grad_dtype`` is ``y``'s dtype (the default; a 16-bit staged tile
        always), else, for a float32 tile, the bf16/fp16 view over the first half of each row (row stride ``2V``).
        ``grad_logp``/``grad_entropy``: ``[n]`` or None (no such term)."""
        grad_dtype = y.dtype if grad_dtype is None else grad_dtype
        if y.dtype in HALF_DTYPES and grad_dtype != y.dtype:
            raise ValueError(f"a {y.dtype} tile's gradient is written in place, in {y.dtype}, not {grad_dtype}")
        if y.dtype not in _KERNEL_TILES:
            if grad_dtype != y.dtype:
                raise ValueError(f"a {y.dtype} tile's gradient is written in {y.dtype}, not {grad_dtype}")
            for start, stop in _row_slices(y.shape[0]):
                TorchTileOps.backward_(
                    y[start:stop],
                    targets[start:stop],
                    lse[start:stop],
                    entropy[start:stop],
                    None if grad_logp is None else grad_logp[start:stop],
                    None if grad_entropy is None else grad_entropy[start:stop],
                    head,
                )
            return y
        _check_runnable(y)
        if y.stride(1) != 1:
            raise ValueError("the tile must have unit column stride (the driver's workspace rows)")
        return logits_grad_(
            y,
            targets.long(),
            lse.float(),
            entropy.float(),
            grad_logp,
            grad_entropy,
            *_head_args(head),
            out_dtype=grad_dtype,
        )

    @staticmethod
    def scale_cast(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(acc * scale).to(dtype)`` for the gradients handed back: one streaming pass (float32 ``acc``)."""
        if acc.dtype != torch.float32 or not acc.is_contiguous() or scale.numel() != 1:
            return torch.mul(acc, scale, out=torch.empty_like(acc, dtype=dtype))
        _check_runnable(acc)
        return scale_cast(acc, scale.to(acc.device), dtype)

    @staticmethod
    def fused_logprobs(hidden, weight, bias, targets, head: HeadParams):
        """``(logp, entropy, lse)`` ``[N]`` of ``targets`` from ``hidden [N, H]`` and ``weight [V, H]`` (+ ``bias``),
        the logits tile never leaving the chip. No gradient (the old / reference log-prob pass).

        bf16/fp16/fp32 inputs (mixed dtypes are promoted) give float32 statistics; float64 inputs float64 ones,
        computed by the PyTorch tile ops over row slices.
        """
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(
                f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
            )
        if targets.shape != hidden.shape[:1]:
            raise ValueError(f"targets must be [N] = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
        if dtype == torch.float64:
            return TritonTileOps._fallback_linear(hidden, weight, bias, targets, head)
        _check_runnable(hidden)
        return linear_logprob(hidden.to(dtype), weight.to(dtype), bias, targets.long(), *_head_args(head))

    @staticmethod
    def _fallback_forward(y, targets, head):
        parts = [TorchTileOps.forward(y[a:b], targets[a:b], head) for a, b in _row_slices(y.shape[0])]
        if not parts:
            empty = y.new_empty(0)
            return empty, empty.clone(), empty.clone()
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    @staticmethod
    def _fallback_linear(hidden, weight, bias, targets, head):
        hidden, weight = hidden.double(), weight.double()
        y = hidden @ weight.t()
        if bias is not None:
            y += bias.double()
        return TritonTileOps._fallback_forward(y, targets.long(), head)
