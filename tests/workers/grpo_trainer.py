"""GRPOTrainer on 2 CPU processes (``torch.distributed.run``, gloo), trained with the flag off and then on from the
same seed: ``python -m torch.distributed.run --nproc_per_node 2 grpo_trainer.py OUT CASE``.

Each process writes ``OUT/<CASE>-<rank>.pt``: the logged history and final weights of both runs. The test compares
flag off with flag on, and rank 0 with rank 1.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trl_helpers import tiny_model, train  # noqa: E402

from fused_gspo.trl import patch_trl  # noqa: E402

CASES = {
    # GSPO off-policy: two optimizer steps per generation, so the second step's ratios are not 1
    "gspo_off_policy": dict(
        loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0,
        steps_per_generation=2,
    ),
    # DAPO with a KL term (num_items_in_batch summed over processes) and the entropy quantile over every process's
    # tokens
    "dapo_kl_entropy_quantile": dict(
        loss_type="dapo", epsilon_high=0.28, beta=0.04, top_entropy_quantile=0.5, mask_truncated_completions=True,
    ),
}  # fmt: skip


def run(case: str, flag: bool, tokenizer, model_path: str):
    from trl import GRPOConfig, GRPOTrainer

    # by path, so that a reference model (beta > 0) can be loaded as from the Hub
    return train(
        GRPOTrainer, GRPOConfig, tokenizer, model_path, flag, max_steps=2, max_completion_length=8, **CASES[case]
    )


def main(out_dir: str, case: str) -> None:
    from trl_helpers import make_tokenizer

    patch_trl()
    rank = int(os.environ.get("RANK", "0"))
    tokenizer = make_tokenizer()
    model_path = os.path.join(out_dir, f"model-{rank}")  # the same weights on every rank (a fixed seed)
    tiny_model().save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    off = run(case, False, tokenizer, model_path)
    on = run(case, True, tokenizer, model_path)
    torch.save({"off": off, "on": on, "world": int(os.environ.get("WORLD_SIZE", "1"))},
               os.path.join(out_dir, f"{case}-{rank}.pt"))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
