"""Shared helpers and fixtures of the TRL adapter's tests (tests/test_trl_*.py).

Real TRL trainers on a tiny random causal LM: a 2-layer Qwen2 built from a config, a word-level tokenizer built here
(no downloads), a rule-based reward. :func:`train` trains a few steps from a fixed seed and :func:`assert_same_training`
asserts that two runs (flag off vs on) logged the same losses, gradient norms and metrics and ended with the same
weights.

Each test module imports the fixtures (``from trl_helpers import fused_calls_fixture, ...  # noqa: F401``):
pytest registers the fixtures found in a test module's namespace, autouse ones included, and
:func:`assert_autouse_fixtures_active` checks that it did. The functions are named ``*_fixture`` and the fixtures
``name=``'d, so that a test's parameter does not shadow the imported name.
"""

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from fused_gspo.trl import FLAG, is_patched, patch_trl, unpatch_trl  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*trl.experimental.*")

WORDS = [f"w{i}" for i in range(300)]
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures (import them into the test module)


@pytest.fixture(scope="module", name="tokenizer")
def tokenizer_fixture():
    return make_tokenizer()


@pytest.fixture(scope="module", name="model_path")
def model_path_fixture(tmp_path_factory, tokenizer):
    """The tiny model saved locally: trainers load it (and their reference model) by path, as with a Hub id."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, name="patched")
def patched_fixture():
    patch_trl()
    yield
    unpatch_trl()


@pytest.fixture(autouse=True, name="fused_calls")
def fused_calls_fixture(monkeypatch):
    """Counts the fused loss and log-prob computations, to prove the flag really switches the path."""
    import fused_gspo.trl.patch as adapter
    import fused_gspo.trl.stand_in as stand_in

    calls = {"loss": 0, "logprobs": 0}
    loss_fn, logprob_fn = adapter.compute_policy_loss, stand_in.fused_logprobs

    def counted_loss(*args, **kwargs):
        calls["loss"] += 1
        return loss_fn(*args, **kwargs)

    def counted_logprobs(*args, **kwargs):
        calls["logprobs"] += 1
        return logprob_fn(*args, **kwargs)

    monkeypatch.setattr(adapter, "compute_policy_loss", counted_loss)
    monkeypatch.setattr(stand_in, "fused_logprobs", counted_logprobs)
    return calls


def assert_autouse_fixtures_active(request) -> None:
    """The autouse fixtures imported from here apply to the calling test: TRL is patched and the fused calls counted."""
    import fused_gspo.trl.patch as adapter
    import fused_gspo.trl.stand_in as stand_in

    assert {"patched", "fused_calls"} <= set(request.fixturenames)
    assert is_patched() and FLAG in trl.GRPOConfig.__dataclass_fields__
    assert adapter.compute_policy_loss.__name__ == "counted_loss"
    assert stand_in.fused_logprobs.__name__ == "counted_logprobs"


# ---------------------------------------------------------------------------------------------------------------
# Models, data, reward


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (ids 3...), with ``<pad>`` 0, ``<eos>`` 1 and ``<unk>`` 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def small_config(**extra) -> dict:
    """The tiny model's config keywords (any ``*Config`` of a causal LM with these names takes them)."""
    return dict(
        vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None, **extra,
    )  # fmt: skip


def with_eos_bias(model):
    """Point the EOS row along the mean final hidden state so ~5% of sampled tokens end the completion: some
    completions terminate, others are truncated (what mask_truncated_completions acts on)."""
    with torch.no_grad():
        hidden = model.model(torch.randint(3, model.config.vocab_size, (8, 16))).last_hidden_state.mean((0, 1))
        model.lm_head.weight[model.config.eos_token_id] = 3.5 * hidden / hidden.square().sum()
    return model


def tiny_model(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return with_eos_bias(Qwen2ForCausalLM(Qwen2Config(**small_config(tie_word_embeddings=False, **overrides))))


def prompts_dataset(n: int = 8):
    g = torch.Generator().manual_seed(0)
    rows = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (3,), generator=g)) for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": rows})


def even_words_reward(completions, **_):
    """Fraction of even-numbered words: a verifiable, rule-based reward."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(sum(w.startswith("w") and int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Training and comparing


# Every flag-off/flag-on training test: CPU, fp32, 3 plain-SGD steps from one seed, a log line per step, nothing saved
CPU_TRAINING_ARGS = dict(
    use_cpu=True,
    bf16=False,
    report_to=[],
    logging_steps=1,
    save_strategy="no",
    max_steps=3,
    optim="sgd",
    seed=1234,
    dataloader_num_workers=0,
)


def train(trainer_cls, config_cls, tokenizer, model, flag: bool, trainer_kwargs=None, **kwargs):
    """Train ``max_steps`` with plain SGD (its update is proportional to the gradient, so differences stay
    comparable; Adam would blow up the rounding noise of gradients that are mathematically zero)."""
    torch.manual_seed(1234)
    args = dict(
        CPU_TRAINING_ARGS,
        output_dir="/tmp/fused-gspo-trl-test",
        learning_rate=0.05,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=10,
    )
    args.update(kwargs)
    config = config_cls(**args, **{FLAG: flag})
    trainer = trainer_cls(
        model=model,
        reward_funcs=even_words_reward,
        args=config,
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        **(trainer_kwargs or {}),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    weights = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return logs, weights


def assert_same_training(off, on, rtol=1e-4, atol=1e-6, initial=None):
    """Logged losses, gradient norms and metrics, and the trained weights, agree; the weights did move (from
    ``initial``, by default what ``model_path`` holds)."""
    logs_off, weights_off = off
    logs_on, weights_on = on
    assert len(logs_off) == len(logs_on) > 0
    for entry_off, entry_on in zip(logs_off, logs_on, strict=True):
        assert entry_off.keys() == entry_on.keys()
        for key, value in entry_off.items():
            if key in TIMINGS:
                continue
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(entry_on[key]), key
            elif isinstance(value, (int, float)):
                assert entry_on[key] == pytest.approx(value, rel=rtol, abs=atol), (key, value, entry_on[key])
    for name, tensor in weights_off.items():
        torch.testing.assert_close(weights_on[name], tensor, rtol=rtol, atol=atol, msg=name)
    if initial is None:
        initial = tiny_model().state_dict()
    if initial:
        moved = [n for n in weights_on if n in initial and not torch.equal(weights_on[n], initial[n])]
        assert moved, "training should move the weights"
