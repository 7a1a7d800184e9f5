"""The fused head as PyTorch custom operators, for ``torch.compile``.

Under ``torch.compile`` the public functions call these operators instead of their ``autograd.Function``s, so a
compiled training step stays one graph (``fullgraph=True``): everything that depends on the data (valid-token counts,
the planner's chunks, checks of values, the chunk loop itself) happens inside an operator, which the compiler sees only
through its fake (shape) implementation. Outside ``torch.compile`` nothing here is used.

- ``fused_gspo::policy_loss``: the loss, the per-token log-probs and entropies, TRL's metrics as one tensor (in the
  order of :func:`fused_gspo.objectives.metric_names`), and the gradients w.r.t. hidden, weight and bias (and any
  other float input that requires grad: advantages, old log-probs, ...) for an incoming gradient of 1, computed in
  the same call (the single pass forms them anyway; the two phases run their
  recomputing pass there). Its backward multiplies them by the incoming gradient.
- ``fused_gspo::logprobs`` / ``fused_gspo::logprobs_backward``: ``fused_logprobs``'s forward, and its backward, which
  recomputes the projection chunk by chunk.

The gradients a compiled loss hands back are the inputs' dtype times the incoming gradient: when that gradient is not
1 (a loss scaled after the call) a bf16 gradient is rounded once more than in eager mode.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import math
import warnings

import torch
from torch import Tensor
from torch._C import DispatchKey

from .backends import resolve_backend, tile_ops_for
from .chunked import ChunkedHead, recompute_grads
from .config import PolicyLossConfig
from .head import HeadParams, full_logprobs
from .objectives import metric_names
from .plan.runtime import plan_call
from .precision import compute_dtype
from .rows import cu_seqlens_from_position_ids
from .tile_ops import stats_dtype_for
from .validation import validate_logprob_inputs

_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def config_args(config: PolicyLossConfig) -> tuple[str, Tensor]:
    """A :class:`PolicyLossConfig` as two operator arguments: a key and its numbers.

    Under ``torch.compile`` a number of the config may be symbolic (a field that changed between calls is recompiled
    as a symbol; with ``dynamic=True`` from the first call): text cannot hold it, a tensor can. So the numbers go in a
    float64 CPU tensor (exact for every float, and for ints below 2**53), and the key is the ``repr`` (which
    ``torch.compile`` can build while tracing; ``json`` it cannot) of the other fields, the kind of each number, and
    what the operator's fake implementation needs before any data: the metric names and whether there is an entropy
    mask (decided here, where a symbolic comparison becomes a guard)."""
    values = [getattr(config, name) for name in _FIELDS]
    kinds = tuple(("i" if isinstance(v, (int, torch.SymInt)) else "f") if _is_number(v) else None for v in values)
    fixed = tuple(None if kind else v for v, kind in zip(values, kinds, strict=True))
    numbers = [v for v, kind in zip(values, kinds, strict=True) if kind]
    entropy_mask = True if config.top_entropy_quantile < 1.0 else False  # noqa: SIM210  (a guard, not a symbol)
    key = repr((fixed, kinds, metric_names(config), entropy_mask))
    # each number added to a float64 zero (exact), not torch.tensor(numbers): the compiler turns a symbolic float into
    # a tensor only where a tensor op takes it, and specialized it in a factory call, recompiling for every new value
    zero = torch.zeros((), dtype=torch.float64)
    return key, torch.stack([zero + v for v in numbers]) if numbers else zero.new_zeros((0,))


def _config(key: str, numbers: Tensor) -> PolicyLossConfig:
    return _config_of(key, tuple(numbers.tolist()))


@functools.lru_cache(maxsize=256)
def _config_of(key: str, numbers: tuple[float, ...]) -> PolicyLossConfig:
    fixed, kinds, _, _ = ast.literal_eval(key)
    values = iter(numbers)
    fields = {
        name: value if kind is None else (int(next(values)) if kind == "i" else next(values))
        for name, value, kind in zip(_FIELDS, fixed, kinds, strict=True)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller's own config already warned
        return PolicyLossConfig(**fields)


@functools.lru_cache(maxsize=256)
def _key_shapes(key: str) -> tuple[tuple[str, ...], bool]:
    """The metric names and whether there is an entropy mask, from a key alone (the fake implementation)."""
    _, _, names, entropy_mask = ast.literal_eval(key)
    return names, entropy_mask


def _empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


@contextlib.contextmanager
def _autograd_inside():
    """Autograd inside an operator's implementation. The dispatcher runs an implementation below autograd (its
    keys excluded), but the loss needs autograd on ``[B, T]`` tensors (the objective's gradient w.r.t. the log-probs,
    the recomputing backward); this lifts that exclusion for the block."""
    keys = (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield


# --------------------------------------------------------------------------------------------------------------------
# The policy loss


# policy_loss_op's inputs that may want a gradient, in the order of its ``needs`` and of its gradient outputs; the
# position of each among the operator's arguments
_GRAD_INPUTS = ("hidden", "weight", "bias", "advantages", "completion_mask", "old_logps", "ref_logps",
                "sampling_logps", "importance_sampling_ratio")  # fmt: skip
_ARG_POSITION = dict(hidden=0, weight=1, bias=2, advantages=4, completion_mask=5, old_logps=6, ref_logps=7,
                     sampling_logps=8, importance_sampling_ratio=9)  # fmt: skip
_NUM_ARGS = 18


@torch.library.custom_op("fused_gspo::policy_loss", mutates_args=())
def policy_loss_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    completion_ids: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    sampling_logps: Tensor | None,
    importance_sampling_ratio: Tensor | None,
    num_items_in_batch: Tensor | None,
    cu_seqlens: Tensor | None,
    position_ids: Tensor | None,
    config: str,
    config_numbers: Tensor,
    backend: str,
    needs: list[bool],
    compute_dtype: torch.dtype,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]:  # fmt: skip
    """``(loss, logps, entropy, policy_loss, metrics, entropy_mask, *grads)``, ``grads`` those of the inputs in
    :data:`_GRAD_INPUTS` (the order of ``needs``); a gradient not in ``needs`` is an empty tensor, and so is
    ``entropy_mask`` without an entropy quantile. ``config`` / ``config_numbers``: :func:`config_args`.
    ``position_ids``: the packed layout's, instead of ``cu_seqlens`` (the sequences they mark are found here)."""
    from .policy import compute_policy_loss  # noqa: PLC0415  (policy imports the API layer's helpers)

    cfg = _config(config, config_numbers)
    if position_ids is not None:
        cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    wanted = [hidden, weight, bias, advantages, completion_mask, old_logps, ref_logps, sampling_logps,
              importance_sampling_ratio]  # fmt: skip
    with _autograd_inside():
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(wanted, needs, strict=True)]
        tensors = dict(zip(_GRAD_INPUTS, leaves, strict=True))
        out = compute_policy_loss(
            completion_ids=completion_ids,
            config=cfg,
            num_items_in_batch=num_items_in_batch,
            cu_seqlens=cu_seqlens,
            backend=backend,
            compute_dtype=compute_dtype,
            **tensors,
        )
        grad_of = [leaf for leaf, n in zip(leaves, needs, strict=True) if leaf is not None and n]
        grads = list(torch.autograd.grad(out.loss, grad_of, allow_unused=True)) if grad_of else []
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    results = []
    for t, n in zip(wanted, needs, strict=True):
        if t is None or not n:
            results.append(_empty(hidden, stats))
            continue
        grad = grads.pop(0)
        # contiguous, as the fake implementation says: autograd hands back a transposed weight's layout (the eager
        # backend's matmul), which inductor's stride assertion refused
        results.append((torch.zeros_like(t) if grad is None else grad).contiguous())
    metrics = torch.stack([out.metrics[name].to(stats) for name in _key_shapes(config)[0]])
    entropy_mask = out.entropy_mask if out.entropy_mask is not None else _empty(completion_mask, torch.bool)
    return (
        out.loss.detach().to(stats).clone(),  # scalars: the loss may be the policy term itself (dapo)
        out.logps.to(stats),
        out.entropy.to(stats),
        out.policy_loss.to(stats).clone(),
        metrics,
        entropy_mask,
        *results,
    )


