"""The fused head as PyTorch custom operators, for ``torch.compile``.

Under ``torch.compile`` the public functions call these operators instead of their ``autograd.Function``s, so a
compiled training step stays one graph (``fullgraph=True``): everything that depends on the data (valid-token counts,
the planner's chunks, checks of values, the chunk loop itself) happens inside an operator, which the compiler sees only
through its fake (shape) implementation. Outside ``torch.compile`` nothing here is used.

- ``fused_gspo::policy_loss``: the loss, the per-token log-probs and entropies, TRL's metrics as one tensor (in the
  order of :func:`fused_gspo.objectives.metric_names`), and the gradients w.r.t. hidden, weight and bias for an
  incoming gradient of 1, computed in the same call (the single pass forms them anyway; the two phases run their
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
from .tile_ops import stats_dtype_for
from .validation import validate_logprob_inputs

_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


def config_key(config: PolicyLossConfig) -> str:
    """A :class:`PolicyLossConfig` as the string an operator takes: the ``repr`` of its field values in order, which
    ``torch.compile`` can build while tracing (``json`` it cannot)."""
    return repr(tuple(getattr(config, name) for name in _FIELDS))


@functools.lru_cache(maxsize=256)
def _config(key: str) -> PolicyLossConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller's own config already warned
        return PolicyLossConfig(**dict(zip(_FIELDS, ast.literal_eval(key), strict=True)))


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
    config: str,
    backend: str,
    needs: list[bool],
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, logps, entropy, policy_loss, metrics, entropy_mask, d_hidden, d_weight, d_bias)``; a gradient not in
    ``needs`` (hidden, weight, bias) is an empty tensor, and so is ``entropy_mask`` without an entropy quantile."""
    from .policy import compute_policy_loss  # noqa: PLC0415  (policy imports the API layer's helpers)

    cfg = _config(config)
    wanted = [hidden, weight, bias]
    with _autograd_inside():
        leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(wanted, needs, strict=True)]
        out = compute_policy_loss(
            leaves[0],
            leaves[1],
            completion_ids,
            advantages,
            completion_mask,
            config=cfg,
            old_logps=old_logps,
            ref_logps=ref_logps,
            sampling_logps=sampling_logps,
            importance_sampling_ratio=importance_sampling_ratio,
            num_items_in_batch=num_items_in_batch,
            bias=leaves[2],
            cu_seqlens=cu_seqlens,
            backend=backend,
            compute_dtype=compute_dtype,
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
        results.append(torch.zeros_like(t) if grad is None else grad)
    metrics = torch.stack([out.metrics[name].to(stats) for name in metric_names(cfg)])
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
    config, needs = rest[-4], rest[-2]
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    scalar = hidden.new_empty((), dtype=stats)
    per_token = completion_mask.new_empty(completion_mask.shape, dtype=stats)
    cfg = _config(config)
    entropy_mask = completion_mask.new_empty(
        completion_mask.shape if cfg.top_entropy_quantile < 1.0 else (0,), dtype=torch.bool
    )
    grads = [
        t.new_empty(t.shape) if (t is not None and n) else hidden.new_empty((0,), dtype=stats)
        for t, n in zip((hidden, weight, bias), needs, strict=True)
    ]
    metrics = hidden.new_empty((len(metric_names(cfg)),), dtype=stats)
    return scalar, per_token, per_token.clone(), scalar.clone(), metrics, entropy_mask, *grads


def _policy_loss_setup(ctx, inputs, output):
    ctx.needs = inputs[-2]
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*output[6:])


def _policy_loss_backward(ctx, grad_loss, *_):
    grads = [g * grad_loss if n else None for g, n in zip(ctx.saved_tensors, ctx.needs, strict=True)]
    return (grads[0], grads[1], grads[2]) + (None,) * 13


policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup)


# --------------------------------------------------------------------------------------------------------------------
# Log-probs


def _head_call(hidden, weight, bias, temperature, logit_scale, softcap, backend, workspace, mode, needs, precision):
    """The chunked head's call for these options; ``precision``: ``(compute_dtype, logits_dtype)``."""
    ops = tile_ops_for(backend)
    plan = plan_call(
        hidden,
        weight,
        bias,
        ops,
        workspace_bytes=workspace if workspace == "auto" else int(workspace),
        coupling="global",
        row_counts=None,
        mode=mode,
        softcap=softcap is not None,
        needs=tuple(needs),
        compute_dtype=precision[0],
        logits_dtype=precision[1],
    )
    head = HeadParams(temperature, logit_scale, softcap)
    return ChunkedHead(head, ops, tuple(plan.bounds), fmt=plan.fmt), plan.strategy


@torch.library.custom_op("fused_gspo::logprobs", mutates_args=())
def logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    backend: str,
    workspace: str,
    needs: list[bool],
    compute_dtype: torch.dtype,
    logits_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, entropy, lse)`` ``[N]`` of ``targets`` (``hidden [N, H]``), for a backward that recomputes."""
    validate_logprob_inputs(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if backend == "eager":
        head = HeadParams(temperature, logit_scale, softcap)
        logp, entropy = full_logprobs(hidden, weight, bias, targets, head, compute_dtype)
        return logp, entropy, torch.zeros_like(logp)
    mode = "fwd_bwd" if any(needs) else "logprobs"
    call, strategy = _head_call(
        hidden, weight, bias, temperature, logit_scale, softcap, backend, workspace, mode, needs,
        (compute_dtype, logits_dtype),
    )  # fmt: skip
    if strategy == "fused":
        logp, entropy, lse = call.ops.fused_logprobs(hidden, weight, bias, targets, call.head)
        return logp, entropy, lse
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
    temperature: float,
    logit_scale: float,
    softcap: float | None,
    backend: str,
    workspace: str,
    needs: list[bool],
    compute_dtype: torch.dtype,
    logits_dtype: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` of ``fused_gspo::logprobs`` (empty where not in ``needs``)."""
    stats = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    if backend == "eager":
        with _autograd_inside():
            leaves = [
                None if t is None else t.detach().requires_grad_(n)
                for t, n in zip((hidden, weight, bias), needs, strict=True)
            ]
            head = HeadParams(temperature, logit_scale, softcap)
            logp, ent = full_logprobs(leaves[0], leaves[1], leaves[2], targets, head, compute_dtype)
            grad_of = [leaf for leaf, n in zip(leaves, needs, strict=True) if leaf is not None and n]
            grads = list(torch.autograd.grad((logp * grad_logp).sum() + (ent * grad_entropy).sum(), grad_of))
        wanted = zip((hidden, weight, bias), needs, strict=True)
        results = [grads.pop(0) if (t is not None and n) else None for t, n in wanted]
    else:
        call, _ = _head_call(
            hidden, weight, bias, temperature, logit_scale, softcap, backend, workspace, "fwd_bwd", needs,
            (compute_dtype, logits_dtype),
        )  # fmt: skip
        acc = recompute_grads(hidden, weight, bias, targets, call, lse, entropy, grad_logp, grad_entropy, needs)
        results = acc.results()
    return tuple(_empty(hidden, stats) if r is None else r for r in results)


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
    return (*grads, None, None, None, None, None, None, None, None, None)


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
    needs = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
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
        config_key(config),
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
        float(head.temperature),
        float(head.logit_scale),
        None if head.softcap is None else float(head.softcap),
        resolve_backend(backend, hidden.device),
        str(workspace_bytes),
        needs,
        compute_dtype(hidden, weight),
        logits_dtype,
    )
    return logp, entropy


__all__ = ["logprobs_call", "logprobs_op", "policy_loss_call", "policy_loss_op"]
