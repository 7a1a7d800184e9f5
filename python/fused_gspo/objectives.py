"""The policy-loss math, written once: from per-token log-probs and entropies to the loss and TRL's metrics.

Every backend ends here. The eager reference feeds it full-logits log-probs; the chunked backends feed it the
log-probs their kernels produce, and take ``dL/dlogp`` and ``dL/dentropy`` from it by autograd (the inputs are
``[B, T]``, so that costs nothing next to the LM head). The code mirrors TRL 1.16.0's ``GRPOTrainer._compute_loss``,
``GMPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss`` term for term, with one structural change: every
aggregate is written as a sum over the rows it is given divided by a normalizer of the *whole* batch
(:class:`Normalizers`). Evaluated on all rows it is TRL's loss; evaluated on a slice of rows it is that slice's share,
which is what lets a chunked backend form gradients chunk by chunk (see :func:`gradient_coupling`).

Conventions, as in TRL: ``logps`` and ``entropy`` are ``[B, T]`` with zeros at masked positions; ``advantages`` is
``[B]`` or ``[B, T]``; the optional tensors are ``[B, T]`` (``importance_sampling_ratio`` may be ``[B, 1]``; RLOO's
``old_logps`` may be ``[B]``, its sequence sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .config import CLIPPED_LOSS_TYPES, PolicyLossConfig


@dataclass
class PolicyBatch:
    """The per-sequence inputs of the objective (everything but the current policy's log-probs)."""

    mask: torch.Tensor  # [B, T] float 0/1
    advantages: torch.Tensor  # [B] or [B, T]
    old_logps: torch.Tensor | None = None  # [B, T] (or [B] for rloo); None: on-policy
    ref_logps: torch.Tensor | None = None  # [B, T]
    sampling_logps: torch.Tensor | None = None  # [B, T]
    importance_sampling_ratio: torch.Tensor | None = None  # [B, T] or [B, 1]

    def rows(self, start: int, stop: int) -> PolicyBatch:
        """The same batch restricted to rows ``start:stop``."""
        return PolicyBatch(**{f.name: _slice(getattr(self, f.name), start, stop) for f in fields(self)})

    def to(self, dtype: torch.dtype) -> PolicyBatch:
        """Floating tensors cast to ``dtype`` (the objective runs in float32, the reference in float64)."""
        return PolicyBatch(**{f.name: _cast(getattr(self, f.name), dtype) for f in fields(self)})


def _slice(x, start, stop):
    return None if x is None else x[start:stop]


def _cast(x, dtype):
    return None if x is None else x.to(dtype)


@dataclass
class Normalizers:
    """Denominators of TRL's aggregations, computed once from the whole micro-batch."""

    num_sequences: float  # B: "grpo", "sapo", "luspo", "gmpo", "rloo" average over sequences
    num_tokens: float  # mask.sum().clamp(min=1): "bnpo"
    dr_grpo: float  # B * max_completion_length
    dapo: float  # num_items_in_batch / num_processes * GA / steps_per_generation: "dapo", "cispo", "vespo"
    accumulation: float  # gradient_accumulation_steps
    entropy_tokens: float  # effective (entropy-masked) token count, clamp(min=1): the entropy bonus

    @staticmethod
    def of(
        batch: PolicyBatch,
        config: PolicyLossConfig,
        num_items_in_batch: float | torch.Tensor | None = None,
        entropy_mask: torch.Tensor | None = None,
    ) -> Normalizers:
        mask = batch.mask
        B, T = mask.shape
        num_items = float(mask.sum()) if num_items_in_batch is None else float(num_items_in_batch)
        max_len = T if config.max_completion_length is None else config.max_completion_length
        effective = mask if entropy_mask is None else mask * entropy_mask
        return Normalizers(
            num_sequences=float(B),
            num_tokens=max(float(mask.sum()), 1.0),
            dr_grpo=float(B * max_len),
            dapo=max(num_items, 1.0)
            / config.num_processes
            * config.gradient_accumulation_steps
            / config.effective_steps_per_generation,
            accumulation=float(config.gradient_accumulation_steps),
            entropy_tokens=max(float(effective.sum()), 1.0),
        )


@dataclass
class ObjectiveTerms:
    """The loss of the rows evaluated, and the intermediates TRL's metrics are computed from."""

    loss: torch.Tensor  # scalar: this slice's share of the loss
    policy_loss: torch.Tensor  # scalar: the policy term before the accumulation normalizer (TRL's "policy_loss")
    coef_1: torch.Tensor | None = None  # ratio, [B, T] or [B, 1]; RLOO: [B]
    log_ratio: torch.Tensor | None = None  # GMPO: per-token log-ratio
    per_token_kl: torch.Tensor | None = None
    phi_seq: torch.Tensor | None = None  # VESPO


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: float, gather_values=None) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask``: tokens whose entropy is >= the ``threshold`` quantile of all valid entropies.

    ``gather_values`` concatenates a 1-D tensor of values across processes (default: one process). TRL takes the
    quantile in float32 (its entropies are float32); here it is taken in the entropies' own dtype, so that the float64
    reference does not compare each entropy with its own float32 rounding.
    """
    valid = entropy[mask.bool()]
    if gather_values is not None:
        valid = gather_values(valid)
    if valid.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    cutoff = torch.quantile(valid, threshold)
    return ((entropy * mask.to(entropy.dtype)) >= cutoff) & mask.bool()


def off_policy_mask(advantages, logps, sampling_logps, mask, threshold) -> torch.Tensor:
    """TRL's ``get_off_policy_mask``: keep a sequence unless its advantage is negative and its mean KL is high."""
    kl_div = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg_seq_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def gamma_weights(advantages, log_ratio, mask, importance_sampling_ratio, config: PolicyLossConfig) -> torch.Tensor:
    """TRL's VESPO ``get_gamma_weights``: phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio, detached."""
    lower = math.log(1e-8)
    seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
    if importance_sampling_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.sum(
            torch.clamp(torch.log(importance_sampling_ratio), lower, 20.0), dim=-1, keepdim=True
        )
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _kl(ref_logps, logps):
    # k3 estimator of KL(pi || ref)
    return torch.exp(ref_logps - logps) - (ref_logps - logps) - 1


