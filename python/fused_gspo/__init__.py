"""fused_gspo: GRPO-family policy losses fused with the LM head, without materializing the logits."""

from .api import (
    FusedPolicyLoss,
    FusedPreferenceLoss,
    fused_logprobs,
    fused_policy_loss,
    fused_preference_loss,
    preference_reference_logps,
)
from .backends import BACKENDS
from .config import LEVELS, LOSS_TYPES, PolicyLossConfig
from .plan import Plan, explain
from .policy import PolicyLossOutput

__version__ = "0.1.0"


def patch_trl() -> None:
    """Add ``use_fused_gspo_loss`` to TRL's GRPO/GMPO/RLOO/DPO/CPO configs and trainers (:mod:`fused_gspo.trl`)."""
    from .trl import patch_trl as _patch

    _patch()


def unpatch_trl() -> None:
    """Restore TRL as it was before :func:`patch_trl`."""
    from .trl import unpatch_trl as _unpatch

    _unpatch()


__all__ = [
    "BACKENDS",
    "LEVELS",
    "LOSS_TYPES",
    "FusedPolicyLoss",
    "FusedPreferenceLoss",
    "PolicyLossConfig",
    "Plan",
    "PolicyLossOutput",
    "explain",
    "fused_logprobs",
    "fused_policy_loss",
    "fused_preference_loss",
    "preference_reference_logps",
    "patch_trl",
    "unpatch_trl",
    "__version__",
]
