"""fused_gspo.trl.gfpo: GFPO (group filtering) on top of TRL's GRPOTrainer.

Inside one generation step: which completions the filter keeps, the advantages renormalized within them, the token
count; over a few training steps: the fused loss (flag on) trains as TRL's (flag off); and what the config and the
trainer refuse.
"""

import pytest
import torch

trl = pytest.importorskip("trl")

from trl_helpers import (  # noqa: E402
    assert_autouse_fixtures_active,
    assert_same_training,
    even_words_reward,
    prompts_dataset,
    train,
)

# fixtures, re-exported (``x as x``) so that pytest registers them in this module
from trl_helpers import fused_calls_fixture as fused_calls_fixture  # noqa: E402
from trl_helpers import model_path_fixture as model_path_fixture  # noqa: E402
from trl_helpers import patched_fixture as patched_fixture  # noqa: E402
from trl_helpers import tokenizer_fixture as tokenizer_fixture  # noqa: E402

from fused_gspo.trl import GFPOConfig, GFPOTrainer, is_patched, unpatch_trl  # noqa: E402


class IndexFilter:
    """The seed documentation's group filter: scores each completion by its index in the group."""

    def __call__(self, group_completions, group_rewards, **kwargs):
        return [[float(i) for i in range(len(completions))] for completions in group_completions]


class ShortestFilter:
    """GFPO's concision filter: prefer the shortest completions."""

    def __call__(self, group_completions, group_rewards, **kwargs):
        return [[-float(len(c.split())) for c in completions] for completions in group_completions]


def gfpo_args(**overrides) -> GFPOConfig:
    args = dict(
        output_dir="/tmp/fused-gspo-gfpo", use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=4,
        num_generations=4, max_completion_length=10, num_remains_in_group=2, seed=3,
    )  # fmt: skip
    return GFPOConfig(**{**args, **overrides})


def gfpo_trainer(tokenizer, model_path, args, **kwargs) -> GFPOTrainer:
    return GFPOTrainer(
        model=model_path, reward_funcs=even_words_reward, args=args, train_dataset=prompts_dataset(),
        processing_class=tokenizer, **kwargs,
    )  # fmt: skip


def one_generation_step(trainer, training=True):
    """One ``_generate_and_score_completions``; returns its output and the rewards and completions before filtering."""
    captured = {}
    original = trainer._calculate_rewards

    def spy(*a, **kw):
        captured["rewards"] = original(*a, **kw)
        captured["completions"] = list(a[2])
        return captured["rewards"]

    trainer._calculate_rewards = spy
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train(training)
    output = trainer._generate_and_score_completions(batch)
    return output, captured["rewards"], captured["completions"]


def test_autouse_fixtures_apply_here(request):
    assert_autouse_fixtures_active(request)


# ---------------------------------------------------------------------------------------------------------------
# Filtering within one generation step


# the three ways of scaling the kept completions' advantages: by the group's std, the batch's std, or not at all
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_gfpo_filters_and_renormalizes(tokenizer, model_path, scale_rewards):
    """Inside one generation step: kept rows, advantages normalized within the kept completions, token count."""
    trainer = gfpo_trainer(
        tokenizer, model_path, gfpo_args(scale_rewards=scale_rewards), group_filter_func=ShortestFilter()
    )
    output, rewards, completions = one_generation_step(trainer)
    lengths = torch.tensor([len(c.split()) for c in completions], dtype=torch.float32)
    groups = lengths.numel() // 4
    assert output["completion_ids"].shape[0] == groups * 2
    rewards = rewards.squeeze(1)
    kept = torch.cat([(-lengths[g * 4 : (g + 1) * 4]).topk(2).indices.sort().values + g * 4 for g in range(groups)])
    for g in range(groups):
        group = kept[g * 2 : g * 2 + 2]
        expected = rewards[group] - rewards[group].mean()
        if scale_rewards == "group":
            expected = expected / (rewards[group].std() + 1e-4)
        elif scale_rewards == "batch":
            expected = expected / (rewards[kept].std() + 1e-4)
        torch.testing.assert_close(output["advantages"][g * 2 : g * 2 + 2], expected, rtol=1e-5, atol=1e-6)
    assert int(output["num_items_in_batch"]) == int(output["completion_mask"].sum())


# what is not filtered: evaluation, and a trainer without a filter function (plain GRPO)
@pytest.mark.parametrize("case", ["eval", "no_filter"])
def test_gfpo_keeps_every_completion(tokenizer, model_path, case):
    kwargs = {} if case == "no_filter" else {"group_filter_func": ShortestFilter()}
    args = gfpo_args(num_remains_in_group=None) if case == "no_filter" else gfpo_args()
    trainer = gfpo_trainer(tokenizer, model_path, args, **kwargs)
    output, _, completions = one_generation_step(trainer, training=case != "eval")
    assert output["completion_ids"].shape[0] == len(completions)


# ---------------------------------------------------------------------------------------------------------------
# Training: flag off vs on


def train_gfpo(tokenizer, model_path, flag, group_filter_func, **kwargs):
    return train(GFPOTrainer, GFPOConfig, tokenizer, model_path, flag=flag,
                 trainer_kwargs={"group_filter_func": group_filter_func}, **kwargs)  # fmt: skip


