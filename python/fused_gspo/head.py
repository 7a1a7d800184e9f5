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
    """Chunk statistics and logits gradient in plain PyTorch: the ``"torch"`` backend's tile operations."""

    name = "torch"
    # [n, V] temporaries these ops allocate next to the tile, for sizing chunks within the workspace
    temporaries = 3

    @staticmethod
    def forward(y: torch.Tensor, targets: torch.Tensor, head: HeadParams):
        """``y``: ``[n, V]`` projection (stats dtype). Returns ``logp``, ``entropy``, ``lse``, each ``[n]``."""
        z = head.transform(y)
        m = z.amax(-1, keepdim=True)
        shifted = z - m  # <= 0
        e = torch.exp(shifted)
        s = e.sum(-1)
        # entropy = log s + sum e (m - z) / s: a sum of non-negative terms, accurate on peaked rows (the textbook
        # lse - sum p z cancels to ~1e-3 relative there in float32)
        entropy = torch.log(s) - (e * shifted).sum(-1) / s
        lse = m.squeeze(-1) + torch.log(s)
        logp = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.log(s)
        return logp, entropy, lse

    @staticmethod
    def backward_(y, targets, lse, entropy, grad_logp, grad_entropy, head: HeadParams) -> torch.Tensor:
        """Overwrite ``y`` with ``dL/dy``. ``grad_logp``/``grad_entropy``: ``[n]`` or None (no such term)."""
        scaled = y * head.logit_scale
        if head.softcap is not None:
            t = torch.tanh(scaled / head.softcap)
            z = head.softcap * t / head.temperature
        else:
            z = scaled / head.temperature
        log_p = z - lse.unsqueeze(-1)
        p = torch.exp(log_p)
        grad = torch.zeros_like(z)
        if grad_logp is not None:
            grad -= grad_logp.unsqueeze(-1) * p
            grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        if grad_entropy is not None:
            grad -= grad_entropy.unsqueeze(-1) * p * (log_p + entropy.unsqueeze(-1))
        grad /= head.temperature
        if head.softcap is not None:
            grad *= 1 - t * t
        grad *= head.logit_scale
        y.copy_(grad)
        return y
