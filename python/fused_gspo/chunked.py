"""The chunked LM head: log-probs and gradients over token chunks, never holding more than one chunk's logits.

Shared by the ``"torch"`` and ``"triton"`` backends; they differ only in their tile ops
(:class:`fused_gspo.tile_ops.TileOps`). A chunk is ``n`` valid tokens against the whole vocabulary: the projection
``y = X_c @ W.T`` lands in a workspace tile of ``n * V`` floats, the tile ops reduce it to per-token statistics, then
(when the gradient is wanted) overwrite it with ``dL/dy``, which feeds ``dX_c = G @ W`` and ``dW += G.T @ X_c`` with
fp32 accumulation. Which chunks, and which of the two strategies below, is the planner's decision
(:mod:`fused_gspo.plan`); the driver runs the :class:`ChunkedHead` it is handed.

The strategies (``docs/design.md``, "Strategy"):

- :class:`LogProbFunction`: a forward that only computes log-probs and entropies, and a backward that recomputes each
  chunk's projection to form the gradient (``8NHV`` with the backward). Used alone by ``fused_logprobs`` and, with
  the objective on top, by every loss whose ``dL/dlogp`` needs the whole batch first ("two phases").
- :class:`SinglePassFunction`: the gradient formed in the forward while each chunk's logits are at hand (``6NHV``),
  for a :class:`ChunkObjective` that can give ``dL/dlogp`` chunk by chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .head import HeadParams, TokenStats
from .plan.cost import ChunkFormat
from .plan.runtime import chunk_format, operand_dtype
from .tile_ops import TileOps

# A context manager factory ``gather(weight, bias)`` for training setups that release the head's weight after the
# forward (DeepSpeed ZeRO-3; the TRL adapters set TRL's gather, which does nothing where ZeRO-3 is off or the weight is
# already gathered). Every backward enters it (:class:`_BackwardGather`): the recomputing backward needs the weight's
# values, and every backward needs the weight whole when autograd accumulates the gradient into it. None: the weight
# stays materialized, nothing to do.
weight_gather: contextvars.ContextVar = contextvars.ContextVar("fused_gspo_weight_gather", default=None)


class _BackwardGather:
    """The head's gather (:data:`weight_gather`), entered by a backward that finds the head released, and left once
    autograd has accumulated the gradients that backward returns into the head's parameters.

    ZeRO-3 releases the head's weight after the forward (the parameter's local tensor then has 0 elements), and
    autograd accumulates a returned gradient into ``param.grad`` in the parameter's *current* shape: a ``[V, H]``
    gradient handed back while the weight is released does not fit ("The size of tensor a (0) must match the size of
    tensor b (H)"). Where the loss's backward comes through the head's or the model's output (the TRL adapters'
    :class:`fused_gspo.trl.stand_in.LossRelay`, or the LM-head module passed to the public functions), ZeRO-3's own
    pre-backward hook has gathered the head already: the gather is a no-op and nothing is held. Otherwise (a custom
    loop that gathers the weight around the call itself) the gather is left from a post-accumulate-grad hook of each
    parameter that gets a gradient (hooks run in the order they were registered: ZeRO-3's own, which reduces the
    gradient, runs first), or at the end of the backward pass if autograd never accumulates one, never later. What
    this cannot hold: a weight that a ZeRO-3 module also gathers in the same backward (an input embedding tied to the
    head; DeepSpeed refuses to release a parameter a module is using): pass the LM-head module instead.
    """

    def __init__(self, gather: Callable | None, weight: torch.Tensor, bias: torch.Tensor | None):
        context = None if gather is None else gather(weight, bias)
        # Nothing to hold: no gather configured, or the gather found the weight materialized (ZeRO-3 off, or gathered
        # by someone who will keep it so until the gradient is in)
        self._context = None if isinstance(context, contextlib.nullcontext) else context
        self._handles: list = []
        if self._context is not None:
            self._context.__enter__()

    def release_after_accumulation(self, params) -> None:
        """Leave the gather once each parameter in ``params`` that gets a gradient has been accumulated."""
        if self._context is None:
            return
        pending = {id(p): p for p in params if p is not None and p.requires_grad and p.is_leaf}
        if not pending:
            self.release()
            return

        def accumulated(param: torch.Tensor) -> None:
            pending.pop(id(param), None)
            if not pending:
                self.release()

        self._handles = [p.register_post_accumulate_grad_hook(accumulated) for p in pending.values()]
        torch.autograd.Variable._execution_engine.queue_callback(self.release)

    @staticmethod
    def check_materialized(weight: torch.Tensor, shape: torch.Size) -> None:
        """A clear error for a weight released since the forward that no gather brought back."""
        if weight.shape != shape:
            raise RuntimeError(
                f"the LM head's weight was {tuple(shape)} in the forward but is {tuple(weight.shape)} in the backward "
                "(released after the forward, as DeepSpeed ZeRO-3 does): pass the LM-head module instead of its "
                "weight, so that its hooks gather it for the backward, or set fused_gspo.chunked.weight_gather to "
                "a factory of a context that gathers it"
            )

    def release(self) -> None:
        """Leave the gather now (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)


