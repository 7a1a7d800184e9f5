"""What a vocabulary-parallel call sends between ranks: bytes per collective, counted per rank.

With the head split over ``k`` ranks (:mod:`fused_gspo.parallel`), a call adds, on top of each rank's chunked head
over its ``V / k`` rows:

- per chunk of ``n`` tokens, one all-gather of the per-token partial statistics: ``w`` floats per token and rank
  (``w = 3``: log-sum-exp, entropy, target logit; 7 with the preference losses' extras) in the statistics dtype.
  Each rank sends its ``n w`` floats to the ``k - 1`` others and receives theirs: ``(k - 1) n w s`` bytes each way;
- per backward, one all-reduce of the fp32 ``dX`` (``N x H``): a ring sends ``2 (k - 1) / k`` of it each way.
  Under sequence parallelism DTensor instead gathers the hidden states before the call and reduce-scatters their
  gradient after it, both in the inputs' dtype: ``(k - 1) / k`` of ``N x H`` each;
- per call, the handshake: a few int64 per rank (shard sizes, free memory, fingerprints of the tokens and of the
  arguments' layouts).

A collective's time is ``bytes / (link bandwidth x efficiency) + latency`` (:class:`fused_gspo.plan.devices.
DeviceProfile`'s ``link_*`` fields: datasheet NVLink / PCIe rates; the efficiency and the latency are assumptions,
not measured here).
"""

from __future__ import annotations

STATISTICS_FLOATS = 3
EXTRA_STATISTICS_FLOATS = 7
HANDSHAKE_INTS = 16  # about: 2, one per tensor argument, one per token tensor


def all_gather_bytes(per_rank_bytes: float, ranks: int) -> float:
    """Bytes one rank sends (and receives) in an all-gather of ``per_rank_bytes`` from each rank."""
    return (ranks - 1) * per_rank_bytes


def all_reduce_bytes(total_bytes: float, ranks: int) -> float:
    """Bytes one rank sends (and receives) in a ring all-reduce of ``total_bytes``."""
    return 2.0 * (ranks - 1) / ranks * total_bytes


def reduce_scatter_bytes(total_bytes: float, ranks: int) -> float:
    """Bytes one rank sends (and receives) in a ring reduce-scatter of ``total_bytes``."""
    return (ranks - 1) / ranks * total_bytes


def statistics_exchange_bytes(tokens: int, ranks: int, stats_bytes: int, floats: int = STATISTICS_FLOATS) -> float:
    """One chunk's all-gather of ``tokens`` tokens' partial statistics."""
    return all_gather_bytes(tokens * floats * stats_bytes, ranks)


def hidden_grad_bytes(tokens: int, hidden: int, ranks: int, width: int, sequence_parallel: bool = False) -> float:
    """The backward's sum of ``dX`` (``width`` bytes per element) over the ranks: all-reduce, or reduce-scatter
    under sequence parallelism."""
    total = tokens * hidden * width
    return reduce_scatter_bytes(total, ranks) if sequence_parallel else all_reduce_bytes(total, ranks)


def per_token_bytes(hidden: int, ranks: int, stats_bytes: int = 4, acc_bytes: int = 4, floats: int = 3) -> float:
    """Bytes one rank sends per scored token over a forward and backward (the handshake aside)."""
    return statistics_exchange_bytes(1, ranks, stats_bytes, floats) + hidden_grad_bytes(1, hidden, ranks, acc_bytes)


__all__ = [
    "EXTRA_STATISTICS_FLOATS",
    "STATISTICS_FLOATS",
    "all_gather_bytes",
    "all_reduce_bytes",
    "hidden_grad_bytes",
    "per_token_bytes",
    "reduce_scatter_bytes",
    "statistics_exchange_bytes",
]