@policy_loss_op.register_fake
def _(hidden, weight, bias, completion_ids, advantages, completion_mask, *rest):
    config, needs = rest[-5], rest[-2]
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    scalar = hidden.new_empty((), dtype=stats)
    per_token = completion_mask.new_empty(completion_mask.shape, dtype=stats)
    names, has_entropy_mask = _key_shapes(config)
    entropy_mask = completion_mask.new_empty(completion_mask.shape if has_entropy_mask else (0,), dtype=torch.bool)
    args = dict(zip(("hidden", "weight", "bias", "completion_ids", "advantages", "completion_mask"),
                    (hidden, weight, bias, completion_ids, advantages, completion_mask), strict=True))  # fmt: skip
    args.update(zip(("old_logps", "ref_logps", "sampling_logps", "importance_sampling_ratio"), rest[:4], strict=True))
    grads = [
        args[name].new_empty(args[name].shape)
        if (args[name] is not None and n)
        else hidden.new_empty((0,), dtype=stats)
        for name, n in zip(_GRAD_INPUTS, needs, strict=True)
    ]
    metrics = hidden.new_empty((len(names),), dtype=stats)
    return scalar, per_token, per_token.clone(), scalar.clone(), metrics, entropy_mask, *grads


def _policy_loss_setup(ctx, inputs, output):
    ctx.needs = inputs[-2]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[6:])


