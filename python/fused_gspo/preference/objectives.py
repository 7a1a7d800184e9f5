"""The preference losses, written once: from per-token log-probs and statistics to the loss and TRL's metrics.

The entry points dispatch on the config's type to :mod:`.dpo` (``DPOTrainer._compute_loss``) or :mod:`.cpo`
(``CPOTrainer``: CPO, SimPO, AlphaPO). Inputs are TRL's concatenated layout, ``[2B, T]`` per token, chosen rows
first (:class:`~fused_gspo.preference.batch.PreferenceBatch`); the loss is differentiable in ``logps`` only (and in
``aux_loss`` when given), every other input is read detached, as TRL detaches it.
"""

from __future__ import annotations

import torch

from . import cpo, dpo
from .batch import PreferenceBatch, PreferenceTerms, validate_batch, validate_metric_inputs
from .config import SORTING_LOSS_TYPES, CPOLossConfig, DPOLossConfig, PreferenceLossConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def preference_objective(
    logps: torch.Tensor, batch: PreferenceBatch, config: PreferenceLossConfig, values: bool = True
) -> PreferenceTerms:
    """The loss of ``config`` on ``[2B, T]`` per-token log-probs; ``values=False`` skips the checks that read data."""
    validate_batch(logps, batch, config, values)
    if isinstance(config, DPOLossConfig):
        return dpo.dpo_objective(logps, batch, config)
    return cpo.cpo_objective(logps, batch, config)


def preference_metrics(
    terms: PreferenceTerms,
    batch: PreferenceBatch,
    config: PreferenceLossConfig,
    gather=_identity,
    gather_for_metrics=_identity,
    train_eval: str = "train",
) -> dict[str, torch.Tensor]:
    """The trainer's logged metrics, under its names (:func:`preference_metric_names`), as 0-dim tensors.

    ``gather`` / ``gather_for_metrics`` are ``accelerator.gather`` / ``accelerator.gather_for_metrics``, used where
    the trainer uses each (``CPOTrainer`` only uses the latter); the defaults are one process's. ``train_eval``
    matters to CPO alone, whose eval names carry an ``eval_`` prefix (``DPOTrainer`` keeps the names and files them
    under its ``"eval"`` metrics instead)."""
    validate_metric_inputs(batch, config)
    if isinstance(config, DPOLossConfig):
        return dpo.dpo_metrics(terms, batch, config, gather, gather_for_metrics)
    return cpo.cpo_metrics(terms, batch, config, gather_for_metrics, train_eval)


def preference_metric_names(config: PreferenceLossConfig, train_eval: str = "train") -> tuple[str, ...]:
    """The keys :func:`preference_metrics` returns for ``config``, in order, known before any data is seen."""
    if isinstance(config, DPOLossConfig):
        return dpo.dpo_metric_names(config)
    return cpo.cpo_metric_names(config, train_eval)


def evaluate_preference(
    logps: torch.Tensor,
    batch: PreferenceBatch,
    config: PreferenceLossConfig,
    gather=_identity,
    gather_for_metrics=_identity,
    train_eval: str = "train",
    values: bool = True,
) -> tuple[PreferenceTerms, dict[str, torch.Tensor]]:
    """The whole epilogue: the terms (``.loss`` differentiable in ``logps``) and the metrics."""
    terms = preference_objective(logps, batch, config, values)
    return terms, preference_metrics(terms, batch, config, gather, gather_for_metrics, train_eval)


def required_inputs(config: PreferenceLossConfig, metrics: bool = True) -> tuple[str, ...]:
    """The :class:`PreferenceBatch` fields besides ``mask`` that ``config`` reads (with ``metrics``: its metrics
    too), i.e. which statistics the LM head must produce."""
    if isinstance(config, DPOLossConfig):
        names = ("ref_chosen_logps", "ref_rejected_logps")
        if config.use_weighting:
            names += ("log_sum_sq_probs",)
        if config.router_aux_loss_coef != 0.0:
            names += ("aux_loss",)
        return names + (("entropy", "mean_logits", "is_top1") if metrics else ())
    return ("position_mean_logits",) if metrics else ()


def preference_gradient_coupling(config: PreferenceLossConfig) -> str:
    """How far ``dL/dlogp_t`` reaches, which decides how a chunked backend may split the rows.

    ``"pair"``: the gradient of a token of row ``i`` (chosen) or ``B + i`` (rejected) depends only on that pair's
    log-probs and reference values and on normalizers the mask gives (``B`` for the mean over pairs, lengths, the
    batch's chosen-token count), so a chunk holding whole pairs can form its gradient once it has both rows' sums.
    ``"global"``: it depends on every pair, so all sequence log-probs must be known first.

    DPO, per loss type (the f-divergence scores are elementwise in each row's log-ratio, so they keep the type's
    coupling): "sigmoid", "hinge", "exo_pair", "robust", "discopop" are functions of the pair's score difference;
    "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down" of its two log-ratios; "ipo" and "sigmoid_norm" add
    the pair's lengths (mask); "sft" is ``-sum / count`` over the batch's chosen tokens, whose count is the mask's
    (each token's gradient is ``-1 / count``: even per token); ``ld_alpha`` splits each row by ``min`` of the pair's
    two lengths (mask); ``use_weighting`` multiplies by the pair's detached weight (its own two rows). All "pair".
    "aot" and "aot_unpaired" sort the batch's log-ratio differences and pair the ``k``-th smallest with the ``k``-th
    smallest reference one: which term a pair's gradient comes from depends on every other pair, so "global".

    CPO: every loss type is a function of the pair's two sequence log-probs (sums, or means over the row's mask
    length for "ipo"/"simpo"), averaged over ``B``; ``nll_loss`` is ``-sum / count`` over the batch's chosen tokens
    (a mask count); AlphaPO's reward is elementwise. All "pair".
    """
    if isinstance(config, DPOLossConfig):
        return "global" if set(config.loss_type) & set(SORTING_LOSS_TYPES) else "pair"
    if isinstance(config, CPOLossConfig):
        return "pair"
    raise TypeError(f"config must be a DPOLossConfig or a CPOLossConfig, got {type(config).__name__}")