def policy_objective(
    logps: torch.Tensor,
    entropy: torch.Tensor,
    batch: PolicyBatch,
    config: PolicyLossConfig,
    norms: Normalizers,
    entropy_mask: torch.Tensor | None = None,
) -> ObjectiveTerms:
    """The loss of the given rows (differentiable in ``logps`` and ``entropy``), as TRL 1.16.0 computes it."""
    if config.loss_type == "gmpo":
        return _gmpo_objective(logps, batch, config, norms, entropy_mask)
    if config.loss_type == "rloo":
        return _rloo_objective(logps, batch, config, norms)

    mask = batch.mask
    advantages = batch.advantages
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = logps.detach() if batch.old_logps is None else batch.old_logps

    if config.off_policy_mask_threshold is not None:
        sampling = old_logps if batch.sampling_logps is None else batch.sampling_logps
        keep = off_policy_mask(advantages, logps, sampling, mask, config.off_policy_mask_threshold)

    log_ratio = logps - old_logps
    level = config.importance_sampling_level
    if level == "token":
        log_importance_weights = log_ratio
    else:
        seq_log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        if level == "sequence":
            log_importance_weights = seq_log_ratio
        else:  # GSPO-token: the value of the sequence log-ratio, the gradient of the token's log-prob
            log_importance_weights = logps - logps.detach() + seq_log_ratio.detach()
    coef_1 = torch.exp(log_importance_weights)

    per_token_kl = None
    if config.beta != 0.0:
        per_token_kl = _kl(batch.ref_logps, logps)
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    phi_seq = None
    if config.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * logps
    elif config.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif config.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:  # vespo
        phi_seq = gamma_weights(advantages, log_ratio, mask, batch.importance_sampling_ratio, config)
        per_token_loss = -phi_seq * advantages * logps

    if config.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * keep
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if batch.importance_sampling_ratio is not None and config.loss_type != "vespo":
        per_token_loss = per_token_loss * batch.importance_sampling_ratio
    if per_token_kl is not None:
        per_token_loss = per_token_loss + config.beta * per_token_kl

    masked = per_token_loss * mask
    if config.loss_type in ("grpo", "sapo"):
        policy_loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / norms.num_sequences
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "bnpo":
        policy_loss = masked.sum() / norms.num_tokens
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "dr_grpo":
        policy_loss = masked.sum() / norms.dr_grpo
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "luspo":
        policy_loss = masked.sum(-1).sum() / norms.num_sequences
        loss = policy_loss / norms.accumulation
    else:  # dapo, cispo, vespo
        policy_loss = masked.sum() / norms.dapo
        loss = policy_loss

    if config.entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropy * effective).sum() / norms.entropy_tokens / norms.accumulation
        loss = loss - config.entropy_coef * entropy_loss

    return ObjectiveTerms(
        # coef_1 as TRL's metrics read it: after the `delta` cap
        loss=loss,
        policy_loss=policy_loss,
        coef_1=coef_1,
        per_token_kl=per_token_kl,
        phi_seq=phi_seq,
    )


