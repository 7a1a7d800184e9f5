"""A backend's tile ops run on one rank's rows of a head split over the vocabulary.

:class:`VocabParallelTileOps` is a :class:`fused_gspo.tile_ops.TileOps`: the chunked driver (:mod:`fused_gspo.chunked`)
runs unchanged on the local shard, ``[n, rows]`` tiles instead of ``[n, V]``. Per chunk:

- statistics: the backend's own kernels reduce the local tile, :func:`.merge.shard_partials` keeps a few floats per
  token, :func:`.collectives.gather_partials` exchanges them (one all-gather), :func:`.merge.merge_partials` gives
  every rank the same log-probs, entropies and log-sum-exps over the whole vocabulary. The objective on top then
  computes the same ``dL/dlogp`` on every rank.
- logits gradient: the backend's own kernel on the local tile with the global log-sum-exp and entropy; a target
  outside the shard selects no column (``dL/dz_j = -g p_j`` there), which the tile ops' contract allows.
- the GEMMs give this shard's ``dW`` rows (no communication) and a partial ``dX``, summed over the ranks once, in
  fp32, before the driver scales and casts it (:meth:`reduce_hidden_grad`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..head import HeadParams, TokenStats
from .collectives import gather_partials, sum_over_ranks
from .merge import merge_partials, shard_partials

if TYPE_CHECKING:
    from .context import VocabShard


class VocabParallelTileOps:
    """``inner`` (a backend's tile ops) on this rank's shard of the vocabulary; see the module docstring."""

    def __init__(self, inner, shard: VocabShard):
        self.inner, self.shard = inner, shard
        self.name = inner.name
        self.temporaries = inner.temporaries
        self.half_tile_temporaries = inner.half_tile_temporaries
        if callable(getattr(inner, "scale_cast", None)):
            self.scale_cast = inner.scale_cast
        # no fused_logprobs: the matmul-with-epilogue kernel merges its partials on the chip, with no exchange

    def grad_dtype(self, compute_dtype: torch.dtype, tile_dtype: torch.dtype | None = None) -> torch.dtype:
        return self.inner.grad_dtype(compute_dtype, tile_dtype)

    def _merged(self, y: torch.Tensor, targets: torch.Tensor, head: HeadParams, extras: bool) -> TokenStats:
        partials = shard_partials(self.inner, y, targets - self.shard.start, head, extras)
        return merge_partials(gather_partials(partials, self.shard.group, self.shard.size), self.shard.vocab)

    def forward(self, y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
        """``(logp, entropy, lse)`` ``[n]`` over the whole vocabulary; ``targets`` are global ids."""
        stats = self._merged(y, targets, head, extras=False)
        return stats.logp, stats.entropy, stats.lse

    def statistics(self, y: torch.Tensor, targets: torch.Tensor, head: HeadParams) -> TokenStats:
        return self._merged(y, targets, head, extras=True)

    def backward_(self, y, targets, lse, entropy, grad_logp, grad_entropy, head: HeadParams, grad_dtype=None):
        """The local tile's ``dL/dy`` (global ``targets``, ``lse`` and ``entropy``)."""
        if y.shape[1] == 0:  # an empty shard has no gradient to write
            return y if grad_dtype is None else y.new_empty(y.shape, dtype=grad_dtype)
        local = targets - self.shard.start
        return self.inner.backward_(y, local, lse, entropy, grad_logp, grad_entropy, head, grad_dtype)

    def reduce_hidden_grad(self, dx: torch.Tensor) -> None:
        """Sum the partial ``dX`` (fp32/fp64 accumulator) over the ranks, in place, unless sequence parallelism's
        reduce-scatter does it afterwards."""
        if self.shard.reduce_hidden_grad:
            sum_over_ranks(dx, self.shard.group)

    def vocab_mean(self, rows: torch.Tensor) -> torch.Tensor:
        """The mean over the whole vocabulary of per-row values ``[rows, ...]`` held as this rank's shard."""
        total = rows.sum(0)
        return sum_over_ranks(total, self.shard.group) / self.shard.vocab


__all__ = ["VocabParallelTileOps"]
