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
``old_logps`` may be ``[B]``, its sequence sums). A packed batch (``PolicyBatch.cu_seqlens``) has per-token tensors
``[N]`` and per-sequence ones ``[S]`` instead; the math only sums over rows and broadcasts row values to tokens,
through :mod:`fused_gspo.rows`, so one text serves both layouts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

from .config import CLIPPED_LOSS_TYPES, PolicyLossConfig
from .rows import PackedRows, PaddedRows, rows_of


@dataclass
class PolicyBatch:
    """The per-sequence inputs of the objective (everything but the current policy's log-probs).

    Padded: per-token tensors ``[B, T]``, per-row ``[B]`` (``importance_sampling_ratio`` ``[B, 1]``). Packed
    (``cu_seqlens`` ``[S + 1]``): per-token ``[N]``, per-row ``[S]``.
    """

    mask: torch.Tensor  # per token, float 0/1
    advantages: torch.Tensor  # per row or per token
    old_logps: torch.Tensor | None = None  # per token (or per row for rloo: sequence sums); None: on-policy
    ref_logps: torch.Tensor | None = None  # per token
    sampling_logps: torch.Tensor | None = None  # per token
    importance_sampling_ratio: torch.Tensor | None = None  # per token or per row
    cu_seqlens: torch.Tensor | None = None  # packed rows; None: [B, T]
    row_starts: tuple[int, ...] | None = None  # cu_seqlens on the host, if read already (fused_gspo.host_values)
    # the names of the per-row tensors: decided from the shapes of the whole batch (None: not yet), and carried to its
    # selections, whose shapes cannot tell (a packed chunk with an empty sequence may hold as many positions as rows)
    per_row: frozenset[str] | None = None

    def __post_init__(self):
        self._rows = None

    def is_per_row(self, name: str) -> bool:
        """Whether the input ``name`` holds one value per row (else one per token), as decided on the whole batch."""
        if self.per_row is None:
            rows = self.rows  # a selection carries the decision; were it missing, rows.is_per_row would raise
            self.per_row = frozenset(
                f.name for f in fields(self)
                if f.name not in _NOT_PER_ROW and getattr(self, f.name) is not None
                and rows.is_per_row(getattr(self, f.name))
            )  # fmt: skip
        return name in self.per_row

    @property
    def rows(self) -> PaddedRows | PackedRows:
        if self._rows is None:
            self._rows = rows_of(self.mask, self.cu_seqlens, self.row_starts)
        return self._rows

    def select_rows(self, start: int, stop: int) -> PolicyBatch:
        """The same batch restricted to rows ``start:stop``."""
        rows = self.rows
        out = {}
        for f in fields(self):
            x = getattr(self, f.name)
            if x is None or f.name in ("cu_seqlens", "row_starts", "per_row"):
                continue
            out[f.name] = x[start:stop] if self.is_per_row(f.name) else rows.token_rows(x, start, stop)
        selected = PolicyBatch(**out, per_row=self.per_row)
        selected._rows = rows.select(start, stop)
        selected.cu_seqlens = getattr(selected._rows, "cu_seqlens", None)
        return selected

    def requiring_grad(self) -> tuple[str, ...]:
        """The names of the tensors that require grad (the objective is differentiable in each, as in eager mode)."""
        return tuple(
            f.name for f in fields(self) if isinstance(x := getattr(self, f.name), torch.Tensor) and x.requires_grad
        )

    def replace(self, **tensors: torch.Tensor) -> PolicyBatch:
        """The same batch with some tensors swapped for others of the same shapes (the per-row decision kept)."""
        out = dataclasses.replace(self, **tensors, per_row=self.per_row)
        if "mask" not in tensors:
            out._rows = self._rows
        return out

    def to(self, dtype: torch.dtype) -> PolicyBatch:
        """Floating tensors cast to ``dtype`` (the objective runs in float32, the reference in float64)."""
        return PolicyBatch(
            **{f.name: (getattr(self, f.name) if f.name == "cu_seqlens" else _cast(getattr(self, f.name), dtype))
               for f in fields(self)}
        )  # fmt: skip


_NOT_PER_ROW = ("mask", "cu_seqlens", "row_starts", "per_row")


