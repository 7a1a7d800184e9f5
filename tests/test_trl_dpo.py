"""fused_gspo.trl.dpo end to end: TRL 1.16's DPOTrainer, flag off vs on, same seed.

Each training case trains a few SGD steps twice from the same seed on a small preference dataset and evaluates once,
then asserts that the logged losses, gradient norms and metrics (train and ``eval_``), and the updated weights agree
(:func:`trl_helpers.assert_same_training`), and that the fused loss (and, for the reference, the fused log-probs)
really ran. The one-call cases compare a single ``_compute_loss``, TRL's and ours, on the same batch with TRL's forward
handing over only the completion tokens' hidden states (its layout on Triton devices, forced here on the CPU).
"""

import uuid
import warnings
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from conftest import rel_err  # noqa: E402
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM  # noqa: E402
from trl_helpers import (  # noqa: E402
    CPU_TRAINING_ARGS,
    WORDS,
    assert_same_training,
    small_config,
    tiny_model,
    with_eos_bias,
)

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import model_path_fixture as model_path_fixture  # noqa: E402
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402
from trl_helpers import tokenizer_fixture as tokenizer_fixture  # noqa: E402

from fused_gspo.trl import FLAG  # noqa: E402

EVAL_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


@pytest.fixture(name="fused_calls")
def fused_calls_fixture(monkeypatch):
    """Counts the fused DPO losses, the fused (reference) log-prob passes, and the deferred losses."""
    import fused_gspo.trl.dpo as adapter
    import fused_gspo.trl.stand_in as stand_in

    calls = {"loss": 0, "logprobs": 0, "deferred": 0}
    loss_fn, logprob_fn, finish = (
        adapter.compute_preference_loss,
        stand_in.fused_logprobs,
        adapter._PreferenceRequest.finish,
    )

    def counted_loss(*args, **kwargs):
        calls["loss"] += 1
        return loss_fn(*args, **kwargs)

    def counted_logprobs(*args, **kwargs):
        calls["logprobs"] += 1
        return logprob_fn(*args, **kwargs)

    def counted_finish(self, ref):
        calls["deferred"] += 1
        return finish(self, ref)

    monkeypatch.setattr(adapter, "compute_preference_loss", counted_loss)
    monkeypatch.setattr(stand_in, "fused_logprobs", counted_logprobs)
    monkeypatch.setattr(adapter._PreferenceRequest, "finish", counted_finish)
    return calls


def preference_dataset(n: int, seed: int, empty_prompt: bool = False):
    """Prompts of 2-4 words, chosen and rejected completions of various lengths (padding in every batch); with
    ``empty_prompt`` the first example has none (its completion starts the sequence). A fresh fingerprint each call,
    so that ``precompute_ref_log_probs`` computes the reference log-probs instead of reusing a cached run's."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    # the completions start with a space: TRL concatenates prompt and completion as strings
    rows = [(words(2 + i % 3), " " + words(3 + i % 4), " " + words(2 + (3 * i) % 5)) for i in range(n)]
    if empty_prompt:
        rows[0] = ("", words(3), words(2))
    columns = dict(zip(("prompt", "chosen", "rejected"), (list(c) for c in zip(*rows, strict=True)), strict=True))
    return datasets.Dataset.from_dict(columns).map(lambda e: e, new_fingerprint=uuid.uuid4().hex)


def dpo_args(flag: bool, **kwargs):
    args = dict(
        CPU_TRAINING_ARGS,
        output_dir="/tmp/fused-gspo-trl-dpo-test",
        learning_rate=0.5,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
    )
    args.update(kwargs)
    return trl.DPOConfig(**args, **{FLAG: flag})


def train_dpo(tokenizer, model, flag: bool, trainer_kwargs=None, empty_prompt=False, **kwargs):
    """Train ``max_steps`` SGD steps and evaluate once; the train and eval log entries (no timings) and the weights.
    ``model``: a path, or a factory called here (the trainer takes ownership of what it is given)."""
    torch.manual_seed(1234)
    trainer = trl.DPOTrainer(
        model=model() if callable(model) else model,
        args=dpo_args(flag, **kwargs),
        train_dataset=preference_dataset(12, 0, empty_prompt),
        eval_dataset=preference_dataset(4, 1),
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    trainer.evaluate()
    logs = [
        {k: v for k, v in entry.items() if k not in EVAL_TIMINGS}
        for entry in trainer.state.log_history
        if "loss" in entry or "eval_loss" in entry
    ]
    assert sum("eval_loss" in entry for entry in logs) == 1
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return logs, weights


def moe_model():
    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **small_config(
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            output_router_logits=True, tie_word_embeddings=False,
        )
    )  # fmt: skip
    return with_eos_bias(Qwen2MoeForCausalLM(config))


@pytest.fixture(scope="module", name="moe_path")
def moe_path_fixture(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    moe_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def lora_b_zeros(weights):
    """LoRA's B matrices start at zero: training must have moved them."""
    return {n: torch.zeros_like(t) for n, t in weights.items() if "lora_B" in n}


