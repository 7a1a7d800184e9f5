"""fused_gspo.trl.cpo end to end: TRL 1.16's CPOTrainer (trl.experimental.cpo), flag off vs on, same seed.

Each training case trains a few SGD steps twice from the same seed on a small preference dataset and evaluates once,
then asserts that the logged losses, gradient norms and metrics (train and ``eval_``), and the updated weights agree
(:func:`trl_helpers.assert_same_training`). Every run records the tensors whose last dimension is the vocabulary:
TRL's run creates the ``[2B, L, V]`` logits, the fused run creates none of the full sequence (only chunks of the
scored tokens) and its LM head outputs one column. The memory test measures one step's peak RSS at V = 32768 in fresh
processes.
"""

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from conftest import rel_err  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from trl_helpers import CPU_TRAINING_ARGS, WORDS, assert_same_training, small_config, tiny_model  # noqa: E402

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402
from trl_helpers import tokenizer_fixture as tokenizer_fixture  # noqa: E402

from fused_gspo.trl import FLAG  # noqa: E402

V = len(WORDS) + 3


@pytest.fixture(name="fused_calls")
def fused_calls_fixture(monkeypatch):
    """Counts the fused preference-loss computations of the CPO adapter."""
    import fused_gspo.trl.cpo as adapter

    calls = {"loss": 0}
    original = adapter.compute_preference_loss

    def counted(*args, **kwargs):
        calls["loss"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "compute_preference_loss", counted)
    return calls


