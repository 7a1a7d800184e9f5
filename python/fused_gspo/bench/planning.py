"""The planner's view of the benchmark: ``--explain`` (the plan for the benchmark's shape, objective and layout,
without running anything) and the plan recorded beside each run's measured figures (``runs[i]["plan"]`` in the
JSON), so that predicted and measured stage times can be compared."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import PolicyLossConfig
from ..plan import Plan, explain
from ..plan.devices import DeviceProfile, get_profile, profile_names
from .problem import DTYPES, Shape, default_seq_len, layout_row_lengths
from .report import library_versions
from .settings import Settings


class PlanRefused(ValueError):
    """The planner refuses the options (e.g. ``--workspace-bytes`` below one token's logits row): a usage error."""


def profile_choices() -> list[str]:
    """The names ``--device-profile`` takes (``fused_gspo.plan.devices.profile_names()``, each once)."""
    return list(dict.fromkeys(profile_names()))


def default_profile(device: str) -> str:
    """``--explain``'s profile when none is named: ``"cpu"`` for ``--device cpu``, else the current GPU's
    (``"cuda"``) when there is one, else ``"h100"``."""
    if device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "h100"


def resolve_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; ``ValueError`` with the known names for an unknown one."""
    if name.lower() not in profile_choices():
        raise ValueError(f"unknown device profile {name!r}; choose from {', '.join(profile_choices())}")
    return get_profile(name)  # "cuda" without a GPU raises ValueError too


def run_plans(
    tokens: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    row_lengths: list[int],
    config: PolicyLossConfig,
    modes: list[str],
    device: str | DeviceProfile,
    autocast: torch.dtype | None = None,
) -> dict[str, Plan]:
    """``fused_gspo.explain`` for each mode: ``tokens`` valid tokens in rows of ``row_lengths``, off-policy (the
    benchmark's ``old_logps`` are perturbed), the config's workspace budget, backend ``"auto"``, under ``autocast``."""
    return {
        mode: explain(
            tokens,
            hidden,
            vocab,
            dtype=dtype,
            device=device,
            workspace_bytes=config.workspace_bytes,
            config=config,
            row_lengths=row_lengths,
            mode=mode,
            on_policy=False,
            autocast=autocast,
        )
        for mode in modes
    }


def recorded_plans(
    tokens: int,
    hidden: int,
    vocab: int,
    dtype: torch.dtype,
    row_lengths: list[int],
    config: PolicyLossConfig,
    modes: list[str],
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> dict[str, dict]:
    """What a benchmark run records under ``"plan"``: per mode, ``explain(..., device="cuda")`` on a GPU (the
    ``"cpu"`` profile on CPU) as ``Plan.to_dict(per_chunk=True)``; a mode the planner fails on gets ``{"error": ...}``
    rather than stopping the run."""
    profile = "cuda" if device.type == "cuda" else "cpu"
    out = {}
    for mode in modes:
        try:
            plan = run_plans(tokens, hidden, vocab, dtype, row_lengths, config, [mode], profile, autocast)[mode]
            out[mode] = plan.to_dict(per_chunk=True)
        except Exception as exc:  # noqa: BLE001  (the measured figures matter more than the prediction)
            out[mode] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def run_explain(settings: Settings, command: list[str], json_path: str | None) -> int:
    """``fused-gspo-bench --explain``: print the planner's table for each token count and mode, run nothing."""
    profile = settings.device_profile
    dtype = DTYPES[settings.dtype_name]
    shape_text = f"H={settings.hidden}, V={settings.vocab}, {settings.dtype_name}"
    autocast = None
    if settings.autocast is not None:
        shape_text += f" under torch.autocast({settings.autocast})"
        autocast = DTYPES[settings.autocast]
    planned = []  # every plan first: a refused option is a usage error, not a traceback after half the output
    for tokens in settings.token_counts:
        seq_len = settings.seq_len or default_seq_len(tokens)
        shape = Shape(tokens, settings.hidden, settings.vocab, seq_len, dtype)
        lengths, exact = layout_row_lengths(shape, settings.seed, settings.valid_frac)
        try:
            plans = run_plans(
                sum(lengths), settings.hidden, settings.vocab, dtype, lengths, settings.config, settings.modes, profile,
                autocast,
            )  # fmt: skip
        except ValueError as exc:
            raise PlanRefused(str(exc)) from exc
        planned.append((tokens, seq_len, shape, lengths, exact, plans))
    print(f"fused-gspo-bench --explain: the plan fused_policy_loss makes on device profile {profile!r}; nothing is run")
    runs = []
    for tokens, seq_len, shape, lengths, exact, plans in planned:
        valid = sum(lengths)
        layout = f"N={tokens} tokens (B={shape.batch} x T={seq_len}, {valid} valid)"
        print(f"\n{layout}, {shape_text} | {settings.objective()}")
        if not exact:
            print(
                f"(--valid-frac {settings.valid_frac}: the drawn lengths are not replayed at this size; "
                "the plans take full rows, an upper bound)"
            )
        for plan in plans.values():
            print(f"\n{plan}")
        runs.append(
            {
                "tokens": tokens,
                "batch": shape.batch,
                "seq_len": seq_len,
                "valid_tokens": valid,
                "row_lengths": lengths,
                "row_lengths_exact": exact,
                "plan": {mode: plan.to_dict(per_chunk=True) for mode, plan in plans.items()},
            }
        )
    if json_path:
        config = asdict(settings)
        config.update(device=str(settings.device), loss=config.pop("config"))
        report = {
            "command": shlex.join(command),
            "argv": command,
            "explain": True,
            "device_profile": profile,
            "versions": library_versions(),
            "config": config,
            "runs": runs,
        }
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {json_path}")
    return 0
