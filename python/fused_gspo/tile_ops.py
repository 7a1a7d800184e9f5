"""The contract between the chunked driver and a backend: what turns one chunk's projection into statistics, and
statistics into the logits gradient.

A chunk is ``n`` tokens against the whole vocabulary. The driver projects it into a ``[n, V]`` tile of the staging
dtype (:mod:`fused_gspo.precision`: bf16/fp16 for 16-bit compute by default, else the stats dtype), calls
:meth:`TileOps.forward` for the per-token statistics, asks the objective for ``dL/dlogp`` and ``dL/dentropy``, then
calls :meth:`TileOps.backward_`, which overwrites the tile with
``dL/dy`` for the two gradient GEMMs. ``docs/design.md`` ("Strategy") explains the schedule around these calls.

Two implementations: :class:`fused_gspo.head.TorchTileOps` (plain PyTorch, the ``"torch"`` backend) and
:class:`fused_gspo.triton_ops.TritonTileOps` (Triton kernels, the ``"triton"`` backend).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .head import HeadParams, TokenStats
from .precision import stats_dtype_for


@runtime_checkable
class TileOps(Protocol):
    """What a backend provides to :mod:`fused_gspo.chunked`."""

    #: The backend's name (``"torch"``, ``"triton"``).
    name: str
    #: How many extra ``[n, V]`` stats-dtype buffers :meth:`forward` / :meth:`backward_` allocate next to a
    #: stats-dtype tile, and next to a 16-bit staged one; the planner counts them in the workspace.
    temporaries: int
    half_tile_temporaries: int

    @staticmethod
    def grad_dtype(compute_dtype: torch.dtype, tile_dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype :meth:`backward_` writes ``dL/dy`` in, for GEMMs in ``compute_dtype`` and a tile of
        ``tile_dtype``: a 16-bit tile's own dtype (in place), else the stats dtype, or the compute dtype when the
        backend writes the 16-bit GEMM operand over an fp32 tile."""
        ...

    @staticmethod
    def forward(
        y: torch.Tensor, targets: torch.Tensor, head: HeadParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``y``: ``[n, V]`` projection (the staging dtype, left unchanged); ``targets``: ``[n]`` int64.
        Returns ``(logp, entropy, lse)``, each ``[n]`` in the stats dtype."""
        ...

    @staticmethod
    def statistics(y: torch.Tensor, targets: torch.Tensor, head: HeadParams) -> TokenStats:
        """Every :class:`TokenStats` field (the extras too) from the same single read of ``y`` as :meth:`forward`."""
        ...

    @staticmethod
    def backward_(
        y: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        grad_logp: torch.Tensor | None,
        grad_entropy: torch.Tensor | None,
        head: HeadParams,
        grad_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Overwrite the tile ``y`` with ``dL/dy`` and return it as a ``[n, V]`` tensor of ``grad_dtype`` (the value
        :meth:`grad_dtype` gave) over ``y``'s storage: ``y`` itself, or a 16-bit view with row stride ``2V``.
        ``grad_logp`` / ``grad_entropy``: ``[n]`` upstream gradients, or None for a term the loss does not have.
        A target outside ``[0, V)`` selects no column (``dL/dz_j = -g_logp p_j + ...``): the tile is one rank's shard
        of a vocabulary split across ranks and the target is another's (:mod:`fused_gspo.parallel`)."""
        ...


class FusedLogProbs(Protocol):
    """Optional: a no-grad kernel scoring tokens straight from the head's input (the ``old``/``ref`` log-prob
    pass), which never writes a tile at all. A backend offers it as ``ops.fused_logprobs``."""

    @staticmethod
    def fused_logprobs(
        hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, head: HeadParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logp, entropy, lse)`` ``[N]`` of ``targets`` under ``hidden [N, H] @ weight.T + bias``, no gradient."""
        ...


class ScaleCast(Protocol):
    """Optional: the gradients handed back in one pass, ``(acc * scale).to(dtype)`` with ``scale`` a device scalar
    (the driver falls back to ``torch.mul`` without it). A backend offers it as ``ops.scale_cast``."""

    @staticmethod
    def scale_cast(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


__all__ = ["FusedLogProbs", "ScaleCast", "TileOps", "TokenStats", "has_fused_logprobs", "stats_dtype_for"]


def has_fused_logprobs(ops) -> bool:
    return callable(getattr(ops, "fused_logprobs", None))
