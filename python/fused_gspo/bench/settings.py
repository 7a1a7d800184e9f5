"""What one benchmark run is asked to do: :class:`Settings`, resolved from the command line by :mod:`.cli` and read
by the benchmark loop and the planner's view (:mod:`.planning`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PolicyLossConfig
from .preference_problem import PreferenceObjective, head_options_text


@dataclass
class Settings:
    """Everything a run needs, with the device-dependent defaults filled in."""

    device: torch.device
    model: str | None
    token_counts: list[int]
    hidden: int
    vocab: int
    seq_len: int | None  # None: default_seq_len(tokens)
    dtype_name: str
    valid_frac: float
    contenders: list[str]
    modes: list[str]
    repeats: int
    warmup: int
    seed: int
    config: PolicyLossConfig | PreferenceObjective  # what each contender is given
    explain: bool = False
    device_profile: str | None = None  # --explain's profile (a name fused_gspo.explain takes)
    family: str = "policy"  # --objective: policy, dpo or cpo
    autocast: str | None = None  # --autocast: a DTYPES name; every contender runs under torch.autocast in it

    def objective(self) -> str:
        cfg = self.config
        if isinstance(cfg, PreferenceObjective):
            return cfg.describe()
        text = f"loss_type={cfg.loss_type} level={cfg.importance_sampling_level} beta={cfg.beta} "
        text += f"epsilon={cfg.epsilon}/{cfg.effective_epsilon_high}"
        if cfg.temperature != 1.0:
            text += f" temperature={cfg.temperature}"
        return text + head_options_text(cfg.final_logit_softcapping, cfg.workspace_bytes)