def _gmpo_objective(logps, batch, config, norms, entropy_mask) -> ObjectiveTerms:
    mask, advantages = batch.mask, batch.advantages
    old_logps = logps.detach() if batch.old_logps is None else batch.old_logps
    log_ratio = logps - old_logps
    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    # Sign-aware clipping in log space: PPO's min trick on the log-ratio
    clamped = torch.clamp(log_ratio, min=-eps_low, max=eps_high)
    advantages_col = advantages.unsqueeze(1)
    clipped = torch.where(advantages_col > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    seq_mask = mask * entropy_mask if entropy_mask is not None else mask
    coef = torch.exp((clipped * seq_mask).sum(-1) / seq_mask.sum(-1).clamp(min=1.0))
    per_sequence_loss = -coef * advantages
    per_token_kl = None
    if config.beta != 0.0:
        per_token_kl = _kl(batch.ref_logps, logps)
        per_sequence_loss = per_sequence_loss + config.beta * (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(
            min=1.0
        )
    policy_loss = per_sequence_loss.sum() / norms.num_sequences
    return ObjectiveTerms(
        loss=policy_loss / norms.accumulation, policy_loss=policy_loss, log_ratio=log_ratio, per_token_kl=per_token_kl
    )


def _rloo_objective(logps, batch, config, norms) -> ObjectiveTerms:
    mask, advantages = batch.mask, batch.advantages
    seq_logps = (logps * mask).sum(1)
    if batch.old_logps is None:
        old = seq_logps.detach()
    elif batch.old_logps.dim() == 1:
        old = batch.old_logps
    else:
        old = (batch.old_logps * mask).sum(1)
    coef_1 = torch.exp(seq_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + config.effective_epsilon_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    # RLOOTrainer returns the loss unscaled: the HF Trainer divides it by the accumulation steps afterwards
    loss = per_sequence_loss.sum() / norms.num_sequences
    return ObjectiveTerms(loss=loss, policy_loss=loss, coef_1=coef_1)


def _nanmin(x):
    return x.new_tensor(float("nan")) if torch.isnan(x).all() else x[~torch.isnan(x)].min()


def _nanmax(x):
    return x.new_tensor(float("nan")) if torch.isnan(x).all() else x[~torch.isnan(x)].max()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def policy_metrics(
    terms: ObjectiveTerms,
    entropy: torch.Tensor,
    batch: PolicyBatch,
    config: PolicyLossConfig,
    reduce_sum=_identity,
    gather=_identity,
) -> dict[str, float]:
    """TRL's logged metrics, under TRL's names (``terms`` evaluated on the whole batch).

    ``reduce_sum`` / ``gather`` are the cross-process sum and concatenation (``accelerator.reduce(..., "sum")`` and
    ``accelerator.gather``) where TRL uses them; the defaults are one process's.
    """
    mask = batch.mask
    advantages = batch.advantages
    metrics: dict[str, float] = {}

    def masked_seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * mask).sum(-1) / mask.sum(-1)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            total, count = x.sum(), x.new_tensor(float(x.shape[0]))
        else:
            total, count = (x * mask).sum(), mask.sum().to(x.dtype)
        totals = reduce_sum(torch.stack([total, count]))
        return float(totals[0] / totals[1].clamp(min=1.0))

    def clip_metrics(low, high):
        region = low | high
        metrics["clip_ratio/low_mean"] = global_masked_mean(low.float())
        metrics["clip_ratio/high_mean"] = global_masked_mean(high.float())
        metrics["clip_ratio/region_mean"] = global_masked_mean(region.float())
        metrics["clip_ratio/low_min"] = float(_nanmin(gather(masked_seq_mean(low.float()))))
        metrics["clip_ratio/high_max"] = float(_nanmax(gather(masked_seq_mean(high.float()))))

    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    if config.loss_type == "rloo":
        totals = reduce_sum(torch.stack([(entropy * mask).sum(), mask.sum().to(entropy.dtype)]))
        metrics["entropy"] = float(totals[0] / totals[1].clamp(min=1.0))
        coef_1 = terms.coef_1
        low = gather(((coef_1 < 1 - eps_low) & (advantages < 0)).float())
        high = gather(((coef_1 > 1 + eps_high) & (advantages > 0)).float())
        metrics["clip_ratio/low_mean"] = float(low.nanmean())
        metrics["clip_ratio/low_min"] = float(_nanmin(low))
        metrics["clip_ratio/high_mean"] = float(high.nanmean())
        metrics["clip_ratio/high_max"] = float(_nanmax(high))
        metrics["clip_ratio/region_mean"] = float(torch.maximum(low, high).nanmean())
        return metrics

    if terms.per_token_kl is not None:
        metrics["kl"] = global_masked_mean(terms.per_token_kl)
    metrics["entropy"] = global_masked_mean(entropy)

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if config.loss_type == "gmpo":
        clip_metrics((terms.log_ratio < -eps_low) & (advantages < 0), (terms.log_ratio > eps_high) & (advantages > 0))
        return metrics
    if config.loss_type in CLIPPED_LOSS_TYPES:
        coef_1 = terms.coef_1
        clip_metrics((coef_1 < 1 - eps_low) & (advantages < 0), (coef_1 > 1 + eps_high) & (advantages > 0))
    elif config.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((terms.coef_1 > eps_high) & (advantages > 0)).float())
    elif config.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = global_masked_mean(terms.phi_seq)
    if config.entropy_coef != 0.0:
        metrics["policy_loss"] = float(gather(terms.policy_loss.detach().reshape(1)).nanmean())
        metrics["entropy_coef"] = float(config.entropy_coef)
    return metrics


def evaluate(
    logps: torch.Tensor,
    entropy: torch.Tensor,
    batch: PolicyBatch,
    config: PolicyLossConfig,
    num_items_in_batch=None,
    reduce_sum=_identity,
    gather=_identity,
    gather_values=None,
) -> tuple[ObjectiveTerms, dict[str, float], torch.Tensor | None]:
    """The whole epilogue on ``[B, T]`` log-probs and entropies: the entropy quantile mask (when
    ``top_entropy_quantile < 1``), the normalizers, the objective and TRL's metrics. Returns the terms (``.loss`` is
    differentiable in ``logps`` and ``entropy``), the metrics and the entropy mask."""
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), batch.mask, 1 - config.top_entropy_quantile, gather_values)
    norms = Normalizers.of(batch, config, num_items_in_batch, entropy_mask)
    terms = policy_objective(logps, entropy, batch, config, norms, entropy_mask)
    metrics = policy_metrics(terms, entropy.detach(), batch, config, reduce_sum, gather)
    return terms, metrics, entropy_mask


