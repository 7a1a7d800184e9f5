"""Vocabulary parallelism: the fused loss on an LM head split over the vocabulary across ranks (tensor parallelism).

Pass a DTensor weight ``(Shard(0),)`` on a 1-D mesh (or the LM-head module holding it) to
:func:`fused_gspo.fused_policy_loss`, :func:`fused_gspo.fused_logprobs` or :func:`fused_gspo.fused_preference_loss`;
the accepted layouts are listed in :mod:`.placements`. Each rank projects its shard of the vocabulary, the per-token
statistics are merged across ranks (:mod:`.merge`, one all-gather per chunk, :mod:`.collectives`), the objective runs
identically on every rank, each rank forms its shard's ``dW`` locally, and ``dX`` is summed over the ranks once.
``README.md`` ("Tensor parallelism") has the byte counts and a torchtitan-style example.

Modules: :mod:`.context` (the active shard, read by the single-process code's seams), :mod:`.placements`,
:mod:`.collectives`, :mod:`.merge`, :mod:`.tile_ops` (the tile ops on a shard) and :mod:`.dispatch` (the entry).
Only the first two are imported here: the single-process code's seams (backends, validation) import this package.
"""

from .context import VocabShard, active_shard, running_on, vocab_size
from .placements import ReplicaMismatchError, UnsupportedPlacementError, is_vocab_parallel

__all__ = [
    "ReplicaMismatchError",
    "UnsupportedPlacementError",
    "VocabShard",
    "active_shard",
    "is_vocab_parallel",
    "running_on",
    "vocab_size",
]
