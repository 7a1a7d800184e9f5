"""The chunked LM head: log-probs and gradients over token chunks, never holding more than one chunk's logits.

Shared by the ``"torch"`` and ``"triton"`` backends; they differ only in their *tile ops* (what turns one chunk's
projection into statistics, and statistics into the logits gradient). A chunk is ``n`` valid tokens against the whole
vocabulary: the projection ``y = X_c @ W.T`` lands in a workspace of ``n * V`` floats, the tile ops reduce it, then
(when the gradient is wanted) overwrite it with ``dL/dy``, which feeds ``dX_c = G @ W`` and ``dW += G.T @ X_c`` with
fp32 accumulation. ``n`` is chosen so the workspace (and the tile ops' temporaries) fit ``workspace_bytes``.

Two strategies (DESIGN.md section 3):

- :class:`LogProbFunction`: a forward that only computes log-probs and entropies, and a backward that recomputes each
  chunk's projection to form the gradient (``8NHV`` with the backward). Used alone by ``fused_logprobs`` and, with the
  objective on top, by every loss whose ``dL/dlogp`` needs the whole batch first.
- :class:`SinglePassPolicyFunction`: the gradient formed in the forward while each chunk's logits are at hand
  (``6NHV``), when the objective's gradient is known chunk by chunk.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

from .head import HeadParams

# A context manager factory ``gather(weight, bias)`` that the recomputing backward re-enters to get the head's full
# weight back, for training setups that release it after the forward (the TRL adapter sets TRL's ZeRO-3 gather).
# None: the weight stays materialized, nothing to do.
weight_gather: contextvars.ContextVar = contextvars.ContextVar("fused_gspo_weight_gather", default=None)

ChunkGrad = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]


def stats_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tokens_per_chunk(
    vocab: int,
    stats_dtype: torch.dtype,
    workspace_bytes: int,
    temporaries: int,
    operand_dtype: torch.dtype | None = None,
) -> int:
    """How many tokens fit in ``workspace_bytes``: their full-vocabulary logits in the stats dtype, the tile ops'
    temporaries, and the logits gradient cast to the GEMM operand dtype when that differs (bf16/fp16 on CUDA)."""
    per_token = vocab * torch.finfo(stats_dtype).bits // 8 * (1 + temporaries)
    if operand_dtype is not None and operand_dtype != stats_dtype:
        per_token += vocab * torch.finfo(operand_dtype).bits // 8
    return max(1, workspace_bytes // per_token)


def chunk_tokens(hidden: torch.Tensor, weight: torch.Tensor, workspace_bytes: int, temporaries: int) -> int:
    """:func:`tokens_per_chunk` for these inputs: the one place the chunked driver and the planner size chunks."""
    compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    stats_dtype = stats_dtype_for(compute_dtype)
    operand_dtype = _projection_dtype(compute_dtype, stats_dtype, hidden.device)
    return tokens_per_chunk(weight.shape[0], stats_dtype, workspace_bytes, temporaries, operand_dtype)


def _projection_dtype(compute_dtype: torch.dtype, stats_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CUDA GEMMs take bf16/fp16 operands and write fp32 (`out_dtype`); elsewhere the operands are upcast
    return compute_dtype if device.type == "cuda" else stats_dtype


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out = x @ weight.T + bias`` with ``out`` in the stats dtype, without rounding the product to bf16/fp16."""
    if out.dtype == x.dtype:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.mm(x, weight.t(), out_dtype=out.dtype, out=out)
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` (each chunk's product is summed unrounded)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _poisoned(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((n,), float("nan"), device=device, dtype=dtype)


class _Chunks:
    """Iterates ``[start, stop)`` token ranges and owns the workspace they share."""

    def __init__(self, hidden, weight, bias, ops, head: HeadParams, workspace_bytes: int, bounds=None):
        self.hidden, self.weight, self.bias, self.ops, self.head = hidden, weight, bias, ops, head
        self.compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        self.stats_dtype = stats_dtype_for(self.compute_dtype)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        if bounds is None:
            step = chunk_tokens(hidden, weight, workspace_bytes, ops.temporaries)
            bounds = [(s, min(s + step, n_tokens)) for s in range(0, n_tokens, step)]
        self.bounds = bounds
        widest = max((stop - start for start, stop in bounds), default=0)
        self.buffer = torch.empty(widest * vocab, device=hidden.device, dtype=self.stats_dtype)
        self.operand_dtype = _projection_dtype(self.compute_dtype, self.stats_dtype, hidden.device)
        self.weight_operand = weight.to(self.operand_dtype)  # a copy only for mixed dtypes or off CUDA

    def project(self, start: int, stop: int) -> torch.Tensor:
        vocab = self.weight.shape[0]
        tile = self.buffer[: (stop - start) * vocab].view(stop - start, vocab)
        return _project(self.hidden[start:stop].to(self.operand_dtype), self.weight_operand, self.bias, tile)


class _GradAccumulators:
    def __init__(self, hidden, weight, bias, needs, operand_dtype):
        self.hidden, self.weight = hidden, weight
        self.operand_dtype = operand_dtype
        self.weight_operand = weight.to(operand_dtype)
        acc = torch.promote_types(torch.float32, operand_dtype)
        self.dx = torch.zeros(hidden.shape, device=hidden.device, dtype=acc) if needs[0] else None
        self.dw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if needs[1] else None
        self.db = torch.zeros(bias.shape, device=bias.device, dtype=acc) if (bias is not None and needs[2]) else None

    def add(self, start: int, stop: int, grad_y: torch.Tensor) -> None:
        # The gradient GEMMs run in the inputs' dtype on CUDA (tensor cores), accumulating in fp32
        g = grad_y.to(self.operand_dtype)
        if self.dx is not None:
            _accumulate(self.dx[start:stop], g, self.weight_operand)
        if self.dw is not None:
            _accumulate(self.dw, g.t(), self.hidden[start:stop].to(self.operand_dtype))
        if self.db is not None:
            self.db += grad_y.sum(0, dtype=self.db.dtype)

    def results(self, bias, scale: torch.Tensor | None = None):
        out = []
        for acc, ref in ((self.dx, self.hidden), (self.dw, self.weight), (self.db, bias)):
            if acc is None:
                out.append(None)
                continue
            if scale is not None:
                acc = acc * scale
            out.append(acc.to(ref.dtype))
        return out


class LogProbFunction(torch.autograd.Function):
    """``(logp, entropy) = f(hidden [N, H], weight [V, H], bias [V] | None, targets [N])``, both ``[N]`` stats dtype.

    Forward: one projection per chunk, reduced to statistics. Backward: the projection again, turned into ``dL/dy``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: HeadParams, ops, workspace_bytes: int):
        ctx.set_materialize_grads(False)
        ctx.head, ctx.ops, ctx.workspace_bytes = head, ops, workspace_bytes
        ctx.gather = weight_gather.get()
        chunks = _Chunks(hidden, weight, bias, ops, head, workspace_bytes)
        # NaN-filled, so a token no chunk scored can never pass for a result
        logp = _poisoned(hidden.shape[0], hidden.device, chunks.stats_dtype)
        entropy, lse = torch.full_like(logp, float("nan")), torch.full_like(logp, float("nan"))
        for start, stop in chunks.bounds:
            tile = chunks.project(start, stop)
            logp[start:stop], entropy[start:stop], lse[start:stop] = ops.forward(tile, targets[start:stop], head)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        needs = ctx.needs_input_grad[:3]
        with ctx.gather(weight, bias) if ctx.gather is not None else contextlib.nullcontext():
            chunks = _Chunks(hidden, weight, bias, ctx.ops, ctx.head, ctx.workspace_bytes)
            acc = _GradAccumulators(hidden, weight, bias, needs, chunks.operand_dtype)
            for start, stop in chunks.bounds:
                tile = chunks.project(start, stop)
                grad_y = ctx.ops.backward_(
                    tile,
                    targets[start:stop],
                    lse[start:stop],
                    entropy[start:stop],
                    None if grad_logp is None else grad_logp[start:stop].to(tile.dtype),
                    None if grad_entropy is None else grad_entropy[start:stop].to(tile.dtype),
                    ctx.head,
                )
                acc.add(start, stop, grad_y)
            dx, dw, db = acc.results(bias)
        return dx, dw, db, None, None, None, None


def logprobs(hidden, weight, bias, targets, head: HeadParams, ops, workspace_bytes: int):
    """``(logp, entropy)`` of ``targets``, each ``[N]``: differentiable through :class:`LogProbFunction`, or, when no
    gradient can flow and the tile ops have one, from a matmul-with-epilogue kernel whose logits never leave the chip
    (the ``old`` / ``ref`` log-prob pass)."""
    fused = getattr(ops, "fused_logprobs", None)
    grad_possible = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if fused is not None and not grad_possible and torch.promote_types(hidden.dtype, weight.dtype) != torch.float64:
        logp, entropy, _ = fused(hidden, weight, bias, targets, head)
        return logp, entropy
    return LogProbFunction.apply(hidden, weight, bias, targets, head, ops, workspace_bytes)


class SinglePassPolicyFunction(torch.autograd.Function):
    """The loss with its gradient formed in the forward, chunk by chunk (``6NHV``).

    ``chunk_grad(start, stop, logp, entropy)`` returns ``dL/dlogp`` and ``dL/dentropy`` for the chunk's tokens (None
    for a term the loss does not have); ``finish(logp, entropy)`` returns the loss value once every token is scored.
    ``bounds`` are the chunks, cut where the objective allows. Returns ``(loss, logp [N], entropy [N])``; the saved
    gradients are scaled by the incoming ``dL`` in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head, ops, workspace_bytes, bounds, chunk_grad, finish):
        ctx.set_materialize_grads(False)
        chunks = _Chunks(hidden, weight, bias, ops, head, workspace_bytes, bounds=bounds)
        acc = _GradAccumulators(hidden, weight, bias, ctx.needs_input_grad[:3], chunks.operand_dtype)
        logp = _poisoned(hidden.shape[0], hidden.device, chunks.stats_dtype)
        entropy = torch.full_like(logp, float("nan"))
        for start, stop in chunks.bounds:
            tile = chunks.project(start, stop)
            lp, ent, lse = ops.forward(tile, targets[start:stop], head)
            logp[start:stop], entropy[start:stop] = lp, ent
            grad_logp, grad_entropy = chunk_grad(start, stop, lp, ent)
            if grad_logp is None and grad_entropy is None:
                continue
            grad_y = ops.backward_(tile, targets[start:stop], lse, ent, grad_logp, grad_entropy, head)
            acc.add(start, stop, grad_y)
        ctx.acc, ctx.bias = acc, bias
        ctx.mark_non_differentiable(logp, entropy)
        return finish(logp, entropy), logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 10
        dx, dw, db = ctx.acc.results(ctx.bias, scale=grad_loss)
        ctx.acc = None
        return dx, dw, db, None, None, None, None, None, None, None
