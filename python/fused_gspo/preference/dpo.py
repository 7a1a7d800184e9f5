"""DPO's loss and metrics: TRL 1.16.0's ``DPOTrainer._compute_loss`` term for term, from per-token log-probs.

Every expression below is TRL's, in TRL's order, so that the same inputs give the same values to the last bits; the
structural changes are that positions outside ``mask`` are excluded with ``torch.where`` instead of relying on the
fused head's zeros (same values; their gradient, which TRL's head discards, is 0 here), and that the masked means
TRL takes over a boolean selection (``x[mask].mean()``, ``x[mask].sum()``) are sums over zero-filled tensors divided
by the count, with no data-dependent shape (the same value up to the summation order).

One deliberate departure: ``f_divergence_type="alpha_divergence"`` takes its exponential in float32 for
float16/bfloat16/float32 inputs, as TRL does, but in float64 for float64 inputs (TRL has no clamp bound for float64
and fails; ours clamps at TRL's float32 bound, 80). The metrics TRL computes with ``.item()`` are returned as 0-dim
tensors of the dtype TRL's arithmetic has (``rewards/accuracies`` and ``mean_token_accuracy`` are float32 there, and
here; ``logits/*`` divide in float64, as TRL's Python floats do).

Not reproduced: ``num_tokens``, a running count of ``attention_mask`` tokens kept by the trainer (an adapter logs
it), and the deprecated ``return_outputs=True`` logits. Refused by :class:`DPOLossConfig`: ``use_weighting`` with
"hinge" or "sft", on which TRL 1.16 fails (see ``WEIGHTING_FAILS_IN_TRL``), besides what TRL itself rejects.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .batch import PreferenceBatch, PreferenceTerms
from .config import DPOLossConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _shared_tail_masks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's split of each row: its first ``min(len_chosen, len_rejected)`` completion tokens, and the rest."""
    comp_pos = mask.cumsum(dim=1)
    comp_lens = mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    return shared_mask, tail_mask


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """``[2B]`` sequence log-probs as ``DPOTrainer`` reduces ``[2B, T]`` per-token ones: the sum over the completion,
    or with ``ld_alpha`` (LD-DPO) the sum over the tokens both completions of a pair have plus ``ld_alpha`` times the
    sum over the longer one's tail."""
    per_token_logps = torch.where(mask.bool(), per_token_logps, 0.0)
    if ld_alpha is None:
        return per_token_logps.sum(dim=1)
    shared_mask, tail_mask = _shared_tail_masks(mask)
    shared_logps = (per_token_logps * shared_mask).sum(dim=1)
    tail_logps = (per_token_logps * tail_mask).sum(dim=1)
    return shared_logps + ld_alpha * tail_logps


@torch.no_grad()
def reference_logps(
    ref_per_token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen_logps, ref_rejected_logps)``, ``[B]`` each, from the reference model's ``[2B, T]`` per-token
    log-probs: ``DPOTrainer.compute_ref_log_probs`` (which precomputes them) and the reference pass of
    ``_compute_loss`` reduce them this way."""
    return tuple(sequence_logps(ref_per_token_logps, mask, ld_alpha).chunk(2, dim=0))


def _scores(logratios: torch.Tensor, config: DPOLossConfig) -> torch.Tensor:
    """f'(pi / ref) of the f-DPO paper, from the log-ratio."""
    kind = config.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    # alpha-divergence: f'(t) = (t^(a-1) - 1) / (a - 1); a -> 1 is log t
    a = config.f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
        return logratios
    coef = 1.0 / (a - 1.0)
    t = (a - 1.0) * logratios
    dtype = t.dtype
    # TRL computes in float32 and clamps so that exp stays representable once cast back; float64 stays float64
    clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}[dtype]
    compute = t if dtype == torch.float64 else t.float()
    return (torch.exp(torch.clamp(compute, max=clamp_max)) - 1.0).to(dtype) * coef


