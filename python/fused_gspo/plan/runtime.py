"""The planner at call time: from tensors, tile ops and a budget to a :class:`ChunkPlan`.

The chunked driver and ``explain`` share :func:`chunk_format`, so the bytes the model counts are the bytes the driver
allocates.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .cost import ChunkFormat, Problem
from .devices import DeviceProfile, profile_for_device
from .planner import ChunkPlan, auto_workspace_bytes, choose


def operand_dtype(compute_dtype: torch.dtype, on_cuda: bool) -> torch.dtype:
    """The GEMMs' operand dtype: the inputs' own on CUDA (tensor cores, fp32 output), the stats dtype elsewhere
    (CPU BLAS has no fp32-output bf16 GEMM; upcasting is exact)."""
    stats = torch.float64 if compute_dtype == torch.float64 else torch.float32
    return compute_dtype if on_cuda else stats


def chunk_format(ops, compute_dtype: torch.dtype, on_cuda: bool, hidden_dtype: torch.dtype) -> ChunkFormat:
    """How ``ops`` hold a chunk of inputs promoted to ``compute_dtype``, on CUDA or elsewhere."""
    stats = torch.float64 if compute_dtype == torch.float64 else torch.float32
    operands = operand_dtype(compute_dtype, on_cuda)
    return ChunkFormat(
        stats_dtype=stats,
        temporaries=ops.temporaries,
        grad_dtype=ops.grad_dtype(compute_dtype),
        operand_dtype=operands,
        convert_hidden=hidden_dtype != operands,
        fused_logprobs=callable(getattr(ops, "fused_logprobs", None)) and compute_dtype != torch.float64,
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
    holds unused. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return float(free + max(cached, 0))


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
) -> ChunkPlan:
    """Plan one call of the chunked head on these tensors (``hidden [N, H]``, ``weight [V, H]``).

    ``needs``: which of hidden, weight, bias want a gradient (default: their ``requires_grad``).
    """
    compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
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
        tensor_parallel=1 if shard is None else shard.size,
        sequence_parallel=shard is not None and not shard.reduce_hidden_grad,
    )
    fmt = chunk_format(ops, compute_dtype, hidden.device.type == "cuda", hidden.dtype)
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
