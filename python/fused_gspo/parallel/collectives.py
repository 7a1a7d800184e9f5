"""The collectives of a vocabulary-parallel call, each one named for what it carries.

Per call, before any chunk: :func:`handshake`, one all-gather of a few int64 per rank (each rank's shard size, its
free device memory, a fingerprint of the tokens it was given and of every tensor argument's shape and dtype), read on
the host once: it gives the shards' offsets, makes every rank plan alike, and refuses ranks that were handed different
tokens (a data-parallel shard taken for a tensor-parallel one, or TRL's per-rank sampling seeds) before they could
silently mix, or arguments one rank alone would refuse (which would leave the others waiting in a collective).

Per chunk: :func:`gather_partials`, one all-gather of the per-token partial statistics (3 floats per token and rank;
7 with the preference losses' extras) in the statistics dtype (fp32; fp64 for fp64 inputs). Per backward:
:func:`sum_over_ranks` of the fp32 hidden-state gradient (``N x H``), unless sequence parallelism reduce-scatters it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# A fingerprint's position weights: odd 64-bit multipliers, so that moving or changing one id changes the sum
# (integer arithmetic wraps identically on every rank)
_MIX = 0x9E3779B97F4A7C15 - (1 << 64)
_OFFSET = 0x632BE59BD9B4E019


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 that differs, with overwhelming probability, between two integer (or bool) tensors of the same
    size that differ anywhere; computed on ``x``'s device."""
    flat = x.detach().reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.long).mul_(_MIX).add_(_OFFSET) | 1
    return (flat * weights).sum() + flat.numel()


def handshake(group, size: int, values: list[torch.Tensor | int], device: torch.device) -> list[list[int]]:
    """All-gather ``values`` (ints, or 0-dim integer tensors on ``device``) from every rank: ``[size][len(values)]``
    Python ints, in one collective and one read."""
    mine = torch.stack([torch.as_tensor(v, dtype=torch.long, device=device).reshape(()) for v in values])
    out = torch.empty(size * mine.numel(), dtype=torch.long, device=device)
    dist.all_gather_into_tensor(out, mine, group=group)
    flat = out.tolist()
    return [flat[r * len(values) : (r + 1) * len(values)] for r in range(size)]


def gather_partials(partials: torch.Tensor, group, size: int) -> torch.Tensor:
    """``[n, w]`` per-token partial statistics of every rank -> ``[size, n, w]`` (rank order = shard order)."""
    partials = partials.contiguous()
    out = partials.new_empty((size, *partials.shape))
    if partials.numel():
        dist.all_gather_into_tensor(out.view(-1), partials.view(-1), group=group)
    return out


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over the ranks, in place (identical on every rank afterwards)."""
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


__all__ = ["fingerprint", "gather_partials", "handshake", "sum_over_ranks"]
