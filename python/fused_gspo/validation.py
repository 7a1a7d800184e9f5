"""Input checks for the public API: every bad input gets a ``TypeError``/``ValueError`` naming the argument."""

from __future__ import annotations

import torch

from .config import PolicyLossConfig

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, x, *, floating: bool | None = None, ndim: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (bf16/fp16/fp32/fp64), got {x.dtype}")
    if floating is False and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {tuple(x.shape)}")


def _same_device(reference: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device}, but hidden is on {reference.device}")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    _tensor("weight", weight, floating=True, ndim=(2,))
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's hidden size "
            f"(weight is {tuple(weight.shape)})"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        _tensor("bias", bias, floating=True, ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_ids(name: str, ids: torch.Tensor, vocab: int, where: torch.Tensor | None = None) -> None:
    checked = ids if where is None else ids[where]
    if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= vocab):
        bad = int(checked.min()) if int(checked.min()) < 0 else int(checked.max())
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")


def validate_logprob_inputs(*, hidden, weight, targets, bias) -> None:
    _tensor("hidden", hidden, floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must have a hidden dimension")
    _check_head(hidden, weight, bias)
    _tensor("targets", targets, floating=False)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last dimension), "
            f"got {tuple(targets.shape)}"
        )
    _same_device(hidden, weight=weight, targets=targets, bias=bias)
    _check_ids("targets", targets, weight.shape[0])


def validate_policy_inputs(
    config: PolicyLossConfig,
    *,
    hidden,
    weight,
    completion_ids,
    advantages,
    completion_mask,
    old_logps,
    ref_logps,
    sampling_logps,
    importance_sampling_ratio,
    num_items_in_batch,
    bias,
) -> None:
    _tensor("hidden", hidden, floating=True, ndim=(2, 3))
    _check_head(hidden, weight, bias)
    _tensor("completion_ids", completion_ids, floating=False, ndim=(2,))
    _tensor("completion_mask", completion_mask, ndim=(2,))
    B, T = completion_ids.shape if hidden.dim() == 2 else hidden.shape[:2]
    for name, x in (("completion_ids", completion_ids), ("completion_mask", completion_mask)):
        if tuple(x.shape) != (B, T):
            raise ValueError(
                f"{name} must have shape ({B}, {T}) like hidden's first two dimensions, got {tuple(x.shape)}"
            )
    if completion_mask.dtype.is_complex:
        raise TypeError(f"completion_mask must be bool, integer or floating, got {completion_mask.dtype}")
    if completion_mask.numel() and not bool(((completion_mask == 0) | (completion_mask == 1)).all()):
        raise ValueError("completion_mask must hold only 0 and 1")
    if hidden.dim() == 2 and hidden.shape[0] != int(completion_mask.sum()):
        raise ValueError(
            f"packed hidden ([N, H]) must hold one row per valid token: completion_mask has "
            f"{int(completion_mask.sum())}, hidden has {hidden.shape[0]}"
        )

    _tensor("advantages", advantages, floating=True, ndim=(1, 2))
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    if config.loss_type in ("gmpo", "rloo") and advantages.dim() != 1:
        raise ValueError(f"advantages must have shape ({B},) for loss_type={config.loss_type!r}: it is per sequence")

    old_shapes = ((B, T), (B,)) if config.loss_type == "rloo" else ((B, T),)
    for name, x, shapes in (
        ("old_logps", old_logps, old_shapes),
        ("ref_logps", ref_logps, ((B, T),)),
        ("sampling_logps", sampling_logps, ((B, T),)),
        ("importance_sampling_ratio", importance_sampling_ratio, ((B, T), (B, 1))),
    ):
        if x is None:
            continue
        _tensor(name, x, floating=True)
        if tuple(x.shape) not in shapes:
            want = " or ".join(str(s) for s in shapes)
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={config.beta})")
    if importance_sampling_ratio is not None and config.loss_type in ("gmpo", "rloo"):
        raise ValueError(
            f"importance_sampling_ratio is not supported with loss_type={config.loss_type!r}: its TRL trainer does "
            "not apply the vLLM correction"
        )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a scalar")
            value = float(num_items_in_batch)
        elif isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool):
            value = float(num_items_in_batch)
        else:
            raise TypeError(
                f"num_items_in_batch must be a number or a scalar tensor, got {type(num_items_in_batch).__name__}"
            )
        if not value >= 0:
            raise ValueError(f"num_items_in_batch must be >= 0, got {value}")
    _same_device(
        hidden,
        weight=weight,
        bias=bias,
        completion_ids=completion_ids,
        advantages=advantages,
        completion_mask=completion_mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
    )
    _check_ids("completion_ids", completion_ids, weight.shape[0], where=completion_mask.bool())
