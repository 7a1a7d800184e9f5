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

from dataclasses import dataclass

import torch


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


def full_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, head: HeadParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``targets`` and entropy from fully materialized logits (differentiable; the eager path).

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``; ``targets``: ``[...]``. The projection runs in the inputs'
    dtype, the softmax in float32 (float64 for float64 inputs). Returns two tensors shaped like ``targets``.
    """
    compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    y = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        y = y + bias
    stats_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    z = head.transform(y.to(stats_dtype))
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class TorchTileOps:
    """Chunk statistics and logits gradient in plain PyTorch: the ``"torch"`` backend's
    :class:`fused_gspo.tile_ops.TileOps`.

    Written in place where it can, so that next to the ``[n, V]`` tile they hold at most ``temporaries`` more. The
    gradient stays in the tile's dtype; the driver casts it for 16-bit GEMMs.
    """

    name = "torch"
    # [n, V] buffers these ops allocate next to the tile, for sizing chunks within the workspace
    temporaries = 2

    @staticmethod
    def grad_dtype(compute_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if compute_dtype == torch.float64 else torch.float32

    @staticmethod
    def forward(y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
        """``y``: ``[n, V]`` projection (stats dtype), left unchanged. Returns ``logp``, ``entropy``, ``lse``."""
        shifted = head.transform(y)  # a new tensor unless the transform is the identity
        m = shifted.amax(-1, keepdim=True)
        shifted = shifted.sub_(m) if shifted is not y else shifted - m  # z - max <= 0
        e = torch.exp(shifted)
        s = e.sum(-1)
        log_s = torch.log(s)
        logp = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_s
        # entropy = log s + sum e (m - z) / s: non-negative terms, accurate on peaked rows (the textbook
        # lse - sum p z cancels to ~1e-3 relative there in float32)
        entropy = log_s - e.mul_(shifted).sum(-1) / s
        return logp, entropy, m.squeeze(-1) + log_s

    @staticmethod
    def backward_(y, targets, lse, entropy, grad_logp, grad_entropy, head: HeadParams, grad_dtype=None) -> torch.Tensor:
        """Overwrite ``y`` with ``dL/dy`` (in ``y``'s dtype, the only ``grad_dtype`` these ops write).
        ``grad_logp``/``grad_entropy``: ``[n]`` or None (no such term)."""
        if grad_dtype is not None and grad_dtype != y.dtype:
            raise ValueError(f"TorchTileOps writes the gradient in the tile's dtype {y.dtype}, not {grad_dtype}")
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
            # dlogp_target/dz_j = 1[j = target] - p_j
            log_p.sub_(p.mul_(grad_logp.unsqueeze(-1)))
            log_p.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        grad = log_p
        grad.mul_(1.0 / head.temperature)
        if t is not None:
            grad.mul_(t.square_().neg_().add_(1.0))  # d softcap / dx = 1 - tanh^2
        return grad.mul_(head.logit_scale)
