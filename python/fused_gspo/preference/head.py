"""The preference losses through the fused head: DPO and CPO (SimPO, AlphaPO) straight from the LM head's input.

:func:`compute_preference_loss` scores the valid tokens of TRL's concatenated batch (rows ``[0, B)`` chosen, ``[B, 2B)``
rejected) with the chunked head, the per-token statistics the loss and its metrics read coming from the same single
read of each logits row (:class:`fused_gspo.head.TokenStats`), and evaluates the loss written once in
:mod:`.objectives`. A pair's gradient couples its two rows only, so the tokens are ordered pair by pair (chosen row
``i``, then rejected row ``B + i``) and the planner cuts chunks between pairs: the single pass (``6NHV``) holds both
members of every pair it scores. A chunk's gradient is the whole batch's objective differentiated at the chunk's
log-probs, the other pairs reading zeros, which their own terms keep to themselves. The sorting losses (``aot``)
couple every pair: they run the two phases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..backends import resolve_backend, tile_ops_for
from ..chunked import ChunkedHead, SinglePassFunction, logprobs, score, weight_gather
from ..head import HeadParams, TokenStats, full_logprobs, full_statistics
from ..host_values import valid_positions
from ..plan.runtime import plan_call, run_planned
from ..tile_ops import stats_dtype_for
from ..validation import validate_preference_inputs
from .batch import PreferenceBatch, PreferenceTerms, check_empty_rows
from .config import CPOLossConfig, DPOLossConfig, PreferenceLossConfig
from .objectives import preference_gradient_coupling, preference_metrics, preference_objective


@dataclass
class PreferenceLossOutput:
    """``loss``: scalar, differentiable w.r.t. hidden, weight and bias. ``metrics``: the trainer's names, 0-dim
    tensors. ``chosen_logps`` / ``rejected_logps``: ``[B]`` sequence log-probs as the trainer reduces them, detached.
    ``logps`` / ``entropy``: ``[2B, T]`` float32, detached, zero at masked positions. ``terms``: the objective's
    intermediates (rewards, ``nll_loss``, WPO weights)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    terms: PreferenceTerms | None = None


@dataclass
class MetricHooks:
    """``accelerator.gather`` and ``accelerator.gather_for_metrics``, where the trainers use them (defaults: one
    process's)."""

    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    gather_for_metrics: Callable[[torch.Tensor], torch.Tensor] | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in (("gather", self.gather), ("gather_for_metrics", self.gather_for_metrics)) if v}


def pair_order(num_pairs: int, device) -> torch.Tensor:
    """Rows in pair order: chosen ``0``, rejected ``B``, chosen ``1``, rejected ``B + 1``, ..."""
    pairs = torch.arange(num_pairs, device=device)
    return torch.stack([pairs, pairs + num_pairs], dim=1).flatten()