def _policy_loss_backward(ctx, grad_loss, *_):
    grads = [None] * _NUM_ARGS
    for name, g, n in zip(_GRAD_INPUTS, ctx.saved_tensors, ctx.needs, strict=True):
        if n:
            grads[_ARG_POSITION[name]] = g * grad_loss
    return tuple(grads)


policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup)


# --------------------------------------------------------------------------------------------------------------------
# Log-probs


# the ``workspace`` argument of the log-prob operators for ``workspace_bytes="auto"`` (a budget is >= 1 byte)
_AUTO_WORKSPACE = 0


def head_args(head: HeadParams) -> Tensor:
    """The head transform as the log-prob operators' ``head`` argument: float64 ``[temperature, logit_scale,
    softcap]`` (NaN: no softcap). A tensor, as for the config (:func:`config_args`): the compiler keeps a symbolic
    float that a tensor op takes; a float argument it specialized, recompiling for every new temperature."""
    zero = torch.zeros((), dtype=torch.float64)
    softcap = math.nan if head.softcap is None else head.softcap
    return torch.stack([zero + head.temperature, zero + head.logit_scale, zero + softcap])


def _head_of(numbers: Tensor) -> HeadParams:
    temperature, logit_scale, softcap = numbers.tolist()
    return HeadParams(temperature, logit_scale, None if math.isnan(softcap) else softcap)


def _head_call(hidden, weight, bias, head: HeadParams, backend, workspace, mode, needs, precision):
    """The chunked head's call for these options; ``precision``: ``(compute_dtype, logits_dtype)``."""
    ops = tile_ops_for(backend)
    plan = plan_call(
        hidden,
        weight,
        bias,
        ops,
        workspace_bytes="auto" if workspace == _AUTO_WORKSPACE else workspace,
        coupling="global",
        row_counts=None,
        mode=mode,
        softcap=head.softcap is not None,
        needs=tuple(needs),
        compute_dtype=precision[0],
        logits_dtype=precision[1],
    )
    return ChunkedHead(head, ops, tuple(plan.bounds), fmt=plan.fmt)


@torch.library.custom_op("fused_gspo::logprobs", mutates_args=())
def logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    head: Tensor,
    backend: str,
    workspace: int,
    needs: list[bool],
    compute_dtype: torch.dtype,
    logits_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[N]`` of ``targets`` (``hidden [N, H]``), for a backward that recomputes.
    ``head``: :func:`head_args`."""
    validate_logprob_inputs(hidden=hidden, weight=weight, targets=targets, bias=bias)
    params = _head_of(head)
    if backend == "eager":
        logp, entropy = full_logprobs(hidden, weight, bias, targets, params, compute_dtype)
        return logp, entropy, torch.zeros_like(logp)
    mode = "fwd_bwd" if any(needs) else "logprobs"
    call = _head_call(
        hidden, weight, bias, params, backend, workspace, mode, needs, (compute_dtype, logits_dtype),
    )  # fmt: skip
    from .chunked import score  # noqa: PLC0415

    stats = score(hidden, weight, bias, targets, call)
    return stats.logp, stats.entropy, stats.lse


@logprobs_op.register_fake
def _(hidden, weight, bias, targets, *rest):
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    out = hidden.new_empty(targets.shape, dtype=stats)
    return out, out.clone(), out.clone()


@torch.library.custom_op("fused_gspo::logprobs_backward", mutates_args=())
def logprobs_backward_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Tensor,
    head: Tensor,
    backend: str,
    workspace: int,
    needs: list[bool],
    compute_dtype: torch.dtype,
    logits_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` of ``fused_gspo::logprobs`` (empty where not in ``needs``)."""
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    params = _head_of(head)
    if backend == "eager":
        with _autograd_inside():
            leaves = [
                None if t is None else t.detach().requires_grad_(n)
                for t, n in zip((hidden, weight, bias), needs, strict=True)
            ]
            logp, ent = full_logprobs(leaves[0], leaves[1], leaves[2], targets, params, compute_dtype)
            grad_of = [leaf for leaf, n in zip(leaves, needs, strict=True) if leaf is not None and n]
            value = (logp * grad_logp).sum() + (ent * grad_entropy).sum()
            grads = list(torch.autograd.grad(value, grad_of)) if grad_of else []
        wanted = zip((hidden, weight, bias), needs, strict=True)
        results = [grads.pop(0) if (t is not None and n) else None for t, n in wanted]
    else:
        call = _head_call(
            hidden, weight, bias, params, backend, workspace, "fwd_bwd", needs, (compute_dtype, logits_dtype),
        )  # fmt: skip
        acc = recompute_grads(hidden, weight, bias, targets, call, lse, entropy, grad_logp, grad_entropy, needs)
        results = acc.results()
    return tuple(_empty(hidden, stats) if r is None else r.contiguous() for r in results)  # the fake's layout


