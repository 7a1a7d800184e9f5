"""fused_gspo.trl.patch end to end: real TRL trainers on a tiny random causal LM, flag off vs on, same seed.

Each training case trains a few steps twice from the same seed and asserts that the logged losses, gradient norms and
metrics, and the updated weights, agree (:func:`trl_helpers.assert_same_training`). The crafted cases compare one
``_compute_loss`` call, TRL's and ours, on the same inputs.
"""

import math
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")

from conftest import rel_err  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl_helpers import (  # noqa: E402
    assert_autouse_fixtures_active,
    assert_same_training,
    even_words_reward,
    prompts_dataset,
    small_config,
    tiny_model,
    train,
    with_eos_bias,
)

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import fused_calls_fixture as fused_calls_fixture  # noqa: E402
from trl_helpers import model_path_fixture as model_path_fixture  # noqa: E402
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402
from trl_helpers import tokenizer_fixture as tokenizer_fixture  # noqa: E402


def test_autouse_fixtures_apply_here(request):
    assert_autouse_fixtures_active(request)


# An untested TRL release: the adapter refuses by name, patching nothing (it replaces private methods)
@pytest.mark.parametrize("version", ["1.17.0", "1.16.1", "1.15.2", "2.0.0.dev0"])
def test_patch_refuses_an_untested_trl_release(monkeypatch, version):
    from fused_gspo.trl import FLAG, is_patched, patch_trl, unpatch_trl
    from fused_gspo.trl.patch import TESTED_TRL_VERSIONS

    unpatch_trl()
    compute_loss = trl.GRPOTrainer.__dict__["_compute_loss"]
    monkeypatch.setattr(trl, "__version__", version)
    with pytest.raises(RuntimeError, match=rf"TRL {TESTED_TRL_VERSIONS[0]}.*TRL {version} is installed.*refuses"):
        patch_trl()
    assert not is_patched()
    assert FLAG not in trl.GRPOConfig.__dataclass_fields__
    assert trl.GRPOTrainer.__dict__["_compute_loss"] is compute_loss
    monkeypatch.setattr(trl, "__version__", TESTED_TRL_VERSIONS[0])
    patch_trl()
    assert is_patched()


# ---------------------------------------------------------------------------------------------------------------
# Training: flag off vs on

GSPO_SEQUENCE = dict(loss_type="grpo", importance_sampling_level="sequence")
# GRPO loss types, sequence-level ratios (GSPO), clipping, KL, accumulation, off-policy iterations, entropy bonus
GRPO_CASES = {
    "grpo": dict(loss_type="grpo"),
    "gspo_paper": dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        beta=0.0,
        epsilon=3e-4,
        epsilon_high=4e-4,
        steps_per_generation=4,
        gradient_accumulation_steps=1,
    ),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "unsloth_gspo": dict(loss_type="dr_grpo", importance_sampling_level="sequence"),
    "beta_kl": dict(loss_type="bnpo", beta=0.05),
    "accumulation": dict(loss_type="dapo", gradient_accumulation_steps=2, steps_per_generation=4),
    "off_policy_entropy": dict(
        loss_type="grpo",
        steps_per_generation=2,
        gradient_accumulation_steps=1,
        num_iterations=2,
        epsilon=0.01,
        entropy_coef=0.01,
        top_entropy_quantile=0.5,
    ),
}


# GRPO's loss types and TRL options, flag off against on (see GRPO_CASES)
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_trainer_flag_on_matches_flag_off(tokenizer, model_path, fused_calls, case):
    kwargs = GRPO_CASES[case]
    off = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=False, **kwargs)
    assert fused_calls == {"loss": 0, "logprobs": 0}
    on = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True, **kwargs)
    assert fused_calls["loss"] >= 3
    assert_same_training(off, on)
    if case in ("gspo_paper", "off_policy_entropy"):
        # steps_per_generation > gradient_accumulation_steps: ratios are off-policy and get clipped
        assert any(entry.get("clip_ratio/region_mean", 0) > 0 for entry in on[0])
    if case == "dapo":  # some completions end, others are truncated and masked out
        assert any(0 < entry["completions/clipped_ratio"] < 1 for entry in on[0]), [
            e["completions/clipped_ratio"] for e in on[0]
        ]


