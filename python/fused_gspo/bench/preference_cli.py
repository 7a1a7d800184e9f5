"""The command line of the preference objectives: ``--objective``, the DPO and CPO options, and their checks.

Options of one family given with another exit with status 2 (rather than being silently ignored), as do
``--explain`` with a preference objective (the planner has no preference entry point) and ``--modes logprobs`` with
CPO (it has no reference model, so no reference pass).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..preference import CPO_LOSS_TYPES, DPO_LOSS_TYPES, F_DIVERGENCE_TYPES, CPOLossConfig, DPOLossConfig
from .preference_problem import PREFERENCE_FAMILIES, PreferenceObjective

OBJECTIVES = ("policy", *PREFERENCE_FAMILIES)
# option (as typed) -> argparse dest, by the objectives it applies to
POLICY_ONLY = {"--loss-type": "loss_type", "--level": "level", "--epsilon": "epsilon",
               "--epsilon-high": "epsilon_high", "--temperature": "temperature"}  # fmt: skip
DPO_ONLY = {"--dpo-loss-type": "dpo_loss_type", "--loss-weights": "loss_weights", "--ld-alpha": "ld_alpha",
            "--use-weighting": "use_weighting", "--f-divergence-type": "f_divergence_type",
            "--f-alpha-divergence-coef": "f_alpha_divergence_coef", "--discopop-tau": "discopop_tau"}  # fmt: skip
CPO_ONLY = {"--cpo-loss-type": "cpo_loss_type", "--cpo-alpha": "cpo_alpha", "--simpo-gamma": "simpo_gamma",
            "--alpha": "alpha"}  # fmt: skip
PREFERENCE_ONLY = {"--label-smoothing": "label_smoothing"}
EXPLAIN_POLICY_ONLY = (
    "--explain covers the policy objectives only: the planner (fused_gspo.explain) has no entry point for the "
    "preference losses (their pair-by-pair chunking, DPO's forced two phases for the metrics' statistics and CPO's "
    "per-position mean logits are not in its model), and printing a policy plan for them would be wrong"
)


def _loss_types(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in DPO_LOSS_TYPES]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown DPO loss type {', '.join(bad) or text!r}; choose from {', '.join(DPO_LOSS_TYPES)}"
        )
    return items


def _floats(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def add_preference_arguments(parser: argparse.ArgumentParser) -> None:
    """``--objective`` and the DPO / CPO option groups."""
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="policy",
        help="the objective family: policy (GRPO-family, the default), dpo (DPOTrainer's loss) or cpo "
        "(CPOTrainer's: CPO, SimPO, AlphaPO); for dpo/cpo --tokens counts the 2B rows (B pairs: chosen rows, then "
        "rejected rows)",
    )
    dpo = parser.add_argument_group("DPO (--objective dpo; TRL 1.16 DPOConfig names and defaults)")
    dpo.add_argument(
        "--dpo-loss-type",
        type=_loss_types,
        metavar="TYPE[,TYPE...]",
        help=f"loss_type, a comma list summed with --loss-weights (default sigmoid): {', '.join(DPO_LOSS_TYPES)}",
    )
    dpo.add_argument("--loss-weights", type=_floats, metavar="W[,W...]", help="one weight per loss type")
    dpo.add_argument("--ld-alpha", type=float, help="LD-DPO's weight of the longer completion's tail, in [0, 1]")
    dpo.add_argument("--use-weighting", action="store_true", default=None, help="WPO weights (needs log sum p^2)")
    dpo.add_argument("--f-divergence-type", choices=F_DIVERGENCE_TYPES, help="default reverse_kl")
    dpo.add_argument("--f-alpha-divergence-coef", type=float, help="alpha of the alpha divergence (default 0.5)")
    dpo.add_argument("--discopop-tau", type=float, help="loss_type discopop's tau (default 0.05)")
    cpo = parser.add_argument_group("CPO (--objective cpo; TRL 1.16 CPOConfig names and defaults)")
    cpo.add_argument(
        "--cpo-loss-type",
        choices=CPO_LOSS_TYPES,
        help="default sigmoid; alphapo is CPOConfig's shorthand for simpo with cpo_alpha=0",
    )
    cpo.add_argument("--cpo-alpha", type=float, help="weight of the chosen rows' NLL term (default 1.0)")
    cpo.add_argument("--simpo-gamma", type=float, help="SimPO's target reward margin (default 0.5)")
    cpo.add_argument("--alpha", type=float, help="AlphaPO's reward exponent (default 0: plain log-probs)")
    both = parser.add_argument_group("DPO and CPO")
    both.add_argument("--label-smoothing", type=float, help="default 0 (--beta: default 0.1 for dpo and cpo)")


def check_family_options(args: argparse.Namespace, error: Callable[[str], None]) -> None:
    """Exit (``error``, status 2) on an option that does not apply to ``--objective``."""
    family = args.objective
    groups = (
        (POLICY_ONLY, ("policy",)),
        (DPO_ONLY, ("dpo",)),
        (CPO_ONLY, ("cpo",)),
        (PREFERENCE_ONLY, PREFERENCE_FAMILIES),
    )
    for options, families in groups:
        if family in families:
            continue
        given = [flag for flag, dest in options.items() if getattr(args, dest) is not None]
        if given:
            where = "--objective " + " or ".join(families)
            error(f"{', '.join(given)}: only with {where} (this run is --objective {family})")
    if family != "policy" and args.explain:
        error(EXPLAIN_POLICY_ONLY)


def resolve_preference(
    args: argparse.Namespace, softcap: float | None, error: Callable[[str], None]
) -> PreferenceObjective:
    """The :class:`PreferenceObjective` of ``--objective dpo|cpo`` and its options (TRL's defaults for the rest);
    what the configs reject exits with status 2."""
    options = {"beta": args.beta, "label_smoothing": args.label_smoothing}
    if args.objective == "dpo":
        options.update(
            loss_type=args.dpo_loss_type,
            loss_weights=args.loss_weights,
            ld_alpha=args.ld_alpha,
            use_weighting=args.use_weighting,
            f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef,
            discopop_tau=args.discopop_tau,
        )
        make = DPOLossConfig
    else:
        options.update(
            loss_type=args.cpo_loss_type, cpo_alpha=args.cpo_alpha, simpo_gamma=args.simpo_gamma, alpha=args.alpha
        )
        make = CPOLossConfig
    try:
        config = make(**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        error(f"--objective {args.objective}: {exc}")
    return PreferenceObjective(config, final_logit_softcapping=softcap, workspace_bytes=args.workspace_bytes)
