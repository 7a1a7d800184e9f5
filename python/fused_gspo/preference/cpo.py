"""CPO's loss and metrics (SimPO, AlphaPO): TRL 1.16.0's ``CPOTrainer`` (``trl.experimental.cpo``) term for term.

``CPOTrainer.concatenated_forward`` runs the model on the ``[2B, L]`` concatenated batch and reduces the logits:
``get_batch_logps`` scores ``labels[:, 1:]`` against ``logits[:, :-1]`` (an encoder-decoder: unshifted) and sums the
log-probs over ``labels != -100``, or averages them (divided by that count, unclamped) for ``loss_type`` ``"ipo"`` and
``"simpo"``; ``nll_loss`` is ``nn.CrossEntropyLoss()`` (mean over the chosen rows' tokens whose label is not ``-100``,
same shift) of the same logits, i.e. ``-sum(chosen logps) / count(chosen tokens)``, and a float32 ``0.0`` when
``cpo_alpha == 0``. Both are functions of the per-token log-probs of the labels, which is what this module takes.

``cpo_loss`` then forms the pair rewards (``logp``, or AlphaPO's ``(1 - exp(logp)^-alpha) / alpha`` when
``alpha != 0``, computed as TRL does: ``exp`` then ``pow``, so a sum of log-probs below about -745 (float64) or -103
(float32) underflows to an infinite reward there and here) and the loss is ``losses.mean() + cpo_alpha * nll_loss``
(+ ``router_aux_loss_coef * aux_loss`` for a MoE model).

The ``logits/*`` metrics average ``outputs.logits`` over every element, which per-token statistics of the completion
cannot give: they need ``PreferenceBatch.position_mean_logits`` (see :mod:`fused_gspo.preference.statistics`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch import PreferenceBatch, PreferenceTerms
from .config import CPOLossConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sequence_logps(per_token_logps: torch.Tensor, mask: torch.Tensor, config: CPOLossConfig) -> torch.Tensor:
    """``[2B]`` sequence log-probs as ``CPOTrainer.get_batch_logps`` reduces them: the sum over the scored tokens,
    or their mean for ``"ipo"`` and ``"simpo"``."""
    valid = mask.bool()
    total = torch.where(valid, per_token_logps, 0.0).sum(-1)
    return total / valid.sum(-1) if config.averages_log_probs else total


def nll_loss(per_token_logps: torch.Tensor, mask: torch.Tensor, config: CPOLossConfig) -> torch.Tensor:
    """The chosen rows' mean negative log-likelihood (``concatenated_forward``'s ``nll_loss``)."""
    if config.cpo_alpha == 0:
        return torch.tensor(0.0, device=per_token_logps.device)  # TRL's default-dtype zero
    B = mask.shape[0] // 2
    valid = mask[:B].bool()
    return -torch.where(valid, per_token_logps[:B], 0.0).sum() / valid.sum()


def cpo_rewards_and_losses(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, config: CPOLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``CPOTrainer.cpo_loss``: per-pair ``losses`` ``[B]`` and the detached ``chosen_rewards``/``rejected_rewards``."""
    beta, alpha, ls = config.beta, config.alpha, config.label_smoothing
    if alpha != 0.0:
        # AlphaPO: r = (1 - p^(-alpha)) / alpha
        chosen_reward = (1 - torch.exp(chosen_logps).pow(-alpha)) / alpha
        rejected_reward = (1 - torch.exp(rejected_logps).pow(-alpha)) / alpha
        logits = chosen_reward - rejected_reward
    else:
        chosen_reward, rejected_reward = chosen_logps, rejected_logps
        logits = chosen_logps - rejected_logps

    if config.loss_type == "simpo":
        logits = logits - config.simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif config.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif config.loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo, Eq. (17): beta is the regularization parameter tau
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_reward.detach(), beta * rejected_reward.detach()


def cpo_objective(logps: torch.Tensor, batch: PreferenceBatch, config: CPOLossConfig) -> PreferenceTerms:
    """CPO's loss from the policy's ``[2B, T]`` per-token log-probs (differentiable) and ``batch``."""
    mask = batch.mask
    nll = nll_loss(logps, mask, config)
    chosen_logps, rejected_logps = sequence_logps(logps, mask, config).chunk(2, dim=0)
    losses, chosen_rewards, rejected_rewards = cpo_rewards_and_losses(chosen_logps, rejected_logps, config)
    loss = losses.mean() + config.cpo_alpha * nll
    if batch.aux_loss is not None:  # CPOTrainer adds it whenever the model returns router logits
        loss = loss + config.router_aux_loss_coef * batch.aux_loss
    return PreferenceTerms(
        loss=loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        nll_loss=nll,
        aux_loss=batch.aux_loss,
    )


@torch.no_grad()
def cpo_metrics(
    terms: PreferenceTerms,
    batch: PreferenceBatch,
    config: CPOLossConfig,
    gather_for_metrics=_identity,
    train_eval: str = "train",
) -> dict[str, torch.Tensor]:
    """``CPOTrainer.get_batch_loss_metrics``'s metrics, under its names (``eval_``-prefixed in eval), as 0-dim
    tensors. ``gather_for_metrics`` is ``accelerator.gather_for_metrics``; the default is one process's."""
    if train_eval not in ("train", "eval"):
        raise ValueError(f"train_eval must be 'train' or 'eval', got {train_eval!r}")
    prefix = "eval_" if train_eval == "eval" else ""
    B = batch.num_pairs
    chosen_rewards, rejected_rewards = terms.chosen_rewards, terms.rejected_rewards
    position_mean_logits = batch.position_mean_logits.detach()
    return {
        f"{prefix}rewards/chosen": gather_for_metrics(chosen_rewards).mean(),
        f"{prefix}rewards/rejected": gather_for_metrics(rejected_rewards).mean(),
        f"{prefix}rewards/accuracies": gather_for_metrics((chosen_rewards > rejected_rewards).float()).mean(),
        f"{prefix}rewards/margins": gather_for_metrics(chosen_rewards - rejected_rewards).mean(),
        f"{prefix}logps/rejected": gather_for_metrics(terms.rejected_logps.detach()).mean(),
        f"{prefix}logps/chosen": gather_for_metrics(terms.chosen_logps.detach()).mean(),
        # each process's mean over all its logits, then the mean of those (as TRL: a mean of means)
        f"{prefix}logits/rejected": gather_for_metrics(position_mean_logits[B:].mean()).mean(),
        f"{prefix}logits/chosen": gather_for_metrics(position_mean_logits[:B].mean()).mean(),
        f"{prefix}nll_loss": gather_for_metrics(terms.nll_loss.detach()).mean(),
    }


def cpo_metric_names(config: CPOLossConfig, train_eval: str = "train") -> tuple[str, ...]:
    """The keys :func:`cpo_metrics` returns, in order."""
    prefix = "eval_" if train_eval == "eval" else ""
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/rejected",
             "logps/chosen", "logits/rejected", "logits/chosen", "nll_loss")  # fmt: skip
    return tuple(prefix + name for name in names)
