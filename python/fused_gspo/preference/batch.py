"""The inputs and outputs of the preference losses, in TRL's concatenated layout, and their checks.

Rows ``[0, B)`` are the chosen completions and rows ``[B, 2B)`` the rejected ones, pair ``i`` being rows ``i`` and
``B + i`` (``DPOTrainer``'s collator and ``CPOTrainer.concatenated_inputs`` both stack them so). Per-token tensors are
``[2B, T]`` in the shifted layout of :mod:`fused_gspo.preference.statistics` (column ``t`` scores token ``t + 1``).

Checks of types and shapes cost nothing; checks of values (a 0/1 mask, rows without a valid token where the loss
cannot have them) read the data and so wait for the device; ``values=False`` skips them, as in
:mod:`fused_gspo.validation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..host_values import read_mask_rows
from .config import CPOLossConfig, DPOLossConfig

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class PreferenceBatch:
    """Everything but the policy's per-token log-probs. ``B`` pairs, ``T`` scored positions.

    Which fields a loss reads is :func:`fused_gspo.preference.required_inputs`; the others may stay None.
    """

    mask: torch.Tensor  # [2B, T] 0/1: the scored completion tokens (TRL's completion_mask[:, 1:], labels != -100)
    # Detached per-token statistics, zero at masked positions (definitions: preference.statistics)
    entropy: torch.Tensor | None = None  # [2B, T] DPO metric "entropy"
    mean_logits: torch.Tensor | None = None  # [2B, T] DPO metrics "logits/*"
    is_top1: torch.Tensor | None = None  # [2B, T] bool, DPO metric "mean_token_accuracy"
    log_sum_sq_probs: torch.Tensor | None = None  # [2B, T] DPO use_weighting (WPO)
    # [2B, P] CPO metrics "logits/*": the vocabulary mean of outputs.logits at *every* position, nothing masked
    # (P = T + 1 for a decoder-only model, whose logits include the final position; P = T for an encoder-decoder)
    position_mean_logits: torch.Tensor | None = None
    # [B] DPO reference sequence log-probs, already reduced as TRL reduces them (see dpo.reference_logps)
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    # [2B] DPO "ipo"/"sigmoid_norm" length normalizers: TRL divides by the *unshifted* completion_mask.sum(1), one
    # more than mask.sum(1) where the first input position is a completion token (an empty prompt). None: mask.sum(1)
    completion_lengths: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # scalar MoE load-balancing loss (outputs.aux_loss), weighted by the config

    @property
    def num_pairs(self) -> int:
        return self.mask.shape[0] // 2


@dataclass
class PreferenceTerms:
    """The loss and the intermediates TRL's metrics are computed from (``[B]`` per pair)."""

    loss: torch.Tensor  # scalar, differentiable w.r.t. logps (and aux_loss when given)
    chosen_logps: torch.Tensor  # [B] TRL's sequence log-prob (DPO: sum or LD-DPO weighted; CPO: sum or mean)
    rejected_logps: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] detached: DPO beta * log-ratio; CPO beta * logp (or the AlphaPO reward)
    rejected_rewards: torch.Tensor  # [B]
    nll_loss: torch.Tensor | None = None  # CPO: the chosen rows' cross entropy (0 when cpo_alpha == 0)
    aux_loss: torch.Tensor | None = None  # the aux_loss that was added (DPO logs it)
    weights: torch.Tensor | None = None  # DPO use_weighting: [B] WPO pair weights, detached


def _check_tensor(name: str, x, shape: tuple[int, ...], *, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def validate_logps_and_mask(logps: torch.Tensor, mask: torch.Tensor, values: bool = True, config=None) -> None:
    """``logps`` and ``mask`` ``[2B, T]``: an even, non-zero row count and (``values``) a 0/1 mask; with ``config``,
    rows without a valid token only where that loss stays finite (:func:`check_empty_rows`)."""
    if not isinstance(logps, torch.Tensor) or logps.dtype not in _FLOATS:
        raise TypeError(f"logps must be a floating torch.Tensor, got {getattr(logps, 'dtype', type(logps))}")
    if logps.dim() != 2:
        raise ValueError(f"logps must be [2B, T] (chosen rows, then rejected rows), got shape {tuple(logps.shape)}")
    rows = logps.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"logps must have an even, non-zero number of rows (B chosen, then B rejected), got {rows} rows"
        )
    if logps.shape[1] == 0:
        raise ValueError("logps must have at least one position")
    _check_tensor("mask", mask, tuple(logps.shape), floating=False)
    if values:
        row_counts = read_mask_rows("mask", mask)
        if config is not None:
            check_empty_rows(config, row_counts, "mask")


def _chosen_mean(config) -> bool:
    """Whether the loss averages over the chosen rows' tokens: DPO's ``sft`` term, CPO's NLL (``cpo_alpha != 0``)."""
    return "sft" in config.loss_type if isinstance(config, DPOLossConfig) else config.cpo_alpha != 0


def may_refuse_empty_rows(config) -> bool:
    """Whether :func:`empty_rows_refusal` can refuse anything under ``config`` (else rows may always be empty)."""
    return (isinstance(config, CPOLossConfig) and config.averages_log_probs) or _chosen_mean(config)


