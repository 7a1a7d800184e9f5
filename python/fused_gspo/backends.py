"""Backend names and their tile ops."""

from __future__ import annotations

import torch

from .head import TorchTileOps
from .parallel.context import active_shard
from .parallel.tile_ops import VocabParallelTileOps

BACKENDS = ("auto", "eager", "torch", "triton")


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


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` is triton on CUDA/XPU when it is available, torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type in ("cuda", "xpu") and triton_tile_ops(required=False) is not None else "torch"
    if backend == "triton":
        triton_tile_ops(required=True)
    return backend


def tile_ops_for(backend: str):
    """The :class:`fused_gspo.tile_ops.TileOps` of a resolved chunked backend (``"torch"`` or ``"triton"``); in a
    vocabulary-parallel call, run on this rank's shard (:mod:`fused_gspo.parallel`)."""
    if backend == "torch":
        ops = TorchTileOps
    elif backend == "triton":
        ops = triton_tile_ops(required=True)
    else:
        raise ValueError(f"backend {backend!r} has no tile ops (the chunked backends are 'torch' and 'triton')")
    shard = active_shard()
    return ops if shard is None else VocabParallelTileOps(ops, shard)