# fp32 master weights with bf16=True (CPU autocast): TRL's chunked head and ours both run the head in bf16 and
# stage the logits in bf16, so they round the same GEMMs (in fp32 they differed by 1.7e-3 on the grad-norm)
@pytest.mark.parametrize("case", ["gspo", "dapo"])
def test_grpo_trainer_under_autocast_matches_flag_off(tokenizer, model_path, fused_calls, capsys, case):
    kwargs = dict(bf16=True, max_steps=2, **({"loss_type": "dapo"} if case == "dapo" else GSPO_SEQUENCE))
    off = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=False, **kwargs)
    on = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True, **kwargs)
    assert fused_calls["loss"] >= 2
    first_off, first_on = off[0][0], on[0][0]
    with capsys.disabled():  # the figures the issue asks for, in the test log
        print(
            f"\n[autocast {case}] step-0 grad_norm flag off {first_off['grad_norm']:.6f} on {first_on['grad_norm']:.6f}"
        )
    for key in ("loss", "grad_norm"):
        assert first_on[key] == pytest.approx(first_off[key], rel=2e-4, abs=1e-6), (key, first_off[key], first_on[key])
    # the model stayed fp32 (master weights), and both runs moved it alike
    assert all(t.dtype == torch.float32 for t in on[1].values())
    for name, tensor in off[1].items():
        torch.testing.assert_close(on[1][name], tensor, rtol=2e-3, atol=1e-5, msg=name)


def test_trainer_arguments_choose_the_logits_staging(tokenizer, model_path, fused_calls, monkeypatch):
    """``fused_gspo_logits_dtype="float32"`` reaches the loss and the no-grad passes; the default stages as TRL."""
    import fused_gspo.trl.stand_in as stand_in
    from fused_gspo.trl import policy_config_for

    seen = []
    request_call = stand_in.LogProbRequest.__call__
    monkeypatch.setattr(stand_in.LogProbRequest, "__call__", lambda self, *a: seen.append(self.logits_dtype)
                        or request_call(self, *a))  # fmt: skip
    for staging in ("float32", "auto"):
        kwargs = dict(bf16=True, max_steps=1, steps_per_generation=2, fused_gspo_logits_dtype=staging)
        train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True, **kwargs)
        assert seen and set(seen) == {staging}
        seen.clear()
    args = trl.GRPOConfig(
        output_dir="/tmp/fused-gspo-staging", use_cpu=True, report_to=[], use_fused_gspo_loss=True,
        fused_gspo_logits_dtype="float32", per_device_train_batch_size=4, num_generations=4,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(model=model_path, reward_funcs=even_words_reward, args=args,
                              train_dataset=prompts_dataset(), processing_class=tokenizer)  # fmt: skip
    assert policy_config_for(trainer).logits_dtype == "float32"
    with pytest.raises(ValueError, match="fused_gspo_logits_dtype"):
        trl.GRPOConfig(output_dir="/tmp/fused-gspo-staging", fused_gspo_logits_dtype="half")


def test_gmpo_trainer_flag_on_matches_flag_off(tokenizer, model_path, fused_calls):
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    kwargs = dict(steps_per_generation=2, gradient_accumulation_steps=1, beta=0.02)
    off = train(GMPOTrainer, GMPOConfig, tokenizer, model_path, flag=False, **kwargs)
    on = train(GMPOTrainer, GMPOConfig, tokenizer, model_path, flag=True, **kwargs)
    assert fused_calls["loss"] >= 3 and fused_calls["logprobs"] > 0
    assert_same_training(off, on)


# GRPO options GMPOTrainer inherits but its loss ignores: with the flag on the trainer refuses them by name (README)
@pytest.mark.parametrize(
    "option",
    [{"delta": 1.5}, {"off_policy_mask_threshold": 0.1}, {"entropy_coef": 0.1}, {"use_adaptive_entropy": True},
     {"importance_sampling_level": "sequence"}],
)  # fmt: skip
def test_gmpo_trainer_refuses_options_its_loss_ignores(tokenizer, model_path, option):
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    def build(flag):
        args = GMPOConfig(output_dir="/tmp/fused-gspo-gmpo", use_cpu=True, report_to=[], use_fused_gspo_loss=flag,
                          per_device_train_batch_size=4, num_generations=4, **option)  # fmt: skip
        return GMPOTrainer(model=model_path, reward_funcs=even_words_reward, args=args,
                           train_dataset=prompts_dataset(), processing_class=tokenizer)  # fmt: skip

    build(False)  # TRL's GMPO trains without it
    name = "entropy_coef" if "adaptive" in next(iter(option)) else next(iter(option))
    with pytest.raises(ValueError, match=rf"{name}.*gmpo"):
        build(True)


def test_rloo_trainer_flag_on_matches_flag_off(tokenizer, model_path, fused_calls):
    kwargs = dict(steps_per_generation=2, gradient_accumulation_steps=1, beta=0.05)
    off = train(trl.RLOOTrainer, trl.RLOOConfig, tokenizer, model_path, flag=False, **kwargs)
    on = train(trl.RLOOTrainer, trl.RLOOConfig, tokenizer, model_path, flag=True, **kwargs)
    assert fused_calls["loss"] >= 3 and fused_calls["logprobs"] > 0
    assert_same_training(off, on)


# ---------------------------------------------------------------------------------------------------------------
# GSPO-token (importance_sampling_level="sequence_token", only with the flag on)


def _compare_logs(a, b, keys):
    for entry_a, entry_b in zip(a, b, strict=True):
        for key in keys:
            assert entry_b[key] == pytest.approx(entry_a[key], rel=1e-4, abs=1e-6), key


def test_gspo_token_with_sequence_advantages_trains_like_gspo(tokenizer, model_path):
    kwargs = dict(loss_type="grpo", steps_per_generation=2, gradient_accumulation_steps=1, epsilon=0.01)
    gspo = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True,
                 importance_sampling_level="sequence", **kwargs)  # fmt: skip
    token = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True,
                  importance_sampling_level="sequence_token", **kwargs)  # fmt: skip
    _compare_logs(gspo[0], token[0], ["loss", "grad_norm", "entropy"])
    for name, tensor in gspo[1].items():
        torch.testing.assert_close(token[1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="importance sampling level"):
        train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=False,
              importance_sampling_level="sequence_token", **kwargs)  # fmt: skip


