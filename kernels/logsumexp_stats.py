"""Log-sum-exp, target log-prob and entropy of each row of logits, in one sweep over the vocabulary.

For a row of logits ``z`` (the head transform of a projection row ``y``): ``lse = log sum_j e^{z_j}``,
``logp = z[target] - lse`` and ``entropy = lse - sum_j softmax(z)_j z_j``. The sweep keeps the online
triple ``(m, s, u) = (max z, sum e^{z - m}, sum e^{z - m} (m - z))``; when the running maximum grows from ``m`` to
``m'``, ``s <- s e^{m - m'}`` and ``u <- (u + (m' - m) s) e^{m - m'}``. Then ``lse = m + log s`` and
``entropy = log s + u / s``: a sum of non-negative terms, where ``lse - sum p z`` would cancel catastrophically for
a peaked row (entropy << |lse|). One read of ``y`` gives all three statistics.

Two kernels, no atomics (deterministic for a given shape):

- :func:`_split_stats_kernel` cuts the vocabulary into ``num_splits`` contiguous ranges and writes one partial triple
  per (row, split); the program whose range holds the row's target also writes the target's logit.
- :func:`merge_stats_kernel` folds a row's partial triples into ``lse``, ``entropy`` and ``logp``. The fused
  linear+log-prob kernel (``linear_logprob.py``) writes the same partials and reuses it.

Partials layout: ``partials[row, k, split]`` float32 with ``k = 0, 1, 2`` for ``m, s, u`` (``[n, 3, num_splits]``).

With ``EXTRA`` the same read also gives the statistics the preference losses' metrics and weights need
(:mod:`fused_gspo.preference.statistics`): ``k = 3, 4, 5`` hold ``s2 = sum e^{2(z - m)}`` (rescaled by
``alpha^2`` as the maximum grows), ``sum z`` and the largest logit left of the target, and the merge gives
``log sum p^2 = log S2 - 2 log S``, the mean logit ``sum z / V`` and whether the target is the *first* argmax
(``z_target >= max z`` and ``z_target > max_{j < target} z_j``, as ``torch.argmax`` picks). ``[n, 6, num_splits]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import MAX_SPLITS, device_guard, fixed_vocab_splits, launch_config, new_buffer
from .logit_transform import head_constants, head_logits

# Running maximum's start: finite, so that exp(m_old - m_new) never sees -inf - -inf in lanes that saw no logit
_NEG_BIG = tl.constexpr(-3.0e38)


@triton.jit
def fold_online_stats(m, s, u, axis: tl.constexpr):
    """Fold online triples along ``axis`` onto their common maximum (lanes that saw no logit have ``s = 0``)."""
    m_all = tl.max(m, axis=axis)
    m_b = tl.expand_dims(m_all, axis)
    w = tl.exp(m - m_b)
    s_all = tl.sum(s * w, axis=axis)
    u_all = tl.sum((u + tl.where(s > 0.0, (m_b - m) * s, 0.0)) * w, axis=axis)
    return m_all, s_all, u_all


# Program (row, split): the partial triple of logits [split * split_size, min((split + 1) * split_size, V)) of one
# row. Per BLOCK_V block: one max-reduction updates the scalar running maximum, then s and u are BLOCK_V-wide
# accumulators rescaled by a scalar (one exp per logit, plus one for the softcap's tanh), summed at the end. With
# EXTRA, three more accumulators ride along (s2, sum z, the maximum left of the target): no extra exp, no extra read.
# Grid: (n_rows, num_splits). Rows on axis 0 (up to 2^31 - 1), splits on axis 1 (at most MAX_SPLITS).
# Memory: reads the row's slice of y once (4 bytes per logit for an fp32 tile, 2 for a 16-bit one, upcast on load)
# plus its target; writes 3 (EXTRA: 6) floats per (row, split) and, from the one program holding the target, its
# logit (4 bytes per row).
@triton.jit(do_not_specialize=["n_rows"])
def _split_stats_kernel(
    y_ptr,
    targets_ptr,
    partials_ptr,
    target_logit_ptr,
    n_rows,
    vocab,
    stride_row,
    split_size,
    num_splits,
    u_scale,
    z_scale,
    HAS_SOFTCAP: tl.constexpr,
    EXTRA: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    y_row = y_ptr + row * stride_row
    lo = split * split_size
    hi = tl.minimum(lo + split_size, vocab)
    offsets = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)

    m = tl.max(tl.full([BLOCK_V], _NEG_BIG, tl.float32), axis=0)
    s = tl.zeros([BLOCK_V], tl.float32)
    u = tl.zeros([BLOCK_V], tl.float32)
    if EXTRA:
        s2 = tl.zeros([BLOCK_V], tl.float32)
        sum_z = tl.zeros([BLOCK_V], tl.float32)
        before = tl.full([BLOCK_V], _NEG_BIG, tl.float32)
    for start in range(lo, hi, BLOCK_V):
        cols = start + offsets
        in_range = cols < hi
        y = tl.load(y_row + cols, mask=in_range, other=0.0).to(tl.float32)
        z = tl.where(in_range, head_logits(y, u_scale, z_scale, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        # a -inf logit (masked lane, or a -inf bias) contributes 0, not inf * 0
        u = alpha * (u + (m_new - m) * s) + tl.where(e > 0.0, m_new - z, 0.0) * e
        s = s * alpha + e
        if EXTRA:
            s2 = s2 * (alpha * alpha) + e * e
            sum_z += tl.where(in_range, z, 0.0)
            before = tl.maximum(before, tl.where(cols < target, z, _NEG_BIG))
        m = m_new

    out = partials_ptr + row * (6 if EXTRA else 3) * num_splits + split
    tl.store(out, m)
    tl.store(out + num_splits, tl.sum(s, axis=0))
    tl.store(out + 2 * num_splits, tl.sum(u, axis=0))
    if EXTRA:
        tl.store(out + 3 * num_splits, tl.sum(s2, axis=0))
        tl.store(out + 4 * num_splits, tl.sum(sum_z, axis=0))
        tl.store(out + 5 * num_splits, tl.max(before, axis=0))

    holds_target = (target >= lo) & (target < hi)
    y_target = tl.load(y_row + target, mask=holds_target, other=0.0).to(tl.float32)
    tl.store(target_logit_ptr + row, head_logits(y_target, u_scale, z_scale, HAS_SOFTCAP), mask=holds_target)


# Program r: rows [r * BLOCK_R, (r + 1) * BLOCK_R), all their splits in one [BLOCK_R, BLOCK_S] block:
# M = max_k m_k, S = sum_k s_k e^{m_k - M}, U = sum_k (u_k + (M - m_k) s_k) e^{m_k - M}; lse = M + log S,
# entropy = log S + U / S, logp = z_target - lse. EXTRA: S2 = sum_k s2_k e^{2 (m_k - M)}, log sum p^2 =
# log S2 - 2 log S, mean logit = sum_k (sum z)_k / V, top-1 = z_target >= M and z_target > max_k before_k.
# Grid: (cdiv(n_rows, BLOCK_R),). Requires num_splits <= BLOCK_S.
# Memory: reads 3 (EXTRA: 6) * num_splits + 1 floats per row, writes 3 (EXTRA: 6) floats per row.
@triton.jit(do_not_specialize=["n_rows"])
def merge_stats_kernel(
    partials_ptr,
    target_logit_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    extra_ptr,
    n_rows,
    num_splits,
    vocab,
    EXTRA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    splits = tl.arange(0, BLOCK_S)
    ok = row_ok[:, None] & (splits < num_splits)[None, :]
    base = partials_ptr + rows[:, None] * (6 if EXTRA else 3) * num_splits + splits[None, :]
    m = tl.load(base, mask=ok, other=_NEG_BIG)
    s = tl.load(base + num_splits, mask=ok, other=0.0)
    u = tl.load(base + 2 * num_splits, mask=ok, other=0.0)
    m_row, s_row, u_row = fold_online_stats(m, s, u, 1)
    s_row = tl.where(row_ok, s_row, 1.0)
    log_s = tl.log(s_row)
    lse = m_row + log_s
    z_target = tl.load(target_logit_ptr + rows, mask=row_ok, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(entropy_ptr + rows, log_s + u_row / s_row, mask=row_ok)
    tl.store(logp_ptr + rows, z_target - lse, mask=row_ok)
    if EXTRA:
        s2 = tl.load(base + 3 * num_splits, mask=ok, other=0.0)
        sum_z = tl.load(base + 4 * num_splits, mask=ok, other=0.0)
        before = tl.load(base + 5 * num_splits, mask=ok, other=_NEG_BIG)
        w = tl.exp(m - m_row[:, None])
        s2_row = tl.sum(s2 * w * w, axis=1)
        top1 = (z_target >= m_row) & (z_target > tl.max(before, axis=1))
        extra = extra_ptr + rows * 3
        tl.store(extra, tl.log(tl.where(row_ok, s2_row, 1.0)) - 2.0 * log_s, mask=row_ok)
        tl.store(extra + 1, tl.sum(sum_z, axis=1) / vocab, mask=row_ok)
        tl.store(extra + 2, top1.to(tl.float32), mask=row_ok)


def new_partials(n_rows: int, num_splits: int, device, extra: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized ``(partials [n, 3 (extra: 6), num_splits], target_logit [n])`` float32 buffers."""
    return new_buffer((n_rows, 6 if extra else 3, num_splits), device), new_buffer((n_rows,), device)


