"""TRL trainers under DeepSpeed ZeRO-3 (CPU, gloo), trained with the flag off and then on from the same seed:
``python -m torch.distributed.run --nproc_per_node N zero3_trainer.py OUT CASE [CASE ...]``.

Each process writes ``OUT/<CASE>-<rank>.pt``: for each run (``"off"``, ``"on"``) the logged history, the final weights
(every parameter gathered) and what :class:`HeadProbe` saw of the LM head's weight. The test compares flag off with
flag on, and rank 0 with rank 1, and checks that the head really was partitioned.

The DeepSpeed config sets ``stage3_param_persistence_threshold: 0``: by default ZeRO-3 keeps parameters under 10^5
elements whole on every rank (the tiny model's head has 9,696), and the head would never be released.
"""

import faulthandler
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from grpo_trainer import CASES as GRPO_CASES  # noqa: E402
from trl_helpers import (  # noqa: E402
    CPU_TRAINING_ARGS,
    WORDS,
    even_words_reward,
    make_tokenizer,
    prompts_dataset,
    small_config,
    with_eos_bias,
)

from fused_gspo.trl import FLAG, patch_trl  # noqa: E402

DEEPSPEED_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    # "auto": filled in from the trainer's arguments. No train_batch_size: accelerate would fill it in with the
    # number of processes before DeepSpeed knows it, and DeepSpeed's consistency check would then fail
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}

# Which strategy each case exercises (the planner's choice; the test asserts the fused calls ran):
# gspo: the old log-probs' no-grad pass, then the single pass (sequence-level ratios, off-policy on the second step);
# gspo_tied: the same with the head's weight tied to the input embedding (ZeRO-3 gathers it for both modules);
# dapo: the reference model's no-grad pass, then the two phases (the entropy quantile needs every entropy first);
# dpo: the reference's no-grad pass, then the single pass (whole pairs); cpo: the single pass, in the head's forward;
# loop: no trainer, a custom loop on DeepSpeed's engine passing the LM-head module (flag off: the eager backend)
CASES = ("gspo", "gspo_tied", "dapo", "dpo", "cpo", "loop")


