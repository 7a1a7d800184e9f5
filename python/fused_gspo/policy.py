"""The GRPO-family policy loss through the head: the plan, the single pass's chunk objective, and the two phases.

:func:`compute_policy_loss` is :func:`fused_gspo.fused_policy_loss` with a resolved config and the cross-process hooks
TRL's trainers need. It scores the valid tokens only (the ``completion_mask`` picks them out of ``[B, T, H]`` hidden
states, or a packed ``[N, H]`` holds just them), asks the planner for a strategy and chunks, and runs either

- the single pass (:class:`fused_gspo.chunked.SinglePassFunction` with a :class:`PolicyChunkObjective`), the gradient
  formed while each chunk's logits are at hand, when :func:`fused_gspo.objectives.gradient_coupling` allows; or
- the two phases: every token scored first (:func:`fused_gspo.chunked.logprobs`), then the objective
  (:func:`fused_gspo.objectives.evaluate`) with autograd recomputing the projection for the gradient.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .backends import resolve_backend, tile_ops_for
from .chunked import ChunkedHead, SinglePassFunction, logprobs, weight_gather
from .config import PolicyLossConfig
from .head import HeadParams, TokenStats, full_logprobs
from .host_values import valid_positions
from .objectives import Normalizers, PolicyBatch, evaluate, gradient_coupling, policy_metrics, policy_objective
from .plan.planner import ChunkPlan
from .plan.runtime import plan_call, run_planned
from .rows import PackedRows, PaddedRows
from .tile_ops import stats_dtype_for
from .validation import validate_policy_inputs


@dataclass
class PolicyLossOutput:
    """``loss``: scalar, differentiable w.r.t. hidden, weight and bias. ``metrics``: TRL's names and values.
    ``logps`` / ``entropy``: ``[B, T]`` float32, detached, zero at masked positions. ``policy_loss``: the policy term
    before the accumulation normalizer and the entropy bonus (TRL's ``policy_loss`` metric), detached.
    ``entropy_mask``: ``[B, T]`` bool, the top-entropy tokens, when ``top_entropy_quantile < 1``."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    policy_loss: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None


@dataclass
class CrossProcess:
    """The reductions TRL uses across processes (the TRL adapter passes the accelerator's; the defaults are one
    process's): ``reduce_sum`` and ``gather`` for the metrics, ``gather_values`` (the valid entropies of every process)
    for the entropy quantile."""

    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather_values: Callable[[torch.Tensor], torch.Tensor] | None = None

    def metric_hooks(self) -> dict:
        return {k: v for k, v in (("reduce_sum", self.reduce_sum), ("gather", self.gather)) if v is not None}


class TokenLayout:
    """The valid tokens' positions, in the order of the flattened per-token layout (row-major ``[B, T]``, or the
    packed ``[N]``): the order of packed hidden states and of the chunks. Tokens come row by row, so each row's valid
    tokens are one contiguous range of that order.

    ``row_counts``: valid tokens per row, from the host's one read of the batch (:mod:`fused_gspo.host_values`);
    without them the layout reads them itself. Knowing the count, the positions are found without waiting for the
    device."""

    def __init__(self, valid: torch.Tensor, rows: PaddedRows | PackedRows, row_counts: Sequence[int] | None = None):
        self.valid, self.rows = valid, rows
        if row_counts is None:
            row_counts = rows.sum(valid.to(torch.float32)).long().tolist()
        self._row_counts = [int(c) for c in row_counts]
        self._row_ends = list(itertools.accumulate(self._row_counts))
        self.positions = valid_positions(valid, self._row_ends[-1] if self._row_ends else 0)

    def row_counts(self) -> list[int]:
        """Valid tokens per row."""
        return self._row_counts

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """``[r0, r1)``: the rows holding valid tokens ``[start, stop)`` (``stop > start``)."""
        return bisect.bisect_right(self._row_ends, start), bisect.bisect_right(self._row_ends, stop - 1) + 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The valid tokens' entries of a per-token tensor (``[B, T, ...]`` or ``[N, ...]``), in order."""
        return x.reshape(-1, *x.shape[self.valid.dim() :])[self.positions]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``[n]`` per-token values back to the per-token layout, zeros at masked positions."""
        flat = values.new_zeros(self.valid.numel()).index_put((self.positions,), values)
        return flat.view(self.valid.shape)


class PolicyChunkObjective:
    """The policy loss as a :class:`fused_gspo.chunked.ChunkObjective`.

    For chunk ``[start, stop)`` of the valid tokens, the objective is evaluated on the rows the chunk touches, with
    the chunk's log-probs as leaves; its gradient w.r.t. them is exact because the planner only cuts where
    ``dL/dlogp`` does not reach across (:func:`fused_gspo.objectives.gradient_coupling`). The rows' positions the chunk
    does not hold read a placeholder: the old log-probs (ratio 1) or 0, as TRL has at masked positions.

    After :meth:`finish`: ``logps`` and ``entropy`` (per-token layout) and ``terms`` (the objective on the batch).
    ``inputs``: the batch's tensors that require grad (advantages, old log-probs, ...), whose gradient :meth:`finish`
    takes from the whole batch's objective, as the eager path's autograd would.
    """

    def __init__(self, layout: TokenLayout, batch: PolicyBatch, config: PolicyLossConfig, norms: Normalizers):
        self.layout, self.batch, self.config, self.norms = layout, batch, config, norms
        self.input_names = batch.requiring_grad() if torch.is_grad_enabled() else ()
        self.inputs = tuple(getattr(batch, name) for name in self.input_names)
        self.input_grads = ()
        placeholder = torch.zeros(layout.valid.shape, device=layout.valid.device, dtype=batch.mask.dtype)
        if batch.old_logps is not None and batch.old_logps.shape == layout.valid.shape:
            placeholder = torch.where(layout.valid, batch.old_logps, placeholder)
        self.placeholder = placeholder.reshape(-1)
        self.entropy_base = torch.zeros_like(self.placeholder)
        self.wants_entropy_grad = config.entropy_coef != 0.0
        self.logps = self.entropy = self.terms = None

    def grad(self, start: int, stop: int, stats: TokenStats):
        logp, entropy = stats.logp, stats.entropy
        r0, r1 = self.layout.row_range(start, stop)
        starts = self.batch.rows.row_starts()
        first, last = starts[r0], starts[r1]
        idx = (self.layout.positions[start:stop] - first,)
        shape = self.batch.rows.token_rows(self.batch.mask, r0, r1).shape
        with torch.enable_grad():
            logp_leaf = logp.detach().requires_grad_()
            entropy_leaf = entropy.detach().requires_grad_(self.wants_entropy_grad)
            terms = policy_objective(
                self.placeholder[first:last].index_put(idx, logp_leaf).view(shape),
                self.entropy_base[first:last].index_put(idx, entropy_leaf).view(shape),
                self.batch.select_rows(r0, r1),
                self.config,
                self.norms,
            )
            leaves = [logp_leaf, entropy_leaf] if self.wants_entropy_grad else [logp_leaf]
            grads = torch.autograd.grad(terms.loss, leaves, allow_unused=True)
        grad_logp = torch.zeros_like(logp) if grads[0] is None else grads[0]
        return grad_logp, (grads[1] if self.wants_entropy_grad else None)

    def finish(self, stats: TokenStats) -> torch.Tensor:
        self.logps, self.entropy = self.layout.scatter(stats.logp), self.layout.scatter(stats.entropy)
        if not self.inputs:
            self.terms = policy_objective(self.logps, self.entropy, self.batch, self.config, self.norms)
            return self.terms.loss.detach()
        with torch.enable_grad():  # the single pass runs without autograd; these inputs need it
            leaves = [t.detach().requires_grad_() for t in self.inputs]
            batch = self.batch.replace(**dict(zip(self.input_names, leaves, strict=True)))
            self.terms = policy_objective(self.logps, self.entropy, batch, self.config, self.norms)
            # None where the loss does not depend on an input (the off-policy mask's sampling log-probs), as eagerly
            self.input_grads = torch.autograd.grad(self.terms.loss, leaves, allow_unused=True)
        return self.terms.loss.detach()


def compute_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    config: PolicyLossConfig,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    cross_process: CrossProcess | None = None,
    compute_dtype: torch.dtype | None = None,
) -> PolicyLossOutput:
    """:func:`fused_gspo.fused_policy_loss` with a resolved ``config`` and optional :class:`CrossProcess` hooks.
    ``compute_dtype``: the head GEMMs' dtype (default: :func:`fused_gspo.precision.compute_dtype`, autocast
    included; the compiled path hands in what it saw when traced)."""
    cfg = config
    hooks = cross_process or CrossProcess()
    counts = validate_policy_inputs(
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
        cu_seqlens=cu_seqlens,
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
        cu_seqlens=cu_seqlens,
        row_starts=counts.row_starts,
    ).to(stats_dtype)
    num_items = counts.num_items  # read with the rest: the host's one read of the batch
    head = HeadParams(cfg.temperature, cfg.logit_scale, cfg.final_logit_softcapping)
    layout = TokenLayout(valid, batch.rows, counts.row_counts)
    # hidden holds every position, or (packed rows, one per valid token) just the scored ones
    every_position = hidden.dim() == 3 or (cu_seqlens is not None and hidden.shape[0] == valid.shape[0])
    x = layout.gather(hidden) if every_position else hidden
    targets = layout.gather(completion_ids).long()

    if backend == "eager":
        if hidden.dim() == 3:  # the eager contender projects every position, as a plain LM head would
            ids = completion_ids.masked_fill(~valid, 0).long()
            logp, entropy = full_logprobs(hidden, weight, bias, ids, head, compute_dtype)
            zero = logp.new_zeros(())
            logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
        else:
            logp, entropy = (layout.scatter(v) for v in full_logprobs(x, weight, bias, targets, head, compute_dtype))
        return _evaluated(logp, entropy, batch, cfg, num_items, hooks, counts.valid_tokens)

    ops = tile_ops_for(backend)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    coupling = gradient_coupling(cfg, batch) if wants_grad else "global"

    def plan_for(workspace_bytes) -> ChunkPlan:
        return plan_call(
            x,
            weight,
            bias,
            ops,
            workspace_bytes=workspace_bytes,
            coupling=coupling,
            row_counts=layout.row_counts() if coupling == "sequence" else None,
            mode="fwd_bwd" if wants_grad else "logprobs",
            softcap=cfg.final_logit_softcapping is not None,
            compute_dtype=compute_dtype,
            logits_dtype=cfg.logits_dtype,
        )

    def run(plan: ChunkPlan) -> PolicyLossOutput:
        call = ChunkedHead(head, ops, tuple(plan.bounds), weight_gather.get(), fmt=plan.fmt)
        if plan.strategy != "single_pass":  # every token scored, then the objective; the backward recomputes
            stats = logprobs(x, weight, bias, targets, call)
            logp, entropy = stats.logp, stats.entropy
            return _evaluated(
                layout.scatter(logp), layout.scatter(entropy), batch, cfg, num_items, hooks, counts.valid_tokens
            )
        norms = Normalizers.of(batch, cfg, num_items, valid_tokens=counts.valid_tokens)
        objective = PolicyChunkObjective(layout, batch, cfg, norms)
        loss, _, _ = SinglePassFunction.apply(x, weight, bias, targets, call, objective, *objective.inputs)
        # a single pass never masks by the entropy quantile (that coupling is global): gather_values is not needed
        metrics = policy_metrics(objective.terms, objective.entropy, batch, cfg, **hooks.metric_hooks())
        return PolicyLossOutput(
            loss, metrics, objective.logps.float(), objective.entropy.float(), objective.terms.policy_loss.detach()
        )

    return run_planned(run, plan_for(cfg.workspace_bytes), plan_for, x.device)


def _evaluated(logps, entropy, batch, cfg, num_items, hooks: CrossProcess, valid_tokens: int) -> PolicyLossOutput:
    """The output of the two phases (and of the eager path): the objective evaluated on every token's log-prob."""
    terms, metrics, entropy_mask = evaluate(
        logps, entropy, batch, cfg, num_items, gather_values=hooks.gather_values, valid_tokens=valid_tokens,
        **hooks.metric_hooks(),
    )  # fmt: skip
    return PolicyLossOutput(
        terms.loss, metrics, logps.detach().float(), entropy.detach().float(), terms.policy_loss.detach(), entropy_mask
    )