def merge_stats(
    partials: torch.Tensor, target_logit: torch.Tensor, out=None, block_r: int | None = None, vocab: int = 1
):
    """``(logp, entropy, lse)`` [n] float32 from ``partials`` [n, 3, S] and ``target_logit`` [n] (``out``: a
    preallocated triple to write into). From ``[n, 6, S]`` partials, a fourth output ``[n, 3]`` float32: log sum p^2,
    the mean logit (over ``vocab`` entries) and 1.0 where the target is the first argmax."""
    n_rows, width, num_splits = partials.shape
    extra = width == 6
    if num_splits > MAX_SPLITS:
        raise ValueError(f"at most {MAX_SPLITS} vocabulary splits can be merged, got {num_splits}")
    if out is None:
        out = tuple(new_buffer((n_rows,), partials.device) for _ in range(3))
    logp, entropy, lse = out
    extras = new_buffer((n_rows, 3), partials.device) if extra else None
    if n_rows > 0:
        cfg = launch_config("merge_stats", BLOCK_R=block_r)
        with device_guard(partials):
            merge_stats_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
                partials,
                target_logit,
                logp,
                entropy,
                lse,
                extras if extra else lse,  # stands in when there are no extras; never written
                n_rows,
                num_splits,
                vocab,
                EXTRA=extra,
                BLOCK_R=cfg["BLOCK_R"],
                BLOCK_S=MAX_SPLITS,
                num_warps=cfg["num_warps"],
            )
    return (logp, entropy, lse, extras) if extra else (logp, entropy, lse)


