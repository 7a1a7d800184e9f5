"""A real trainer on a GPU: TRL's ``GRPOTrainer`` on a Qwen3-architecture model, ``use_fused_gspo_loss`` off vs on.

    python bench/gpu_trainer.py --json $OUT/trainer.json            # H100/H200: about a minute
    python bench/gpu_trainer.py --tiny --device cpu --json t.json   # the same code at a toy size, on CPU (seconds)

The model is built from a config (no download): Qwen3-8B's hidden size (4096), MLP width (12288), heads (32, 8 of
them key/value, 128 wide) and vocabulary (151936), 2 decoder layers, untied head, random init, bf16, with TRL's
``GRPOConfig`` defaults that matter here (``bf16=True``, gradient checkpointing on) and GSPO (``loss_type="grpo"``,
``importance_sampling_level="sequence"``, ``beta=0``). Nothing is generated: each step is ``trainer.compute_loss``
plus ``backward`` on a crafted batch shaped like what ``_generate_and_score_completions`` hands to ``_compute_loss``
(prompt and completion ids and masks, advantages, ``num_items_in_batch``; on-policy, as TRL's default
``num_iterations=1`` is; full rows, no padding).

1. Time and peak memory of one step at ``--batch`` rows of ``--completion`` tokens (default 8 x 1024: the 8192
   tokens of the head benchmark's reference shape), flag off vs on: CUDA events around each step, the median of
   ``--repeats`` after ``--warmup``; peak = ``max_memory_allocated`` above what was allocated before the step (the
   model's weights and the batch). The loss and the gradient norm of each flag are recorded too.
2. The longest completion at ``--scan-batch`` rows (default 8) that fits, flag off vs on: ``--scan-lengths`` tokens
   per row (default 4096 ... 65536) in turn, one step each, stopping at the first out-of-memory error (caught; the
   cache is emptied), or when ``--max-seconds`` have passed (the rest recorded as skipped).

The JSON has the device, library versions and git commit, the exact command, the model config and every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

FULL = dict(
    hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    vocab_size=151_936, num_hidden_layers=2,
)  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
    num_hidden_layers=2,
)  # fmt: skip
PROMPT = 64  # prompt tokens per row


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a toy model and toy lengths (a dry run, e.g. on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batch", type=int, help="rows of the timed step (default 8; tiny 4)")
    parser.add_argument("--completion", type=int, help="completion tokens per row of the timed step (default 1024)")
    parser.add_argument("--repeats", type=int, help="timed steps per flag (default 5; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; tiny 1)")
    parser.add_argument("--scan-batch", type=int, default=8)
    parser.add_argument("--scan-lengths", help="comma list of completion lengths (default 4096,...,65536)")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop the scan after this long")
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="TRL's default is on")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.batch = args.batch or (4 if tiny else 8)
    args.completion = args.completion or (32 if tiny else 1024)
    args.repeats = args.repeats or (2 if tiny else 5)
    args.warmup = 1 if tiny and args.warmup is None else (2 if args.warmup is None else args.warmup)
    lengths = args.scan_lengths or ("16,32,64" if tiny else "4096,8192,16384,32768,65536")
    args.scan_lengths = [int(x) for x in lengths.split(",") if x.strip()]
    return args


def build_trainer(args, device: torch.device):
    """The model (random init on ``device``, bf16), a word-level tokenizer, and a ``GRPOTrainer`` around them."""
    import datasets
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from fused_gspo.trl import FLAG, patch_trl

    patch_trl()
    sizes = TINY if args.tiny else FULL
    longest = max([args.completion, *args.scan_lengths]) + PROMPT
    config = Qwen3Config(
        **sizes, max_position_embeddings=longest, tie_word_embeddings=False, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=None, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(64)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    dataset = datasets.Dataset.from_dict({"prompt": [f"w{i} w{i + 1}" for i in range(16)]})
    batch = max(args.batch, args.scan_batch)
    grpo = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="gpu-trainer-"), report_to=[], save_strategy="no",
        per_device_train_batch_size=batch, num_generations=batch, max_completion_length=longest - PROMPT,
        bf16=True, use_cpu=device.type == "cpu", gradient_checkpointing=not args.no_gradient_checkpointing,
        loss_type="grpo", importance_sampling_level="sequence", beta=0.0, **{FLAG: False},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.GRPOTrainer(
            model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=grpo,
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    if grpo.gradient_checkpointing:  # what Trainer.train() does before the first step
        enable = getattr(trainer.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.model.train()
    return trainer, config


def crafted_inputs(batch: int, completion: int, vocab: int, device: torch.device, seed: int = 0) -> dict:
    """What ``_generate_and_score_completions`` hands to ``_compute_loss`` (on-policy, no reference model), every
    completion ``completion`` tokens long: with no padding the model's attention runs causal with no mask (with
    padding, transformers' SDPA path would build a ``[B, 1, T, T]`` mask, 34 GB at 8 x 65k, and the scan would
    measure that instead of the head)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mask = torch.ones(batch, completion, dtype=torch.int)
    inputs = {
        "prompt_ids": torch.randint(3, vocab, (batch, PROMPT), generator=g),
        "prompt_mask": torch.ones(batch, PROMPT, dtype=torch.int),
        "completion_ids": torch.randint(3, vocab, (batch, completion), generator=g),
        "completion_mask": mask,
        "advantages": torch.randn(batch, generator=g),
        "num_items_in_batch": mask.sum(),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_step(trainer, inputs: dict, flag: bool) -> dict:
    """One ``compute_loss`` + ``backward`` with the flag set: its time (ms), peak memory above what was allocated
    before it (MiB, CUDA only), the loss and the gradient norm."""
    from fused_gspo.trl import FLAG

    setattr(trainer.args, FLAG, flag)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    device = inputs["completion_ids"].device
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        start_s = time.perf_counter()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    else:
        ms, peak = (time.perf_counter() - start_s) * 1e3, None
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.stack(grads).norm()) if grads else float("nan")
    out = {"ms": ms, "peak_mib": peak, "loss": float(loss.detach()), "grad_norm": grad_norm}
    del loss
    model.zero_grad(set_to_none=True)
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def timed(trainer, args, device, vocab) -> dict:
    inputs = crafted_inputs(args.batch, args.completion, vocab, device)
    out = {"batch": args.batch, "completion": args.completion, "prompt": PROMPT,
           "completion_tokens": int(inputs["completion_mask"].sum())}  # fmt: skip
    for flag in (False, True):
        key = "flag_on" if flag else "flag_off"
        try:
            for _ in range(args.warmup):
                run_step(trainer, inputs, flag)
            steps = [run_step(trainer, inputs, flag) for _ in range(args.repeats)]
        except Exception as exc:  # noqa: BLE001  (one flag failing must not lose the other's figures)
            out[key] = {"status": "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"}
            exc.__traceback__ = None
            _release(device)
            continue
        times = [s["ms"] for s in steps]
        out[key] = {
            "status": "ok", "median_ms": statistics.median(times), "times_ms": times,
            "peak_mib": max((s["peak_mib"] for s in steps if s["peak_mib"] is not None), default=None),
            "loss": steps[-1]["loss"], "grad_norm": steps[-1]["grad_norm"],
        }  # fmt: skip
    if out.get("flag_off", {}).get("status") == "ok" and out.get("flag_on", {}).get("status") == "ok":
        off, on = out["flag_off"], out["flag_on"]
        out["speedup_on_over_off"] = off["median_ms"] / on["median_ms"]
        if off["peak_mib"] and on["peak_mib"]:
            out["peak_on_over_off"] = on["peak_mib"] / off["peak_mib"]
        out["grad_norm_rel_diff"] = abs(on["grad_norm"] - off["grad_norm"]) / max(abs(off["grad_norm"]), 1e-30)
    return out


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def scan(trainer, args, device, vocab, started: float, save=lambda out: None) -> dict:
    """The longest completion at ``--scan-batch`` rows that fits, per flag (the first out-of-memory length ends a
    flag's scan); ``save(out)`` after each step, so that a run stopped from outside keeps what it measured."""
    out = {"batch": args.scan_batch, "lengths": args.scan_lengths, "max_seconds": args.max_seconds}
    for flag in (False, True):
        key = "flag_on" if flag else "flag_off"
        rows, longest = [], None
        out[key] = {"longest_that_fits": longest, "steps": rows}
        for length in args.scan_lengths:
            if time.perf_counter() - started > args.max_seconds:
                rows.append({"completion": length, "status": "skipped: out of time (--max-seconds)"})
                continue
            inputs = crafted_inputs(args.scan_batch, length, vocab, device, seed=length)
            try:
                step = run_step(trainer, inputs, flag)
                rows.append({"completion": length, "status": "ok", **step})
                longest = length
            except Exception as exc:  # noqa: BLE001
                status = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
                exc.__traceback__ = None
                rows.append({"completion": length, "status": status})
                del inputs
                _release(device)
                break
            del inputs
            _release(device)
            out[key]["longest_that_fits"] = longest
            save(out)
            print(f"  scan {key} completion {length}: {rows[-1]['status']} {rows[-1].get('ms', 0):.0f} ms "
                  f"peak {rows[-1].get('peak_mib')} MiB", flush=True)  # fmt: skip
        save(out)
    off, on = out["flag_off"]["longest_that_fits"], out["flag_on"]["longest_that_fits"]
    out["longest_on_over_off"] = on / off if off and on else None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device (use --tiny --device cpu for a dry run)", file=sys.stderr)
        return 2
    from fused_gspo.bench.report import device_info, library_versions

    started = time.perf_counter()
    trainer, config = build_trainer(args, device)
    built_s = time.perf_counter() - started
    report = {
        "command": shlex.join(["python", "bench/gpu_trainer.py", *argv]),
        "device": device_info(device),
        "versions": library_versions(),
        "model": {k: getattr(config, k) for k in (*FULL, "max_position_embeddings", "tie_word_embeddings")},
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "dtype": "bfloat16",
        "trainer": {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "beta": 0.0,
            "bf16": True,
            "gradient_checkpointing": not args.no_gradient_checkpointing,
            "on_policy": True,
        },  # fmt: skip
        "build_seconds": built_s,
    }
    vocab = config.vocab_size
    print(f"GRPOTrainer on a {report['parameters'] / 1e9:.2f}B-parameter Qwen3 ({device_info(device)['name']}), "
          f"built in {built_s:.1f} s", flush=True)  # fmt: skip

    def save(scan_so_far=None):
        if scan_so_far is not None:
            report["completion_scan"] = scan_so_far
        report["seconds"] = time.perf_counter() - started
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")

    report["timed_step"] = timed(trainer, args, device, vocab)
    save()
    print(json.dumps(report["timed_step"], indent=1, default=str), flush=True)
    report["completion_scan"] = scan(trainer, args, device, vocab, time.perf_counter(), save)
    scan_out = report["completion_scan"]
    print(f"longest completion at batch {args.scan_batch}: flag off {scan_out['flag_off']['longest_that_fits']}, "
          f"flag on {scan_out['flag_on']['longest_that_fits']} (on/off {scan_out['longest_on_over_off']})")  # fmt: skip
    save(scan_out)
    if args.json:
        print(f"JSON written to {args.json}")
    timed_ok = all(report["timed_step"].get(k, {}).get("status") == "ok" for k in ("flag_off", "flag_on"))
    return 0 if timed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