def preference_dataset(n: int, seed: int):
    """Prompts of 2-4 words, chosen and rejected completions of various lengths (padding in every batch)."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    rows = [(words(2 + i % 3), words(3 + i % 4), words(2 + (3 * i) % 5)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {key: list(col) for key, col in zip(("prompt", "chosen", "rejected"), zip(*rows, strict=True), strict=True)}
    )


class VocabTensors(TorchDispatchMode):
    """Records, for every op output whose last dimension is the vocabulary, its leading size next to the number of
    positions ``rows * L`` of the model call in progress (set by a forward pre-hook on the model)."""

    def __init__(self):
        super().__init__()
        self.positions = None
        self.seen = []  # (leading size, rows * L of the current batch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and self.positions is not None:
                self.seen.append((t.numel() // V, self.positions))
        return out


def train_cpo(tokenizer, make_model, flag: bool, peft_config=None, workspace="auto", **kwargs):
    """Train 3 SGD steps and evaluate once; returns (train logs, trained weights), eval metrics, and what the
    LM head output and the vocabulary-wide tensors looked like. ``workspace``: the fused head's scratch budget (a
    small one splits the batch into several chunks of pairs)."""
    import fused_gspo.trl.cpo as adapter

    adapter.WORKSPACE_BYTES = workspace
    try:
        return _train_and_record(tokenizer, make_model, flag, peft_config, **kwargs)
    finally:
        adapter.WORKSPACE_BYTES = "auto"


def _train_and_record(tokenizer, make_model, flag, peft_config, **kwargs):
    torch.manual_seed(1234)
    args = dict(
        CPU_TRAINING_ARGS, output_dir="/tmp/fused-gspo-trl-cpo-test", learning_rate=0.05,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, max_length=32,
    )  # fmt: skip
    args.update(kwargs)
    trainer = trl.experimental.cpo.CPOTrainer(
        model=make_model(),
        args=trl.experimental.cpo.CPOConfig(**args, **{FLAG: flag}),
        train_dataset=preference_dataset(8, seed=0),
        eval_dataset=preference_dataset(4, seed=1),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    recorder = VocabTensors()
    head_widths = []
    model = trainer.model

    def pre_hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        recorder.positions = ids.shape[0] * ids.shape[1]

    hooks = [
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.get_output_embeddings().register_forward_hook(lambda m, i, o: head_widths.append(o.shape[-1])),
    ]
    try:
        with recorder:
            trainer.train()
            eval_metrics = trainer.evaluate()
    finally:
        for hook in hooks:
            hook.remove()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return (logs, weights), eval_metrics, head_widths, recorder.seen


def assert_same_eval(off: dict, on: dict) -> None:
    assert off.keys() == on.keys()
    assert {"eval_loss", "eval_rewards/margins", "eval_logits/chosen", "eval_nll_loss"} <= off.keys()
    for key, value in off.items():
        if not key.endswith(("_runtime", "_per_second")):
            assert on[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, value, on[key])


def assert_logits_materialized_only_off(off_run, on_run) -> None:
    """TRL's head outputs V columns and its [2B * L, V] logits exist; the fused head outputs one column and nothing
    vocabulary-wide covers the sequence (only chunks of scored tokens, fewer than the rows * (L - 1) positions)."""
    (_, _, widths_off, seen_off), (_, _, widths_on, seen_on) = off_run, on_run
    assert widths_off and set(widths_off) == {V}
    assert any(lead >= positions for lead, positions in seen_off)
    assert widths_on and set(widths_on) == {1}, widths_on
    assert seen_on, "the fused path should project chunks of the scored tokens"
    assert all(lead < positions - positions // 4 for lead, positions in seen_on), max(seen_on)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation: flag off vs on

CASES = {
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
    "alphapo": dict(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1),
    # 24 KiB: a few tokens' [n, V] rows per chunk, so the pairs are split over several chunks
    "cpo_sigmoid": dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.1, workspace=24 << 10),
    "cpo_simpo": dict(loss_type="simpo", cpo_alpha=0.5, label_smoothing=0.2),
    "hinge": dict(loss_type="hinge", beta=0.5, gradient_checkpointing=True),
    "ipo": dict(loss_type="ipo", beta=0.5, cpo_alpha=0.3),
}


# CPO's loss types and options on TRL's CPOTrainer (train and eval metrics, weights, no logits materialized)
@pytest.mark.parametrize("case", list(CASES))
def test_cpo_trainer_flag_on_matches_flag_off(tokenizer, fused_calls, case):
    off = train_cpo(tokenizer, tiny_model, flag=False, **CASES[case])
    assert fused_calls["loss"] == 0
    on = train_cpo(tokenizer, tiny_model, flag=True, **CASES[case])
    assert fused_calls["loss"] == 3 + 1  # three training steps, one eval batch
    assert_same_training(off[0], on[0])
    assert_same_eval(off[1], on[1])
    assert_logits_materialized_only_off(off, on)
    if case == "alphapo":  # CPOConfig's sugar: SimPO without the NLL term
        assert all(entry["nll_loss"] == 0.0 for entry in on[0][0])
    if case == "cpo_sigmoid":
        assert all(entry["nll_loss"] > 0.0 for entry in on[0][0])


def _tiny_moe():
    torch.manual_seed(0)
    config = Qwen2MoeConfig(**small_config(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
    ))  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def _tiny_gemma2():
    """Gemma2: a final logit softcap (small, so that it bends the logits), tied embeddings."""
    torch.manual_seed(0)
    config = Gemma2Config(**{
        **small_config(), "head_dim": 16, "final_logit_softcapping": 2.0, "tie_word_embeddings": True,
        "num_hidden_layers": 1,
    })  # fmt: skip
    return Gemma2ForCausalLM(config)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip


# Models whose plumbing the fused path must go through: MoE aux loss, softcap + tied head, PEFT (LoRA + saved head)
@pytest.mark.parametrize("model_case", ["moe_aux_loss", "gemma2_softcap", "peft_lora"])
def test_cpo_trainer_models_flag_on_matches_flag_off(tokenizer, fused_calls, model_case):
    kwargs = dict(loss_type="sigmoid", cpo_alpha=1.0)
    make_model, peft_config, initial = tiny_model, None, None
    if model_case == "moe_aux_loss":
        make_model = _tiny_moe
        initial = _tiny_moe().state_dict()
    elif model_case == "gemma2_softcap":
        # the softcapped logits/* mean is a no-grad chunked pass over every position: small chunks, so that the
        # recorder can tell them from the whole sequence
        make_model, kwargs["workspace"] = _tiny_gemma2, 24 << 10
        initial = _tiny_gemma2().state_dict()
    else:
        pytest.importorskip("peft")
        peft_config, initial = _lora(), {}
    off = train_cpo(tokenizer, make_model, flag=False, peft_config=peft_config, **kwargs)
    on = train_cpo(tokenizer, make_model, flag=True, peft_config=peft_config, **kwargs)
    assert fused_calls["loss"] == 4
    assert_same_training(off[0], on[0], initial=initial)
    assert_same_eval(off[1], on[1])
    assert_logits_materialized_only_off(off, on)
    if model_case == "peft_lora":  # the adapters and the saved head copy trained
        weights = on[0][1]
        assert any("lora_B" in name and weights[name].abs().sum() > 0 for name in weights)
        trained_head = [name for name in weights if "modules_to_save" in name and "lm_head" in name]
        assert trained_head and not torch.equal(weights[trained_head[0]], tiny_model().lm_head.weight)


def test_cpo_moe_aux_loss_enters_the_loss(tokenizer):
    """The aux term really is there: the same MoE model with router_aux_loss_coef = 0 logs a different loss."""

    def no_aux():
        model = _tiny_moe()
        model.config.router_aux_loss_coef = 0.0
        return model

    with_aux = train_cpo(tokenizer, _tiny_moe, flag=True, max_steps=1)[0][0][0]["loss"]
    without = train_cpo(tokenizer, no_aux, flag=True, max_steps=1)[0][0][0]["loss"]
    assert with_aux > without


# ---------------------------------------------------------------------------------------------------------------
# What the fused path refuses


def test_cpo_refuses_encoder_decoder_at_construction(tokenizer):
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))  # fmt: skip
    args = trl.experimental.cpo.CPOConfig(
        output_dir="/tmp/fused-gspo-trl-cpo-test", use_cpu=True, report_to=[], max_length=32,
        max_completion_length=16, use_fused_gspo_loss=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="decoder-only"):
        trl.experimental.cpo.CPOTrainer(model=t5, args=args, train_dataset=preference_dataset(4, 0),
                                        processing_class=tokenizer)  # fmt: skip


def test_cpo_refuses_lora_on_the_lm_head_at_construction(tokenizer):
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    args = trl.experimental.cpo.CPOConfig(output_dir="/tmp/fused-gspo-trl-cpo-test", use_cpu=True, report_to=[],
                                          max_length=32, use_fused_gspo_loss=True)  # fmt: skip
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        trl.experimental.cpo.CPOTrainer(model=tiny_model(), args=args, train_dataset=preference_dataset(4, 0),
                                        processing_class=tokenizer, peft_config=peft_config)  # fmt: skip


def test_cpo_detects_a_logit_transform_the_config_does_not_describe(tokenizer):
    """A config announcing a logit scale its model does not apply: the fused loss would differ, so it fails."""

    def misdescribed():
        model = tiny_model()
        model.config.logit_scale = 0.5  # Qwen2 never multiplies its logits by it
        return model

    with pytest.raises(RuntimeError, match="transforms its LM head's output"):
        train_cpo(tokenizer, misdescribed, flag=True, max_steps=1)


@pytest.mark.parametrize("loss_type,fused", [("sigmoid", True), ("simpo", False)])
def test_a_row_with_nothing_to_score(tokenizer, fused_calls, loss_type, fused):
    """A chosen row whose labels are all -100: TRL sums its log-probs to 0 (sigmoid), which the fused loss does too,
    with the same loss, gradients and metrics; or divides by its count (simpo: NaN), and then TRL computes it."""
    trainer = trl.experimental.cpo.CPOTrainer(
        model=tiny_model(),
        args=trl.experimental.cpo.CPOConfig(**CPU_TRAINING_ARGS, output_dir="/tmp/fused-gspo-trl-cpo-test",
                                            max_length=32, loss_type=loss_type, **{FLAG: True}),
        train_dataset=preference_dataset(4, seed=0),
        processing_class=tokenizer,
    )  # fmt: skip
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    batch["chosen_labels"][0] = -100
    results = {}
    for flag in (False, True):
        trainer.args.use_fused_gspo_loss = flag
        trainer.model.zero_grad()
        with contextlib.ExitStack() as stack:
            if flag and not fused:
                stack.enter_context(pytest.warns(UserWarning, match="averages each row's log-probs"))
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        grads = {}
        if fused:
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[flag] = loss.detach(), grads, metrics
    assert fused_calls["loss"] == (1 if fused else 0)
    (loss_off, grads_off, metrics_off), (loss_on, grads_on, metrics_on) = results[False], results[True]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert torch.isfinite(loss_on) == fused
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert rel_err(grads_on[name], grad, floor=1e-8) < 1e-4, name
    assert metrics_on.keys() == metrics_off.keys()
    for key, value in metrics_off.items():
        assert metrics_on[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


def test_flag_off_leaves_trl_untouched(tokenizer):
    """With the flag off the patched trainer runs TRL's own methods (the head outputs the whole vocabulary)."""
    from fused_gspo.trl import cpo

    assert trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics.__wrapped__ is not None
    assert FLAG in trl.experimental.cpo.CPOConfig.__dataclass_fields__
    assert trl.experimental.cpo.CPOConfig in cpo.config_classes()
    _, _, widths, _ = train_cpo(tokenizer, tiny_model, flag=False, max_steps=1)
    assert set(widths) == {V}


