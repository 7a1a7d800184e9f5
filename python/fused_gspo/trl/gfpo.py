"""GFPO (group filtering) on top of TRL 1.16's GRPOTrainer, with the ``use_fused_gspo_loss`` flag.

After the rewards of the ``num_generations`` completions of each prompt are known, ``group_filter_func`` scores them
(``group_filter_func(group_completions=[[...], ...], group_rewards=[[...], ...])`` returns one list of scores per
group); the ``num_remains_in_group`` best of each group (``torch.topk``) are kept and the rest dropped from the batch.
Advantages are normalized again within the kept completions (group mean; group std with ``scale_rewards="group"``,
the batch std with ``"batch"``, none with ``"none"``), and ``num_items_in_batch`` is recounted from the kept
completions. Without a filter function the trainer is plain GRPO; evaluation is not filtered. The loss itself is
GRPO's, so ``use_fused_gspo_loss=True`` works as on GRPOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from ..precision import normalize_logits_dtype
from .config_field import FLAG_HELP, LOGITS_HELP
from .patch import patch_trl


@dataclass
class GFPOConfig(GRPOConfig):
    """:class:`trl.GRPOConfig` plus ``num_remains_in_group`` (and ``use_fused_gspo_loss``, always available here).

    Args:
        num_remains_in_group: completions kept per group after filtering; at least 2 and smaller than
            ``num_generations``. None keeps every completion (plain GRPO).
    """

    num_remains_in_group: int | None = field(
        default=None,
        metadata={"help": "Completions kept per group by group_filter_func (>= 2, < num_generations)."},
    )
    use_fused_gspo_loss: bool = field(default=False, metadata={"help": FLAG_HELP})
    fused_gspo_logits_dtype: str = field(default="auto", metadata={"help": LOGITS_HELP})

    def __post_init__(self):
        super().__post_init__()
        try:
            self.fused_gspo_logits_dtype = normalize_logits_dtype(self.fused_gspo_logits_dtype)
        except ValueError as exc:
            raise ValueError(f"fused_gspo_logits_dtype: {exc}") from None
        if self.num_remains_in_group is None:
            return
        if self.num_remains_in_group < 2:  # one kept completion is its group's mean: every advantage would be 0
            raise ValueError(
                f"num_remains_in_group must be >= 2 (a group of one has advantage 0), got {self.num_remains_in_group}"
            )
        if self.num_remains_in_group >= self.num_generations:
            raise ValueError(
                f"num_remains_in_group ({self.num_remains_in_group}) must be smaller than num_generations "
                f"({self.num_generations})"
            )


def check_filter_layout(args: GFPOConfig, num_processes: int) -> None:
    """Refuse, by name, what the filter cannot train on: each process must hold whole groups (a group split across
    processes could be kept from one process only, leaving the others a different number of rows, or none), keep a
    number of rows that splits into ``steps_per_generation`` micro-batches, and aggregate the rewards by summing
    (the kept completions' advantages are normalized from the summed reward)."""
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise ValueError(
            f"multi_objective_aggregation={args.multi_objective_aggregation!r} is not supported with a "
            "group_filter_func: GFPO normalizes the kept completions' summed rewards ('sum_then_normalize')"
        )
    per_process = args.generation_batch_size // num_processes
    if per_process % args.num_generations:
        raise ValueError(
            f"each process holds {per_process} completions per generation batch (per_device_train_batch_size x "
            f"steps_per_generation), not a multiple of num_generations={args.num_generations}: a group would be "
            "split across processes, and the filter keeps whole groups on each process; raise "
            "per_device_train_batch_size or steps_per_generation"
        )
    kept = per_process // args.num_generations * args.num_remains_in_group
    if kept % args.steps_per_generation:
        raise ValueError(
            f"after filtering, each process keeps {kept} completions per generation batch, which does not "
            f"split into steps_per_generation={args.steps_per_generation} equal micro-batches; adjust "
            "num_remains_in_group, per_device_train_batch_size or steps_per_generation"
        )


class GFPOTrainer(GRPOTrainer):
    """:class:`trl.GRPOTrainer` that trains on the ``num_remains_in_group`` best completions of each group."""

    _tag_names = ["trl", "gfpo"]

    def __init__(self, model, reward_funcs, args: GFPOConfig | None = None, *, group_filter_func=None, **kwargs):
        if args is None:  # as GRPOTrainer names its default, but a GFPOConfig (GRPOTrainer would build a GRPOConfig)
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = GFPOConfig(f"{(name or 'model').split('/')[-1]}-GFPO")
        if not isinstance(args, GFPOConfig):
            raise TypeError(f"args must be a GFPOConfig, got {type(args).__name__}")
        if args.use_fused_gspo_loss:
            patch_trl()  # the switch lives on GRPOTrainer, which this trainer inherits
        super().__init__(model, reward_funcs, args=args, **kwargs)
        self.group_filter_func = group_filter_func
        self.num_remains_in_group = self.args.num_remains_in_group
        if group_filter_func is not None and self.num_remains_in_group is None:
            raise ValueError("group_filter_func is set but num_remains_in_group is None: say how many to keep")
        if group_filter_func is not None:
            check_filter_layout(self.args, self.accelerator.num_processes)
        self._gfpo_rewards = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gfpo_rewards = (rewards_per_func, completions)  # every process's rewards, this process's completions
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, completions = self._gfpo_rewards
        self._gfpo_rewards = None
        if self.group_filter_func is None or not self.model.training:
            return output
        if output.get("pixel_values") is not None:
            raise NotImplementedError("GFPOTrainer does not filter multimodal batches (pixel_values)")
        return self._filter_groups(output, rewards_per_func, gather_object(list(completions)))

    def _filter_groups(self, output: dict, rewards_per_func: torch.Tensor, completions: list) -> dict:
        G, k = self.num_generations, self.num_remains_in_group
        device = rewards_per_func.device
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        rewards[unscorable] = torch.nan
        groups = rewards.numel() // G
        scores = self.group_filter_func(
            group_completions=[completions[g * G : (g + 1) * G] for g in range(groups)],
            group_rewards=[rewards[g * G : (g + 1) * G].tolist() for g in range(groups)],
        )
        scores = torch.as_tensor(scores, dtype=torch.float32, device=device)
        if scores.shape != (groups, G):
            raise ValueError(
                f"group_filter_func must return {groups} lists of {G} scores, got shape {tuple(scores.shape)}"
            )
        keep = scores.topk(k, dim=1).indices.sort(dim=1).values  # [groups, k], original order within a group
        kept = (keep + torch.arange(groups, device=device).unsqueeze(1) * G).reshape(-1)

        kept_rewards = rewards[kept].view(groups, k)
        advantages = kept_rewards - torch.nanmean(kept_rewards, dim=1, keepdim=True)
        if self.scale_rewards == "group":
            advantages = advantages / (nanstd(kept_rewards, dim=1).unsqueeze(1) + 1e-4)
        elif self.scale_rewards == "batch":
            advantages = advantages / ((nanstd(kept_rewards.reshape(-1)) if kept.numel() > 1 else 0.0) + 1e-4)
        advantages = torch.nan_to_num(advantages.reshape(-1), nan=0.0)

        # This process holds rows [start, start + local) of the gathered batch: keep its own kept rows
        local = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * local
        mine = (kept >= start) & (kept < start + local)
        rows = kept[mine] - start
        filtered = {}
        for name, value in output.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == local:
                filtered[name] = value[rows]
            else:
                filtered[name] = value
        filtered["advantages"] = advantages[mine].to(output["advantages"].dtype)
        loss_mask = filtered["completion_mask"]
        if filtered.get("tool_mask") is not None:
            loss_mask = loss_mask * filtered["tool_mask"]
        filtered["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return filtered