def logsumexp_stats(
    y: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    *,
    extra: bool = False,
    block_v: int | None = None,
    num_splits: int | None = None,
    out=None,
    scratch=None,
):
    """``(logp, entropy, lse)``, each ``[n]`` float32, of the logits ``softcap(y * logit_scale) / temperature``;
    with ``extra``, a fourth output ``[n, 3]``: log sum p^2, the mean logit, the first-argmax flag (1.0 / 0.0).

    ``y``: ``[n, V]`` float32, bfloat16 or float16 (a 16-bit tile is read as is and folded in float32) with unit
    column stride (any row stride); ``targets``: ``[n]`` int64 in ``[0, V)``.
    ``block_v`` / ``num_splits`` override the launch table (None: the table; the split count then depends on ``V``
    only, :func:`~.launch_config.fixed_vocab_splits`).
    ``out`` (a ``(logp, entropy, lse)`` triple) and ``scratch`` (``(partials, target_logit)`` of
    :func:`new_partials`' shapes, for the chosen split count) let callers provide the buffers.
    """
    n_rows, vocab = y.shape
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16) or y.stride(1) != 1:
        raise ValueError("logsumexp_stats needs float32/bfloat16/float16 projections with unit column stride")
    has_softcap, u_scale, z_scale, _ = head_constants(logit_scale, softcap, temperature)
    cfg = launch_config("logsumexp_stats", BLOCK_V=block_v)
    num_splits, split_size = fixed_vocab_splits(vocab, cfg["BLOCK_V"], cfg["SPLIT_LOGITS"], num_splits)
    partials, target_logit = scratch if scratch is not None else new_partials(n_rows, num_splits, y.device, extra)
    width = 6 if extra else 3
    if partials.shape != (n_rows, width, num_splits) or target_logit.shape != (n_rows,):
        raise ValueError(f"scratch must be shaped ({n_rows}, {width}, {num_splits}) and ({n_rows},)")
    targets = targets.contiguous()
    if n_rows > 0:
        with device_guard(y):
            _split_stats_kernel[(n_rows, num_splits)](
                y,
                targets,
                partials,
                target_logit,
                n_rows,
                vocab,
                y.stride(0),
                split_size,
                num_splits,
                u_scale,
                z_scale,
                HAS_SOFTCAP=has_softcap,
                EXTRA=extra,
                BLOCK_V=cfg["BLOCK_V"],
                num_warps=cfg["num_warps"],
            )
    return merge_stats(partials, target_logit, out=out, vocab=vocab)
