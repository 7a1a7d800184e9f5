"""Preference losses fused with the LM head: TRL 1.16.0's DPO (every ``loss_type``) and CPO (SimPO, AlphaPO).

The loss math lives here, on per-token log-probs and statistics in TRL's concatenated chosen-then-rejected layout;
:mod:`.statistics` defines the statistics the LM head kernels must produce.
"""

from .batch import PreferenceBatch, PreferenceTerms, validate_batch, validate_logps_and_mask, validate_metric_inputs
from .config import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    CPOLossConfig,
    DPOLossConfig,
    PreferenceLossConfig,
)
from .cpo import cpo_metrics, cpo_objective
from .dpo import dpo_metrics, dpo_objective, reference_logps
from .objectives import (
    evaluate_preference,
    preference_gradient_coupling,
    preference_metric_names,
    preference_metrics,
    preference_objective,
    required_inputs,
)
from .statistics import STATISTICS, position_mean_logits, token_statistics

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "STATISTICS",
    "CPOLossConfig",
    "DPOLossConfig",
    "PreferenceBatch",
    "PreferenceLossConfig",
    "PreferenceTerms",
    "cpo_metrics",
    "cpo_objective",
    "dpo_metrics",
    "dpo_objective",
    "evaluate_preference",
    "position_mean_logits",
    "preference_gradient_coupling",
    "preference_metric_names",
    "preference_metrics",
    "preference_objective",
    "reference_logps",
    "required_inputs",
    "token_statistics",
    "validate_batch",
    "validate_logps_and_mask",
    "validate_metric_inputs",
]
