"""Input checks for the public API: every bad input gets a ``TypeError``/``ValueError`` naming the argument.

Checks of types and shapes cost nothing; checks of values (token ids in range, a 0/1 mask, ``cu_seqlens`` offsets,
packed row counts) read the data and so wait for the device: they are made from the host's one read of the batch
(:mod:`fused_gspo.host_values`), after every shape is known to be right. ``values=False`` skips them: under
``torch.compile`` the wrappers check shapes while tracing and the custom operators check values when they run.
"""

from __future__ import annotations

import torch

from .config import PolicyLossConfig
from .host_values import BatchCounts, read_batch, read_ids
from .parallel.context import active_shard, vocab_size

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


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(x, DTensor)


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if _is_dtensor(weight):
        raise TypeError(
            "weight is a DTensor (a sharded parameter, e.g. FSDP2's outside the module's forward): pass the LM-head "
            "module itself (fused_policy_loss(hidden, model.lm_head, ...)) so that it is unsharded for the call"
        )
    _tensor("weight", weight, floating=True, ndim=(2,))
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's hidden size "
            f"(weight is {tuple(weight.shape)})"
        )
    if weight.shape[0] < 1 and active_shard() is None:  # a rank's shard of a vocabulary may be empty
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        _tensor("bias", bias, floating=True, ndim=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def validate_logprob_inputs(*, hidden, weight, targets, bias, values: bool = True) -> None:
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
    if values:
        read_ids("targets", targets, vocab_size(weight))


def validate_position_ids(position_ids, completion_ids) -> None:
    """``position_ids``: a 1-D integer tensor shaped like the packed ``completion_ids`` (checked before the sequences
    are read from it, so that an error names it rather than the ``cu_seqlens`` made from it)."""
    _tensor("position_ids", position_ids, floating=False, ndim=(1,))
    _tensor("completion_ids", completion_ids, floating=False, ndim=(1,))
    tokens = tuple(completion_ids.shape)
    if tuple(position_ids.shape) != tokens:
        raise ValueError(f"position_ids must have shape {tokens} like completion_ids, got {tuple(position_ids.shape)}")


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
    cu_seqlens=None,
    position_ids=None,
    values: bool = True,
) -> BatchCounts | None:
    """Every check of a policy loss's inputs; with ``values``, also the checks that read the data, all from the
    host's one read of the batch (:func:`fused_gspo.host_values.read_batch`), whose counts are returned.

    ``position_ids`` instead of ``cu_seqlens`` (with ``values=False``, under ``torch.compile``): the number of
    sequences ``S`` is in the data, known only once the operator runs, which checks the shapes that depend on it."""
    packed = cu_seqlens is not None or position_ids is not None
    _tensor("hidden", hidden, floating=True, ndim=(2,) if packed else (2, 3))
    _check_head(hidden, weight, bias)
    token_dims = (1,) if packed else (2,)
    _tensor("completion_ids", completion_ids, floating=False, ndim=token_dims)
    _tensor("completion_mask", completion_mask, ndim=token_dims)
    if packed and position_ids is not None:
        validate_position_ids(position_ids, completion_ids)
        row_shape, per_token = None, tuple(completion_ids.shape)  # [S], S unknown here
    elif packed:
        _tensor("cu_seqlens", cu_seqlens, floating=False, ndim=(1,))
        tokens = tuple(completion_ids.shape)
        rows = cu_seqlens.shape[0] - 1
        if rows < 0:
            raise ValueError("cu_seqlens must hold at least one offset (0)")
        row_shape, per_token = (rows,), tokens
        if rows == tokens[0] and rows > 0:
            raise ValueError(
                f"cu_seqlens marks as many sequences as positions ({rows}): per-sequence ([S]) and per-token ([N]) "
                "tensors cannot be told apart; use the padded [B, T] layout for such a batch"
            )
    else:
        B, T = completion_ids.shape if hidden.dim() == 2 else hidden.shape[:2]
        row_shape, per_token = (B,), (B, T)
    for name, x in (("completion_ids", completion_ids), ("completion_mask", completion_mask)):
        if tuple(x.shape) != per_token:
            like = "completion_ids" if packed else "hidden's first two dimensions"
            raise ValueError(f"{name} must have shape {per_token} like {like}, got {tuple(x.shape)}")
    if completion_mask.dtype.is_complex:
        raise TypeError(f"completion_mask must be bool, integer or floating, got {completion_mask.dtype}")

    def fits(x, shapes) -> bool:
        # a row shape of None ([S], S not known yet) fits any 1-D shape but the per-token one (S != N)
        return tuple(x.shape) in shapes or (None in shapes and x.dim() == 1 and tuple(x.shape) != per_token)

    def shown(shape) -> str:
        return "(S,)" if shape is None else str(shape)

    row_or_token = (row_shape, per_token)
    _tensor("advantages", advantages, floating=True, ndim=(1,) if packed else (1, 2))
    if not fits(advantages, row_or_token):
        raise ValueError(f"advantages must have shape {shown(row_shape)} or {per_token}, got {tuple(advantages.shape)}")
    if config.loss_type in ("gmpo", "rloo") and not fits(advantages, (row_shape,)):
        raise ValueError(
            f"advantages must have shape {shown(row_shape)} for loss_type={config.loss_type!r}: it is per sequence"
        )

    old_shapes = row_or_token if config.loss_type == "rloo" else (per_token,)
    ratio_shapes = (per_token, row_shape) if packed else (per_token, (row_shape[0], 1))
    for name, x, shapes in (
        ("old_logps", old_logps, old_shapes),
        ("ref_logps", ref_logps, (per_token,)),
        ("sampling_logps", sampling_logps, (per_token,)),
        ("importance_sampling_ratio", importance_sampling_ratio, ratio_shapes),
    ):
        if x is None:
            continue
        _tensor(name, x, floating=True)
        if not fits(x, shapes):
            want = " or ".join(shown(s) for s in shapes)
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if config.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={config.beta})")
    if importance_sampling_ratio is not None and config.loss_type in ("gmpo", "rloo"):
        raise ValueError(
            f"importance_sampling_ratio is not supported with loss_type={config.loss_type!r}: its TRL trainer does "
            "not apply the vLLM correction"
        )
    if packed and config.loss_type == "dr_grpo" and config.max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' with cu_seqlens needs max_completion_length (its normalizer)")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError("num_items_in_batch must be a scalar")
        elif not isinstance(num_items_in_batch, (int, float)) or isinstance(num_items_in_batch, bool):
            raise TypeError(
                f"num_items_in_batch must be a number or a scalar tensor, got {type(num_items_in_batch).__name__}"
            )
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
        cu_seqlens=cu_seqlens,
        position_ids=position_ids,
    )
    if not values:
        return None
    return read_batch(
        hidden=hidden, vocab=vocab_size(weight), completion_ids=completion_ids, completion_mask=completion_mask,
        cu_seqlens=cu_seqlens, num_items_in_batch=num_items_in_batch,
    )  # fmt: skip