def _cast(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) else x  # None, row_starts (ints on the host) or per_row


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
        valid_tokens: int | None = None,
    ) -> Normalizers:
        """``valid_tokens``: the mask's sum, when the caller has read it already (no read at all without an entropy
        mask; otherwise the one read of what is missing, each read waiting for the device)."""
        mask = batch.mask
        B, T = batch.rows.num, batch.rows.width
        sums = [] if valid_tokens is not None else [mask.sum()]
        if entropy_mask is not None:
            sums.append((mask * entropy_mask).sum())
        counts = torch.stack(sums).tolist() if sums else []
        tokens = float(valid_tokens) if valid_tokens is not None else counts[0]
        effective_tokens = counts[-1] if entropy_mask is not None else tokens  # else every valid token counts
        num_items = tokens if num_items_in_batch is None else float(num_items_in_batch)
        max_len = T if config.max_completion_length is None else config.max_completion_length
        if max_len is None and config.loss_type == "dr_grpo":
            raise ValueError(
                "loss_type='dr_grpo' divides by max_completion_length, which a packed batch cannot infer: set it"
            )
        return Normalizers(
            num_sequences=float(B),
            num_tokens=max(tokens, 1.0),
            dr_grpo=float(B * (max_len or 0)),
            dapo=max(num_items, 1.0)
            / config.num_processes
            * config.gradient_accumulation_steps
            / config.effective_steps_per_generation,
            accumulation=float(config.gradient_accumulation_steps),
            entropy_tokens=max(effective_tokens, 1.0),
        )


@dataclass
class ObjectiveTerms:
    """The loss of the rows evaluated, and the intermediates TRL's metrics are computed from."""

    loss: torch.Tensor  # scalar: this slice's share of the loss
    policy_loss: torch.Tensor  # scalar: the policy term before the accumulation normalizer (TRL's "policy_loss")
    coef_1: torch.Tensor | None = None  # ratio, per token or per row ([B, 1] padded, [S] packed); RLOO: [B]
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


def off_policy_mask(advantages, logps, sampling_logps, rows, threshold) -> torch.Tensor:
    """TRL's ``get_off_policy_mask``: keep a sequence unless its advantage is negative and its mean KL is high.
    ``advantages`` already broadcast to tokens."""
    mask = rows.mask
    kl_div = torch.nan_to_num(sampling_logps - logps.detach(), nan=0.0)
    avg_seq_kl = rows.expand(rows.sum(kl_div * mask) / rows.sum(mask).clamp(min=1.0))
    return ((advantages >= 0) | (avg_seq_kl <= threshold)).to(mask.dtype)


