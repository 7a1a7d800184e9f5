"""Train a small causal LM with a GRPO-family loss and ``use_fused_gspo_loss=True``, on CPU, in a few minutes.

The task has a verifiable reward: a prompt is three words ``w<i>``; the completion earns the fraction of its words
that are even-numbered (``w0``, ``w2``, ...). A randomly initialized 2-layer Qwen2 starts near 0.5 and learns to say
even words.

    python examples/train_toy_cpu.py --objective gspo --steps 60

Objectives: grpo, gspo (the paper's configuration), gspo_token, dapo, dr_grpo, unsloth_gspo, gmpo, rloo, gfpo.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
warnings.filterwarnings("ignore")

import datasets  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import fused_gspo  # noqa: E402
from fused_gspo.trl import GFPOConfig, GFPOTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(400)]

OBJECTIVES = {
    "grpo": (trl.GRPOTrainer, trl.GRPOConfig, dict(loss_type="grpo")),
    "gspo": (
        trl.GRPOTrainer,
        trl.GRPOConfig,
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0),
    ),
    "gspo_token": (trl.GRPOTrainer, trl.GRPOConfig, dict(loss_type="grpo", importance_sampling_level="sequence_token")),
    # mask_truncated_completions would drop nearly every completion here: the toy model rarely says EOS
    "dapo": (trl.GRPOTrainer, trl.GRPOConfig, dict(loss_type="dapo", epsilon_high=0.28)),
    "dr_grpo": (trl.GRPOTrainer, trl.GRPOConfig, dict(loss_type="dr_grpo")),
    "unsloth_gspo": (trl.GRPOTrainer, trl.GRPOConfig, dict(loss_type="dr_grpo", importance_sampling_level="sequence")),
    "gmpo": ("gmpo", "gmpo", dict()),
    "rloo": (trl.RLOOTrainer, trl.RLOOConfig, dict(beta=0.0)),
    "gfpo": (GFPOTrainer, GFPOConfig, dict(loss_type="grpo", num_remains_in_group=4)),
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def even_words(completions, **_) -> list[float]:
    """Verifiable reward: the share of even-numbered words."""
    rewards = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("w")]
        share = sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1)
        rewards.append(share)
    return rewards


class PrintReward(TrainerCallback):
    """One line per optimizer step: the reward of the latest generation, loss, entropy, clipped fraction."""

    def __init__(self):
        self.history = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        if "reward" in logs:
            self.history.append(logs["reward"])
        if state.global_step % 5 == 0 or state.global_step == 1:
            print(
                f"step {state.global_step:3d}  reward {self.history[-1]:.3f}  loss {logs['loss']:+.4f}  "
                f"entropy {logs.get('entropy', float('nan')):.3f}  "
                f"clip {logs.get('clip_ratio/region_mean', float('nan')):.3f}",
                flush=True,
            )


def shortest_first(group_completions, group_rewards, **_):
    """GFPO filter: keep the shortest completions of each group (concise reasoning)."""
    return [[-float(len(c.split())) for c in group] for group in group_completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="gspo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fused", action="store_true", help="train with TRL's own loss, for comparison")
    args = parser.parse_args()

    fused_gspo.patch_trl()
    trainer_cls, config_cls, objective = OBJECTIVES[args.objective]
    if trainer_cls == "gmpo":
        from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

        trainer_cls, config_cls = GMPOTrainer, GMPOConfig
    tokenizer = build_tokenizer()
    g = torch.Generator().manual_seed(args.seed)
    prompts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=g)) for _ in range(256)]
    num_generations = 8
    config = config_cls(
        output_dir=tempfile.mkdtemp(prefix="fused-gspo-toy-"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        max_steps=args.steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        per_device_train_batch_size=16,
        num_generations=num_generations,
        max_completion_length=8,
        steps_per_generation=2,
        seed=args.seed,
        disable_tqdm=True,
        use_fused_gspo_loss=not args.no_fused,
        **objective,
    )
    extra = {"group_filter_func": shortest_first} if trainer_cls is GFPOTrainer else {}
    callback = PrintReward()
    trainer = trainer_cls(
        model=build_model(args.seed),
        reward_funcs=even_words,
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[callback],
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # one line per step from PrintReward instead of raw log dicts
    start = time.perf_counter()
    trainer.train()
    first, last = callback.history[:5], callback.history[-5:]
    print(
        f"{args.objective} ({'fused_gspo' if not args.no_fused else 'TRL'} loss): mean reward of the first 5 steps "
        f"{sum(first) / len(first):.3f}, of the last 5 steps {sum(last) / len(last):.3f}, "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
