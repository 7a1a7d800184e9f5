"""The logits gradient, written over the projection it came from: ``y <- dL/dy``, in fp32 or straight in 16-bit.

With ``p = softmax(z)``, ``log p_j = z_j - lse``:
``dL/dz_j = g_logp * (1[j = target] - p_j) - g_ent * p_j * (log p_j + entropy)``, chained through the head
transform: ``dL/dy_j = dL/dz_j * logit_scale / temperature * sech^2(y_j * logit_scale / c)`` (no sech^2 factor
without the softcap). ``g_logp`` / ``g_ent`` are per-row upstream gradients; either term can be absent.

The gradient is the operand of the two gradient GEMMs, so it is written once, in the GEMMs' dtype, over the logits it
came from:

- a 16-bit tile (logits staged in bf16/fp16, as TRL stages them) is overwritten in place, element for element;
- an fp32 tile with bf16/fp16 GEMMs gets the gradient over the first half of each of its rows: row ``r`` of the
  result starts where row ``r`` of ``y`` does and has row stride ``2V`` (16-bit elements), which keeps that
  workspace at 4 bytes per logit and saves a separate cast pass;
- an fp32 tile with fp32 GEMMs is overwritten in place in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import device_guard, launch_config
from .logit_transform import head_constants, tanh_sech2

# CUDA's limit on grid axis 1; a row with more vocabulary blocks has its programs loop over them
_MAX_GRID_1 = 65535


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, rounding to nearest even in integer arithmetic (NaN stays NaN). The interpreter's own conversion
    truncates (Triton 3.9), so under it this is what keeps CPU results equal to a GPU's ``cvt.rn.bf16.f32``."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x == x, rounded, float("nan"))


# Program (row, c): vocabulary blocks c, c + G, c + 2G, ... (G = grid axis 1) of one row: load y, rebuild z and p
# from the row's lse, store dL/dy into g.
# Grid: (n_rows, G). Rows on axis 0 (up to 2^31 - 1). G = min(cdiv(V, BLOCK_V), 65535) when g is y itself or a
# separate buffer; G = 1 when g is the 16-bit view over the first half of y's rows (NARROW_IN_PLACE): then one
# program walks its row left to right, and a barrier between the load and the store of each block guarantees every
# thread has read block k before any thread writes it. Written bytes [2kB, 2(k+1)B) of the row never reach an unread
# byte (>= 4(k+1)B), so the row is consumed before it is overwritten.
# Memory: reads 4 (fp32 tile) or 2 (16-bit tile) bytes and writes 4 (fp32) or 2 (16-bit) bytes per logit, plus a
# few floats per row.
@triton.jit
def _logits_grad_kernel(
    y_ptr,
    g_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    vocab,
    stride_y_row,
    stride_g_row,
    u_scale,
    z_scale,
    grad_scale,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NARROW_IN_PLACE: tl.constexpr,
    SOFTWARE_BF16_ROUNDING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y_row = y_ptr + row * stride_y_row
    g_row = g_ptr + row * stride_g_row
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
        if SOFTWARE_BF16_ROUNDING:
            out = to_bf16_rne(grad)
        else:
            out = grad.to(g_ptr.dtype.element_ty)
        if NARROW_IN_PLACE:
            tl.debug_barrier()
        tl.store(g_row + cols, out, mask=in_range)


def narrow_view(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[n, V]`` ``dtype`` (bf16/fp16) view over the first half of each fp32 row of ``y`` (row stride ``2V``)."""
    if y.dtype != torch.float32 or y.stride(1) != 1:
        raise ValueError("narrow_view needs a float32 [n, V] tile with unit column stride")
    return y.view(dtype)[:, : y.shape[1]]


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
    out_dtype: torch.dtype = torch.float32,
    block_v: int | None = None,
) -> torch.Tensor:
    """``dL/dy`` written over ``y`` ``[n, V]`` (unit column stride), which is returned: in place when ``out_dtype``
    is ``y``'s dtype (float32, bfloat16 or float16), else (a float32 ``y``, a bf16/fp16 gradient) into
    :func:`narrow_view` of ``y``.

    ``targets`` ``[n]`` int64; ``lse``, ``entropy``, ``grad_logp``, ``grad_entropy``: ``[n]`` float32, the last two
    None for an absent term (both None: the result is zeros).
    """
    n_rows, vocab = y.shape
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16) or y.stride(1) != 1:
        raise ValueError("logits_grad_ needs float32/bfloat16/float16 projections with unit column stride")
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if y.dtype != torch.float32 and out_dtype != y.dtype:
        raise ValueError(f"a {y.dtype} tile's gradient is written in place, in {y.dtype}, not {out_dtype}")
    narrow = out_dtype != y.dtype
    g = narrow_view(y, out_dtype) if narrow else y
    has_softcap, u_scale, z_scale, grad_scale = head_constants(logit_scale, softcap, temperature)
    cfg = launch_config("logits_grad", BLOCK_V=block_v)
    if n_rows == 0:
        return g

    def row_vector(v):
        return lse if v is None else v.to(device=y.device, dtype=torch.float32).contiguous()

    programs_per_row = 1 if narrow else min(triton.cdiv(vocab, cfg["BLOCK_V"]), _MAX_GRID_1)
    with device_guard(y):
        _logits_grad_kernel[(n_rows, programs_per_row)](
            y,
            g,
            targets.contiguous(),
            row_vector(lse),
            row_vector(entropy),
            row_vector(grad_logp),  # stands in for an absent term; never read
            row_vector(grad_entropy),
            vocab,
            y.stride(0),
            g.stride(0),
            u_scale,
            z_scale,
            grad_scale,
            HAS_SOFTCAP=has_softcap,
            HAS_GRAD_LOGP=grad_logp is not None,
            HAS_GRAD_ENTROPY=grad_entropy is not None,
            NARROW_IN_PLACE=narrow,
            SOFTWARE_BF16_ROUNDING=out_dtype == torch.bfloat16 and cfg.get("software_bf16_rounding", False),
            BLOCK_V=cfg["BLOCK_V"],
            num_warps=cfg["num_warps"],
        )
    return g
