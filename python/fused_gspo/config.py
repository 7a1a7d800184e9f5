"""The loss configuration: which GRPO-family objective, with which options.

Field names and defaults follow TRL 1.16.0's ``GRPOConfig`` wherever TRL has the field, so a trainer's arguments map
onto this dataclass one to one. ``loss_type="gmpo"`` is ``GMPOTrainer``'s objective (``epsilon`` in log space) and
``loss_type="rloo"`` is ``RLOOTrainer``'s; ``importance_sampling_level="sequence_token"`` is GSPO-token.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass

from .precision import normalize_logits_dtype

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo", "gmpo", "rloo")
LEVELS = ("token", "sequence", "sequence_token")
# Loss types whose aggregation is TRL's "clipped surrogate" family (they log clip_ratio/*)
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass
class PolicyLossConfig:
    """Configuration of a GRPO-family policy loss.

    The head options (``temperature``, ``logit_scale``, ``final_logit_softcapping``) are applied to the projection
    ``hidden @ weight.T + bias`` in TRL's order: scale, then softcap, then divide by the temperature.
    ``gradient_accumulation_steps``, ``steps_per_generation`` and ``num_processes`` only enter TRL's normalizers; the
    defaults (1, same as accumulation, 1) give the loss of one process, one micro-batch.
    ``workspace_bytes`` bounds the chunked backends' scratch memory (the logits of one chunk of tokens): an int, or
    ``"auto"`` (512 MiB on CPU; on a GPU what the cost model finds worth having within a share of the free memory,
    see ``docs/design.md``, "The default budget"). An explicit budget is always obeyed.
    ``logits_dtype``: how each chunk's logits are staged. ``"auto"``: in the GEMMs' dtype when it is 16-bit (bf16/fp16
    inputs, or under ``torch.autocast``), as TRL stages them; ``"float32"`` (``torch.float32`` is accepted): in fp32,
    for more precision than TRL keeps (:mod:`fused_gspo.precision`).
    """

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    beta: float = 0.0
    temperature: float = 1.0
    use_bias_correction_kl: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    max_completion_length: int | None = 512
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    num_processes: int = 1
    workspace_bytes: int | str = "auto"
    logits_dtype: str = "auto"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NumPy scalars as the Python numbers they hold (see plain_number)
            setattr(self, f.name, plain_number(getattr(self, f.name)))
        self.logits_dtype = normalize_logits_dtype(self.logits_dtype)
        self.validate()

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def effective_steps_per_generation(self) -> int:
        return self.gradient_accumulation_steps if self.steps_per_generation is None else self.steps_per_generation

    def replace(self, **overrides) -> PolicyLossConfig:
        """A copy with some fields changed (validated again); unknown names raise ``TypeError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown PolicyLossConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for every combination TRL rejects or a backend cannot honour."""
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {LEVELS}, got {self.importance_sampling_level!r}"
            )
        _finite("epsilon", self.epsilon, positive=True)
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high, positive=True)
        if self.delta is not None:
            _finite("delta", self.delta, positive=True)
        _finite("beta", self.beta)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        _finite("temperature", self.temperature, positive=True)
        _finite("logit_scale", self.logit_scale)
        if self.final_logit_softcapping is not None:
            _finite("final_logit_softcapping", self.final_logit_softcapping, positive=True)
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            _finite(name, getattr(self, name), positive=True)
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _finite(name, getattr(self, name))
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 or None, got {self.max_completion_length}")
        if not (0.0 < self.top_entropy_quantile <= 1.0):
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if self.off_policy_mask_threshold is not None:
            _finite("off_policy_mask_threshold", self.off_policy_mask_threshold)
        _finite("entropy_coef", self.entropy_coef)
        for name in ("gradient_accumulation_steps", "num_processes"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps_per_generation is not None and (
            int(self.steps_per_generation) != self.steps_per_generation or self.steps_per_generation < 1
        ):
            raise ValueError(
                f"steps_per_generation must be a positive integer or None, got {self.steps_per_generation!r}"
            )
        validate_workspace_bytes(self.workspace_bytes)
        normalize_logits_dtype(self.logits_dtype)

        # Objectives whose trainers (GMPOTrainer, RLOOTrainer) do not implement an option: refuse rather than ignore.
        if self.loss_type == "gmpo":
            self._refuse_for("gmpo", delta=None, off_policy_mask_threshold=None, entropy_coef=0.0)
            if self.importance_sampling_level != "token":
                raise ValueError(
                    "importance_sampling_level has no effect with loss_type='gmpo' (its geometric mean is already "
                    "sequence-level); leave it at 'token'"
                )
        if self.loss_type == "rloo":
            self._refuse_for(
                "rloo", delta=None, off_policy_mask_threshold=None, entropy_coef=0.0, beta=0.0, top_entropy_quantile=1.0
            )
            if self.importance_sampling_level != "token":
                raise ValueError(
                    "importance_sampling_level has no effect with loss_type='rloo' (its ratio is over the sequence "
                    "sum); leave it at 'token'"
                )
        self._warn_like_trl()

    def _warn_like_trl(self) -> None:
        # TRL warns (and trains anyway) on these; the seed recipes use some of them (Unsloth: sequence + dr_grpo).
        level, loss_type = self.importance_sampling_level, self.loss_type
        if loss_type == "luspo" and level != "sequence":
            warnings.warn("loss_type='luspo' mirrors its paper with importance_sampling_level='sequence'", stacklevel=3)
        if loss_type == "vespo" and level != "token":
            warnings.warn(
                "loss_type='vespo' computes sequence-level weights itself; importance_sampling_level should be 'token'",
                stacklevel=3,
            )
        if level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            warnings.warn(
                f"with importance_sampling_level='sequence', loss_type={loss_type!r} sums per-token terms and so "
                "weights each sequence by its length; the GSPO paper uses loss_type='grpo'",
                stacklevel=3,
            )

    def _refuse_for(self, loss_type: str, **defaults) -> None:
        for name, default in defaults.items():
            if getattr(self, name) != default:
                why = " (RLOO puts the KL penalty in the reward)" if name == "beta" else ""
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported with loss_type={loss_type!r}: its TRL trainer "
                    f"does not apply it{why}"
                )


def validate_workspace_bytes(value) -> None:
    """``"auto"`` or a positive integer number of bytes."""
    if isinstance(value, str) and value == "auto":  # tested as a string first: a symbolic int cannot meet one
        return
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"workspace_bytes must be 'auto' or a positive integer, got {value!r}")


def plain_number(value):
    """A NumPy scalar (``np.int64``, ``np.float64``, ``np.bool_``, ...) as the Python value it holds, anything else
    as it is. ``torch.compile`` traces a NumPy scalar as an array: a config holding one failed to compile (its checks
    and the custom operator's arguments need Python numbers), though eager mode took it."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _finite(name: str, value, positive: bool = False) -> None:
    # comparisons, not math.isfinite: under torch.compile the value may be symbolic, which they accept (as guards)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