def empty_rows_refusal(config, row_counts: Sequence[int], name: str) -> str | None:
    """Why rows without a valid token cannot be computed under ``config`` (TRL divides by their count: NaN), or None.

    Allowed elsewhere, as the trainers allow them: an empty row's log-prob is a sum over no token (0), and DPO clamps
    its per-row normalizers (``ipo``, ``sigmoid_norm``, WPO weights) to 1. Refused: any empty row under CPO's averaged
    log-probs (``ipo``, ``simpo``: divided by the row's count, unclamped), and no valid token in any chosen row under
    a mean over the chosen tokens (DPO's ``sft`` term, CPO's NLL with ``cpo_alpha != 0``).
    """
    empty = [r for r, c in enumerate(row_counts) if c == 0]
    if not empty:
        return None
    B = len(row_counts) // 2
    if isinstance(config, CPOLossConfig) and config.averages_log_probs:
        named = ", ".join(f"{'chosen' if r < B else 'rejected'} row {r if r < B else r - B}" for r in empty)
        return (
            f"loss_type={config.loss_type!r} averages each row's log-probs over its tokens: every row needs at least "
            f"one valid token in {name}; none in {named}"
        )
    if _chosen_mean(config) and all(c == 0 for c in row_counts[:B]):
        term = "the sft loss" if isinstance(config, DPOLossConfig) else f"the NLL term (cpo_alpha={config.cpo_alpha})"
        return f"{term} averages over the chosen rows' tokens, and {name} has none in any chosen row"
    return None


def check_empty_rows(config, row_counts: Sequence[int], name: str) -> None:
    """``ValueError`` with :func:`empty_rows_refusal`'s reason, if there is one."""
    refusal = empty_rows_refusal(config, row_counts, name)
    if refusal is not None:
        raise ValueError(refusal)


def validate_batch(logps: torch.Tensor, batch: PreferenceBatch, config, values: bool = True) -> None:
    """The inputs the loss itself reads (the metrics check theirs in :func:`validate_metric_inputs`)."""
    if not isinstance(batch, PreferenceBatch):
        raise TypeError(f"batch must be a PreferenceBatch, got {type(batch).__name__}")
    validate_logps_and_mask(logps, batch.mask, values, config)
    B = logps.shape[0] // 2
    if isinstance(config, DPOLossConfig):
        for name in ("ref_chosen_logps", "ref_rejected_logps"):
            x = getattr(batch, name)
            if x is None:
                raise ValueError(
                    f"DPO needs {name} ([B] reference sequence log-probs; dpo.reference_logps reduces per-token ones)"
                )
            _check_tensor(name, x, (B,))
        if config.use_weighting:
            if batch.log_sum_sq_probs is None:
                raise ValueError("use_weighting=True needs log_sum_sq_probs ([2B, T], log sum_j p_j^2)")
            _check_tensor("log_sum_sq_probs", batch.log_sum_sq_probs, tuple(logps.shape))
        if batch.completion_lengths is not None:
            _check_tensor("completion_lengths", batch.completion_lengths, (2 * B,), floating=False)
            if values and bool((batch.completion_lengths < batch.mask.sum(1)).any()):
                raise ValueError("completion_lengths must be at least mask.sum(1) (it counts the unshifted mask)")
        if config.router_aux_loss_coef != 0.0 and batch.aux_loss is None:
            raise ValueError("router_aux_loss_coef != 0 needs aux_loss (the model's load-balancing loss)")
        if config.router_aux_loss_coef == 0.0 and batch.aux_loss is not None:
            raise ValueError(
                "aux_loss was given but router_aux_loss_coef is 0: DPOTrainer neither adds nor logs it then"
            )
    elif isinstance(config, CPOLossConfig):
        for name in ("ref_chosen_logps", "ref_rejected_logps", "log_sum_sq_probs", "completion_lengths"):
            if getattr(batch, name) is not None:
                raise ValueError(f"{name} has no meaning for CPO (it has no reference model): leave it None")
        if config.router_aux_loss_coef != 0.0 and batch.aux_loss is None:
            raise ValueError("router_aux_loss_coef != 0 needs aux_loss (the model's load-balancing loss)")
    else:
        raise TypeError(f"config must be a DPOLossConfig or a CPOLossConfig, got {type(config).__name__}")
    if batch.aux_loss is not None:
        _check_tensor("aux_loss", batch.aux_loss, ())


def validate_metric_inputs(batch: PreferenceBatch, config) -> None:
    """The statistics TRL's metrics read, present and shaped."""
    shape = tuple(batch.mask.shape)
    if isinstance(config, DPOLossConfig):
        for name in ("entropy", "mean_logits", "is_top1"):
            x = getattr(batch, name)
            if x is None:
                raise ValueError(f"DPO's metrics need {name} ({list(shape)}, see fused_gspo.preference.statistics)")
            _check_tensor(name, x, shape, floating=name != "is_top1")
        if batch.is_top1.dtype != torch.bool:
            raise TypeError(f"is_top1 must be a bool tensor, got {batch.is_top1.dtype}")
    else:
        x = batch.position_mean_logits
        if x is None:
            raise ValueError(
                "CPO's logits/* metrics need position_mean_logits ([2B, P]: the vocabulary mean of the logits at "
                "every position, see fused_gspo.preference.statistics)"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != shape[0] or x.shape[1] < 1:
            raise ValueError(
                f"position_mean_logits must be [{shape[0]}, P] with P >= 1, got {tuple(getattr(x, 'shape', ()))}"
            )
