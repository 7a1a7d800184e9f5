"""The logits gradient, written over the projection it came from: ``y <- dL/dy``.

With ``p = softmax(z)``, ``log p_j = z_j - lse``:
``dL/dz_j = g_logp * (1[j = target] - p_j) - g_ent * p_j * (log p_j + entropy)``, chained through the head
transform: ``dL/dy_j = dL/dz_j * logit_scale / temperature * sech^2(y_j * logit_scale / c)`` (no sech^2 factor
without the softcap). ``g_logp`` / ``g_ent`` are per-row upstream gradients; either term can be absent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import device_guard, launch_config
from .logit_transform import head_constants, tanh_sech2

# CUDA's limit on grid axis 1; a row with more vocabulary blocks has its programs loop over them
_MAX_GRID_1 = 65535


# Program (row, c): vocabulary blocks c, c + G, c + 2G, ... (G = grid axis 1) of one row, in place: load y, rebuild
# z and p from the row's lse, write dL/dy over y.
# Grid: (n_rows, min(cdiv(V, BLOCK_V), 65535)). Rows on axis 0 (up to 2^31 - 1).
# Memory: reads and writes each logit once (8 bytes per logit), plus a few floats per row.
@triton.jit
def _logits_grad_kernel(
    y_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    vocab,
    stride_row,
    u_scale,
    z_scale,
    grad_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
        target = tl.load(targets_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    offsets = tl.arange(0, BLOCK_V)
    for start in range(tl.program_id(1) * BLOCK_V, vocab, tl.num_programs(1) * BLOCK_V):
        cols = start + offsets
        in_range = cols < vocab
        y = tl.load(y_row + cols, mask=in_range, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            tanh_u, sech2_u = tanh_sech2(y * u_scale)
            z = tanh_u * z_scale
        else:
            z = y * z_scale
        log_p = z - lse
        p = tl.exp(log_p)
        grad = tl.zeros([BLOCK_V], tl.float32)
        if HAS_GRAD_LOGP:
            grad = tl.where(cols == target, g_logp, 0.0) - g_logp * p
        if HAS_GRAD_ENTROPY:
            # p log p -> 0 as p -> 0 (a -inf logit), not 0 * -inf
            grad -= g_entropy * tl.where(p > 0.0, p * (log_p + entropy), 0.0)
        if HAS_SOFTCAP:
            grad = grad * (grad_scale * sech2_u)
        else:
            grad = grad * grad_scale
        tl.store(y_row + cols, grad, mask=in_range)


def logits_grad_(
    y: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Overwrite ``y`` ``[n, V]`` (float32, unit column stride) with ``dL/dy``; returns ``y``.

    ``targets`` ``[n]`` int64; ``lse``, ``entropy``, ``grad_logp``, ``grad_entropy``: ``[n]`` float32, the last two
    None for an absent term (both None: y becomes zeros).
    """
    n_rows, vocab = y.shape
    if y.dtype != torch.float32 or y.stride(1) != 1:
        raise ValueError("logits_grad_ needs float32 projections with unit column stride")
    has_softcap, u_scale, z_scale, grad_scale = head_constants(logit_scale, softcap, temperature)
    cfg = launch_config("logits_grad", BLOCK_V=block_v)
    if n_rows == 0:
        return y

    def row_vector(v):
        return lse if v is None else v.to(device=y.device, dtype=torch.float32).contiguous()

    with device_guard(y):
        _logits_grad_kernel[(n_rows, min(triton.cdiv(vocab, cfg["BLOCK_V"]), _MAX_GRID_1))](
            y,
            targets.contiguous(),
            row_vector(lse),
            row_vector(entropy),
            row_vector(grad_logp),  # stands in for an absent term; never read
            row_vector(grad_entropy),
            vocab,
            y.stride(0),
            u_scale,
            z_scale,
            grad_scale,
            HAS_SOFTCAP=has_softcap,
            HAS_GRAD_LOGP=grad_logp is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            BLOCK_V=cfg["BLOCK_V"],
            num_warps=cfg["num_warps"],
        )
    return y