def validate_preference_token_shapes(*, hidden, completion_ids, completion_mask) -> None:
    """The shapes of a preference batch, head aside: ``[2B, T]`` ids and mask (an even, non-zero row count), hidden
    ``[2B, T, H]`` or ``[n, H]``."""
    _tensor("hidden", hidden, floating=True, ndim=(2, 3))
    _tensor("completion_ids", completion_ids, floating=False, ndim=(2,))
    _tensor("completion_mask", completion_mask, ndim=(2,))
    rows = completion_ids.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(
            f"completion_ids must have an even, non-zero number of rows (B chosen, then B rejected), got {rows}"
        )
    if tuple(completion_mask.shape) != tuple(completion_ids.shape):
        raise ValueError(
            f"completion_mask must have the shape of completion_ids {tuple(completion_ids.shape)}, "
            f"got {tuple(completion_mask.shape)}"
        )
    if hidden.dim() == 3 and tuple(hidden.shape[:2]) != tuple(completion_ids.shape):
        raise ValueError(
            f"hidden must be [2B, T, H] with [2B, T] = {tuple(completion_ids.shape)}, got {tuple(hidden.shape)}"
        )


def validate_preference_inputs(
    *, hidden, weight, completion_ids, completion_mask, bias, values: bool = True
) -> BatchCounts | None:
    """The head and per-token inputs of a preference loss: ``[2B, T]`` ids and mask (an even row count), hidden
    ``[2B, T, H]`` or ``[n, H]`` (the valid tokens, row-major); with ``values``, a 0/1 mask and ids in range, from one
    read whose counts are returned. Which rows may be empty depends on the loss
    (:func:`fused_gspo.preference.batch.check_empty_rows`); the loss's own inputs are checked by
    :func:`fused_gspo.preference.batch.validate_batch`."""
    _tensor("hidden", hidden, floating=True, ndim=(2, 3))
    _check_head(hidden, weight, bias)
    validate_preference_token_shapes(hidden=hidden, completion_ids=completion_ids, completion_mask=completion_mask)
    _same_device(hidden, weight=weight, bias=bias, completion_ids=completion_ids, completion_mask=completion_mask)
    if not values:
        return None
    return read_batch(
        hidden=hidden, vocab=vocab_size(weight), completion_ids=completion_ids, completion_mask=completion_mask
    )
