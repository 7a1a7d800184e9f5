"""The public functional API: ``fused_policy_loss``, ``fused_logprobs`` and the ``FusedPolicyLoss`` module."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .chunked import SinglePassPolicyFunction, chunk_tokens, logprobs, stats_dtype_for
from .config import PolicyLossConfig
from .head import HeadParams, TorchTileOps, full_logprobs
from .objectives import Normalizers, PolicyBatch, evaluate, gradient_coupling, policy_metrics, policy_objective
from .validation import validate_logprob_inputs, validate_policy_inputs

BACKENDS = ("auto", "eager", "torch", "triton")


@dataclass
class PolicyLossOutput:
    """``loss``: scalar, differentiable w.r.t. hidden, weight and bias. ``metrics``: TRL's names and values.
    ``logps`` / ``entropy``: ``[B, T]`` float32, detached, zero at masked positions. ``policy_loss``: the policy term
    before the accumulation normalizer and the entropy bonus (TRL's ``policy_loss`` metric), detached."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    policy_loss: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None  # [B, T] bool: the top-entropy tokens, when top_entropy_quantile < 1


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` is triton on CUDA/XPU when it is available, torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type in ("cuda", "xpu") and triton_tile_ops(required=False) is not None else "torch"
    if backend == "triton":
        triton_tile_ops(required=True)
    return backend


def triton_tile_ops(required: bool):
    """The Triton backend's tile ops, or None (``required=False``) / a clear error when they cannot be used."""
    try:
        from .triton_ops import TritonTileOps  # noqa: PLC0415
    except ImportError as exc:
        if required:
            raise RuntimeError(
                f"backend='triton' is not available: Triton cannot be imported here ({exc}). Use backend='torch'."
            ) from exc
        return None
    return TritonTileOps


def _tile_ops(backend: str):
    return TorchTileOps if backend == "torch" else triton_tile_ops(required=True)


def _resolve_config(config: PolicyLossConfig | None, overrides: dict) -> PolicyLossConfig:
    if config is not None and not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    config = config or PolicyLossConfig()
    return config.replace(**overrides) if overrides else config


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    backend: str = "auto",
    **config_overrides,
) -> PolicyLossOutput:
    """A GRPO-family policy loss straight from the LM head's input, as TRL 1.16.0's ``_compute_loss`` computes it.

    Args:
        hidden: ``[B, T, H]`` float (bf16/fp16/fp32/fp64); ``hidden[:, t]`` predicts ``completion_ids[:, t]``.
            Or packed, ``[N, H]``: the hidden states of the ``N = completion_mask.sum()`` valid tokens only, in the
            row-major order of ``completion_mask`` (padding-free batches; nothing is gathered).
        weight: ``[V, H]`` LM-head weight. ``bias``: optional ``[V]``.
        completion_ids: ``[B, T]`` integer token ids, in ``[0, V)`` where the mask is 1.
        advantages: ``[B]`` or ``[B, T]`` (per-token, e.g. GSPO-token).
        completion_mask: ``[B, T]`` of 0/1 (bool, int or float); masked positions cost nothing.
        old_logps: ``[B, T]`` log-probs of the policy that sampled (RLOO also takes its ``[B]`` sequence sums);
            None means on-policy (the current log-probs, detached).
        ref_logps: ``[B, T]`` reference-model log-probs, required when ``beta != 0``.
        sampling_logps: ``[B, T]`` the sampler's (vLLM's) log-probs, read by the off-policy sequence mask.
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` vLLM correction, applied as TRL applies it.
        num_items_in_batch: token count the dapo/cispo/vespo losses divide by (default: the mask sum).
        config / config_overrides: a :class:`PolicyLossConfig` and/or its fields as keywords.
        backend: ``"auto"`` (triton on CUDA/XPU, torch elsewhere), ``"eager"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`PolicyLossOutput` with ``loss``, ``metrics``, ``logps`` and ``entropy``.
    """
    return policy_loss(
        hidden,
        weight,
        completion_ids,
        advantages,
        completion_mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items_in_batch=num_items_in_batch,
        bias=bias,
        config=_resolve_config(config, config_overrides),
        backend=backend,
    )


def policy_loss(
    hidden,
    weight,
    completion_ids,
    advantages,
    completion_mask,
    *,
    old_logps,
    ref_logps,
    sampling_logps,
    importance_sampling_ratio,
    num_items_in_batch,
    bias,
    config: PolicyLossConfig,
    backend: str,
    reduce_sum=None,
    gather=None,
    gather_values=None,
) -> PolicyLossOutput:
    """:func:`fused_policy_loss` with a resolved config, plus the cross-process hooks TRL uses under several
    processes (the TRL adapter passes the accelerator's): ``reduce_sum`` and ``gather`` for the metrics,
    ``gather_values`` (valid entropies of every process) for the entropy quantile."""
    cfg = config
    validate_policy_inputs(
        cfg,
        hidden=hidden,
        weight=weight,
        completion_ids=completion_ids,
        advantages=advantages,
        completion_mask=completion_mask,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items_in_batch=num_items_in_batch,
        bias=bias,
    )
    backend = resolve_backend(backend, hidden.device)
    stats_dtype = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    valid = completion_mask.bool()
    batch = PolicyBatch(
        mask=completion_mask.to(stats_dtype),
        advantages=advantages,
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
    ).to(stats_dtype)
    head = HeadParams(cfg.temperature, cfg.logit_scale, cfg.final_logit_softcapping)
    hooks = {k: v for k, v in (("reduce_sum", reduce_sum), ("gather", gather)) if v is not None}
    if gather_values is not None:
        hooks["gather_values"] = gather_values
    tokens = _Tokens(valid)
    x = hidden if hidden.dim() == 2 else hidden[tokens.rows, tokens.cols]
    targets = completion_ids[tokens.rows, tokens.cols].long()

    if backend == "eager":
        if hidden.dim() == 3:  # the eager contender projects every position, as a plain LM head would
            logp, entropy = full_logprobs(hidden, weight, bias, completion_ids.masked_fill(~valid, 0).long(), head)
            zero = logp.new_zeros(())
            logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
        else:
            logp, entropy = (tokens.scatter(v) for v in full_logprobs(x, weight, bias, targets, head))
        return _finish(logp, entropy, batch, cfg, num_items_in_batch, hooks)

    ops = _tile_ops(backend)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    bounds = None
    if wants_grad:
        bounds = _single_pass_bounds(cfg, batch, valid, chunk_tokens(x, weight, cfg.workspace_bytes, ops.temporaries))
    if bounds is None:  # two phases: score every token, then the objective; autograd recomputes for the gradient
        logp, entropy = logprobs(x, weight, bias, targets, head, ops, cfg.workspace_bytes)
        return _finish(tokens.scatter(logp), tokens.scatter(entropy), batch, cfg, num_items_in_batch, hooks)
    hooks.pop("gather_values", None)  # a single pass never masks by the entropy quantile
    return _single_pass(tokens, x, weight, bias, targets, head, ops, bounds, batch, cfg, num_items_in_batch, hooks)


class _Tokens:
    """The valid tokens' positions, in the row-major order of ``completion_mask`` (the order of packed hidden)."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid
        self.rows, self.cols = valid.nonzero(as_tuple=True)
        self.row_list = self.rows.tolist()

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-token values to ``[B, T]``, zeros at masked positions."""
        return values.new_zeros(self.valid.shape).index_put((self.rows, self.cols), values)


def _single_pass(tokens, x, weight, bias, targets, head, ops, bounds, batch, cfg, num_items, hooks):
    """The loss with its gradient formed chunk by chunk while each chunk's logits are at hand (``6NHV``).

    For a chunk of tokens ``[start, stop)``, the objective is evaluated on the rows the chunk touches, with the chunk's
    log-probs as leaves; its gradient w.r.t. them is exact because the bounds only cut where ``dL/dlogp`` does not
    reach across (:func:`fused_gspo.objectives.gradient_coupling`). Positions of those rows the chunk does not hold
    read a placeholder: the old log-probs (ratio 1) or 0, as TRL has at masked positions.
    """
    norms = Normalizers.of(batch, cfg, num_items)
    placeholder = torch.zeros(tokens.valid.shape, device=x.device, dtype=batch.mask.dtype)
    if batch.old_logps is not None and batch.old_logps.dim() == 2:
        placeholder = torch.where(tokens.valid, batch.old_logps, placeholder)
    entropy_base = torch.zeros_like(placeholder)
    wants_entropy_grad = cfg.entropy_coef != 0.0
    done = {}

    def chunk_grad(start: int, stop: int, logp_c: torch.Tensor, entropy_c: torch.Tensor):
        r0, r1 = tokens.row_list[start], tokens.row_list[stop - 1] + 1
        idx = (tokens.rows[start:stop] - r0, tokens.cols[start:stop])
        with torch.enable_grad():
            logp_leaf = logp_c.detach().requires_grad_()
            entropy_leaf = entropy_c.detach().requires_grad_(wants_entropy_grad)
            terms = policy_objective(
                placeholder[r0:r1].index_put(idx, logp_leaf),
                entropy_base[r0:r1].index_put(idx, entropy_leaf),
                batch.rows(r0, r1),
                cfg,
                norms,
            )
            leaves = [logp_leaf, entropy_leaf] if wants_entropy_grad else [logp_leaf]
            grads = torch.autograd.grad(terms.loss, leaves, allow_unused=True)
        grad_logp = torch.zeros_like(logp_c) if grads[0] is None else grads[0]
        return grad_logp, (grads[1] if wants_entropy_grad else None)

    def finish(logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        done["logps"], done["entropy"] = tokens.scatter(logp), tokens.scatter(entropy)
        done["terms"] = policy_objective(done["logps"], done["entropy"], batch, cfg, norms)
        return done["terms"].loss.detach()

    loss, _, _ = SinglePassPolicyFunction.apply(
        x, weight, bias, targets, head, ops, cfg.workspace_bytes, bounds, chunk_grad, finish
    )
    terms = done["terms"]
    metrics = policy_metrics(terms, done["entropy"], batch, cfg, **hooks)
    return PolicyLossOutput(loss, metrics, done["logps"].float(), done["entropy"].float(), terms.policy_loss.detach())


def _single_pass_bounds(cfg, batch, valid, step: int):
    """Token ranges of at most ``step`` tokens for the single-pass strategy, or None when the objective needs two
    phases."""
    coupling = gradient_coupling(cfg, batch)
    if coupling == "global":
        return None
    n_tokens = int(valid.sum())
    if coupling == "token":
        return [(s, min(s + step, n_tokens)) for s in range(0, n_tokens, step)]
    # "sequence": cut only between rows; a row longer than the workspace forces two phases
    counts = valid.sum(1).tolist()
    if max(counts, default=0) > step:
        return None
    bounds, start, end = [], 0, 0
    for count in counts:
        if end + count - start > step:
            bounds.append((start, end))
            start = end
        end += count
    if end > start:
        bounds.append((start, end))
    return bounds


def _finish(logps, entropy, batch, cfg, num_items_in_batch, hooks) -> PolicyLossOutput:
    terms, metrics, entropy_mask = evaluate(logps, entropy, batch, cfg, num_items_in_batch, **hooks)
    return PolicyLossOutput(
        terms.loss, metrics, logps.detach().float(), entropy.detach().float(), terms.policy_loss.detach(), entropy_mask
    )


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    workspace_bytes: int = PolicyLossConfig.workspace_bytes,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log-probs of ``targets`` under ``softmax(head(hidden @ weight.T + bias))``, never holding
    the logits.

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``; ``targets``: ``[...]`` integer ids in ``[0, V)``.
    Returns float32 log-probs shaped like ``targets`` (and the entropy, same shape, with ``return_entropy=True``);
    float64 inputs give float64. Gradients flow to ``hidden``, ``weight`` and ``bias`` from both outputs.
    """
    # Validated through the config so the head options get the same checks as in the loss
    PolicyLossConfig(
        temperature=temperature,
        logit_scale=logit_scale,
        final_logit_softcapping=final_logit_softcapping,
        workspace_bytes=workspace_bytes,
    )
    validate_logprob_inputs(hidden=hidden, weight=weight, targets=targets, bias=bias)
    backend = resolve_backend(backend, hidden.device)
    head = HeadParams(temperature, logit_scale, final_logit_softcapping)
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    if backend == "eager":
        logp, entropy = full_logprobs(flat_hidden, weight, bias, flat_targets, head)
    else:
        logp, entropy = logprobs(flat_hidden, weight, bias, flat_targets, head, _tile_ops(backend), workspace_bytes)
    logp, entropy = logp.view(shape), entropy.view(shape)
    return (logp, entropy) if return_entropy else logp


class FusedPolicyLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_policy_loss`, holding a :class:`PolicyLossConfig` and a backend.

    ``FusedPolicyLoss(loss_type="grpo", importance_sampling_level="sequence")(hidden, lm_head.weight, ids, adv, mask)``
    """

    def __init__(self, config: PolicyLossConfig | None = None, backend: str = "auto", **config_overrides):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = _resolve_config(config, config_overrides)
        self.backend = backend

    def forward(self, hidden, weight, completion_ids, advantages, completion_mask, **kwargs) -> PolicyLossOutput:
        return fused_policy_loss(
            hidden,
            weight,
            completion_ids,
            advantages,
            completion_mask,
            config=self.config,
            backend=self.backend,
            **kwargs,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return f"loss_type={cfg.loss_type!r}, level={cfg.importance_sampling_level!r}, backend={self.backend!r}"