# ---------------------------------------------------------------------------------------------------------------
# Memory: one CPOTrainer step at a 32k vocabulary, flag off vs on, each in a fresh process

_MEASURE = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    sys.path.insert(0, sys.argv[2])
    import torch, datasets
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl_helpers import WORDS, make_tokenizer, small_config
    from fused_gspo.bench import ProcessMemory
    import fused_gspo.trl.cpo
    from fused_gspo.trl import patch_trl
    patch_trl()
    workspace = sys.argv[7]
    fused_gspo.trl.cpo.WORKSPACE_BYTES = workspace if workspace == "auto" else int(workspace)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    flag, V, pairs, prompt_len, completion_len = sys.argv[1] == "on", *map(int, sys.argv[3:7])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**small_config(), "vocab_size": V, "hidden_size": 64}))
    g = torch.Generator().manual_seed(0)
    words = lambda k: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
    data = datasets.Dataset.from_dict({
        "prompt": [words(prompt_len) for _ in range(pairs)],
        "chosen": [words(completion_len) for _ in range(pairs)],
        "rejected": [words(completion_len - 1) for _ in range(pairs)],
    })
    args = CPOConfig(output_dir="/tmp/fused-gspo-trl-cpo-mem", use_cpu=True, bf16=False, report_to=[],
                     per_device_train_batch_size=pairs, max_length=prompt_len + completion_len + 1,
                     dataloader_num_workers=0, use_fused_gspo_loss=flag)
    trainer = CPOTrainer(model=model, args=args, train_dataset=data, processing_class=make_tokenizer())
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()

    def step():
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        trainer.model.zero_grad(set_to_none=True)

    step()  # warm every code path once
    probe = ProcessMemory.create()
    assert isinstance(probe, ProcessMemory), probe.method
    L = inputs["chosen_input_ids"].shape[1]
    print(json.dumps({"peak_mib": probe.peak_mib(step), "rows": 2 * pairs, "L": L}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak-RSS counter is Linux's /proc")
def test_cpo_step_peak_memory_flag_on_is_below_trl_by_the_logits():
    """Peak resident memory of one CPOTrainer step (loss + backward) above what was resident before it, V = 32768,
    2B = 8 rows of L = 120 positions, flag off and on each in a fresh process (both at once). TRL's step holds the
    [2B, L, V] float32 logits (120 MiB) and, in the backward, their gradient: its peak exceeds twice their size. The
    fused step, with an 8 MiB chunk budget, holds hidden-sized tensors, the parameters' gradients and its chunks: under
    half their size. (The default CPU budget, "auto", is a fixed 512 MiB: at this shape one chunk is about as large as
    the logits, and the fused step peaks near 260 MiB against TRL's 510-635 MiB.)"""
    V_big, pairs, prompt_len, completion_len = 32768, 4, 40, 80
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    runs = {"off": ("off", "auto"), "on": ("on", str(8 << 20))}
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _MEASURE,
                flag,
                tests_dir,
                str(V_big),
                str(pairs),
                str(prompt_len),
                str(completion_len),
                workspace,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, (flag, workspace) in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results[name] = json.loads(out.strip().splitlines()[-1])
    rows, L = results["on"]["rows"], results["on"]["L"]
    assert (rows, L) == (2 * pairs, prompt_len + completion_len)
    logits_mib = rows * L * V_big * 4 / 2**20
    off, on = results["off"]["peak_mib"], results["on"]["peak_mib"]
    message = (
        f"peak MiB of one step: TRL {off:.1f}, fused {on:.1f} (8 MiB chunks); "
        f"logits [{rows}, {L}, {V_big}] fp32 = {logits_mib:.1f} MiB"
    )
    print(message)
    assert off > 2 * logits_mib, message  # the logits and their gradient
    assert on < logits_mib / 2, message  # nothing of their size
    assert off - on > 1.5 * logits_mib, message