@torch.no_grad()
def gamma_weights(batch: PolicyBatch, log_ratio: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """TRL's VESPO ``get_gamma_weights``: phi(w) = e^lambda w^k e^(-lambda w) of the sequence ratio, detached.
    Per row when the advantages are (``[B, 1]`` / ``[S]``), per token otherwise; the vLLM ratio's log is summed over
    every position of the row, as TRL sums it."""
    rows, ratio = batch.rows, batch.importance_sampling_ratio
    lower = math.log(1e-8)
    seq_log_ratio = rows.sum(torch.clamp(log_ratio, -20.0, 20.0) * rows.mask)
    if ratio is not None:
        log_is = torch.clamp(torch.log(ratio), lower, 20.0)
        per_row_ratio = batch.is_per_row("importance_sampling_ratio")
        seq_log_ratio = seq_log_ratio + (rows.row_values(log_is) if per_row_ratio else rows.sum(log_is))
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    log_w, advantages = aligned(
        rows, log_w if rows.packed else log_w.unsqueeze(-1), True, batch.advantages, batch.is_per_row("advantages")
    )
    nonneg = advantages >= 0
    k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def aligned(rows, a: torch.Tensor, a_per_row: bool, b: torch.Tensor, b_per_row: bool):
    """``a`` and ``b`` (each per row or not, as the caller knows) ready to combine elementwise as TRL combines them:
    two per-row values stay per row, a per-row value meeting a per-token one is broadcast to the tokens."""
    if not rows.packed:  # [B] becomes [B, 1]; broadcasting does the rest
        return (a.unsqueeze(-1) if a.dim() == 1 else a), (b.unsqueeze(-1) if b.dim() == 1 else b)
    if a_per_row and b_per_row:
        return a, b
    return rows.broadcast(a, a_per_row), rows.broadcast(b, b_per_row)


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

    rows = batch.rows
    mask = batch.mask
    # [B, 1] or [B, T] padded (TRL's shapes), [N] packed
    advantages = rows.broadcast(batch.advantages, batch.is_per_row("advantages"))
    old_logps = logps.detach() if batch.old_logps is None else batch.old_logps

    if config.off_policy_mask_threshold is not None:
        sampling = old_logps if batch.sampling_logps is None else batch.sampling_logps
        keep = off_policy_mask(advantages, logps, sampling, rows, config.off_policy_mask_threshold)

    log_ratio = logps - old_logps
    level = config.importance_sampling_level
    per_row_ratio = level == "sequence"  # coef_1 per row (GSPO), else per token
    if level == "token":
        log_importance_weights = log_ratio
    else:
        # per row: [B, 1] padded (TRL's shape), [S] packed
        seq_log_ratio = rows.sum(log_ratio * mask) / rows.sum(mask).clamp(min=1.0)
        seq_log_ratio = seq_log_ratio if rows.packed else seq_log_ratio.unsqueeze(-1)
        if level == "sequence":
            log_importance_weights = seq_log_ratio
        else:  # GSPO-token: the value of the sequence log-ratio, the gradient of the token's log-prob
            log_importance_weights = logps - logps.detach() + rows.expand(seq_log_ratio.detach())
    coef_1 = torch.exp(log_importance_weights)

    per_token_kl = None
    if config.beta != 0.0:
        per_token_kl = _kl(batch.ref_logps, logps)
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * rows.broadcast(coef_1, per_row_ratio)

    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    phi_seq = None
    if config.loss_type == "cispo":
        per_token_loss = -rows.broadcast(torch.clamp(coef_1, max=eps_high).detach(), per_row_ratio) * advantages * logps
    elif config.loss_type in CLIPPED_LOSS_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token_loss = -torch.min(
            rows.broadcast(coef_1, per_row_ratio) * advantages, rows.broadcast(coef_2, per_row_ratio) * advantages
        )
    elif config.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token_loss = (
            -torch.sigmoid(temperatures * (rows.broadcast(coef_1, per_row_ratio) - 1)) * 4 / temperatures * advantages
        )
    else:  # vespo
        phi_seq = gamma_weights(batch, log_ratio, config)  # per row when the advantages are
        per_token_loss = -rows.broadcast(phi_seq, batch.is_per_row("advantages")) * advantages * logps

    if config.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * keep
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if batch.importance_sampling_ratio is not None and config.loss_type != "vespo":
        per_token_loss = per_token_loss * rows.broadcast(
            batch.importance_sampling_ratio, batch.is_per_row("importance_sampling_ratio")
        )
    if per_token_kl is not None:
        per_token_loss = per_token_loss + config.beta * per_token_kl

    masked = per_token_loss * mask
    if config.loss_type in ("grpo", "sapo"):
        policy_loss = (rows.sum(masked) / rows.sum(mask).clamp(min=1.0)).sum() / norms.num_sequences
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "bnpo":
        policy_loss = masked.sum() / norms.num_tokens
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "dr_grpo":
        policy_loss = masked.sum() / norms.dr_grpo
        loss = policy_loss / norms.accumulation
    elif config.loss_type == "luspo":
        policy_loss = rows.sum(masked).sum() / norms.num_sequences
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
    rows, mask, advantages = batch.rows, batch.mask, batch.advantages
    old_logps = logps.detach() if batch.old_logps is None else batch.old_logps
    log_ratio = logps - old_logps
    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    # Sign-aware clipping in log space: PPO's min trick on the log-ratio
    clamped = torch.clamp(log_ratio, min=-eps_low, max=eps_high)
    positive = rows.expand(advantages) > 0
    clipped = torch.where(positive, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))
    seq_mask = mask * entropy_mask if entropy_mask is not None else mask
    coef = torch.exp(rows.sum(clipped * seq_mask) / rows.sum(seq_mask).clamp(min=1.0))
    per_sequence_loss = -coef * advantages
    per_token_kl = None
    if config.beta != 0.0:
        per_token_kl = _kl(batch.ref_logps, logps)
        per_sequence_loss = per_sequence_loss + config.beta * rows.sum(per_token_kl * mask) / rows.sum(mask).clamp(
            min=1.0
        )
    policy_loss = per_sequence_loss.sum() / norms.num_sequences
    return ObjectiveTerms(
        loss=policy_loss / norms.accumulation, policy_loss=policy_loss, log_ratio=log_ratio, per_token_kl=per_token_kl
    )