class PerTokenAdvantageGRPOTrainer(trl.GRPOTrainer):
    """A GRPO subclass with per-token advantages ``[B, T]``: later tokens get more credit."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        T = output["completion_ids"].shape[1]
        ramp = torch.linspace(0.5, 1.5, T, device=output["advantages"].device)
        output["advantages"] = output["advantages"].unsqueeze(1) * ramp
        return output


def test_gspo_token_with_per_token_advantages(tokenizer, model_path, fused_calls):
    kwargs = dict(loss_type="grpo", steps_per_generation=2, gradient_accumulation_steps=1, epsilon=0.01)
    token = train(PerTokenAdvantageGRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True,
                  importance_sampling_level="sequence_token", **kwargs)  # fmt: skip
    gspo = train(PerTokenAdvantageGRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True,
                 importance_sampling_level="sequence", **kwargs)  # fmt: skip
    assert fused_calls["loss"] >= 6
    assert all(math.isfinite(entry["loss"]) for entry in token[0])
    moved = max((token[1][n] - gspo[1][n]).abs().max().item() for n in token[1])
    assert moved > 1e-6, "per-token advantages must make GSPO-token differ from GSPO"


# ---------------------------------------------------------------------------------------------------------------
# Model variants: what TRL's fused LM-head forward hands over


def tied_model():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**small_config(tie_word_embeddings=True)))


def biased_head_model():
    model = tiny_model()
    torch.manual_seed(5)
    head = torch.nn.Linear(32, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0.0, 0.5)
    model.lm_head = head
    return model


def softcapped_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(**small_config(head_dim=16, final_logit_softcapping=5.0, tie_word_embeddings=False))
    return with_eos_bias(Gemma2ForCausalLM(config))


def scaled_logits_model():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    return CohereForCausalLM(CohereConfig(**small_config(logit_scale=0.5)))


def moe_model():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(
        **small_config(
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            output_router_logits=True, tie_word_embeddings=False,
        )
    )  # fmt: skip
    return with_eos_bias(Qwen2MoeForCausalLM(config))


# Head variants (tied weights, bias, softcapping, logit scale), the MoE aux loss, and TRL's forward options
VARIANTS = {
    "tied_embeddings": (tied_model, {}),
    "lm_head_bias": (biased_head_model, {}),
    "softcapping": (softcapped_model, {}),
    "logit_scale": (scaled_logits_model, {}),
    "moe_aux_loss": (moe_model, {}),
    "gradient_checkpointing": (tiny_model, {"gradient_checkpointing": True}),
    "cast_lm_head_to_fp32": (tiny_model, {"cast_lm_head_to_fp32": True}),
}


# model-side variants: tied embeddings, bias, softcap, logit scale, MoE, checkpointing, fp32 head
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_variants_flag_on_matches_flag_off(tokenizer, fused_calls, variant):
    factory, extra = VARIANTS[variant]
    kwargs = dict(loss_type="grpo", steps_per_generation=2, gradient_accumulation_steps=1, epsilon=0.05, **extra)
    off = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, factory(), flag=False, **kwargs)
    on = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, factory(), flag=True, **kwargs)
    assert fused_calls["loss"] >= 3
    assert_same_training(off, on, initial=factory().state_dict())
    if variant == "moe_aux_loss":
        assert all(entry["aux_loss"] > 0 for entry in on[0])


def test_lora_on_the_backbone(tokenizer, fused_calls):
    peft = pytest.importorskip("peft")
    kwargs = dict(loss_type="dapo", steps_per_generation=2, gradient_accumulation_steps=1, beta=0.02)

    def run(flag):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        torch.manual_seed(7)  # LoRA's own initialization
        return train(
            trl.GRPOTrainer,
            trl.GRPOConfig,
            tokenizer,
            tiny_model(),
            flag,
            trainer_kwargs={"peft_config": lora},
            **kwargs,
        )

    off, on = run(False), run(True)
    assert fused_calls["loss"] >= 3 and fused_calls["logprobs"] > 0
    # LoRA's B matrices start at zero: training must have moved them
    assert_same_training(off, on, initial={n: torch.zeros_like(t) for n, t in on[1].items() if "lora_B" in n})


def test_lora_on_the_lm_head_fails_at_construction(tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    args = trl.GRPOConfig(output_dir="/tmp/x", use_cpu=True, report_to=[], use_fused_gspo_loss=True,
                          per_device_train_batch_size=4, num_generations=4)  # fmt: skip
    with pytest.raises(ValueError, match="lm_head"):
        trl.GRPOTrainer(model=tiny_model(), reward_funcs=even_words_reward, args=args, train_dataset=prompts_dataset(),
                        processing_class=tokenizer, peft_config=lora)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# One _compute_loss call on crafted inputs: what a CPU training run cannot produce


def _crafted_inputs(model, B=4, P=3, T=7, seed=0, with_tool_mask=False):
    """A batch shaped like what ``_generate_and_score_completions`` hands to ``_compute_loss``."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    completion_ids = torch.randint(3, vocab, (B, T), generator=g)
    completion_mask = (torch.rand(B, T, generator=g) > 0.2).int()
    completion_mask[:, 0] = 1
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids], 1)).logits[:, P - 1 : -1].float()
        current = torch.log_softmax(logits, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)

    def near(scale):
        return (current + scale * torch.randn(B, T, generator=g)) * completion_mask

    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(B, P, dtype=torch.int),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": near(0.2),
        "ref_per_token_logps": near(0.3),
        "sampling_per_token_logps": near(0.3),
        "importance_sampling_ratio": torch.exp(0.2 * torch.randn(B, T, generator=g)),
        "num_items_in_batch": completion_mask.sum() * 3,
    }
    if with_tool_mask:
        inputs["tool_mask"] = (torch.rand(B, T, generator=g) > 0.3).int()
    return inputs