def dpo_objective(logps: torch.Tensor, batch: PreferenceBatch, config: DPOLossConfig) -> PreferenceTerms:
    """DPO's loss from the policy's ``[2B, T]`` per-token log-probs (differentiable) and ``batch``."""
    mask = batch.mask
    beta = config.beta
    logps_seq = sequence_logps(logps, mask, config.ld_alpha)
    chosen_logps, rejected_logps = logps_seq.chunk(2, dim=0)
    # the reference comes from a no-grad pass (or the dataset, precomputed)
    ref_chosen_logps, ref_rejected_logps = batch.ref_chosen_logps.detach(), batch.ref_rejected_logps.detach()

    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = _scores(chosen_logratios, config)
    rejected_scores = _scores(rejected_logratios, config)
    delta_score = chosen_scores - rejected_scores

    weights = None
    if config.use_weighting:  # Eq. (2) of WPO: the pair's length-normalized probabilities under the policy, detached
        with torch.no_grad():
            completion_lengths = mask.sum(dim=1).clamp_min(1)
            aligned = torch.where(mask.bool(), logps - batch.log_sum_sq_probs.detach(), 0.0)
            chosen_w, rejected_w = torch.exp(aligned.sum(dim=1) / completion_lengths).chunk(2, dim=0)
            weights = chosen_w * rejected_w

    def lengths():  # ipo and sigmoid_norm: TRL's unshifted completion_mask.sum(1).clamp(min=1.0)
        counts = mask.sum(dim=1) if batch.completion_lengths is None else batch.completion_lengths
        return counts.clamp(min=1.0).chunk(2, dim=0)

    def smoothed(delta):  # conservative DPO form of aot / aot_unpaired
        ls = config.label_smoothing
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls

    loss = 0.0
    for loss_type, loss_weight in zip(config.loss_type, config.weights, strict=True):
        if loss_type == "sigmoid":
            per_sequence_loss = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per_sequence_loss = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            chosen_len, rejected_len = lengths()
            ipo_delta = chosen_scores / chosen_len - rejected_scores / rejected_len
            per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            # TRL builds epsilon as a default-dtype (float32) tensor: its logs are float32 constants
            epsilon = torch.tensor(config.label_smoothing, device=logps.device)
            qw = torch.sigmoid(beta * delta_score)
            log_qw = F.logsigmoid(beta * delta_score)
            log_pw = torch.log1p(-epsilon)
            ql = torch.sigmoid(-beta * delta_score)
            log_ql = F.logsigmoid(-beta * delta_score)
            log_pl = torch.log(epsilon)
            per_sequence_loss = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
        elif loss_type == "nca_pair":
            chosen_rewards = beta * chosen_logratios
            rejected_rewards = beta * rejected_logratios
            per_sequence_loss = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "robust":
            ls = config.label_smoothing
            clean_loss_term = -(1 - ls) * F.logsigmoid(beta * delta_score)
            flipped_loss_term = -ls * F.logsigmoid(-beta * delta_score)
            per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * ls)
        elif loss_type == "bco_pair":
            per_sequence_loss = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-(beta * rejected_logratios))
        elif loss_type == "sppo_hard":
            per_sequence_loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "aot":
            logratios_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
            ref_logratios_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            per_sequence_loss = smoothed(logratios_sorted - ref_logratios_sorted)
        elif loss_type == "aot_unpaired":
            chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
            per_sequence_loss = smoothed(chosen_sorted - rejected_sorted)
        elif loss_type == "apo_zero":
            per_sequence_loss = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
        elif loss_type == "apo_down":
            per_sequence_loss = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":
            logits = delta_score * beta
            log_ratio_modulation = torch.sigmoid(logits / config.discopop_tau)
            logistic_component = -F.logsigmoid(logits)
            exp_component = torch.exp(-logits)
            per_sequence_loss = logistic_component * (1 - log_ratio_modulation) + exp_component * log_ratio_modulation
        elif loss_type == "sft":
            chosen_mask = mask[: batch.num_pairs].bool()
            chosen_token_logps = torch.where(chosen_mask, logps[: batch.num_pairs], 0.0)
            # TRL's -x[mask].mean(), without the data-dependent shape; expanded to [B] as TRL does
            batch_loss = -chosen_token_logps.sum() / chosen_mask.sum()
            per_sequence_loss = batch_loss.expand(batch.num_pairs)
        else:  # sigmoid_norm
            chosen_len, rejected_len = lengths()
            per_sequence_loss = -F.logsigmoid(beta * (chosen_scores / chosen_len - rejected_scores / rejected_len))
        if weights is not None:
            per_sequence_loss = per_sequence_loss * weights
        loss = loss + per_sequence_loss.mean() * loss_weight

    aux_loss = None
    if config.router_aux_loss_coef != 0.0:
        aux_loss = batch.aux_loss
        loss = loss + config.router_aux_loss_coef * aux_loss

    return PreferenceTerms(
        loss=loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        aux_loss=aux_loss,
        weights=weights,
    )


