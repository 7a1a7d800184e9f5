"""The command line: argument parsing, resolving it into :class:`~.settings.Settings`, the benchmark loop and
``main``."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import LEVELS, LOSS_TYPES, PolicyLossConfig
from .contenders import CONTENDERS, GemmFloor, build_contenders
from .measure import Result, measure, memory_probe, summarize
from .planning import PlanRefused, default_profile, profile_choices, recorded_plans, resolve_profile, run_explain
from .preference_cli import add_preference_arguments, check_family_options, resolve_preference
from .preference_contenders import PREFERENCE_CONTENDERS, build_preference_contenders
from .preference_problem import (
    compute_preference_reference,
    make_preference_inputs,
    preference_seq_len,
)
from .problem import (
    CPU_DEFAULTS,
    DTYPES,
    GPU_DEFAULTS,
    MODELS,
    MODES,
    Shape,
    compute_reference,
    default_seq_len,
    make_inputs,
)
from .report import Progress, device_info, format_notes, format_table, library_versions, write_plot
from .settings import Settings

# PolicyLossConfig's fields -> the options that set them, so that a config error names the option the user typed
CONFIG_FLAGS = {
    "loss_type": "--loss-type",
    "importance_sampling_level": "--level",
    "beta": "--beta",
    "epsilon": "--epsilon",
    "epsilon_high": "--epsilon-high",
    "temperature": "--temperature",
    "final_logit_softcapping": "--softcap",
    "workspace_bytes": "--workspace-bytes",
}


def _config_error(message: str) -> str:
    """A config's error prefixed with the options whose fields it names (``--softcap: final_logit_softcapping ...``)."""
    flags = [flag for name, flag in CONFIG_FLAGS.items() if re.search(rf"\b{name}\b", message)]
    return f"{', '.join(flags)}: {message}" if flags else message


def _csv(kind: str, allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad) or text!r}; choose from {allowed}")
        return list(dict.fromkeys(items))

    return parse


def _token_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return values