# name: (GRPOConfig keywords, options): vLLM importance ratios (token / sequence shaped), the off-policy mask, tool
# masks, accumulation and eval normalizers, the other loss types, delta / bias-corrected KL, the entropy controller
COMPUTE_LOSS_CASES = {
    "vllm_token_ratio": (dict(loss_type="grpo"), dict(use_vllm=True)),
    "vllm_sequence_ratio": (dict(loss_type="bnpo"), dict(use_vllm=True, is_ratio_shape="sequence")),
    "off_policy_mask": (dict(loss_type="dapo", off_policy_mask_threshold=0.01), {}),
    "tool_mask_entropy_quantile": (
        dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.02),
        dict(tool=True),
    ),
    "accumulation_dapo": (dict(loss_type="dapo", gradient_accumulation_steps=4, steps_per_generation=8), dict(ga=4)),
    "accumulation_grpo_kl": (dict(loss_type="grpo", gradient_accumulation_steps=2, beta=0.1), dict(ga=2)),
    "eval_mode_dapo": (dict(loss_type="dapo", gradient_accumulation_steps=4), dict(ga=4, eval=True)),
    "vespo_ratio": (dict(loss_type="vespo"), dict(use_vllm=True)),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.2), {}),
    "sapo": (dict(loss_type="sapo"), {}),
    "luspo": (dict(loss_type="luspo", importance_sampling_level="sequence"), {}),
    "delta_bias_kl": (dict(loss_type="grpo", delta=1.3, beta=0.05, use_bias_correction_kl=True), {}),
    "adaptive_entropy": (dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=9.0), {}),
}