@torch.no_grad()
def dpo_metrics(
    terms: PreferenceTerms,
    batch: PreferenceBatch,
    config: DPOLossConfig,
    gather=_identity,
    gather_for_metrics=_identity,
) -> dict[str, torch.Tensor]:
    """``DPOTrainer``'s logged metrics (but ``num_tokens``), under its names, as 0-dim tensors (nothing waits for the
    device). ``gather`` / ``gather_for_metrics`` are ``accelerator.gather`` / ``accelerator.gather_for_metrics``,
    used where TRL uses each; the defaults are one process's. Train and eval log the same names."""
    mask = batch.mask.bool()
    B = batch.num_pairs
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    metrics: dict[str, torch.Tensor] = {}

    def ratio(total, count, as_double):  # TRL: total / count if count > 0 else 0.0
        total, count = gather_for_metrics(total).sum(), gather_for_metrics(count).sum()
        if as_double:  # TRL divides the two .item()s, in Python floats
            total, count = total.double(), count.double()
        value = total / count.clamp(min=1)
        return torch.where(count > 0, value, torch.zeros_like(value))

    if terms.aux_loss is not None:
        metrics["aux_loss"] = gather_for_metrics(terms.aux_loss.detach()).mean()
    entropy = batch.entropy.detach()
    metrics["entropy"] = ratio(torch.where(mask, entropy, 0.0).sum(), mask.sum(), as_double=False)
    chosen_mean_logits, rejected_mean_logits = batch.mean_logits.detach().chunk(2, dim=0)
    metrics["logits/chosen"] = ratio(
        torch.where(chosen_mask, chosen_mean_logits, 0.0).sum(), chosen_mask.sum(), as_double=True
    )
    metrics["logits/rejected"] = ratio(
        torch.where(rejected_mask, rejected_mean_logits, 0.0).sum(), rejected_mask.sum(), as_double=True
    )
    # int64 / int64: float32, as in TRL
    correct = gather_for_metrics((batch.is_top1[:B] & chosen_mask).sum()).sum()
    total = gather_for_metrics(chosen_mask.sum()).sum()
    metrics["mean_token_accuracy"] = torch.where(total > 0, correct / total.clamp(min=1), 0.0)

    chosen_rewards, rejected_rewards = terms.chosen_rewards, terms.rejected_rewards
    metrics["rewards/chosen"] = gather(chosen_rewards).mean()
    metrics["rewards/rejected"] = gather(rejected_rewards).mean()
    metrics["rewards/accuracies"] = gather((chosen_rewards > rejected_rewards).float()).mean()
    metrics["rewards/margins"] = gather(chosen_rewards - rejected_rewards).mean()
    metrics["logps/chosen"] = gather(terms.chosen_logps.detach()).mean()
    metrics["logps/rejected"] = gather(terms.rejected_logps.detach()).mean()
    return metrics


def dpo_metric_names(config: DPOLossConfig) -> tuple[str, ...]:
    """The keys :func:`dpo_metrics` returns for ``config``, in order."""
    names = ("aux_loss",) if config.router_aux_loss_coef != 0.0 else ()
    return names + (
        "entropy",
        "logits/chosen",
        "logits/rejected",
        "mean_token_accuracy",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    )