# ---------------------------------------------------------------------------------------------------------------
# Training: flag off vs on

# DPO's losses and options: IPO (length-normalized), a loss combination with SFT, LD-DPO, an f-divergence, WPO
# weighting, precomputed reference log-probs, padding_free (TRL 1.16 turns it off: padded batches), accumulation
CASES = {
    "sigmoid": {},
    "ipo": dict(loss_type=["ipo"], beta=0.5),
    "sigmoid_sft_weights": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "ld_alpha": dict(ld_alpha=0.5),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "use_weighting": dict(loss_type=["sigmoid", "bco_pair"], use_weighting=True),
    "precompute_ref": dict(precompute_ref_log_probs=True),
    "padding_free": dict(padding_free=True),
    "accumulation": dict(gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dpo_trainer_flag_on_matches_flag_off(tokenizer, model_path, fused_calls, case):
    off = train_dpo(tokenizer, model_path, False, **CASES[case])
    assert fused_calls == {"loss": 0, "logprobs": 0, "deferred": 0}
    on = train_dpo(tokenizer, model_path, True, **CASES[case])
    # every training micro-batch (3 steps) and the eval batch; the reference of each (or, precomputed, of the dataset)
    assert fused_calls["loss"] >= 3 + 1
    assert fused_calls["logprobs"] >= (1 if case == "precompute_ref" else fused_calls["loss"])
    assert fused_calls["deferred"] == 0
    assert_same_training(off, on)
    assert on[0][-1]["eval_num_tokens"] == on[0][-2]["num_tokens"] > 0


def test_lora_on_the_backbone(tokenizer, model_path, fused_calls):
    """The reference is the policy with its adapter disabled."""
    off = train_dpo(tokenizer, model_path, False, trainer_kwargs={"peft_config": lora()})
    on = train_dpo(tokenizer, model_path, True, trainer_kwargs={"peft_config": lora()})
    assert fused_calls["loss"] == 4 and fused_calls["logprobs"] >= 4
    assert_same_training(off, on, initial=lora_b_zeros(on[1]))


def test_moe_aux_loss(tokenizer, moe_path, fused_calls):
    """Qwen2-MoE: TRL adds router_aux_loss_coef * outputs.aux_loss to the loss and logs aux_loss."""
    off = train_dpo(tokenizer, moe_path, False)
    on = train_dpo(tokenizer, moe_path, True)
    assert fused_calls["loss"] == 4
    assert_same_training(off, on, initial=moe_model().state_dict())
    assert all(entry["aux_loss"] > 0 for entry in on[0] if "loss" in entry)
    assert on[0][-1]["eval_aux_loss"] > 0


def test_stochastic_reference_follows_trls_order(tokenizer, fused_calls):
    """Attention dropout stays on (disable_dropout only zeroes nn.Dropout), so the reference pass (the policy with
    its adapter disabled, in train mode) draws random numbers: the policy's forward must draw first, as in TRL. The
    fused run detects it and computes the loss after the reference pass (``deferred``); eval has no dropout."""

    def model():
        return tiny_model(attention_dropout=0.3)

    off = train_dpo(tokenizer, model, False, trainer_kwargs={"peft_config": lora()})
    on = train_dpo(tokenizer, model, True, trainer_kwargs={"peft_config": lora()})
    assert fused_calls["loss"] == 4 and fused_calls["deferred"] == 3
    assert_same_training(off, on, initial=lora_b_zeros(on[1]))


def test_prompt_tuning(tokenizer, fused_calls):
    """Prompt-learning PEFT prepends virtual tokens to every row (and, for the example with an empty prompt, scores
    its first completion token from the last virtual token, which TRL drops)."""
    kwargs = dict(trainer_kwargs={"peft_config": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)})
    off = train_dpo(tokenizer, tiny_model, False, empty_prompt=True, **kwargs)
    on = train_dpo(tokenizer, tiny_model, True, empty_prompt=True, **kwargs)
    assert fused_calls["loss"] == 4
    assert_same_training(off, on, initial={})
    moved = [n for n in on[1] if "prompt_encoder" in n]
    assert moved


# ---------------------------------------------------------------------------------------------------------------
# One _compute_loss call: TRL's forward handing over the completion tokens only (Triton devices)


def _one_call(trainer, inputs, flag, monkeypatch=None, handed=None):
    import trl.trainer.utils as trl_utils

    import fused_gspo.trl.dpo as adapter

    trainer.args.use_fused_gspo_loss = flag
    if flag and monkeypatch is not None:  # TRL's layout on Triton devices: only the completion tokens handed over
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
        original_call = adapter._PreferenceRequest.__call__

        def recording_call(request, hidden, *args):
            handed.append(hidden.shape[0])
            return original_call(request, hidden, *args)

        monkeypatch.setattr(adapter._PreferenceRequest, "__call__", recording_call)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: dict(v) for k, v in trainer._metrics.items()}