def _rloo_objective(logps, batch, config, norms) -> ObjectiveTerms:
    rows, mask, advantages = batch.rows, batch.mask, batch.advantages
    seq_logps = rows.sum(logps * mask)
    if batch.old_logps is None:
        old = seq_logps.detach()
    elif batch.is_per_row("old_logps") and batch.old_logps.dim() == 1:
        old = batch.old_logps
    else:
        old = rows.sum(batch.old_logps * mask)
    coef_1 = torch.exp(seq_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - config.epsilon_low, 1 + config.effective_epsilon_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    # RLOOTrainer returns the loss unscaled: the HF Trainer divides it by the accumulation steps afterwards
    loss = per_sequence_loss.sum() / norms.num_sequences
    return ObjectiveTerms(loss=loss, policy_loss=loss, coef_1=coef_1)


def _nanmin(x):
    """``min`` over the non-NaN entries, NaN if there is none (TRL's ``nanmin``), without a host synchronisation."""
    lowest = torch.where(torch.isnan(x), torch.inf, x).min() if x.numel() else x.new_tensor(torch.inf)
    return torch.where(torch.isnan(x).all(), torch.nan, lowest)


def _nanmax(x):
    return -_nanmin(-x)


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
) -> dict[str, torch.Tensor]:
    """TRL's logged metrics, under TRL's names (``terms`` evaluated on the whole batch), as 0-dim tensors: nothing
    here waits for the device (TRL calls ``.item()`` on each; a caller that logs does the same).

    ``reduce_sum`` / ``gather`` are the cross-process sum and concatenation (``accelerator.reduce(..., "sum")`` and
    ``accelerator.gather``) where TRL uses them; the defaults are one process's.
    """
    rows, mask = batch.rows, batch.mask
    advantages = batch.advantages
    metrics: dict[str, torch.Tensor] = {}

    def masked_seq_mean(x):
        if rows.is_per_row(x):
            return rows.row_values(x)
        return rows.sum(x * mask) / rows.sum(mask)

    def global_masked_mean(x):
        if rows.is_per_row(x):
            total, count = x.sum(), x.new_tensor(float(rows.num))
        else:
            total, count = (x * mask).sum(), mask.sum().to(x.dtype)
        totals = reduce_sum(torch.stack([total, count]))
        return totals[0] / totals[1].clamp(min=1.0)

    def clip_metrics(low, high):
        region = low | high
        metrics["clip_ratio/low_mean"] = global_masked_mean(low.float())
        metrics["clip_ratio/high_mean"] = global_masked_mean(high.float())
        metrics["clip_ratio/region_mean"] = global_masked_mean(region.float())
        metrics["clip_ratio/low_min"] = _nanmin(gather(masked_seq_mean(low.float())))
        metrics["clip_ratio/high_max"] = _nanmax(gather(masked_seq_mean(high.float())))

    eps_low, eps_high = config.epsilon_low, config.effective_epsilon_high
    per_row_ratio = config.importance_sampling_level == "sequence"  # terms.coef_1 per row, else per token
    if config.loss_type == "rloo":
        totals = reduce_sum(torch.stack([(entropy * mask).sum(), mask.sum().to(entropy.dtype)]))
        metrics["entropy"] = totals[0] / totals[1].clamp(min=1.0)
        coef_1 = terms.coef_1
        low = gather(((coef_1 < 1 - eps_low) & (advantages < 0)).float())
        high = gather(((coef_1 > 1 + eps_high) & (advantages > 0)).float())
        metrics["clip_ratio/low_mean"] = low.nanmean()
        metrics["clip_ratio/low_min"] = _nanmin(low)
        metrics["clip_ratio/high_mean"] = high.nanmean()
        metrics["clip_ratio/high_max"] = _nanmax(high)
        metrics["clip_ratio/region_mean"] = torch.maximum(low, high).nanmean()
        return metrics

    if terms.per_token_kl is not None:
        metrics["kl"] = global_masked_mean(terms.per_token_kl)
    metrics["entropy"] = global_masked_mean(entropy)

    if config.loss_type == "gmpo":
        log_ratio, adv = aligned(rows, terms.log_ratio, False, advantages, batch.is_per_row("advantages"))
        clip_metrics((log_ratio < -eps_low) & (adv < 0), (log_ratio > eps_high) & (adv > 0))
        return metrics
    if config.loss_type in CLIPPED_LOSS_TYPES:
        coef_1, adv = aligned(rows, terms.coef_1, per_row_ratio, advantages, batch.is_per_row("advantages"))
        clip_metrics((coef_1 < 1 - eps_low) & (adv < 0), (coef_1 > 1 + eps_high) & (adv > 0))
    elif config.loss_type == "cispo":
        coef_1, adv = aligned(rows, terms.coef_1, per_row_ratio, advantages, batch.is_per_row("advantages"))
        metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > eps_high) & (adv > 0)).float())
    elif config.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"] = global_masked_mean(terms.phi_seq)
    if config.entropy_coef != 0.0:
        metrics["policy_loss"] = gather(terms.policy_loss.detach().reshape(1)).nanmean()
        metrics["entropy_coef"] = terms.policy_loss.new_tensor(config.entropy_coef)
    return metrics


