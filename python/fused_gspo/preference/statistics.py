"""The per-token statistics of the LM head that the preference losses and their metrics read, defined once.

TRL 1.16.0's fused LM head (``trl.trainer.utils.add_fused_lm_head``, kernel ``trl.kernels.chunked_logprob
.ChunkedLogProbFunction``, fields documented on ``trl.trainer.utils.FusedCausalLMOutput``) returns, for each position
``t`` whose next-token label ``y = labels[t + 1]`` is not ``-100``, from the transformed logits
``z = softcap(logit_scale * (h @ W.T + b)) / temperature`` (``softcap(x) = c * tanh(x / c)`` when the model has
``final_logit_softcapping = c``; ``DPOTrainer`` adds the head with ``temperature = 1``):

- ``log_probs``: ``z_y - logsumexp_j z_j`` (differentiable);
- ``entropy``: ``-sum_j p_j log p_j`` with ``p = softmax(z)`` (kernel: ``log Z - sum_j e^z_j z_j / sum_j e^z_j``);
- ``log_sum_sq_probs``: ``log sum_j p_j^2`` (kernel: ``log sum_j e^(2 (z_j - m)) - 2 log sum_j e^(z_j - m)``),
  no gradient;
- ``mean_logits``: ``(1 / V) sum_j z_j``, the mean over the whole vocabulary of the *transformed* logits (after
  ``logit_scale``, softcap and the temperature), no gradient;
- ``is_top1``: ``argmax_j z_j == y`` where ``argmax`` is the *first* maximum, as ``torch.argmax``: a tie with an
  earlier token is not a top-1 hit (kernel: ``z_y >= max_j z_j and z_y > max_{j < y} z_j``), bool, no gradient.

Every field is 0 (``False``) where the label is ``-100``, and the layout is the shifted one: column ``t`` scores the
token at ``t + 1`` (``labels[:, 1:]`` against ``logits[:, :-1]``). TRL's kernel accumulates in float32.

``CPOTrainer`` runs the model's plain forward instead and logs ``logits/*`` as the mean of ``outputs.logits`` over
*every* element: all positions (prompt, completion, padding and the final position, which predicts nothing) and the
whole vocabulary. :func:`position_mean_logits` is that per position; a kernel that only scores completion tokens must
produce it separately (without softcap it is linear: ``h . mean_j W_j + mean_j b_j``).
"""

from __future__ import annotations

import torch

STATISTICS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@torch.no_grad()
def _detached_stats(z: torch.Tensor, log_p: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    p = log_p.exp()
    return {
        "entropy": -(p * log_p).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == targets,
    }


def token_statistics(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, outputs: tuple[str, ...] = STATISTICS
) -> dict[str, torch.Tensor]:
    """The eager reference of the fused head's statistics from full, already transformed logits.

    ``logits`` ``[..., V]`` (the ``z`` above, in the layout of ``targets``: already shifted), ``targets`` ``[...]``
    (any value where ``mask`` is 0), ``mask`` ``[...]`` 0/1. Returns the requested fields, computed in ``logits``'
    dtype, zero where ``mask`` is 0; ``log_probs`` is differentiable w.r.t. ``logits``, ``entropy`` too (TRL's
    kernel gives it a gradient), the others are detached.
    """
    unknown = sorted(set(outputs) - set(STATISTICS))
    if unknown:
        raise ValueError(f"outputs must be among {STATISTICS}, got {unknown}")
    valid = mask.bool()
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_p = torch.log_softmax(logits, dim=-1)
    out = {}
    if "log_probs" in outputs:
        out["log_probs"] = torch.where(valid, log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1), 0.0)
    if "entropy" in outputs:
        out["entropy"] = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    rest = [name for name in ("log_sum_sq_probs", "mean_logits", "is_top1") if name in outputs]
    if rest:
        detached = _detached_stats(logits.detach(), log_p.detach(), safe_targets)
        for name in rest:
            x = detached[name]
            out[name] = (x & valid) if name == "is_top1" else torch.where(valid, x, 0.0)
    return out


@torch.no_grad()
def position_mean_logits(logits: torch.Tensor) -> torch.Tensor:
    """CPO's ``logits/*`` input: the vocabulary mean of ``outputs.logits`` ``[2B, L, V]`` at every position
    ``[2B, L]``, nothing masked."""
    return logits.mean(-1)
