"""The vocabulary shard a call runs on, when the LM head is split over the vocabulary across ranks.

A vocabulary-parallel call (:mod:`fused_gspo.parallel.dispatch`) makes a :class:`VocabShard` active for the duration
of the ordinary single-process code path, which then runs on this rank's rows of the head. Three seams read it, and
nothing else changes:

- :func:`fused_gspo.backends.tile_ops_for` wraps the backend's tile ops in
  :class:`fused_gspo.parallel.tile_ops.VocabParallelTileOps` (statistics merged across the ranks, the hidden
  gradient summed, the plan agreed);
- the input checks take token ids in the *whole* vocabulary (:func:`vocab_size`);
- the planner plans every rank alike, on the largest shard (``ops.shard``, :func:`fused_gspo.plan.runtime.plan_call`).

This module imports nothing of the package: the seams import it from below.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

_active: contextvars.ContextVar = contextvars.ContextVar("fused_gspo_vocab_shard", default=None)


@dataclass(frozen=True, eq=False)
class VocabShard:
    """This rank's part of a head split over the vocabulary on a 1-D mesh of ``size`` ranks.

    ``rank``: this rank's index on the mesh (its shard's position in the vocabulary). ``starts``: ``size + 1``
    offsets, shard ``r`` holding rows ``[starts[r], starts[r + 1])`` (uneven shards allowed, an empty one too).
    ``group``: the mesh's process group. ``reduce_hidden_grad``: sum the hidden states' gradient over the ranks
    (False under sequence parallelism, where autograd's DTensor reduce-scatters the partial sums instead).
    ``free_bytes``: the least free device memory over the ranks (the ``"auto"`` workspace budget's input, so that every
    rank plans the same chunks); None off CUDA.
    """

    group: object
    rank: int
    size: int
    starts: tuple[int, ...]
    reduce_hidden_grad: bool = True
    free_bytes: float | None = None

    @property
    def vocab(self) -> int:
        return self.starts[-1]

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def stop(self) -> int:
        return self.starts[self.rank + 1]

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def rows_max(self) -> int:
        """The largest shard: every rank plans its chunks on it, so that the chunks (and their collectives) agree."""
        return max(b - a for a, b in zip(self.starts[:-1], self.starts[1:], strict=True))


def active_shard() -> VocabShard | None:
    """The shard of the vocabulary-parallel call in progress, or None."""
    return _active.get()


@contextlib.contextmanager
def running_on(shard: VocabShard):
    """Run the block as this rank's part of a vocabulary-parallel call."""
    token = _active.set(shard)
    try:
        yield shard
    finally:
        _active.reset(token)


def vocab_size(weight: torch.Tensor) -> int:
    """The vocabulary token ids index: the whole one in a vocabulary-parallel call, else ``weight``'s rows."""
    shard = _active.get()
    return weight.shape[0] if shard is None else shard.vocab


__all__ = ["VocabShard", "active_shard", "running_on", "vocab_size"]
