"""The TRL adapter: ``patch_trl()`` adds ``use_fused_gspo_loss`` to TRL's trainers; GFPO on top of GRPO."""

from .config_field import FLAG
from .gfpo import GFPOConfig, GFPOTrainer
from .patch import is_patched, patch_trl, policy_config_for, unpatch_trl

__all__ = ["FLAG", "GFPOConfig", "GFPOTrainer", "is_patched", "patch_trl", "policy_config_for", "unpatch_trl"]