_CLIP_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)


def metric_names(config: PolicyLossConfig) -> tuple[str, ...]:
    """The keys :func:`policy_metrics` returns for ``config``, in order, known before any data is seen (the custom
    operators return the metrics as one tensor in this order)."""
    if config.loss_type == "rloo":
        return ("entropy", "clip_ratio/low_mean", "clip_ratio/low_min", "clip_ratio/high_mean",
                "clip_ratio/high_max", "clip_ratio/region_mean")  # fmt: skip
    names = (("kl",) if config.beta != 0.0 else ()) + ("entropy",)
    if config.loss_type == "gmpo" or config.loss_type in CLIPPED_LOSS_TYPES:
        names += _CLIP_METRICS
    elif config.loss_type == "cispo":
        names += ("cispo_clip_ratio",)
    elif config.loss_type == "vespo":
        names += ("vespo/phi_seq_mean",)
    if config.entropy_coef != 0.0 and config.loss_type != "gmpo":
        names += ("policy_loss", "entropy_coef")
    return names


def evaluate(
    logps: torch.Tensor,
    entropy: torch.Tensor,
    batch: PolicyBatch,
    config: PolicyLossConfig,
    num_items_in_batch=None,
    reduce_sum=_identity,
    gather=_identity,
    gather_values=None,
    valid_tokens: int | None = None,
) -> tuple[ObjectiveTerms, dict[str, torch.Tensor], torch.Tensor | None]:
    """The whole epilogue on ``[B, T]`` log-probs and entropies: the entropy quantile mask (when
    ``top_entropy_quantile < 1``), the normalizers, the objective and TRL's metrics. Returns the terms (``.loss`` is
    differentiable in ``logps`` and ``entropy``), the metrics and the entropy mask. ``valid_tokens``: the mask's sum
    if the host knows it (:class:`Normalizers`)."""
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropy.detach(), batch.mask, 1 - config.top_entropy_quantile, gather_values)
    norms = Normalizers.of(batch, config, num_items_in_batch, entropy_mask, valid_tokens)
    terms = policy_objective(logps, entropy, batch, config, norms, entropy_mask)
    metrics = policy_metrics(terms, entropy.detach(), batch, config, reduce_sum, gather)
    return terms, metrics, entropy_mask


def gradient_coupling(config: PolicyLossConfig, batch: PolicyBatch) -> str:
    """How far ``dL/dlogp_t`` reaches for this batch (:func:`coupling_of` with the batch's optional inputs)."""
    return coupling_of(config, on_policy=batch.old_logps is None, has_sampling_logps=batch.sampling_logps is not None)


def coupling_of(config: PolicyLossConfig, *, on_policy: bool, has_sampling_logps: bool = False) -> str:
    """How far ``dL/dlogp_t`` reaches, which decides how a chunked backend may split the tokens.

    ``"token"``: it depends only on token ``t``'s own values (and on normalizers known from the masks), so any chunk
    of tokens can form its gradient while its logits are at hand. ``"sequence"``: it depends on the other tokens of
    the same sequence, so chunks must hold whole sequences. ``"global"``: it depends on the whole batch (the entropy
    quantile), so every log-prob and entropy must be known first. On-policy (no ``old_logps``) every ratio is 1
    and its gradient is known per token, which makes most sequence-level objectives token-coupled.
    """
    if config.top_entropy_quantile < 1.0:
        return "global"
    sequence_wide = config.importance_sampling_level != "token" or config.loss_type in ("gmpo", "rloo", "vespo")
    if not on_policy and sequence_wide:
        return "sequence"
    if config.off_policy_mask_threshold is not None and not (on_policy and not has_sampling_logps):
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
