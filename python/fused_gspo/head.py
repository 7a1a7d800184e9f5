"""The LM head's math in PyTorch: the logit transform, log-softmax statistics and their gradient.

``y = hidden @ weight.T + bias`` is the raw projection; the logits are ``z = softcap(y * logit_scale) / temperature``
(TRL's order), with ``softcap(x) = c * tanh(x / c)`` when ``final_logit_softcapping = c`` is set. From a row of
logits: ``lse = logsumexp(z)``, ``logp = z[target] - lse``, ``entropy = lse - sum(softmax(z) * z)``.

The eager reference uses :func:`full_logprobs` (autograd through the full logits). The ``"torch"`` chunked backend
uses :class:`TorchTileOps`, whose forward turns one chunk's projection into those statistics and whose backward
overwrites the chunk with ``dL/dy`` given ``dL/dlogp`` and ``dL/dentropy``:
``dL/dz_j = g_logp * (1[j = target] - p_j) - g_ent * p_j * (log p_j + entropy)``, then chained through the transform.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .precision import HALF_DTYPES, compute_dtype, stats_dtype_for


@dataclass(frozen=True)
class HeadParams:
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    def transform(self, y: torch.Tensor) -> torch.Tensor:
        z = y * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


@dataclass
class TokenStats:
    """Per-token statistics of the head, each ``[n]``: ``logp`` (of the target), ``entropy``, ``lse``, and the extra
    ones the preference losses read (:mod:`fused_gspo.preference.statistics`): ``log_sum_sq_probs`` (``log sum p^2``),
    ``mean_logit`` (over the vocabulary, of the transformed logits) and ``is_top1`` (bool: the target is the first
    argmax). The extras are None unless asked for."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None

    @property
    def has_extras(self) -> bool:
        return self.mean_logit is not None

    def slice(self, start: int, stop: int) -> TokenStats:
        return TokenStats(**{f.name: _slice(getattr(self, f.name), start, stop) for f in fields(self)})

    def assign(self, start: int, stop: int, chunk: TokenStats) -> None:
        """Write ``chunk``'s values at ``[start, stop)``."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(chunk, f.name)
            if mine is not None and theirs is not None:
                mine[start:stop] = theirs

    @staticmethod
    def poisoned(n: int, device, dtype, extras: bool) -> TokenStats:
        """NaN-filled buffers (False for ``is_top1``), so a token no chunk scored never passes for a result."""

        def nan():
            return torch.full((n,), float("nan"), device=device, dtype=dtype)

        if not extras:
            return TokenStats(nan(), nan(), nan())
        return TokenStats(nan(), nan(), nan(), nan(), nan(), torch.zeros(n, device=device, dtype=torch.bool))


def _slice(x, start, stop):
    return None if x is None else x[start:stop]


def _full_projection(hidden, weight, bias, compute: torch.dtype | None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` as a model's own ``lm_head`` gives it: in the compute dtype (the inputs', or
    autocast's: :func:`fused_gspo.precision.compute_dtype`), the bias added in that dtype."""
    compute = compute_dtype(hidden, weight) if compute is None else compute
    y = hidden.to(compute) @ weight.to(compute).t()
    return y if bias is None else y + bias.to(compute)