@logprobs_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *rest):
    needs = rest[-3]
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    return tuple(
        t.new_empty(t.shape) if (t is not None and n) else hidden.new_empty((0,), dtype=stats)
        for t, n in zip((hidden, weight, bias), needs, strict=True)
    )


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    ctx.options = inputs[4:]
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(
        hidden, weight, bias if bias is not None else hidden.new_empty(0), targets, output[2], output[1]
    )


def _logprobs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    bias = bias if ctx.has_bias else None
    grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
    needs = ctx.options[-3]
    dx, dw, db = logprobs_backward_op(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *ctx.options
    )
    grads = [g if n else None for g, n in zip((dx, dw, db), needs, strict=True)]
    return (*grads, *[None] * (1 + len(ctx.options)))  # targets and the options


logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


def policy_loss_call(
    hidden, weight, completion_ids, advantages, completion_mask, *, config: PolicyLossConfig, backend: str, **optional
):
    """``fused_policy_loss`` through :func:`policy_loss_op` (what it does under ``torch.compile``)."""
    from .policy import PolicyLossOutput  # noqa: PLC0415

    bias = optional.get("bias")
    num_items = optional.get("num_items_in_batch")
    if num_items is not None and not isinstance(num_items, Tensor):
        num_items = torch.tensor(float(num_items), device=hidden.device)
    grad_on = torch.is_grad_enabled()
    wanted = (hidden, weight, bias, advantages, completion_mask, *(optional.get(k) for k in _GRAD_INPUTS[5:]))
    needs = [grad_on and t is not None and t.requires_grad for t in wanted]
    loss, logps, entropy, policy_loss, metrics, entropy_mask, *_ = policy_loss_op(
        hidden,
        weight,
        bias,
        completion_ids,
        advantages,
        completion_mask,
        optional.get("old_logps"),
        optional.get("ref_logps"),
        optional.get("sampling_logps"),
        optional.get("importance_sampling_ratio"),
        num_items,
        optional.get("cu_seqlens"),
        optional.get("position_ids"),
        *config_args(config),
        resolve_backend(backend, hidden.device),
        needs,
        compute_dtype(hidden, weight),
    )
    names = metric_names(config)
    return PolicyLossOutput(
        loss,
        dict(zip(names, metrics.unbind(), strict=True)),
        logps.float(),
        entropy.float(),
        policy_loss,
        entropy_mask if config.top_entropy_quantile < 1.0 else None,
    )


def logprobs_call(hidden, weight, targets, bias, head: HeadParams, backend: str, workspace_bytes, logits_dtype="auto"):
    """``fused_logprobs`` through :func:`logprobs_op`: ``(logp, entropy)`` ``[N]``."""
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    logp, entropy, _ = logprobs_op(
        hidden,
        weight,
        bias,
        targets,
        head_args(head),
        resolve_backend(backend, hidden.device),
        # an int argument, which may be symbolic under torch.compile (dynamic=True), as text cannot
        _AUTO_WORKSPACE if isinstance(workspace_bytes, str) else workspace_bytes,
        needs,
        compute_dtype(hidden, weight),
        logits_dtype,
    )
    return logp, entropy


__all__ = ["logprobs_call", "logprobs_op", "policy_loss_call", "policy_loss_op"]