# a filter that ignores the completions (keeps the last ones) and GFPO's shortest-first
@pytest.mark.parametrize("group_filter", [IndexFilter(), ShortestFilter()], ids=["index", "shortest"])
def test_gfpo_trainer_flag_on_matches_flag_off(tokenizer, model_path, fused_calls, group_filter):
    kwargs = dict(num_remains_in_group=2, loss_type="grpo", scale_rewards="group")
    off = train_gfpo(tokenizer, model_path, False, group_filter, **kwargs)
    assert fused_calls["loss"] == 0
    on = train_gfpo(tokenizer, model_path, True, group_filter, **kwargs)
    assert fused_calls["loss"] >= 3
    assert_same_training(off, on)


def test_gfpo_flag_patches_trl(tokenizer, model_path):
    """The switch lives on GRPOTrainer: a GFPOTrainer built with the flag on patches TRL itself."""
    unpatch_trl()
    gfpo_trainer(tokenizer, model_path, gfpo_args(use_fused_gspo_loss=False))
    assert not is_patched()
    gfpo_trainer(tokenizer, model_path, gfpo_args(use_fused_gspo_loss=True))
    assert is_patched()


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_gfpo_config_validation():
    with pytest.raises(ValueError, match="num_remains_in_group"):
        GFPOConfig(output_dir="/tmp/x", use_cpu=True, num_generations=4, num_remains_in_group=4)
    assert GFPOConfig(output_dir="/tmp/x", use_cpu=True, use_fused_gspo_loss=True).use_fused_gspo_loss


# num_remains_in_group out of range: none kept, or as many as (or more than) were generated
# (one kept completion is its group's mean, so every advantage would be 0: nothing to learn)
@pytest.mark.parametrize("remains,match", [(0, ">= 2"), (1, ">= 2"), (4, "smaller than"), (5, "smaller than")])
def test_gfpo_config_rejects_num_remains_in_group(remains, match):
    with pytest.raises(ValueError, match=match):
        gfpo_args(num_remains_in_group=remains)


def wrong_shape_filter(group_completions, group_rewards, **kwargs):
    return [[0.0] * (len(completions) - 1) for completions in group_completions]


# name: (config overrides, trainer keywords, error, message): what the trainer refuses at construction
TRAINER_ERRORS = {
    "grpo_config": (None, {}, TypeError, "GFPOConfig"),
    "filter_without_count": ({"num_remains_in_group": None}, {"group_filter_func": ShortestFilter()}, ValueError,
                             "num_remains_in_group is None"),
    "uneven_micro_batches": (dict(per_device_train_batch_size=2, steps_per_generation=2, num_remains_in_group=3),
                             {"group_filter_func": ShortestFilter()}, ValueError, "steps_per_generation"),
    # GFPO renormalizes the kept completions' summed rewards; TRL's per-function normalization was silently ignored
    "normalize_then_sum": ({"multi_objective_aggregation": "normalize_then_sum"},
                           {"group_filter_func": ShortestFilter()}, ValueError, "multi_objective_aggregation"),
}  # fmt: skip


# the GFPO trainer's argument checks (see TRAINER_ERRORS)
@pytest.mark.parametrize("case", list(TRAINER_ERRORS))
def test_gfpo_trainer_validation(tokenizer, model_path, case):
    overrides, kwargs, error, match = TRAINER_ERRORS[case]
    if overrides is None:
        args = trl.GRPOConfig(
            output_dir="/tmp/x", use_cpu=True, report_to=[], per_device_train_batch_size=4, num_generations=4
        )
    else:
        args = gfpo_args(**overrides)
    with pytest.raises(error, match=match):
        gfpo_trainer(tokenizer, model_path, args, **kwargs)


def test_gfpo_refuses_groups_split_across_processes():
    """Two processes holding 2 completions each of one group of 4: the filter could keep both of a group's kept
    completions on one process and leave the other none (the previous check counted 2 // 4 = 0 groups, 0 kept
    rows, and let it through)."""
    from fused_gspo.trl.gfpo import check_filter_layout

    args = gfpo_args(per_device_train_batch_size=2, steps_per_generation=2)  # 4 per generation batch, 1 process
    check_filter_layout(args, num_processes=1)
    args.generation_batch_size = 4  # as 2 processes x per_device_train_batch_size 2 x steps_per_generation 1
    args.steps_per_generation = 1
    with pytest.raises(ValueError, match="not a multiple of num_generations=4"):
        check_filter_layout(args, num_processes=2)


def test_gfpo_rejects_scores_of_the_wrong_shape(tokenizer, model_path):
    trainer = gfpo_trainer(tokenizer, model_path, gfpo_args(), group_filter_func=wrong_shape_filter)
    rewards = torch.rand(8, 1)
    with pytest.raises(ValueError, match=r"2 lists of 4 scores, got shape \(2, 3\)"):
        trainer._filter_groups({}, rewards, [f"w{i}" for i in range(8)])


def test_default_arguments_are_a_gfpo_config(monkeypatch):
    """Without args, GFPOTrainer builds its own GFPOConfig (GRPOTrainer would build a GRPOConfig, which has no
    num_remains_in_group)."""
    seen = {}

    def grpo_init(self, model, reward_funcs, args=None, **kwargs):
        seen["args"] = args
        raise RuntimeError("stop after the arguments")

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", grpo_init)
    monkeypatch.setattr(GFPOConfig, "__post_init__", lambda self: None)  # no GPU here for the default bf16
    with pytest.raises(RuntimeError, match="stop after"):
        GFPOTrainer("org/tiny-model", even_words_reward)
    assert isinstance(seen["args"], GFPOConfig) and seen["args"].output_dir == "tiny-model-GFPO"