@dataclass(frozen=True)
class ChunkedHead:
    """Everything but the tensors, handed through ``Function.apply`` as one object.

    ``bounds``: token ranges ``(start, stop)`` covering ``[0, N)`` in order (the planner's chunks).
    ``gather``: :data:`weight_gather`'s value when the call was made. ``extras``: compute the extra per-token
    statistics too (:class:`fused_gspo.head.TokenStats`; the preference losses read them), from the same read.
    ``fmt``: the chunk format the plan was made for (``plan.fmt``: compute and staging dtypes, autocast included);
    None: the inputs' promoted dtype, logits staged as ``"auto"`` stages them.
    """

    head: HeadParams
    ops: TileOps
    bounds: tuple[tuple[int, int], ...]
    gather: Callable | None = None
    extras: bool = False
    fmt: ChunkFormat | None = None

    def format_for(self, hidden: torch.Tensor, weight: torch.Tensor) -> ChunkFormat:
        if self.fmt is not None:
            return self.fmt
        compute = torch.promote_types(hidden.dtype, weight.dtype)
        return chunk_format(self.ops, compute, hidden.device.type == "cuda", hidden.dtype)

    def statistics(self, tile: torch.Tensor, targets: torch.Tensor) -> TokenStats:
        if self.extras:
            return self.ops.statistics(tile, targets, self.head)
        return TokenStats(*self.ops.forward(tile, targets, self.head))


