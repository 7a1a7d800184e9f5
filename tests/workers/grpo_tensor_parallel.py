"""GRPOTrainer (GSPO, off-policy) with ``use_fused_gspo_loss=True`` on a model loaded with transformers' tensor
parallelism, on 2 CPU processes (gloo), against the same training in one process.

``python -m torch.distributed.run --nproc_per_node 2 grpo_tensor_parallel.py OUT tp`` loads a tiny Qwen2 with
``tp_plan="auto"`` (the LM head a ``Shard(0)`` DTensor) and trains it; ``python grpo_tensor_parallel.py OUT single``
trains the unsharded model. accelerate refuses a tensor-parallel model on CPU
(``ParallelismConfig._validate_accelerator`` accepts only GPU-like devices): the check is bypassed here, in this
process only. Each process writes
``OUT/<mode>-<rank>.pt``: the logged history, the final (full) weights, how many vocabulary-parallel calls ran, and,
for ``tp``, what a run without the adapter's common seed raised.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from trl_helpers import make_tokenizer, small_config, train, with_eos_bias  # noqa: E402

from fused_gspo.trl import patch_trl  # noqa: E402

CASE = dict(
    loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0,
    steps_per_generation=2, max_steps=2, max_completion_length=8,
)  # fmt: skip
# TRL's entropy quantile is taken over every process's entropies, the group's copies included: the adapter counts
# each group once (at this quantile and seed, counting the copies masks other tokens than one process)
ENTROPY_CASE = {**CASE, "loss_type": "dapo", "importance_sampling_level": "token", "top_entropy_quantile": 0.8,
                "epsilon": 0.2, "epsilon_high": 0.28}  # fmt: skip


def tiny_tp_model():
    """The tiny Qwen2 of the adapter's tests with two key/value heads, so that 2 ranks can split attention too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**small_config(tie_word_embeddings=False), "num_key_value_heads": 2})
    return with_eos_bias(Qwen2ForCausalLM(config))


def counted_runs():
    """Count the vocabulary-parallel calls, and forbid gathering the LM head (``full_tensor``) while training."""
    import fused_gspo.parallel.dispatch as dispatch
    import fused_gspo.trl.patch as adapter

    calls = {"vocab_parallel": 0}
    original = dispatch.run

    def counted(*args, **kwargs):
        calls["vocab_parallel"] += 1
        return original(*args, **kwargs)

    dispatch.run = counted
    adapter.vocab_parallel = dispatch
    return calls


def main(out_dir: str, mode: str) -> None:
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    patch_trl()
    rank = int(os.environ.get("RANK", "0"))
    path = os.path.join(out_dir, "model")
    tokenizer = make_tokenizer()
    result = {}
    if mode == "tp":
        import accelerate.parallelism_config as parallelism_config
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        import fused_gspo.trl.patch as adapter

        # accelerate takes tensor parallelism on GPUs only; on CPU its one refusal is the device type
        parallelism_config.ParallelismConfig._validate_accelerator = lambda self, accelerator: None
        dist.init_process_group("gloo")
        if rank == 0:
            tiny_tp_model().save_pretrained(path)
            tokenizer.save_pretrained(path)
        dist.barrier()

        def load():
            model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
            head = model.lm_head.weight
            assert isinstance(head, DTensor) and head.placements[0].is_shard(0), head

            def no_gather(self, *args, **kwargs):
                if self is model.lm_head.weight and torch.is_grad_enabled():
                    raise AssertionError("the LM head was gathered (full_tensor) while training")
                return full_tensor(self, *args, **kwargs)

            DTensor.full_tensor = no_gather
            return model

        full_tensor = DTensor.full_tensor
        calls = counted_runs()
        # without the common seed, the ranks sample different completions: refused by name at the first loss
        agree = adapter.agree_on_seed
        adapter.agree_on_seed = lambda trainer: None
        try:
            train(GRPOTrainer, GRPOConfig, tokenizer, load(), True, **CASE)
            result["without_common_seed"] = "trained"
        except ValueError as exc:  # ReplicaMismatchError
            result["without_common_seed"] = f"{type(exc).__name__}: {exc}"
        adapter.agree_on_seed = agree
        calls["vocab_parallel"] = 0
        logs, weights = train(GRPOTrainer, GRPOConfig, tokenizer, load(), True, **CASE)
        result["vocab_parallel_calls"] = calls["vocab_parallel"]
        weights = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in weights.items()}
        entropy_logs, _ = train(GRPOTrainer, GRPOConfig, tokenizer, load(), True, **ENTROPY_CASE)
        DTensor.full_tensor = full_tensor
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
        result["initial"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        logs, weights = train(GRPOTrainer, GRPOConfig, tokenizer, model, True, **CASE)
        model = AutoModelForCausalLM.from_pretrained(path)
        entropy_logs, _ = train(GRPOTrainer, GRPOConfig, tokenizer, model, True, **ENTROPY_CASE)
    result["run"] = (logs, weights)
    result["entropy_quantile_logs"] = entropy_logs
    torch.save(result, os.path.join(out_dir, f"{mode}-{rank}.pt"))
    if mode == "tp":
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