class HeadProbe:
    """What the LM head's weight looked like during training (a ``TrainerCallback``, with two gradient hooks).

    ``partition``: ``(ds_numel, local partition's numel, world size)`` once DeepSpeed holds the model.
    ``at_accumulation``: the weight's local numel each time autograd accumulated its gradient (it must be gathered
    then, or the gradient does not fit). ``at_backward_end``: its ``ds_status`` when the input embedding's gradient
    was accumulated, the last of the backward (with tied embeddings, the same moment as the first). ``at_step_end``:
    ``(ds_status, local numel)`` after each optimizer step (released: 0 elements).
    """

    def __init__(self):
        self.partition = None
        self.at_accumulation, self.at_backward_end, self.at_step_end = [], [], []
        self._head = None
        self._handles = []

    def attach(self, model) -> None:
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        self._head = head
        self.partition = (head.ds_numel, head.ds_tensor.numel(), torch.distributed.get_world_size())
        self._handles = [
            head.register_post_accumulate_grad_hook(lambda p: self.at_accumulation.append(p.numel())),
            embed.register_post_accumulate_grad_hook(lambda _: self.at_backward_end.append(str(self._head.ds_status))),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()

    def step_end(self) -> None:
        self.at_step_end.append((str(self._head.ds_status), self._head.numel()))

    def summary(self) -> dict:
        return dict(
            partition=self.partition,
            at_accumulation=self.at_accumulation,
            at_backward_end=self.at_backward_end,
            at_step_end=self.at_step_end,
        )


def _callback(probe: HeadProbe):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            probe.attach(model)  # after DeepSpeed took the model: its gradient hooks run before these

        def on_step_end(self, args, state, control, **kwargs):
            probe.step_end()

    return Probe()


def pairs_dataset(n: int):
    """Preference pairs: prompts of 2-4 words, chosen and rejected completions of various lengths."""
    import datasets

    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = [(words(2 + i % 3), " " + words(3 + i % 4), " " + words(2 + (3 * i) % 5)) for i in range(n)]
    columns = zip(("prompt", "chosen", "rejected"), zip(*rows, strict=True), strict=True)
    return datasets.Dataset.from_dict({name: list(values) for name, values in columns})


def trainer_for(case: str, flag: bool, model_path: str, tokenizer, probe: HeadProbe):
    import trl
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = dict(
        CPU_TRAINING_ARGS, output_dir="/tmp/fused-gspo-zero3-test", max_steps=2, per_device_train_batch_size=4,
        deepspeed=DEEPSPEED_CONFIG, **{FLAG: flag},
    )  # fmt: skip
    common = dict(model=model_path, processing_class=tokenizer, callbacks=[_callback(probe)])
    if case in ("gspo", "gspo_tied", "dapo"):
        config = trl.GRPOConfig(
            **args, learning_rate=0.05, num_generations=4, max_completion_length=8,
            **GRPO_CASES["dapo_kl_entropy_quantile" if case == "dapo" else "gspo_off_policy"],
        )  # fmt: skip
        return trl.GRPOTrainer(reward_funcs=even_words_reward, args=config, train_dataset=prompts_dataset(), **common)
    if case == "dpo":
        config = trl.DPOConfig(**args, learning_rate=0.5)
        return trl.DPOTrainer(
            args=config, train_dataset=pairs_dataset(8 * torch.distributed.get_world_size()), **common
        )
    if case == "cpo":
        config = CPOConfig(**args, learning_rate=0.05, max_length=32)
        return CPOTrainer(args=config, train_dataset=pairs_dataset(8 * torch.distributed.get_world_size()), **common)
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def custom_loop(fused: bool, model_path: str, probe: HeadProbe) -> tuple[list[dict], torch.nn.Module]:
    """Two steps of a loop written against DeepSpeed's engine: the backbone's hidden states, the old log-probs
    (a no-grad pass) and an off-policy GSPO loss, both through the LM-head module (run inside its forward, so
    ZeRO-3's module hooks gather it), with the fused backend or (``fused=False``) the eager one."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from fused_gspo import fused_logprobs, fused_policy_loss

    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    config = dict(DEEPSPEED_CONFIG, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, zero_allow_untested_optimizer=True)  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), config=config
    )
    probe.attach(engine.module)
    backend = "torch" if fused else "eager"
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    logs = []
    for _ in range(2):
        ids = torch.randint(3, model.config.vocab_size, (3, 10), generator=g)
        mask = (torch.rand(3, 9, generator=g) > 0.2).long()
        advantages = torch.randn(3, generator=g)
        hidden = engine.module.model(ids).last_hidden_state[:, :-1]
        head = engine.module.get_output_embeddings()
        with torch.no_grad():
            old = fused_logprobs(hidden, head, ids[:, 1:], backend=backend) + 0.3 * torch.randn(3, 9, generator=g)
        out = fused_policy_loss(hidden, head, ids[:, 1:], advantages, mask, old_logps=old, loss_type="grpo",
                                importance_sampling_level="sequence", epsilon=3e-2, backend=backend)  # fmt: skip
        engine.backward(out.loss)
        engine.step()
        grad_norm = engine.get_global_grad_norm()  # the norm before clipping, found by the step
        probe.step_end()
        logs.append(
            dict(loss=out.loss.item(), grad_norm=float(grad_norm), **{k: v.item() for k, v in out.metrics.items()})
        )
    return logs, engine.module


def run(case: str, flag: bool, model_path: str, tokenizer, measure: bool = False) -> dict:
    """Train 2 SGD steps; the logged history, every weight gathered, the head probe's record and, with ``measure``,
    the process's peak resident memory during the training above what was resident before it (MiB)."""
    import deepspeed

    from fused_gspo.bench.measure import ProcessMemory

    torch.manual_seed(1234)
    probe = HeadProbe()
    if case == "loop":
        logs, model = custom_loop(flag, model_path, probe)
        peak_mib = None
    else:
        trainer = trainer_for(case, flag, model_path, tokenizer, probe)
        peak_mib = ProcessMemory.create().peak_mib(trainer.train) if measure else None
        if not measure:
            trainer.train()
        logs, model = [entry for entry in trainer.state.log_history if "loss" in entry], trainer.model
    probe.detach()
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        weights = {name: p.detach().clone() for name, p in params.items()}
    return dict(logs=logs, weights=weights, head=probe.summary(), peak_mib=peak_mib)


def model_and_tokenizer(vocab: int | None = None, tied: bool = False):
    """The tiny model (:func:`trl_helpers.tiny_model`'s weights by default) and its tokenizer. ``vocab``: a vocabulary
    that large (words ``w0``, ``w1``, ...: the head then dominates the memory); ``tied``: the head's weight tied to the
    input embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    config = small_config(tie_word_embeddings=tied)
    if vocab is None:
        tokenizer = make_tokenizer()
    else:
        config["vocab_size"] = vocab
        words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
        tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )
    torch.manual_seed(0)
    return with_eos_bias(Qwen2ForCausalLM(Qwen2Config(**config))), tokenizer


def count_fused_calls() -> dict:
    """Counts, from here on: the fused loss requests, the fused (no-grad) log-prob requests, the backward of each
    gradient strategy (``single_pass``, ``two_phase``), to show which paths the flag-on runs took, and the fused
    backwards that found the head released and gathered it themselves (``own_gather``; none when the loss's backward
    came through the model's output, where ZeRO-3's hook gathers the head first)."""
    import fused_gspo.trl.cpo as cpo
    import fused_gspo.trl.dpo as dpo
    import fused_gspo.trl.patch as patch
    import fused_gspo.trl.stand_in as stand_in
    from fused_gspo import chunked
    from fused_gspo.chunked import LogProbFunction, SinglePassFunction

    calls = dict.fromkeys(("loss", "logprobs", "single_pass", "two_phase", "own_gather"), 0)

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for module, name in (
        (patch, "compute_policy_loss"),
        (dpo, "compute_preference_loss"),
        (cpo, "compute_preference_loss"),
    ):
        setattr(module, name, counted("loss", getattr(module, name)))
    stand_in.fused_logprobs = counted("logprobs", stand_in.fused_logprobs)
    SinglePassFunction.backward = staticmethod(counted("single_pass", SinglePassFunction.backward))
    LogProbFunction.backward = staticmethod(counted("two_phase", LogProbFunction.backward))
    init = chunked._BackwardGather.__init__

    def holding(self, *args):  # a backward that had to gather the head itself (DeepSpeed's hook had not)
        init(self, *args)
        calls["own_gather"] += self._context is not None

    chunked._BackwardGather.__init__ = holding
    return calls


def main(out_dir: str, cases: list[str], vocab: int | None = None) -> None:
    """``vocab``: measure the peak memory, with a vocabulary of that size."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung collective: kill -USR1 shows where
    patch_trl()
    calls = count_fused_calls()
    rank = int(os.environ.get("RANK", "0"))
    for case in cases:
        tied = case.endswith("_tied")
        model, tokenizer = model_and_tokenizer(vocab, tied)
        # by path, as from the Hub; the same weights on every rank (a fixed seed)
        model_path = os.path.join(out_dir, f"model-{'tied-' if tied else ''}{rank}")
        model.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
        result = {}
        for flag in ("off", "on"):
            before = dict(calls)
            result[flag] = run(case, flag == "on", model_path, tokenizer, measure=vocab is not None)
            result[flag]["fused_calls"] = {name: calls[name] - before[name] for name in calls}
        result["world"] = int(os.environ.get("WORLD_SIZE", "1"))
        torch.save(result, os.path.join(out_dir, f"{case}-{rank}.pt"))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("cases", nargs="+", choices=CASES)
    parser.add_argument("--memory-vocab", type=int, default=None, help="measure the peak memory at this vocabulary")
    options = parser.parse_args()
    main(options.out_dir, options.cases, options.memory_vocab)