class ChunkObjective(Protocol):
    """The loss on top of the single pass, asked chunk by chunk.

    The driver scores chunk ``[start, stop)`` of the valid tokens, then calls :meth:`grad` with its statistics; once
    every chunk is scored, :meth:`finish` with all of them. Implementations keep what they compute (the loss terms,
    the per-token log-probs) as attributes for the caller.

    ``inputs``: the loss's own tensors that want a gradient besides the head's (advantages that require grad, a MoE
    ``aux_loss``); the caller hands them to :class:`SinglePassFunction` after the objective, so autograd reaches them,
    and :meth:`finish` sets ``input_grads``, ``dL/d`` each of them, in order.
    """

    inputs: tuple[torch.Tensor, ...]
    input_grads: tuple[torch.Tensor | None, ...]

    def grad(self, start: int, stop: int, stats: TokenStats) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(dL/dlogp, dL/dentropy)``, each ``[stop - start]`` or None for a term the loss does not have."""
        ...

    def finish(self, stats: TokenStats) -> torch.Tensor:
        """The loss value (a detached scalar) from every token's statistics (``[N]`` each)."""
        ...


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ weight.T + bias`` into the tile ``out``: a GEMM writing the tile's dtype directly (a 16-bit staged
    tile, as TRL's ``torch.mm(..., out=tile)``, or an fp32 one from fp32 operands), or fp32 out of 16-bit operands
    without rounding the product first. The bias is added in the tile's dtype."""
    if out.dtype == x.dtype:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.mm(x, weight.t(), out_dtype=out.dtype, out=out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out (+)= a @ b`` with an fp32/fp64 ``out``; 16-bit operands multiply on tensor cores, summed unrounded."""
    mixed = a.dtype != out.dtype
    if accumulate:
        if mixed:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            out.addmm_(a, b)
    elif mixed:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a, b, out=out)


def _matmul_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` handed back in ``dtype``, rounded once: the GEMM writes ``dtype`` itself (16-bit operands into a
    16-bit or, on CUDA, an fp32 result) or, off CUDA, computes in the operands' fp32 and is cast."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


def _poisoned(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), device=device, dtype=dtype)


def _check_bounds(bounds, n_tokens: int) -> None:
    end = 0
    for start, stop in bounds:
        if start != end or stop <= start:
            raise ValueError(f"chunk bounds must tile [0, {n_tokens}) in order, got {list(bounds)}")
        end = stop
    if end != n_tokens:
        raise ValueError(f"chunk bounds must tile [0, {n_tokens}) in order, got {list(bounds)}")


class _Workspace:
    """The tile buffer shared by the chunks (sized to the widest, in the staging dtype), and the GEMMs' operands: the
    inputs rounded to the compute dtype once (autocast's, or their promoted dtype), then held as each GEMM takes
    them."""

    def __init__(self, hidden, weight, bias, call: ChunkedHead):
        _check_bounds(call.bounds, hidden.shape[0])
        self.hidden, self.bias, self.ops = hidden, bias, call.ops
        self.fmt = fmt = call.format_for(hidden, weight)
        self.stats_dtype = fmt.stats_dtype
        self.vocab = weight.shape[0]
        widest = max((stop - start for start, stop in call.bounds), default=0)
        self.buffer = torch.empty(widest * self.vocab, device=hidden.device, dtype=fmt.tile)
        rounded = weight.to(fmt.compute)  # a copy only under autocast or for mixed dtypes
        self.projection_weight = rounded.to(fmt.projection)
        self.weight_operand = rounded.to(fmt.operand_dtype)  # off CUDA: an fp32 copy for the gradient GEMMs

    def project(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's ``[n, V]`` projection tile, and its hidden rows in the gradient GEMMs' operand dtype."""
        n = stop - start
        tile = self.buffer[: n * self.vocab].view(n, self.vocab)
        rounded = self.hidden[start:stop].to(self.fmt.compute)
        _project(rounded.to(self.fmt.projection), self.projection_weight, self.bias, tile)
        return tile, rounded.to(self.fmt.operand_dtype)


class _GradAccumulators:
    """``dX`` (each chunk writes its own rows), ``dW`` and ``db`` (summed over chunks) in fp32 (fp64 for fp64)."""

    def __init__(self, hidden, weight, bias, needs, workspace: _Workspace):
        # the head's parameters themselves (a backward may have to gather them: _BackwardGather); of the hidden
        # states only the dtype, so that a single pass does not keep them alive until its backward
        self.weight, self.bias = weight, bias
        self.out_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.operand_dtype = workspace.fmt.operand_dtype
        self.weight_operand = workspace.weight_operand
        acc = torch.promote_types(torch.float32, self.operand_dtype)
        self.scale_cast = getattr(workspace.ops, "scale_cast", None)
        # a vocabulary-parallel call's partial dX, summed over the ranks in fp32 before the cast (fused_gspo.parallel)
        self.reduce_hidden_grad = getattr(workspace.ops, "reduce_hidden_grad", None)
        # dW and db are written by the first chunk and summed into by the others (no zero fill: 4VH bytes saved)
        self.dx = torch.empty(hidden.shape, device=hidden.device, dtype=acc) if needs[0] else None
        self.dw = torch.empty(weight.shape, device=weight.device, dtype=acc) if needs[1] else None
        self.weight_shape = weight.shape if needs[1] else None
        self.db = torch.empty(bias.shape, device=bias.device, dtype=acc) if (bias is not None and needs[2]) else None
        self.summed = False

    def add(self, start: int, stop: int, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        """Add chunk ``[start, stop)``'s share, from ``grad_y = dL/dy`` and the chunk's hidden rows ``x`` (both in
        the operand dtype, or converted here: the torch backend's fp32 gradient on CUDA, a 16-bit one off CUDA)."""
        g = grad_y.to(self.operand_dtype)
        if self.dx is not None:
            _matmul_into(self.dx[start:stop], g, self.weight_operand, accumulate=False)
        if self.dw is not None:
            _matmul_into(self.dw, g.t(), x, accumulate=self.summed)
        if self.db is not None:
            if self.summed:
                self.db += g.sum(0, dtype=self.db.dtype)
            else:
                torch.sum(g, 0, dtype=self.db.dtype, out=self.db)
        self.summed = True

    def results(self, scale: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """``[dX, dW, db]`` in the inputs' dtypes, times ``scale`` (the incoming gradient): one pass over each
        accumulator, in place when no cast is needed (no second fp32 ``dW``)."""
        if not self.summed:  # no chunk ran (no valid token)
            for acc in (self.dw, self.db):
                if acc is not None:
                    acc.zero_()
        if self.dx is not None and self.reduce_hidden_grad is not None:
            self.reduce_hidden_grad(self.dx)
        out = []
        for acc, dtype in zip((self.dx, self.dw, self.db), self.out_dtypes, strict=True):
            if acc is None:
                out.append(None)
            elif dtype == acc.dtype:
                out.append(acc if scale is None else acc.mul_(scale))
            elif scale is None:
                out.append(acc.to(dtype))
            elif self.scale_cast is not None:
                out.append(self.scale_cast(acc, scale, dtype))
            else:
                out.append(torch.mul(acc, scale, out=torch.empty_like(acc, dtype=dtype)))
        return out


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (None for an inference tensor, which has none and cannot be modified outside
    inference mode)."""
    return None if t.is_inference() else t._version


class _OneChunk:
    """The one-chunk schedule between its forward and backward: a single pass whose one chunk holds every token keeps
    its staged tile, and the backward forms ``G = dL/dy`` from it with the incoming gradient read on the device,
    then writes ``dX = G @ W`` and ``dW = G.T @ X`` once, straight in the inputs' dtypes. No fp32 accumulator, no
    read-modify-write of ``dW``, no scale-and-cast pass: still ``6NHV``, nothing recomputed.

    It holds the tile, the chunk's hidden rows (``dW``'s operand, as any linear layer keeps its input) and the head's
    parameters themselves, not a copy of ``W``: the GEMMs' operand is taken from the weight again in the backward,
    where ZeRO-3 has gathered it (:class:`_BackwardGather`)."""

    def __init__(self, workspace: _Workspace, tile, x, targets, chunk: TokenStats, grads, call, weight, needs):
        self.fmt, self.ops, self.call = workspace.fmt, workspace.ops, call
        self.tile, self.x, self.targets, self.chunk = tile, x, targets, chunk
        self.grad_logp, self.grad_entropy = grads
        self.weight, self.bias, self.needs = weight, workspace.bias, needs
        self.hidden_dtype = workspace.hidden.dtype
        self.weight_shape = weight.shape if needs[1] else None
        # the backward reads W and the hidden rows (a view of the caller's tensor when no cast was needed) again, as
        # autograd's saved tensors would: an in-place change since the forward must fail as it does there, not give
        # a gradient of other values
        self.versions = (_version(weight), _version(x))

    def results(self, scale: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """``[dX, dW, db]`` in the inputs' dtypes for an incoming gradient ``scale`` (a device scalar)."""
        if self.tile is None:
            raise RuntimeError("backward ran twice through a fused single pass: retain_graph=True is not supported")
        fmt, weight, bias = self.fmt, self.weight, self.bias
        if (_version(weight), _version(self.x)) != self.versions:
            raise RuntimeError(
                "the LM head's weight or the hidden states were modified by an inplace operation between the fused "
                "loss's forward and its backward, which reads them again (as autograd's saved tensors would)"
            )
        scale = None if scale is None else scale.to(device=self.tile.device, dtype=fmt.stats_dtype)
        grads = [g if (g is None or scale is None) else g * scale for g in (self.grad_logp, self.grad_entropy)]
        out: list[torch.Tensor | None] = [None, None, None]
        wanted = [self.needs[0], self.needs[1], bias is not None and self.needs[2]]
        if grads[0] is None and grads[1] is None:  # the loss has no head term: zeros
            shapes = (self.x.shape, weight.shape, None if bias is None else bias.shape)
            dtypes = (self.hidden_dtype, weight.dtype, None if bias is None else bias.dtype)
            for i in range(3):
                if wanted[i]:
                    out[i] = torch.zeros(shapes[i], device=self.tile.device, dtype=dtypes[i])
        else:
            g = self.ops.backward_(
                self.tile, self.targets, self.chunk.lse, self.chunk.entropy, *grads, self.call.head, fmt.grad_dtype
            ).to(fmt.operand_dtype)
            if wanted[0]:
                w = weight.to(fmt.compute).to(fmt.operand_dtype)
                reduce = getattr(self.ops, "reduce_hidden_grad", None)
                if reduce is not None:  # a vocabulary shard's partial dX: summed over the ranks in fp32 first
                    dx = _matmul_as(g, w, torch.promote_types(torch.float32, g.dtype))
                    reduce(dx)
                    out[0] = dx.to(self.hidden_dtype)
                else:
                    out[0] = _matmul_as(g, w, self.hidden_dtype)
                del w
            if wanted[1]:
                out[1] = _matmul_as(g.t(), self.x, weight.dtype)
            if wanted[2]:
                out[2] = g.sum(0, dtype=torch.promote_types(torch.float32, g.dtype)).to(bias.dtype)
        self.tile = self.x = None  # the tile goes as soon as the gradients exist
        return out


def _autocast_off(device: torch.device):
    """The driver's GEMMs run in the dtypes its chunk format names; the caller's autocast already decided those."""
    return (
        torch.autocast(device.type, enabled=False)
        if device.type in ("cpu", "cuda", "xpu")
        else contextlib.nullcontext()
    )


def score(hidden, weight, bias, targets, call: ChunkedHead) -> TokenStats:
    """Every token's :class:`TokenStats` (``[N]`` each), chunk by chunk (no gradient is formed)."""
    workspace = _Workspace(hidden, weight, bias, call)
    stats = TokenStats.poisoned(hidden.shape[0], hidden.device, workspace.stats_dtype, call.extras)
    for start, stop in call.bounds:
        tile, _ = workspace.project(start, stop)
        stats.assign(start, stop, call.statistics(tile, targets[start:stop]))
    return stats


def recompute_grads(hidden, weight, bias, targets, call: ChunkedHead, lse, entropy, grad_logp, grad_entropy, needs):
    """The second of the two phases: each chunk projected again and turned into ``dL/dy`` from the tokens' upstream
    gradients (``[N]``, either may be None); returns the fp32 accumulators. ``weight`` must be materialized (the
    caller holds ``call.gather``: :class:`LogProbFunction`)."""
    workspace = _Workspace(hidden, weight, bias, call)
    acc = _GradAccumulators(hidden, weight, bias, needs, workspace)
    if acc.dx is not None and not call.bounds:
        acc.dx.zero_()
    stats_dtype = workspace.stats_dtype
    for start, stop in call.bounds:
        tile, x = workspace.project(start, stop)
        grad_y = call.ops.backward_(
            tile,
            targets[start:stop],
            lse[start:stop],
            entropy[start:stop],
            None if grad_logp is None else grad_logp[start:stop].to(stats_dtype),
            None if grad_entropy is None else grad_entropy[start:stop].to(stats_dtype),
            call.head,
            workspace.fmt.grad_dtype,
        )
        acc.add(start, stop, grad_y, x)
    return acc


def single_pass(hidden, weight, bias, targets, call: ChunkedHead, objective: ChunkObjective, needs):
    """``(loss, stats, gradients)`` with the gradient formed chunk by chunk (``6NHV``); ``stats`` every token's
    :class:`TokenStats`, ``gradients`` an object whose ``results(scale)`` hands ``[dX, dW, db]`` back. One chunk over
    the whole batch is :class:`_OneChunk` (its gradient formed in the backward); several accumulate in fp32 as they
    go. ``call.bounds`` must only cut where the objective's gradient does not reach across (the planner's job)."""
    workspace = _Workspace(hidden, weight, bias, call)
    stats = TokenStats.poisoned(hidden.shape[0], hidden.device, workspace.stats_dtype, call.extras)
    if len(call.bounds) == 1 and (needs[0] or needs[1]):
        start, stop = call.bounds[0]
        tile, x = workspace.project(start, stop)
        chunk = call.statistics(tile, targets[start:stop])
        stats.assign(start, stop, chunk)
        grads = objective.grad(start, stop, chunk)
        state = _OneChunk(workspace, tile, x, targets[start:stop], chunk, grads, call, weight, needs)
        return objective.finish(stats), stats, state
    acc = _GradAccumulators(hidden, weight, bias, needs, workspace)
    if acc.dx is not None and not call.bounds:
        acc.dx.zero_()
    for start, stop in call.bounds:
        tile, x = workspace.project(start, stop)
        chunk = call.statistics(tile, targets[start:stop])
        stats.assign(start, stop, chunk)
        grad_logp, grad_entropy = objective.grad(start, stop, chunk)
        if grad_logp is None and grad_entropy is None:
            if acc.dx is not None:
                acc.dx[start:stop].zero_()
            continue
        grad_y = call.ops.backward_(
            tile, targets[start:stop], chunk.lse, chunk.entropy, grad_logp, grad_entropy, call.head,
            workspace.fmt.grad_dtype,
        )  # fmt: skip
        acc.add(start, stop, grad_y, x)
    del workspace  # the tile buffer goes before the objective's last evaluation and the backward
    # dX is complete: the GEMM operand's copy of W (mixed dtypes, off CUDA) must not live on until the backward (under
    # ZeRO-3 it would be the whole gathered head)
    acc.weight_operand = None
    return objective.finish(stats), stats, acc


def _refuse_double_backward() -> None:
    """A backward asked for a graph of its own (``create_graph=True``: grad mode is on inside it) is refused: the
    chunked gradients are formed outside autograd, so a second derivative taken through them would be silently
    partial (one chunk: through ``dX = G @ W``'s ``W`` only) or fail somewhere unrelated."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "double backward (create_graph=True) through the fused LM head is not supported: its gradients are "
            "formed outside autograd. Use backend='eager' for higher-order gradients"
        )


class LogProbFunction(torch.autograd.Function):
    """``(logp, entropy, log_sum_sq_probs, mean_logit, is_top1) = f(hidden [N, H], weight [V, H], bias [V] | None,
    targets [N], call)``, ``[N]`` each in the stats dtype (the last three None without ``call.extras``; never
    differentiable): :func:`score` forward, :func:`recompute_grads` backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, call: ChunkedHead):
        ctx.set_materialize_grads(False)
        ctx.call, ctx.weight_shape = call, weight.shape
        with _autocast_off(hidden.device):
            stats = score(hidden, weight, bias, targets, call)
        ctx.save_for_backward(hidden, weight, bias, targets, stats.lse, stats.entropy)
        extras = (stats.log_sum_sq_probs, stats.mean_logit, stats.is_top1)
        if call.extras:
            ctx.mark_non_differentiable(*extras)
        return stats.logp, stats.entropy, *extras

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        _refuse_double_backward()
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        needs = ctx.needs_input_grad[:3]
        gathered = _BackwardGather(ctx.call.gather, weight, bias)  # the projection is recomputed: W's values needed
        try:
            gathered.check_materialized(weight, ctx.weight_shape)
            with _autocast_off(hidden.device):
                acc = recompute_grads(
                    hidden, weight, bias, targets, ctx.call, lse, entropy, grad_logp, grad_entropy, needs
                )
                dx, dw, db = acc.results()
        except BaseException:
            gathered.release()
            raise
        gathered.release_after_accumulation([p for p, g in ((weight, dw), (bias, db)) if g is not None])
        return dx, dw, db, None, None


class SinglePassFunction(torch.autograd.Function):
    """``(loss, logp [N], entropy [N]) = f(hidden, weight, bias, targets, call, objective, *objective.inputs)``:
    :func:`single_pass` forward; backward hands back the gradients for the incoming ``dL`` (formed then, for one
    chunk), and the objective's ``input_grads`` times ``dL``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, call: ChunkedHead, objective: ChunkObjective, *inputs):
        ctx.set_materialize_grads(False)
        ctx.call, ctx.device = call, hidden.device
        with _autocast_off(hidden.device):
            loss, stats, ctx.acc = single_pass(hidden, weight, bias, targets, call, objective, ctx.needs_input_grad[:3])
        ctx.input_grads = tuple(objective.input_grads) if inputs else ()
        ctx.num_inputs = len(inputs)
        ctx.mark_non_differentiable(stats.logp, stats.entropy)
        return loss, stats.logp, stats.entropy

    @staticmethod
    def backward(ctx, grad_loss, *_):
        _refuse_double_backward()
        if grad_loss is None:
            return (None,) * (6 + ctx.num_inputs)
        if ctx.acc is None:
            raise RuntimeError("backward ran twice through a fused single pass: retain_graph=True is not supported")
        acc, ctx.acc = ctx.acc, None
        # the one chunk needs W's values (dX = G W); several chunks only need its full shape, when autograd
        # accumulates dW into it
        gathered = _BackwardGather(ctx.call.gather, acc.weight, acc.bias)
        try:
            if acc.weight_shape is not None:
                gathered.check_materialized(acc.weight, acc.weight_shape)
            with _autocast_off(ctx.device):
                dx, dw, db = acc.results(scale=grad_loss)
        except BaseException:
            gathered.release()
            raise
        gathered.release_after_accumulation([p for p, g in ((acc.weight, dw), (acc.bias, db)) if g is not None])
        inputs = tuple(None if g is None else g * grad_loss for g in ctx.input_grads)
        ctx.input_grads = None
        return dx, dw, db, None, None, None, *inputs


def logprobs(hidden, weight, bias, targets, call: ChunkedHead) -> TokenStats:
    """Every token's :class:`TokenStats` (``logp`` and ``entropy`` differentiable) through :class:`LogProbFunction`:
    the two phases' first, and the ``old`` / ``ref`` log-prob pass."""
    logp, entropy, *extras = LogProbFunction.apply(hidden, weight, bias, targets, call)
    return TokenStats(logp, entropy, None, *extras)


__all__ = [
    "ChunkObjective",
    "ChunkedHead",
    "LogProbFunction",
    "SinglePassFunction",
    "logprobs",
    "operand_dtype",
    "recompute_grads",
    "score",
    "single_pass",
    "weight_gather",
]