class PairLayout:
    """The valid tokens of a ``[2B, T]`` mask in pair order: the order of the chunks. ``row_counts``: valid tokens
    per row, from the host's one read of the batch (:mod:`fused_gspo.host_values`; read here when not given)."""

    def __init__(self, valid: torch.Tensor, row_counts: Sequence[int] | None = None):
        self.valid = valid
        two_b, width = valid.shape
        if row_counts is None:
            row_counts = valid.sum(1).tolist()
        order = pair_order(two_b // 2, valid.device)
        in_pair_order = valid_positions(valid[order], int(sum(row_counts)))  # flat positions of valid[order]
        self.positions = order[in_pair_order // width] * width + in_pair_order % width  # flat [2B * T], by pair
        # where each of them sits among the valid tokens in row-major order (a packed [n, H] input's order)
        self.packed_index = valid.reshape(-1).long().cumsum(0)[self.positions] - 1
        B = two_b // 2
        self.pair_counts = [int(row_counts[i] + row_counts[B + i]) for i in range(B)]

    def gather(self, x: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """The valid tokens' rows of ``[2B, T, ...]`` (every position) or, ``packed``, of ``[n, ...]`` (the valid
        tokens, row-major). Said by the caller, not read from the shape: a packed ``[n, H]`` with ``n = 2B`` and
        ``H = T`` has the shape of the mask."""
        if packed:
            return x[self.packed_index]
        return x.reshape(-1, *x.shape[2:])[self.positions]

    def scatter(self, values: torch.Tensor, fill=0.0) -> torch.Tensor:
        """``[n]`` values (pair order) back to ``[2B, T]``, ``fill`` at masked positions."""
        flat = torch.full((self.valid.numel(),), fill, dtype=values.dtype, device=values.device)
        return flat.index_put((self.positions,), values).view(self.valid.shape)


def _full_batch(layout: PairLayout, stats: TokenStats, base: PreferenceBatch, config) -> PreferenceBatch:
    """``base`` with the per-token statistics of every token scattered to ``[2B, T]`` (CPO reads none of the
    extras)."""
    extras = {}
    if stats.has_extras and isinstance(config, DPOLossConfig):
        extras = dict(
            log_sum_sq_probs=layout.scatter(stats.log_sum_sq_probs),
            mean_logits=layout.scatter(stats.mean_logit),
            is_top1=layout.scatter(stats.is_top1, fill=False),
        )
    return PreferenceBatch(**{**base.__dict__, "entropy": layout.scatter(stats.entropy), **extras})


class PreferenceChunkObjective:
    """The preference loss as a :class:`fused_gspo.chunked.ChunkObjective`: for a chunk of whole pairs, the whole
    batch's objective differentiated at the chunk's log-probs (the other pairs' tokens read 0, and a pair's terms
    reach no other pair). After :meth:`finish`: ``logps`` ``[2B, T]``, ``batch`` (with every statistic) and ``terms``.
    ``inputs``: the batch's tensors that require grad (a MoE ``aux_loss``), whose gradient :meth:`finish` takes from
    the whole batch's objective, as the eager path's autograd would.
    """

    def __init__(self, layout: PairLayout, batch: PreferenceBatch, config: PreferenceLossConfig):
        self.layout, self.batch, self.config = layout, batch, config
        self.weighting = isinstance(config, DPOLossConfig) and config.use_weighting
        self.logps = self.terms = None
        grad_on = torch.is_grad_enabled()
        self.input_names = tuple(k for k, v in batch.__dict__.items() if grad_on and _requires_grad(v))
        self.inputs = tuple(getattr(batch, name) for name in self.input_names)
        self.input_grads = ()

    def grad(self, start: int, stop: int, stats: TokenStats):
        positions = (self.layout.positions[start:stop],)
        shape = self.layout.valid.shape
        with torch.enable_grad():
            leaf = stats.logp.detach().requires_grad_()
            logps = leaf.new_zeros(shape.numel()).index_put(positions, leaf).view(shape)
            batch = self.batch
            if self.weighting:  # the WPO weights read the pair's own log sum p^2
                lss = stats.log_sum_sq_probs.new_zeros(shape.numel()).index_put(positions, stats.log_sum_sq_probs)
                batch = PreferenceBatch(**{**batch.__dict__, "log_sum_sq_probs": lss.view(shape)})
            terms = preference_objective(logps, batch, self.config, values=False)
            (grad,) = torch.autograd.grad(terms.loss, [leaf], allow_unused=True)
        return (torch.zeros_like(leaf) if grad is None else grad), None

    def finish(self, stats: TokenStats) -> torch.Tensor:
        self.logps = self.layout.scatter(stats.logp)
        self.batch = _full_batch(self.layout, stats, self.batch, self.config)
        if not self.inputs:
            self.terms = preference_objective(self.logps, self.batch, self.config, values=False)
            return self.terms.loss.detach()
        with torch.enable_grad():  # the single pass runs without autograd; these inputs need it
            leaves = [t.detach().requires_grad_() for t in self.inputs]
            batch = PreferenceBatch(**{**self.batch.__dict__, **dict(zip(self.input_names, leaves, strict=True))})
            self.terms = preference_objective(self.logps, batch, self.config, values=False)
            # None where the loss reads an input detached (the reference log-probs), as eagerly
            self.input_grads = torch.autograd.grad(self.terms.loss, leaves, allow_unused=True)
        return self.terms.loss.detach()


@torch.no_grad()
def position_mean_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias, head: HeadParams, ops, workspace, logits_dtype: str = "auto"
):
    """The vocabulary mean of the logits at every position of ``hidden`` ``[R, P, H]`` -> ``[R, P]`` (CPO's
    ``logits/*``). Without a softcap the mean is linear in the hidden state: ``(h . mean_j W_j + mean_j b_j) *
    logit_scale / temperature``, one matrix-vector product; with one, a no-grad chunked pass."""
    rows, positions, size = hidden.shape
    stats_dtype = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    flat = hidden.reshape(-1, size)
    if head.softcap is None:
        # over the whole vocabulary: a vocabulary-parallel call's ops average over every rank's shard
        vocab_mean = getattr(ops, "vocab_mean", lambda rows: rows.mean(0))
        mean = flat.to(stats_dtype) @ vocab_mean(weight.to(stats_dtype))
        if bias is not None:
            mean = mean + vocab_mean(bias.to(stats_dtype))
        return (mean * (head.logit_scale / head.temperature)).view(rows, positions)
    targets = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    # chunks of the two phases' first pass: tiles are needed (the fused kernel keeps no extras)
    plan = plan_call(flat, weight, bias, ops, workspace_bytes=workspace, coupling="global", row_counts=None,
                     mode="fwd", softcap=True, needs=(False, False, False), logits_dtype=logits_dtype)  # fmt: skip
    call = ChunkedHead(head, ops, tuple(plan.bounds), extras=True, fmt=plan.fmt)
    return score(flat, weight, bias, targets, call).mean_logit.view(rows, positions)


def compute_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    config: PreferenceLossConfig,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
    completion_lengths: torch.Tensor | None = None,
    position_hidden: torch.Tensor | None = None,
    head: HeadParams | None = None,
    workspace_bytes: int | str = "auto",
    logits_dtype: str = "auto",
    backend: str = "auto",
    hooks: MetricHooks | None = None,
    train_eval: str = "train",
) -> PreferenceLossOutput:
    """:func:`fused_gspo.fused_preference_loss` with a resolved config, TRL's metric hooks, and, for CPO's
    ``logits/*``, ``position_hidden`` ``[2B, P, H]`` (the hidden states at every position of the input; default:
    ``hidden`` when it is ``[2B, T, H]``)."""
    head = head or HeadParams()
    hooks = hooks or MetricHooks()
    if not isinstance(config, (DPOLossConfig, CPOLossConfig)):
        raise TypeError(f"config must be a DPOLossConfig or a CPOLossConfig, got {type(config).__name__}")
    counts = validate_preference_inputs(  # with the values: 0/1 mask, ids in range (one read)
        hidden=hidden, weight=weight, completion_ids=completion_ids, completion_mask=completion_mask, bias=bias
    )
    check_empty_rows(config, counts.row_counts, "completion_mask")
    backend = resolve_backend(backend, hidden.device)
    stats_dtype = stats_dtype_for(torch.promote_types(hidden.dtype, weight.dtype))
    valid = completion_mask.bool()
    layout = PairLayout(valid, counts.row_counts)
    x, targets = layout.gather(hidden, packed=hidden.dim() == 2), layout.gather(completion_ids).long()
    dpo = isinstance(config, DPOLossConfig)
    base = PreferenceBatch(
        mask=completion_mask.to(stats_dtype),
        ref_chosen_logps=None if ref_chosen_logps is None else ref_chosen_logps.to(stats_dtype),
        ref_rejected_logps=None if ref_rejected_logps is None else ref_rejected_logps.to(stats_dtype),
        completion_lengths=completion_lengths,
        aux_loss=aux_loss,
    )
    if not dpo:
        source = position_hidden if position_hidden is not None else (hidden if hidden.dim() == 3 else None)
        if source is None:
            raise ValueError("CPO's logits/* metrics need the hidden states at every position: pass position_hidden")
        ops = tile_ops_for("torch" if backend == "eager" else backend)
        # the eager backend takes no workspace (as DPO's eager path): its softcapped mean is chunked at the auto budget
        budget = "auto" if backend == "eager" else workspace_bytes
        base.position_mean_logits = position_mean_logits(source.detach(), weight.detach(),
                                                         None if bias is None else bias.detach(), head, ops,
                                                         budget, logits_dtype)  # fmt: skip

    if backend == "eager":  # DPO's metrics read the extra statistics; CPO's do not
        stats = (
            full_statistics(x, weight, bias, targets, head)
            if dpo
            else TokenStats(*full_logprobs(x, weight, bias, targets, head))
        )
        return _evaluated(layout, stats, base, config, hooks, train_eval)

    ops = tile_ops_for(backend)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    coupling = preference_gradient_coupling(config) if wants_grad else "global"

    def plan_for(budget):
        return plan_call(
            x, weight, bias, ops, workspace_bytes=budget, coupling="sequence" if coupling == "pair" else coupling,
            row_counts=layout.pair_counts if coupling == "pair" else None, mode="fwd_bwd" if wants_grad else "logprobs",
            softcap=head.softcap is not None, logits_dtype=logits_dtype,
        )  # fmt: skip

    def run(plan):
        call = ChunkedHead(head, ops, tuple(plan.bounds) or _whole(x), weight_gather.get(), extras=dpo, fmt=plan.fmt)
        if plan.strategy != "single_pass":
            stats = logprobs(x, weight, bias, targets, call)
            return _evaluated(layout, stats, base, config, hooks, train_eval)
        objective = PreferenceChunkObjective(layout, base, config)
        loss, _, _ = SinglePassFunction.apply(x, weight, bias, targets, call, objective, *objective.inputs)
        metrics = preference_metrics(objective.terms, objective.batch, config, train_eval=train_eval, **hooks.kwargs())
        return _output(loss, metrics, objective.terms, objective.logps, objective.batch.entropy)

    return run_planned(run, plan_for(workspace_bytes), plan_for, x.device)


def _requires_grad(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _whole(x) -> tuple[tuple[int, int], ...]:
    return ((0, x.shape[0]),) if x.shape[0] else ()


def _evaluated(layout, stats: TokenStats, base, config, hooks: MetricHooks, train_eval) -> PreferenceLossOutput:
    """The two phases (and the eager path): every token scored, then the objective on the per-token tensors."""
    logps = layout.scatter(stats.logp)
    batch = _full_batch(layout, stats, base, config)
    terms = preference_objective(logps, batch, config, values=False)
    metrics = preference_metrics(terms, batch, config, train_eval=train_eval, **hooks.kwargs())
    return _output(terms.loss, metrics, terms, logps, batch.entropy)


def _output(loss, metrics, terms: PreferenceTerms, logps, entropy) -> PreferenceLossOutput:
    return PreferenceLossOutput(
        loss,
        metrics,
        terms.chosen_logps.detach(),
        terms.rejected_logps.detach(),
        logps.detach().float(),
        entropy.detach().float(),
        terms,
    )


__all__ = ["MetricHooks", "PairLayout", "PreferenceLossOutput", "compute_preference_loss", "position_mean_logits"]