def _workspace(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number of bytes, got {text!r}")
    return value


def default_level(loss_type: str | None) -> str:
    """The importance-sampling level a run takes without ``--level``.

    No ``--loss-type`` means the benchmark's headline objective, GSPO (``grpo`` at sequence level). A named loss type
    means that objective as TRL's ``GRPOConfig`` sets it up, at its default token level: ``--loss-type dapo`` is DAPO,
    not a sequence-level variant TRL warns about. LUSPO is defined at sequence level.
    """
    if loss_type is None or loss_type == "luspo":
        return "sequence"
    return "token"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fused-gspo-bench",
        description="Time forward, forward+backward and the no-grad log-prob pass of a GRPO-family loss (or, with "
        "--objective dpo|cpo, a preference loss) through the LM head, and its peak memory, for fused_gspo's "
        "backends, TRL, Liger, PyTorch's linear_cross_entropy (policy only) and the bare GEMMs. With --explain, print "
        "the planner's plan instead and run nothing (policy objectives only).",
        epilog="Defaults: on a GPU the qwen3-8b head (H=4096, V=151936) at 8192 tokens in bf16; on CPU "
        f"{CPU_DEFAULTS['tokens']} tokens, H={CPU_DEFAULTS['hidden']}, V={CPU_DEFAULTS['vocab']}, fp32 (--explain: "
        "the GPU defaults on a GPU profile). Without --loss-type the objective is GSPO (loss_type=grpo, "
        "level=sequence); a named --loss-type takes GRPOConfig's default level, token (luspo: sequence, as its paper "
        "and TRL pair it); "
        "--objective dpo / cpo take TRL 1.16's DPOConfig / CPOConfig defaults.",
    )
    add_preference_arguments(parser)
    shape = parser.add_argument_group("shape")
    shape.add_argument("--model", choices=sorted(MODELS), help="take H, V (and softcapping) from a model's LM head")
    shape.add_argument("--tokens", type=int, help="N, tokens per micro-batch (B * T; dpo/cpo: 2B * T)")
    shape.add_argument("--hidden", type=int, help="H, hidden size (overrides --model)")
    shape.add_argument("--vocab", type=int, help="V, vocabulary size (overrides --model)")
    shape.add_argument(
        "--seq-len",
        type=int,
        help="T, tokens per sequence; B = tokens / T (default min(512, N/4), lower for dpo/cpo if that leaves an "
        "odd number of rows)",
    )
    shape.add_argument(
        "--valid-frac", type=float, default=1.0, help="sequence lengths drawn in [frac*T, T] (default 1: no padding)"
    )
    shape.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default bf16 on GPU, fp32 on CPU)")
    shape.add_argument(
        "--autocast",
        choices=("bf16", "fp16"),
        help="run every contender under torch.autocast(device, dtype) with --dtype fp32 inputs: fp32 master weights, "
        "16-bit GEMMs (the floor: the bare GEMMs in that dtype); policy objectives only",
    )
    shape.add_argument("--sweep-tokens", type=_token_list, help="comma list of token counts to run in turn")
    obj = parser.add_argument_group("objective (policy: --objective policy, the default)")
    obj.add_argument("--loss-type", choices=LOSS_TYPES, help="default grpo, at sequence level: GSPO")
    obj.add_argument(
        "--level",
        choices=LEVELS,
        help="importance_sampling_level (default: sequence without --loss-type or with luspo, else token as in "
        "GRPOConfig; gmpo and rloo take token only, their ratios have no level)",
    )
    obj.add_argument(
        "--beta",
        type=float,
        help="policy: the KL coefficient (default 0; needs ref log-probs, drawn at random); dpo/cpo: beta "
        "(default 0.1)",
    )
    obj.add_argument("--epsilon", type=float, help=f"default {PolicyLossConfig.epsilon}")
    obj.add_argument("--epsilon-high", type=float, default=None)
    obj.add_argument("--temperature", type=float, help="default 1 (dpo/cpo score at temperature 1, as TRL does)")
    obj.add_argument("--softcap", type=float, default=None, help="final_logit_softcapping (default: the model's)")
    obj.add_argument(
        "--workspace-bytes",
        type=_workspace,
        default="auto",
        metavar="BYTES|auto",
        help="the chunked backends' workspace budget (PolicyLossConfig.workspace_bytes; dpo/cpo: "
        "fused_preference_loss's workspace_bytes) for every fused contender and for the plans (default auto)",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--contenders",
        type=_csv("contender", CONTENDERS),
        help=f"policy: {','.join(CONTENDERS)}; dpo/cpo: {','.join(PREFERENCE_CONTENDERS)} (default: all of them)",
    )
    run.add_argument(
        "--modes",
        type=_csv("mode", MODES),
        help=f"{','.join(MODES)} (default all; cpo: fwd,fwd_bwd, as it has no reference pass)",
    )
    run.add_argument("--repeats", type=int, help="timed runs per figure (default 20 on GPU, 5 on CPU)")
    run.add_argument("--warmup", type=int, help="untimed runs first, after the check run (default 3 GPU, 1 CPU)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", metavar="PATH", help="write every figure, the config and the environment as JSON")
    run.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory per contender (needs matplotlib)")
    plan = parser.add_argument_group("plan")
    plan.add_argument(
        "--explain",
        action="store_true",
        help="print the planner's table (fused_gspo.explain) for the shape, objective and --modes; run nothing "
        "(--json PATH: the plans as JSON; --plot, which draws measured figures, is refused)",
    )
    plan.add_argument(
        "--device-profile",
        metavar="NAME",
        help="--explain's device profile (default: the current GPU's, 'cuda', when there is one, else 'h100'; "
        f"'cpu' with --device cpu): {', '.join(profile_choices())}",
    )
    return parser


def resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Fill the device-dependent defaults and validate what argparse cannot (errors exit through the parser)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    check_family_options(args, parser.error)
    family = args.objective
    if args.autocast is not None and (family != "policy" or args.dtype != "fp32"):
        parser.error("--autocast needs --dtype fp32 (fp32 master weights) and a policy objective")
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    profile_name = None
    if args.explain:
        profile_name = args.device_profile or default_profile(args.device)
        try:
            profile = resolve_profile(profile_name)
        except ValueError as exc:
            parser.error(f"--device-profile: {exc}")
        gpu_defaults = profile.is_gpu
        if args.plot is not None:  # a requested file that would silently not be written
            parser.error("--plot draws measured time and memory, and --explain measures nothing; --json PATH writes "
                         "its plans")  # fmt: skip
    elif args.device_profile is not None:
        parser.error("--device-profile only applies with --explain (a run records the plan of its own device)")
    else:
        gpu_defaults = on_gpu
    defaults = GPU_DEFAULTS if gpu_defaults else CPU_DEFAULTS
    model_name = args.model or defaults.get("model")
    model = MODELS.get(model_name) if model_name else None
    # `is None`, not `or`: an explicit 0 must reach the checks below, not fall back to a default
    hidden = args.hidden if args.hidden is not None else (model.hidden if model else defaults["hidden"])
    vocab = args.vocab if args.vocab is not None else (model.vocab if model else defaults["vocab"])
    softcap = args.softcap if args.softcap is not None else (model.softcap if model else None)
    token_counts = args.sweep_tokens or [args.tokens if args.tokens is not None else defaults["tokens"]]
    repeats = defaults["repeats"] if args.repeats is None else args.repeats
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    for name, value in (
        ("--hidden", hidden),
        ("--vocab", vocab),
        ("--repeats", repeats),
        ("--tokens", token_counts[0]),
    ):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        parser.error(f"--warmup must be >= 0, got {warmup}")
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        parser.error(f"--softcap must be a finite number > 0, got {args.softcap}")
    if not 0.0 < args.valid_frac <= 1.0:
        parser.error(f"--valid-frac must be in (0, 1], got {args.valid_frac}")
    if args.seq_len is not None:
        if args.seq_len < 1:
            parser.error(f"--seq-len must be >= 1, got {args.seq_len}")
        bad = [n for n in token_counts if n % args.seq_len]
        if bad:
            parser.error(f"--seq-len {args.seq_len} must divide the token count(s) {bad}")
    if family != "policy":
        if args.seq_len is not None:
            odd = [n for n in token_counts if (n // args.seq_len) % 2]
            if odd:
                parser.error(f"--seq-len {args.seq_len}: token count(s) {odd} give an odd number of rows (dpo/cpo: 2B)")
        odd = [n for n in token_counts if preference_seq_len(n) is None]
        if odd:
            parser.error(f"--tokens {odd}: dpo/cpo need an even token count (2B rows of T tokens)")
    contenders = args.contenders or list(CONTENDERS if family == "policy" else PREFERENCE_CONTENDERS)
    if family != "policy":
        bad = [name for name in contenders if name not in PREFERENCE_CONTENDERS]
        if bad:
            parser.error(
                f"--contenders {','.join(bad)}: not a contender for --objective {family}; choose from "
                f"{','.join(PREFERENCE_CONTENDERS)}"
            )
    modes = args.modes or [m for m in MODES if family != "cpo" or m != "logprobs"]
    if family == "cpo" and "logprobs" in modes:
        parser.error("--modes logprobs: CPO has no reference model, so no reference pass (logprobs is dpo/policy)")
    if family != "policy":
        config = resolve_preference(args, softcap, parser.error)
    else:
        loss_type = args.loss_type or "grpo"
        try:
            config = PolicyLossConfig(
                loss_type=loss_type,
                importance_sampling_level=args.level or default_level(args.loss_type),
                beta=0.0 if args.beta is None else args.beta,
                epsilon=PolicyLossConfig.epsilon if args.epsilon is None else args.epsilon,
                epsilon_high=args.epsilon_high,
                temperature=1.0 if args.temperature is None else args.temperature,
                final_logit_softcapping=softcap,
                workspace_bytes=args.workspace_bytes,
            )
        except ValueError as exc:
            parser.error(_config_error(str(exc)))
    return Settings(
        device=torch.device("cuda" if on_gpu else "cpu"),
        model=model_name,
        token_counts=token_counts,
        hidden=hidden,
        vocab=vocab,
        seq_len=args.seq_len,
        dtype_name=args.dtype or defaults["dtype"],
        valid_frac=args.valid_frac,
        contenders=contenders,
        modes=modes,
        repeats=repeats,
        warmup=warmup,
        seed=args.seed,
        config=config,
        explain=args.explain,
        device_profile=profile_name,
        family=family,
        autocast=args.autocast,
    )


# What a preference run records instead of the planner's prediction
PREFERENCE_PLAN_NOTE = (
    "not recorded: the planner (fused_gspo.explain) has no entry point for the preference losses (fused_gspo-bench "
    "--explain covers the policy objectives only)"
)


def run_benchmark(settings: Settings) -> tuple[list[dict], str]:
    """Run every contender in every mode at each token count: one dict per token count, and the memory method.

    The objects alive before it (modules, the interpreter's and a test runner's state) are frozen out of the
    garbage collector meanwhile (``gc.freeze``): the ``gc.collect()`` before each memory probe and after each
    measurement then walks only what the run allocated, in milliseconds rather than a quarter of a second once TRL
    and transformers are imported."""
    gc.collect()
    gc.freeze()
    try:
        return _run_benchmark(settings)
    finally:
        gc.unfreeze()


def _run_benchmark(settings: Settings) -> tuple[list[dict], str]:
    preference = settings.family != "policy"
    if preference:
        contenders = build_preference_contenders(settings.contenders)
        seq_len_of, make, reference = preference_seq_len, make_preference_inputs, compute_preference_reference
    else:
        contenders = build_contenders(settings.contenders)
        seq_len_of, make, reference = default_seq_len, make_inputs, compute_reference
    memory = memory_probe(settings.device)
    progress = Progress(len(settings.token_counts) * len(contenders) * len(settings.modes))
    runs = []
    for tokens in settings.token_counts:
        seq_len = settings.seq_len or seq_len_of(tokens)
        shape = Shape(tokens, settings.hidden, settings.vocab, seq_len, DTYPES[settings.dtype_name])
        progress.show(f"N={tokens}: inputs and reference")
        inputs = make(shape, settings.config, settings.device, settings.seed, settings.valid_frac)
        if settings.autocast is not None:
            inputs.autocast = DTYPES[settings.autocast]
        ref = reference(inputs, settings.config)
        results = []
        for contender in contenders:
            reason = contender.prepare(inputs, settings.config)
            for mode in settings.modes:
                progress.step(f"N={tokens}: {contender.name} {mode}")
                if reason:
                    results.append(Result(contender.name, mode, reason))
                    continue
                check_ref = None if isinstance(contender, GemmFloor) else ref
                args = (settings.config, check_ref, settings.repeats, settings.warmup, memory)
                results.append(measure(contender, mode, inputs, *args))
        summarize(results, inputs)
        lengths = inputs.row_lengths
        tensors = inputs.tensors() if preference else (inputs.hidden, inputs.weight)
        run = {
            "tokens": tokens,
            "batch": shape.batch,
            "seq_len": seq_len,
            "valid_tokens": inputs.valid_tokens,
            "inputs_mib": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
            "reference": ref.kind,
            "contenders": {c.name: c.description for c in contenders},
            "notes": {c.name: c.note for c in contenders if c.note},
            "results": results,
            "row_lengths": lengths,
        }
        if preference:
            run.update(pairs=shape.batch // 2, plan=None, plan_note=PREFERENCE_PLAN_NOTE)
        else:
            run["plan"] = recorded_plans(
                inputs.valid_tokens,
                shape.hidden,
                shape.vocab,
                shape.dtype,
                lengths,
                settings.config,
                settings.modes,
                settings.device,
                autocast=inputs.autocast,
            )
        runs.append(run)
        del inputs, ref
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    return runs, memory.method


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fused-gspo-bench``; returns the exit status (argument errors exit with status 2)."""
    parser = build_parser()
    command = ["fused-gspo-bench", *(sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(command[1:])
    settings = resolve_settings(args, parser)
    if settings.explain:
        try:
            return run_explain(settings, command, args.json)
        except PlanRefused as exc:  # the options the user gave admit no plan (a budget under one token's row)
            parser.error(f"--explain: {exc}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            f"warning: --plot needs matplotlib, which is not installed: {args.plot} will not be written",
            file=sys.stderr,
        )
    torch.manual_seed(settings.seed)

    runs, memory_method = run_benchmark(settings)

    device = device_info(settings.device)
    timer = "CUDA events, synchronize before each run" if settings.device.type == "cuda" else "time.perf_counter"
    shape = f"H={settings.hidden}, V={settings.vocab}, {settings.dtype_name}"
    if settings.autocast is not None:
        shape += f" under torch.autocast({settings.autocast})"
    for run in runs:
        if "pairs" in run:
            rows = f"2B={run['batch']} rows x T={run['seq_len']}: {run['pairs']} pairs"
        else:
            rows = f"B={run['batch']} x T={run['seq_len']}"
        tokens = f"N={run['tokens']} tokens ({rows}, {run['valid_tokens']} valid)"
        print(f"\n{device['name']} ({settings.device.type}) | {tokens}, {shape} | {settings.objective()}")
        print(f"time: {timer}, median of {settings.repeats} runs after {settings.warmup} warm-up")
        print(f"memory: {memory_method}")
        print(f"check: ||out - ref|| / ||ref|| against {run['reference']}")
        print(format_table(run["results"]))
        notes = format_notes(run["notes"], run["results"])
        if notes:
            print(notes)

    json_runs = [{**run, "results": [r.to_json() for r in run["results"]]} for run in runs]
    if args.json:
        config = asdict(settings)
        config.update(device=str(settings.device), loss=config.pop("config"))
        if settings.family != "policy":  # the loss config, and the head options beside it
            config.update(loss=config["loss"].pop("loss"), head=config["loss"])
        report = {
            "command": shlex.join(command),
            "argv": command,
            "device": device,
            "versions": library_versions(),
            "timer": timer,
            "memory_method": memory_method,
            "config": config,
            "runs": json_runs,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    if args.plot:
        title = f"{device['name']} | {shape} | {settings.objective()}"
        print(write_plot(args.plot, json_runs, settings.modes, title), file=sys.stderr)
    return 0