def _assert_same_call(off, on) -> None:
    """Flag off vs on for one :func:`_one_call`: loss, gradients and train metrics."""
    (loss_off, grads_off, metrics_off), (loss_on, grads_on, metrics_on) = off, on
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name, grad in grads_off.items():
        assert rel_err(grads_on[name], grad, floor=1e-8) < 1e-4, name
    assert metrics_on["train"].keys() == metrics_off["train"].keys()
    for key, values in metrics_off["train"].items():
        assert metrics_on["train"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


ONE_CALL_CASES = {
    "weighting_ld_alpha": (dict(use_weighting=True, ld_alpha=0.3, loss_type=["sigmoid", "ipo"]), {}, False),
    "sft_js_divergence": (
        dict(loss_type=["robust", "sft"], label_smoothing=0.1, f_divergence_type="js_divergence"),
        {},
        False,
    ),
    # the example with an empty prompt: one more label per row whose completion starts the sequence
    "prompt_tuning": (
        {},
        {"peft_config": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)},
        True,
    ),
}


@pytest.mark.parametrize("case", list(ONE_CALL_CASES))
def test_compute_loss_with_only_the_completion_tokens_handed_over(tokenizer, fused_calls, monkeypatch, case):
    config_kwargs, trainer_kwargs, empty_prompt = ONE_CALL_CASES[case]
    # a reference unlike the policy (rewards != 0), or with PEFT the policy with its adapter disabled
    reference = {} if trainer_kwargs else {"ref_model": tiny_model(seed=3)}
    trainer = trl.DPOTrainer(
        model=tiny_model(),
        args=dpo_args(False, **config_kwargs),
        train_dataset=preference_dataset(8, 0, empty_prompt),
        processing_class=tokenizer,
        **reference,
        **trainer_kwargs,
    )
    trainer.model.train()
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    handed = []
    off = _one_call(trainer, inputs, False)
    on = _one_call(trainer, inputs, True, monkeypatch, handed)
    assert fused_calls["loss"] == 1
    mask = inputs["completion_mask"]
    lead = int(mask[:, 0].sum()) if empty_prompt else 0
    assert handed == [int(mask[:, 1:].sum()) + lead]
    if empty_prompt:
        assert lead == 2  # chosen and rejected of the first example
    _assert_same_call(off, on)
    # eval with return_outputs=True (compute_metrics): the logits come from a plain forward, as in TRL
    trainer.model.eval()
    with torch.no_grad(), pytest.warns(FutureWarning, match="return_outputs"):
        loss_eval, outputs = trainer._compute_loss(trainer.model, inputs, True)
    assert outputs.logits.shape[-1] == trainer.model.config.vocab_size and torch.isfinite(loss_eval)
    assert fused_calls["loss"] == 2 and trainer._metrics["eval"]["rewards/margins"]


