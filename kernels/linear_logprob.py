"""Log-prob, entropy and log-sum-exp straight from the LM head's input, the logits never leaving the chip.

``y = hidden @ weight.T (+ bias)`` is formed tile by tile with ``tl.dot`` (fp32 accumulation), transformed into
logits ``z`` and folded into the same online ``(max, sum e^{z-m}, sum e^{z-m} (m - z))`` statistics as
``logsumexp_stats.py``, per vocabulary split; ``merge_stats_kernel`` finishes the rows. No gradient: this is the
no-grad pass that scores old / reference log-probs (``2NHV`` FLOPs, no ``[N, V]`` buffer at all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import device_guard, launch_config, vocab_splits
from .logit_transform import head_constants, head_logits
from .logsumexp_stats import _NEG_BIG, merge_stats, new_partials

# fp32 operands: 3xTF32 (tensor cores, about fp32's accuracy); "ieee" would fall back to FMA loops
_DOT_PRECISION = {torch.float32: "tf32x3", torch.bfloat16: "tf32", torch.float16: "tf32"}


# Program (b, split): tokens [b * BLOCK_N, (b + 1) * BLOCK_N) against vocabulary [split * split_size, ...), one
# [BLOCK_N, BLOCK_V] logits tile at a time (a K-loop of [BLOCK_N, BLOCK_H] x [BLOCK_H, BLOCK_V] tl.dot's), folded into
# per-token partial statistics; the target's logit is picked out of the tile that holds it.
# Grid: (cdiv(N, BLOCK_N), num_splits). Token blocks on axis 0 (up to 2^31 - 1), splits on axis 1 (<= MAX_SPLITS).
# Memory: reads the block's hidden rows once per vocabulary tile (from L2/cache after the first) and its split's
# weight slice once; writes 3 floats per (token, split) and one per token. 2 * BLOCK_N * BLOCK_V * H FLOPs per tile.
@triton.jit(do_not_specialize=["n_rows"])
def _linear_split_stats_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    targets_ptr,
    partials_ptr,
    target_logit_ptr,
    n_rows,
    vocab,
    hidden_size,
    stride_xn,
    stride_xh,
    stride_wv,
    stride_wh,
    split_size,
    num_splits,
    u_scale,
    z_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    split = tl.program_id(1)
    lo = split * split_size
    hi = tl.minimum(lo + split_size, vocab)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    ks = tl.arange(0, BLOCK_H)
    x_rows = x_ptr + rows[:, None] * stride_xn

    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    z_target = tl.zeros([BLOCK_N], tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < hi
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for k in tl.range(0, hidden_size, BLOCK_H, num_stages=NUM_STAGES):
            k_ok = (k + ks) < hidden_size
            xa = tl.load(x_rows + (k + ks)[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wb = tl.load(w_cols + (k + ks)[:, None] * stride_wh, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_IN_FP32:
                xa = xa.to(tl.float32)
                wb = wb.to(tl.float32)
            acc = tl.dot(xa, wb, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], head_logits(acc, u_scale, z_scale, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        u = alpha * (u + (m_new - m) * s) + tl.sum(tl.where(e > 0.0, m_new[:, None] - z, 0.0) * e, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        z_target += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)

    out = partials_ptr + rows * 3 * num_splits + split
    tl.store(out, m, mask=row_ok)
    tl.store(out + num_splits, s, mask=row_ok)
    tl.store(out + 2 * num_splits, u, mask=row_ok)
    holds_target = row_ok & (target >= lo) & (target < hi)
    tl.store(target_logit_ptr + rows, z_target, mask=holds_target)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    *,
    block_n: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    num_splits: int | None = None,
    out=None,
    scratch=None,
):
    """``(logp, entropy, lse)`` ``[N]`` float32 of ``targets`` under the logits of ``hidden [N, H] @ weight.T + bias``.

    ``hidden`` and ``weight`` share one dtype among bf16/fp16/fp32 (any strides); ``bias``: ``[V]`` or None;
    ``targets``: ``[N]`` int64 in ``[0, V)``. Block sizes and split count default to the launch table; ``out`` and
    ``scratch`` as in :func:`logsumexp_stats.logsumexp_stats`.
    """
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    if hidden.dtype != weight.dtype or hidden.dtype not in _DOT_PRECISION:
        raise ValueError(
            f"linear_logprob needs hidden and weight of one dtype among bf16/fp16/fp32, got {hidden.dtype} and "
            f"{weight.dtype}"
        )
    has_softcap, u_scale, z_scale, _ = head_constants(logit_scale, softcap, temperature)
    table = "linear_logprob_fp32" if hidden.dtype == torch.float32 else "linear_logprob"
    cfg = launch_config(table, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h)
    row_blocks = triton.cdiv(n_rows, cfg["BLOCK_N"])
    num_splits, split_size = vocab_splits(row_blocks, vocab, cfg["BLOCK_V"], hidden.device, num_splits)
    partials, target_logit = scratch if scratch is not None else new_partials(n_rows, num_splits, hidden.device)
    if partials.shape != (n_rows, 3, num_splits) or target_logit.shape != (n_rows,):
        raise ValueError(f"scratch must be shaped ({n_rows}, 3, {num_splits}) and ({n_rows},)")
    # The interpreter multiplies bf16 operands' raw bits (Triton 3.9); upcasting is exact (fp32 products of bf16)
    dot_in_fp32 = hidden.dtype == torch.bfloat16 and cfg.get("bf16_dot_in_fp32", False)
    if n_rows > 0:
        with device_guard(hidden):
            _linear_split_stats_kernel[(row_blocks, num_splits)](
                hidden,
                weight,
                bias if bias is not None else hidden,  # stands in for an absent bias; never read
                targets.contiguous(),
                partials,
                target_logit,
                n_rows,
                vocab,
                hidden_size,
                hidden.stride(0),
                hidden.stride(1),
                weight.stride(0),
                weight.stride(1),
                split_size,
                num_splits,
                u_scale,
                z_scale,
                HAS_BIAS=bias is not None,
                HAS_SOFTCAP=has_softcap,
                DOT_PRECISION="ieee" if dot_in_fp32 else _DOT_PRECISION[hidden.dtype],
                DOT_IN_FP32=dot_in_fp32,
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_V=cfg["BLOCK_V"],
                BLOCK_H=cfg["BLOCK_H"],
                NUM_STAGES=cfg["num_stages"],
                num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"],
            )
    return merge_stats(partials, target_logit, out=out)
