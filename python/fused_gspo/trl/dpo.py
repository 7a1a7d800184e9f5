"""``use_fused_gspo_loss=True`` on TRL 1.16's DPOTrainer (trl.DPOTrainer): not built yet."""

from __future__ import annotations


def targets() -> list:
    """(owner, attribute, replacement factory) for the TRL attributes this trainer's switch replaces."""
    return []


def config_classes() -> list:
    """The config classes that get the ``use_fused_gspo_loss`` field."""
    return []