# ---------------------------------------------------------------------------------------------------------------
# What TRL computes but the fused loss does not take: TRL's own loss, or a refusal at construction


def _nothing_to_score_trainer(tokenizer, chosen: str, **config_kwargs):
    """A first example with an empty prompt and a one-token chosen completion (its EOS): the shifted chosen row
    scores nothing."""
    trainer = trl.DPOTrainer(
        model=tiny_model(),
        ref_model=tiny_model(seed=3),
        args=dpo_args(True, **config_kwargs),
        train_dataset=datasets.Dataset.from_dict(
            {"prompt": ["", "w1 w2"], "chosen": ["", chosen], "rejected": [" w4 w5", " w6"]}
        ),  # fmt: skip
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "sft"]])
def test_a_sequence_with_nothing_to_score_is_fused(tokenizer, fused_calls, loss_type):
    """TRL computes a row that scores nothing (its log-prob is 0; ipo's length clamps to 1); so does the fused loss,
    with the same loss, gradients and metrics (sft: another chosen row still has tokens)."""
    trainer = _nothing_to_score_trainer(tokenizer, " w3", loss_type=loss_type)
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    inputs["completion_mask"][0] = 0  # nothing to score in chosen row 0 (its own EOS, too)
    assert int(inputs["completion_mask"][0].sum()) == 0 and int(inputs["completion_mask"][1, 1:].sum()) > 0
    off, on = _one_call(trainer, inputs, False), _one_call(trainer, inputs, True)
    assert fused_calls["loss"] == 1
    _assert_same_call(off, on)


def test_sft_with_no_chosen_token_runs_trls_loss(tokenizer, fused_calls):
    """TRL's sft term averages over the chosen tokens: with none in the batch it is NaN, which the fused loss refuses
    to compute; the adapter hands that batch to TRL's own loss."""
    trainer = _nothing_to_score_trainer(tokenizer, "", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[0]]))
    assert int(inputs["completion_mask"][0, 1:].sum()) == 0
    with pytest.warns(UserWarning, match="sft loss averages over the chosen rows"):
        loss_on = trainer._compute_loss(trainer.model, inputs, False)
    assert fused_calls["loss"] == 0
    trainer.args.use_fused_gspo_loss = False
    loss_off = trainer._compute_loss(trainer.model, inputs, False)
    torch.testing.assert_close(loss_on, loss_off, equal_nan=True)


def test_lora_on_the_lm_head_fails_at_construction(tokenizer, model_path):
    with pytest.raises(ValueError, match="lm_head"):
        trl.DPOTrainer(
            model=model_path,
            args=dpo_args(True),
            train_dataset=preference_dataset(4, 0),
            processing_class=tokenizer,
            peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]),
        )


def test_what_trl_fails_on_fails_at_construction(tokenizer, model_path):
    """use_weighting with "hinge": TRL 1.16 builds the trainer and fails in the first backward (in-place product on
    the relu output); with the flag on, the trainer is refused."""
    kwargs = dict(loss_type=["hinge"], use_weighting=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trl.DPOTrainer(model=model_path, args=dpo_args(False, **kwargs), train_dataset=preference_dataset(4, 0),
                       processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="use_fused_gspo_loss=True cannot reproduce"):
        trl.DPOTrainer(model=model_path, args=dpo_args(True, **kwargs), train_dataset=preference_dataset(4, 0),
                       processing_class=tokenizer)  # fmt: skip