# every case with TRL's forward handing over every position, and three also with only the completion tokens (packed)
@pytest.mark.parametrize(
    "case,packed",
    [(case, False) for case in COMPUTE_LOSS_CASES]
    + [("tool_mask_entropy_quantile", True), ("vllm_token_ratio", True), ("off_policy_mask", True)],
)
def test_compute_loss_matches_trl_on_the_same_inputs(tokenizer, model_path, fused_calls, monkeypatch, case, packed):
    """One ``_compute_loss`` call, TRL's and ours, on the same crafted inputs: loss, gradients, metrics and the
    entropy controller's state agree. Covers what a CPU run cannot produce: vLLM ratios, tool masks, accumulation
    and eval normalizers. ``packed``: TRL's forward hands over only the completion tokens' hidden states, as it does
    on Triton devices (here forced on CPU for the fused run)."""
    import trl.trainer.utils as trl_utils

    import fused_gspo.trl.patch as adapter

    handed = []
    config_kwargs, options = COMPUTE_LOSS_CASES[case]
    args = trl.GRPOConfig(
        output_dir="/tmp/fused-gspo-compute-loss", use_cpu=True, bf16=False, report_to=[],
        per_device_train_batch_size=4, num_generations=4, max_completion_length=7, **config_kwargs,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=model_path, reward_funcs=even_words_reward, args=args, train_dataset=prompts_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.use_vllm = options.get("use_vllm", False)  # the ratios come from vLLM; the loss only reads the flag
    trainer.current_gradient_accumulation_steps = options.get("ga", 1)
    trainer.model.train(not options.get("eval", False))
    inputs = _crafted_inputs(trainer.model, with_tool_mask=options.get("tool", False))
    if options.get("is_ratio_shape") == "sequence":
        inputs["importance_sampling_ratio"] = inputs["importance_sampling_ratio"][:, :1]
    if not trainer.use_vllm:
        del inputs["importance_sampling_ratio"]
    if trainer.off_policy_mask_threshold is None:
        del inputs["sampling_per_token_logps"]

    def run(flag):
        trainer.args.use_fused_gspo_loss = flag
        if flag and packed:
            monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
            original_call = adapter._LossRequest.__call__

            def recording_call(request, hidden, *args):
                handed.append(hidden.shape[0])
                return original_call(request, hidden, *args)

            monkeypatch.setattr(adapter._LossRequest, "__call__", recording_call)
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        state = (trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats)
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        after = (trainer.entropy_coef, trainer._last_world_entropy)
        trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats = state
        return loss.detach(), grads, {k: dict(v) for k, v in trainer._metrics.items()}, after

    loss_off, grads_off, metrics_off, state_off = run(False)
    assert fused_calls["loss"] == 0
    loss_on, grads_on, metrics_on, state_on = run(True)
    assert fused_calls["loss"] == 1
    if packed:  # TRL's forward handed over the completion tokens only
        assert handed == [int(inputs["completion_mask"].sum())]
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-7)
    assert grads_on.keys() == grads_off.keys() and grads_on
    for name, grad in grads_off.items():
        assert rel_err(grads_on[name], grad, floor=1e-8) < 1e-5, name
    for mode in ("train", "eval"):
        assert metrics_on[mode].keys() == metrics_off[mode].keys(), mode
        for key, values in metrics_off[mode].items():
            assert metrics_on[mode][key] == pytest.approx(values, rel=1e-5, abs=1e-7, nan_ok=True), key
    assert state_on == pytest.approx(state_off)


def test_torch_compile_flag_on_matches_flag_off(tokenizer, model_path, fused_calls):
    """GRPOConfig(torch_compile=True): the Trainer compiles the model, and TRL's scoring forward (where the fused loss
    runs) inside it; the fused code runs eagerly between the compiled regions. ``aot_eager`` stands in for inductor
    to keep CI's time (the same dynamo and AOTAutograd tracing, no code generation)."""
    torch._dynamo.reset()
    kwargs = dict(loss_type="grpo", importance_sampling_level="sequence", torch_compile=True,
                  torch_compile_backend="aot_eager")  # fmt: skip
    off = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=False, **kwargs)
    torch._dynamo.reset()
    on = train(trl.GRPOTrainer, trl.GRPOConfig, tokenizer, model_path, flag=True, **kwargs)
    torch._dynamo.reset()
    assert fused_calls["loss"] >= 3
    assert_same_training(off, on)
