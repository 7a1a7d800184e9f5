"""The preference-loss configurations: DPO's and CPO's (SimPO, AlphaPO), with TRL 1.16.0's field names and defaults.

Two dataclasses rather than one with a discriminator: the two trainers share few options and give the shared names
different types (``DPOConfig.loss_type`` is a list of losses summed with ``loss_weights``, ``CPOConfig.loss_type`` one
string) and different meanings (``alpha`` is CPO's AlphaPO exponent, DPO has ``ld_alpha`` and
``f_alpha_divergence_coef``). The loss functions tell them apart by type (:data:`PreferenceLossConfig`).

Only the options that enter the loss or its metrics are here. ``router_aux_loss_coef`` is the coefficient the trainer
resolved (TRL reads the model config when ``DPOConfig.router_aux_loss_coef`` is None; ``CPOTrainer`` always reads it
there); the loss adds ``router_aux_loss_coef * aux_loss`` with the ``aux_loss`` the model returned.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
# The losses built on the chosen-rejected score difference: the only ones DPOTrainer lets an f-divergence reshape
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Losses that sort the batch: their gradient couples every pair (see objectives.preference_gradient_coupling)
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")
# WPO weights multiply each loss's per-sequence tensor in place; TRL 1.16 fails on these two (the in-place product
# is refused on sft's scalar expanded to more than one pair, and overwrites the relu output hinge's backward needs),
# so they are refused
WEIGHTING_FAILS_IN_TRL = ("hinge", "sft")

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
# CPO losses whose sequence log-prob is the length-normalized mean rather than the sum
CPO_AVERAGED_LOSS_TYPES = ("ipo", "simpo")


class _Replaceable:
    def replace(self, **overrides):
        """A copy with some fields changed (validated again); unknown names raise ``TypeError``."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class DPOLossConfig(_Replaceable):
    """Configuration of ``DPOTrainer``'s loss (TRL 1.16.0 ``DPOConfig`` names and defaults).

    ``loss_type`` takes a string or a list, as ``DPOConfig`` does, and is stored as a list; ``loss_weights`` defaults
    to 1.0 per loss type (:attr:`weights`). ``f_alpha_divergence_coef`` within 1e-6 of 1 is reverse KL, as in TRL.
    """

    loss_type: str | list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    discopop_tau: float = 0.05
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        elif isinstance(self.loss_type, (list, tuple)):
            self.loss_type = list(self.loss_type)
        if isinstance(self.loss_weights, tuple):
            self.loss_weights = list(self.loss_weights)
        self.validate()

    @property
    def weights(self) -> tuple[float, ...]:
        """The weight of each loss type (``DPOTrainer.loss_weights``)."""
        return tuple(self.loss_weights) if self.loss_weights else (1.0,) * len(self.loss_type)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for every combination TRL rejects or cannot compute."""
        if not isinstance(self.loss_type, list) or not self.loss_type:
            raise ValueError(f"loss_type must be a non-empty string or list of strings, got {self.loss_type!r}")
        for name in self.loss_type:
            if name not in DPO_LOSS_TYPES:
                raise ValueError(f"loss_type must be among {DPO_LOSS_TYPES}, got {name!r}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, list) or len(self.loss_weights) != len(self.loss_type):
                raise ValueError(
                    "loss_weights must have the same length as loss_type when combining multiple losses: got "
                    f"{self.loss_weights!r} for {self.loss_type!r}"
                )
            for w in self.loss_weights:
                _finite("loss_weights", w)
        _finite("beta", self.beta)
        _finite("label_smoothing", self.label_smoothing)
        _finite("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        _finite("discopop_tau", self.discopop_tau)
        _finite("router_aux_loss_coef", self.router_aux_loss_coef)
        if not isinstance(self.use_weighting, bool):
            raise ValueError(f"use_weighting must be a bool, got {self.use_weighting!r}")
        if self.ld_alpha is not None:
            _finite("ld_alpha", self.ld_alpha)
            if not 0.0 <= self.ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must be in [0.0, 1.0] or None, got {self.ld_alpha}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCE_TYPES}, got {self.f_divergence_type!r}")
        types = set(self.loss_type)
        if self.f_divergence_type != "reverse_kl" and not types <= set(F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} is only supported for the loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}, got loss_type={self.loss_type!r}"
            )
        if self.use_weighting and types & set(SORTING_LOSS_TYPES):
            raise ValueError(
                "use_weighting=True is not implemented for loss_type 'aot' or 'aot_unpaired' (they sort the batch, "
                "which would misalign the per-pair weights)"
            )
        if self.use_weighting and types & set(WEIGHTING_FAILS_IN_TRL):
            raise ValueError(
                f"use_weighting=True fails in TRL 1.16 with loss_type {sorted(types & set(WEIGHTING_FAILS_IN_TRL))}: "
                "it multiplies the per-sequence loss in place, which sft's scalar expanded over the pairs refuses "
                "(for any batch of two pairs or more) and which overwrites the relu output hinge's gradient needs"
            )
        if "exo_pair" in types and not 0.0 < self.label_smoothing < 1.0:
            raise ValueError(
                "label_smoothing must be in (0, 1) with loss_type 'exo_pair' (its log(label_smoothing) and "
                f"log(1 - label_smoothing)); the EXO paper recommends 1e-3, got {self.label_smoothing}"
            )
        if "robust" in types and self.label_smoothing == 0.5:
            raise ValueError("label_smoothing=0.5 divides the 'robust' loss by 1 - 2 * label_smoothing = 0")
        if self.beta == 0.0 and types & {"ipo", "sppo_hard"}:
            raise ValueError("beta must be != 0 with loss_type 'ipo' or 'sppo_hard' (they divide by beta)")
        if self.discopop_tau == 0.0 and "discopop" in types:
            raise ValueError("discopop_tau must be != 0 with loss_type 'discopop' (it divides by discopop_tau)")
        if "robust" in types and not 0.0 <= self.label_smoothing < 0.5:
            warnings.warn(
                f"label_smoothing should lie in [0.0, 0.5) for the 'robust' loss, got {self.label_smoothing}",
                stacklevel=3,
            )


@dataclass
class CPOLossConfig(_Replaceable):
    """Configuration of ``CPOTrainer``'s loss (TRL 1.16.0 ``trl.experimental.cpo.CPOConfig`` names and defaults).

    ``loss_type="alphapo"`` is ``CPOConfig``'s shorthand, applied here as there: it becomes ``loss_type="simpo"``
    with ``cpo_alpha=0.0`` (overriding any ``cpo_alpha`` given), and leaves ``alpha`` as given. The AlphaPO reward
    shape comes from ``alpha`` alone (``r = (1 - p^-alpha) / alpha`` with ``p = exp(logp)``, for every loss type when
    ``alpha != 0``), so the paper recipe is ``CPOLossConfig(loss_type="alphapo", alpha=0.25, beta=2.5,
    simpo_gamma=0.1)``; ``loss_type="alphapo"`` with the default ``alpha=0.0`` is SimPO without the NLL term.
    ``simpo_gamma`` only enters ``loss_type="simpo"``; ``label_smoothing`` only ``"sigmoid"`` and ``"simpo"``.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo":  # CPOConfig.__post_init__'s syntactic sugar
            self.loss_type = "simpo"
            self.cpo_alpha = 0.0
        self.validate()

    @property
    def averages_log_probs(self) -> bool:
        """Whether the sequence log-prob is the per-token mean (``get_batch_logps(average_log_prob=True)``)."""
        return self.loss_type in CPO_AVERAGED_LOSS_TYPES

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for every combination TRL rejects or cannot compute."""
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("beta", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha", "router_aux_loss_coef"):
            _finite(name, getattr(self, name))
        if self.beta == 0.0 and self.loss_type in ("ipo", "simpo"):
            raise ValueError(
                f"beta must be != 0 with loss_type={self.loss_type!r} (it divides by beta: "
                f"{'1 / (2 * beta)' if self.loss_type == 'ipo' else 'simpo_gamma / beta'})"
            )
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing > 0:
            warnings.warn(
                f"loss_type={self.loss_type!r} does not support label smoothing: label_smoothing is ignored",
                stacklevel=3,
            )


PreferenceLossConfig = DPOLossConfig | CPOLossConfig


def _finite(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
