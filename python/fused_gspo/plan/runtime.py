"""The planner at call time: from tensors, tile ops and a budget to a :class:`ChunkPlan`.

The chunked driver and ``explain`` share :func:`chunk_format`, so the bytes the model counts are the bytes the driver
allocates.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from ..parallel.context import active_shard
from ..precision import compute_dtype as resolve_compute_dtype
from ..precision import staging_dtype, stats_dtype_for
from .cost import ChunkFormat, Problem
from .devices import DeviceProfile, profile_for_device
from .planner import AUTO_FREE_FRACTION, MIB, ChunkPlan, auto_workspace_bytes, choose

T = TypeVar("T")


def operand_dtype(compute_dtype: torch.dtype, on_cuda: bool) -> torch.dtype:
    """The gradient GEMMs' operand dtype: the compute dtype on CUDA (tensor cores, fp32 output), the stats dtype
    elsewhere (CPU BLAS has no fp32-output bf16 GEMM; upcasting the rounded values is exact)."""
    return compute_dtype if on_cuda else stats_dtype_for(compute_dtype)


def chunk_format(
    ops, compute_dtype: torch.dtype, on_cuda: bool, hidden_dtype: torch.dtype, logits_dtype: str = "auto"
) -> ChunkFormat:
    """How ``ops`` hold a chunk of inputs computed in ``compute_dtype`` (:func:`fused_gspo.precision.compute_dtype`),
    on CUDA or elsewhere, with the logits staged as ``logits_dtype`` says (:func:`fused_gspo.precision.staging_dtype`).

    The no-grad pass scores through the same staged tile as the training pass: the backend's matmul-with-epilogue
    kernel (``TritonTileOps.fused_logprobs``, whose fp32 logits never leave the chip) is not a schedule, since its
    log-probs could not be the same bits as the training pass's (an on-policy ratio must be exactly 1), and it reached
    0.55 of cuBLAS's rate on an H100 (``bench/results/gpu-h100-profile.json``).
    """
    stats = stats_dtype_for(compute_dtype)
    tile = staging_dtype(compute_dtype, logits_dtype)
    operands = operand_dtype(compute_dtype, on_cuda)
    half_tile = tile != stats
    return ChunkFormat(
        stats_dtype=stats,
        temporaries=ops.half_tile_temporaries if half_tile else ops.temporaries,
        grad_dtype=ops.grad_dtype(compute_dtype, tile),
        operand_dtype=operands,
        convert_hidden=hidden_dtype != operands,
        tile_dtype=tile,
        # a 16-bit tile is the projection GEMM's own output (TRL's torch.mm(..., out=tile)), on any device
        projection_dtype=tile if half_tile else operands,
        compute_dtype=compute_dtype,
    )


@functools.cache
def _profile(device_type: str, index: int | None) -> DeviceProfile:
    return profile_for_device(torch.device(device_type, index) if index is not None else torch.device(device_type))


def device_profile(device: torch.device) -> DeviceProfile:
    """The (cached) profile of ``device``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _profile(device.type, device.index)