def full_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    head: HeadParams,
    compute: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy from fully materialized logits (differentiable; the eager path).

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``; ``targets``: ``[...]``. The projection runs in ``compute``
    (default: the inputs' dtype, or autocast's), the softmax in float32 (float64 for float64 inputs). Returns two
    tensors shaped like ``targets``.
    """
    y = _full_projection(hidden, weight, bias, compute)
    stats_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    z = head.transform(y.to(stats_dtype))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def full_statistics(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, head: HeadParams
) -> TokenStats:
    """:func:`full_logprobs`'s log-probs and entropies (differentiable) with the extra statistics (detached), from
    one materialized projection: the eager path of the preference losses."""
    logp, entropy = full_logprobs(hidden, weight, bias, targets, head)
    with torch.no_grad():
        extras = TorchTileOps.statistics(_full_projection(hidden, weight, bias, None).to(logp.dtype), targets, head)
    return TokenStats(logp, entropy, extras.lse, extras.log_sum_sq_probs, extras.mean_logit, extras.is_top1)


class TorchTileOps:
    """Chunk statistics and logits gradient in plain PyTorch: the ``"torch"`` backend's
    :class:`fused_gspo.tile_ops.TileOps`.

    Written in place where it can, so that next to the ``[n, V]`` tile they hold at most ``temporaries`` more
    (``half_tile_temporaries`` for a 16-bit tile, which they read into a float32 copy first). The gradient stays in
    the tile's dtype; the driver casts it for the GEMMs where needed.
    """

    name = "torch"
    # [n, V] stats-dtype buffers these ops allocate next to the tile, for sizing chunks within the workspace
    temporaries = 2
    half_tile_temporaries = 3

    @staticmethod
    def grad_dtype(compute_dtype: torch.dtype, tile_dtype: torch.dtype | None = None) -> torch.dtype:
        if tile_dtype in HALF_DTYPES:
            return tile_dtype
        return stats_dtype_for(compute_dtype)

    @staticmethod
    def forward(y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
        """``y``: ``[n, V]`` projection (stats dtype), left unchanged. Returns ``logp``, ``entropy``, ``lse``."""
        stats = TorchTileOps._stats(y, targets, head, extras=False)
        return stats.logp, stats.entropy, stats.lse

    @staticmethod
    def statistics(y: torch.Tensor, targets: torch.Tensor, head: HeadParams) -> TokenStats:
        """Every :class:`TokenStats` field, from the same pass as :meth:`forward`."""
        return TorchTileOps._stats(y, targets, head, extras=True)

    @staticmethod
    def _stats(y, targets, head: HeadParams, extras: bool) -> TokenStats:
        y = y.to(stats_dtype_for(y.dtype))  # a 16-bit tile is folded in float32 (one copy)
        shifted = head.transform(y)  # a new tensor unless the transform is the identity
        m = shifted.amax(-1, keepdim=True)
        shifted = shifted.sub_(m) if shifted is not y else shifted - m  # z - max <= 0
        e = torch.exp(shifted)
        s = e.sum(-1)
        log_s = torch.log(s)
        logp = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s
        out = {}
        if extras:  # before e and shifted are overwritten; the norm is a reduction, no temporary
            out["mean_logit"] = shifted.mean(-1) + m.squeeze(-1)
            out["is_top1"] = shifted.argmax(-1) == targets  # the first maximum, as TRL's head reads it
            out["log_sum_sq_probs"] = 2.0 * (torch.log(torch.linalg.vector_norm(e, dim=-1)) - log_s)
        # entropy = log s + sum e (m - z) / s: non-negative terms, accurate on peaked rows (the textbook
        # lse - sum p z cancels to ~1e-3 relative there in float32)
        entropy = log_s - e.mul_(shifted).sum(-1) / s
        return TokenStats(logp, entropy, m.squeeze(-1) + log_s, **out)

    @staticmethod
    def backward_(y, targets, lse, entropy, grad_logp, grad_entropy, head: HeadParams, grad_dtype=None) -> torch.Tensor:
        """Overwrite ``y`` with ``dL/dy`` (in ``y``'s dtype, the only ``grad_dtype`` these ops write; a 16-bit tile
        is worked on in a float32 copy and rounded once). ``grad_logp``/``grad_entropy``: ``[n]`` or None (no such
        term). ``targets`` outside ``[0, V)`` select no column."""
        if grad_dtype is not None and grad_dtype != y.dtype:
            raise ValueError(f"TorchTileOps writes the gradient in the tile's dtype {y.dtype}, not {grad_dtype}")
        if y.dtype in HALF_DTYPES:
            work = y.float()
            TorchTileOps.backward_(work, targets, lse, entropy, grad_logp, grad_entropy, head)
            return y.copy_(work)
        # z = transform(y), rounded exactly as in forward (so a one-token vocabulary gives log p = 0 exactly)
        t = None
        y.mul_(head.logit_scale)
        if head.softcap is not None:
            t = torch.tanh(y / head.softcap)
            torch.mul(t, head.softcap, out=y)
        log_p = y.div_(head.temperature).sub_(lse.unsqueeze(-1))  # y now holds log p
        p = torch.exp(log_p)
        if grad_entropy is not None:
            # dH/dz_j = -p_j (log p_j + H)
            log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-grad_entropy.unsqueeze(-1))
        else:
            log_p.zero_()
        if grad_logp is not None:
            # dlogp_target/dz_j = 1[j = target] - p_j; a target outside [0, V) selects no column (a vocabulary shard
            # that does not hold it: fused_gspo.parallel)
            log_p.sub_(p.mul_(grad_logp.unsqueeze(-1)))
            held = (targets >= 0) & (targets < y.shape[-1])
            log_p.scatter_add_(-1, targets.clamp(0, y.shape[-1] - 1).unsqueeze(-1), (grad_logp * held).unsqueeze(-1))
        grad = log_p
        grad.mul_(1.0 / head.temperature)
        if t is not None:
            grad.mul_(t.square_().neg_().add_(1.0))  # d softcap / dx = 1 - tanh^2
        return grad.mul_(head.logit_scale)