def gradient_coupling(config: PolicyLossConfig, batch: PolicyBatch) -> str:
    """How far ``dL/dlogp_t`` reaches, which decides how a chunked backend may split the tokens.

    ``"token"``: it depends only on token ``t``'s own values (and on normalizers known from the masks), so any chunk
    of tokens can form its gradient while its logits are at hand. ``"sequence"``: it depends on the other tokens of
    the same sequence, so chunks must hold whole sequences. ``"global"``: it depends on the whole batch (the entropy
    quantile), so every log-prob and entropy must be known first. On-policy (``old_logps`` is None) every ratio is 1
    and its gradient is known per token, which makes most sequence-level objectives token-coupled.
    """
    if config.top_entropy_quantile < 1.0:
        return "global"
    on_policy = batch.old_logps is None
    sequence_wide = config.importance_sampling_level != "token" or config.loss_type in ("gmpo", "rloo", "vespo")
    if not on_policy and sequence_wide:
        return "sequence"
    if config.off_policy_mask_threshold is not None and not (on_policy and batch.sampling_logps is None):
        return "sequence"  # the keep/drop decision reads the whole sequence's log-probs
    if (
        on_policy
        and config.beta != 0.0
        and config.use_bias_correction_kl
        and config.importance_sampling_level == "sequence"
        and config.loss_type not in ("gmpo", "rloo")
    ):
        return "sequence"  # kl_t * coef_1: coef_1's gradient spreads every token's KL over the sequence
    return "token"