def free_device_bytes(device: torch.device) -> float | None:
    """Memory a new allocation can get on ``device``: the driver's free memory plus what PyTorch's caching allocator
    holds unused. A cap set by ``torch.cuda.set_per_process_memory_fraction`` bounds it too (the allocator refuses
    to reserve past ``fraction * total``, whatever the driver has free). None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    cached = max(reserved - torch.cuda.memory_allocated(device), 0)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if fraction is not None:
        capped = fraction(device)
        if capped < 1.0:
            free = min(free, max(int(capped * total) - reserved, 0))
    return float(free + cached)


def plan_call(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ops,
    *,
    workspace_bytes: int | str,
    coupling: str,
    row_counts: Sequence[int] | None,
    mode: str,
    softcap: bool = False,
    needs: tuple[bool, bool, bool] | None = None,
    compute_dtype: torch.dtype | None = None,
    logits_dtype: str = "auto",
) -> ChunkPlan:
    """Plan one call of the chunked head on these tensors (``hidden [N, H]``, ``weight [V, H]``).

    ``needs``: which of hidden, weight, bias want a gradient (default: their ``requires_grad``).
    ``compute_dtype``: the GEMMs' (default: :func:`fused_gspo.precision.compute_dtype`, autocast included);
    ``logits_dtype``: the staging option. The plan carries the chunk format the driver must use (``plan.fmt``).
    """
    if compute_dtype is None:
        compute_dtype = resolve_compute_dtype(hidden, weight)
    if needs is None:
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    # a vocabulary-parallel call (fused_gspo.parallel): every rank plans the same chunks, on the largest shard and
    # the least free memory, since each chunk exchanges statistics with the other ranks
    shard = getattr(ops, "shard", None)
    problem = Problem(
        tokens=hidden.shape[0],
        hidden=hidden.shape[1],
        vocab=weight.shape[0] if shard is None else shard.rows_max,
        dtype=compute_dtype,
        hidden_grad=bool(needs[0]),
        weight_grad=bool(needs[1]),
        bias=bias is not None,
        softcap=softcap,
        output_dtype=weight.dtype,
        tensor_parallel=1 if shard is None else shard.size,
        sequence_parallel=shard is not None and not shard.reduce_hidden_grad,
    )
    fmt = chunk_format(ops, compute_dtype, hidden.device.type == "cuda", hidden.dtype, logits_dtype)
    free = free_device_bytes(hidden.device) if workspace_bytes == "auto" else None
    if shard is not None and free is not None:
        free = shard.free_bytes
    if free is not None:  # the auto budget moves with free memory; planning again for every MiB is not worth it
        free = float(int(free) >> _FREE_ROUNDING_BITS << _FREE_ROUNDING_BITS)
    return _plan(
        problem,
        fmt,
        device_profile(hidden.device),
        workspace_bytes,
        coupling,
        None if row_counts is None else tuple(row_counts),
        mode,
        weight.dtype != fmt.operand_dtype,
        free,
    )


# free memory is rounded down to 256 MiB for the plan cache
_FREE_ROUNDING_BITS = 28


@functools.lru_cache(maxsize=512)
def _plan(problem, fmt, profile, workspace_bytes, coupling, row_counts, mode, weight_copy, free) -> ChunkPlan:
    """The plan of one call (cached: a training loop asks again and again for the same shapes)."""
    if workspace_bytes == "auto":
        workspace_bytes = auto_workspace_bytes(
            problem, fmt, coupling=coupling, row_counts=row_counts, profile=profile, mode=mode, free_bytes=free
        )
    return choose(
        problem,
        fmt,
        coupling=coupling,
        row_counts=row_counts,
        workspace_bytes=int(workspace_bytes),
        profile=profile,
        mode=mode,
        weight_copy=weight_copy,
    )


# --------------------------------------------------------------------------------------------------------------------
# Out of memory: one re-plan

_warned_oom = False


def run_planned(run: Callable[[ChunkPlan], T], plan: ChunkPlan, replan: Callable[[int], ChunkPlan], device) -> T:
    """``run(plan)``; if the chosen chunks do not fit after all (a fragmented allocator, or a budget larger than
    what is free) and the device runs out of memory, plan once more within the memory free then
    (:data:`~fused_gspo.plan.planner.AUTO_FREE_FRACTION` of it, as ``"auto"`` would), warn once per process, and
    run that plan. The step is not lost; a second failure, or no smaller plan, raises the original error.
    Not in a vocabulary-parallel call: the error is raised there (see below)."""
    try:
        return run(plan)
    except torch.OutOfMemoryError as exc:
        exc.__traceback__ = None  # the failed attempt's frames (and their tensors) go with it
        error = exc
    if active_shard() is not None:
        # every chunk exchanges statistics with the other ranks: this rank alone starting over on other chunks (from
        # its own free memory) would pair its collectives with the others' wrong ones
        raise error
    free = free_device_bytes(torch.device(device))
    budget = None if free is None else int(AUTO_FREE_FRACTION * free)
    if budget is None or budget >= plan.workspace_bytes:
        raise error
    try:
        smaller = replan(budget)
    except ValueError:  # not even one token's row fits
        raise error from None
    global _warned_oom
    if not _warned_oom:
        _warned_oom = True
        warnings.warn(
            f"fused_gspo: the planned workspace ({plan.workspace_bytes / MIB:.0f} MiB, {plan.num_chunks} chunk(s)) "
            f"ran out of device memory; planned again within {budget / MIB:.0f} MiB of the "
            f"{free / MIB:.0f} MiB free ({smaller.num_chunks} chunk(s)). Set workspace_bytes to avoid the retry. "
            "(Warned once per process.)",
            RuntimeWarning,
            stacklevel=3,
        )
    return run(smaller)
