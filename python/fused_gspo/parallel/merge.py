"""Per-token statistics of a vocabulary split across ranks: each rank's partial, and their merge.

Each rank reduces its tile (the chunk's logits over its rows of the vocabulary) with the backend's own tile ops, as in
one process, and keeps of it what a merge needs, per token (the *partial*, in the statistics dtype):

====  ===========================================================================================================
lse   ``log sum_{j in shard} e^{z_j}`` (``-inf`` for an empty shard)
ent   the entropy of the softmax restricted to the shard
zt    the target's logit on the rank whose shard holds it, 0 elsewhere
====  ===========================================================================================================

and, for the preference losses' extra statistics, ``log sum p^2`` within the shard, ``sum z``, the shard's largest
logit and an owner code (0: the target is elsewhere; 1: here; 2: here, and it is the shard's first argmax).

The merge is the online log-sum-exp's merge of split partials (``kernels/logsumexp_stats.py``) with a shard's
``(lse, ent)`` standing for the triple ``(m, s, u) = (lse, 1, ent)``: with ``pi_r = e^{lse_r - lse}`` each shard's
share of the probability mass, ``lse = log sum_r e^{lse_r}``, ``entropy = sum_r pi_r (ent_r - log pi_r)`` (a sum of
non-negative terms, as in one process), ``log sum p^2 = log sum_r pi_r^2 e^{lsp_r}``, the mean logit is
``sum_r (sum z)_r / V``, and the target is the first argmax of the whole row when it is its own shard's, beats every
logit of the shards before it and ties or beats those after. Every rank merges the same gathered values in the same
order, so every rank gets the same bits.
"""

from __future__ import annotations

import torch

from ..head import HeadParams, TokenStats

LSE, ENT, ZT, LSP, SUMZ, MAXZ, OWNER = range(7)
WIDTH, EXTRA_WIDTH = 3, 7


def shard_partials(ops, y: torch.Tensor, local_targets: torch.Tensor, head: HeadParams, extras: bool) -> torch.Tensor:
    """``[n, 3]`` (``extras``: ``[n, 7]``) partial statistics of the tile ``y`` ``[n, rows]`` (left unchanged), whose
    targets are ``local_targets`` ``[n]`` (the global ids minus the shard's first row: outside ``[0, rows)`` for a
    token another shard holds), from ``ops`` (the backend's tile ops)."""
    n, rows = y.shape
    stats_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = torch.zeros((n, EXTRA_WIDTH if extras else WIDTH), device=y.device, dtype=stats_dtype)
    if rows == 0:  # an empty shard: no mass, no logit
        out[:, LSE] = float("-inf")
        if extras:
            out[:, LSP] = out[:, MAXZ] = float("-inf")
        return out
    owned = (local_targets >= 0) & (local_targets < rows)
    clamped = local_targets.clamp(0, rows - 1)  # the tile ops index their target; a stand-in where it is elsewhere
    if extras:
        stats = ops.statistics(y, clamped, head)
        lse, entropy = stats.lse, stats.entropy
    else:
        _, entropy, lse = ops.forward(y, clamped, head)
    out[:, LSE], out[:, ENT] = lse, entropy
    # the target's logit read from the tile directly (not logp + lse, which would round it)
    z_target = head.transform(y.gather(1, clamped.unsqueeze(1)).squeeze(1).to(stats_dtype))
    out[:, ZT] = torch.where(owned, z_target, 0.0)
    if extras:
        out[:, LSP] = stats.log_sum_sq_probs
        out[:, SUMZ] = stats.mean_logit * rows
        # the transform is monotone: increasing in y for a positive scale, decreasing for a negative one
        extreme = y.amax(-1) if head.logit_scale >= 0 else y.amin(-1)
        out[:, MAXZ] = head.transform(extreme.to(stats_dtype))
        out[:, OWNER] = owned.to(stats_dtype) * (1.0 + stats.is_top1.to(stats_dtype))
    return out


def merge_partials(gathered: torch.Tensor, vocab: int) -> TokenStats:
    """Every token's :class:`fused_gspo.head.TokenStats` over the whole vocabulary from every shard's partials
    ``[ranks, n, 3 | 7]`` (in shard order); the extras too from 7 columns."""
    lse_r, ent_r = gathered[..., LSE], gathered[..., ENT]
    top = lse_r.amax(0)
    weight = torch.exp(lse_r - top)  # e^{lse_r - max}: 0 for an empty shard
    total = weight.sum(0)
    lse = top + torch.log(total)
    share = weight / total
    # pi_r (ent_r - log pi_r); an empty shard's term is 0 (not 0 * inf)
    entropy = torch.where(weight > 0, share * (ent_r + (lse - lse_r)), 0.0).sum(0)
    z_target = gathered[..., ZT].sum(0)  # one rank's logit, zeros from the others
    stats = TokenStats(z_target - lse, entropy, lse)
    if gathered.shape[-1] == WIDTH:
        return stats
    stats.log_sum_sq_probs = torch.logsumexp(gathered[..., LSP] + 2.0 * (lse_r - lse), dim=0)
    stats.mean_logit = gathered[..., SUMZ].sum(0) / vocab
    code = gathered[..., OWNER]
    owner = (code > 0).to(torch.int8).argmax(0)  # the one shard that holds the target
    rank = torch.arange(gathered.shape[0], device=gathered.device).unsqueeze(1)
    shard_max = gathered[..., MAXZ]
    holds = torch.where(
        rank < owner,
        z_target > shard_max,  # a logit before the target's position may not tie it (the first argmax)
        torch.where(rank > owner, z_target >= shard_max, code > 1.5),
    )
    stats.is_top1 = holds.all(0)
    return stats


__all__ = ["EXTRA_WIDTH", "WIDTH", "merge_partials", "shard_partials"]
