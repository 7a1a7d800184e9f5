"""fused_gspo: GRPO-family policy losses fused with the LM head, without materializing the logits."""

from .api import BACKENDS, FusedPolicyLoss, PolicyLossOutput, fused_logprobs, fused_policy_loss
from .config import LEVELS, LOSS_TYPES, PolicyLossConfig

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LEVELS",
    "LOSS_TYPES",
    "FusedPolicyLoss",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "fused_logprobs",
    "fused_policy_loss",
    "__version__",
]
