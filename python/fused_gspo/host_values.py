"""The host's one read of a batch: every value it needs before the chunks, in one device-to-host transfer.

Before it can queue a chunk, the host needs a few numbers that live on the device: how many tokens are valid (the
shape of the gathered operands), how many in each row (chunks that cut only between rows), a packed batch's row
offsets, the trainer's token count, and the values the input checks read (a 0/1 mask, token ids inside the
vocabulary, ``cu_seqlens`` offsets). Each read waits for everything queued before it, and the GPU then idles while
the host runs the Python up to its next kernel; read one by one, that happened five to eight times per call. Here
they are computed on the device, stacked, copied over once, and checked on the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


def read_together(*parts: torch.Tensor) -> list[list[float]]:
    """Each tensor's values as a list of Python numbers, for all of them in one transfer.

    Integers are exact below 2**53 (2**24 on MPS, which has no float64): token ids, counts and offsets are.
    """
    if not parts:
        return []
    device = parts[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    # a part on another device (a CPU num_items_in_batch beside CUDA inputs) joins the first's: still one transfer
    values = torch.cat([p.detach().reshape(-1).to(device, dtype) for p in parts]).tolist()
    out, start = [], 0
    for p in parts:
        out.append(values[start : start + p.numel()])
        start += p.numel()
    return out


@dataclass(frozen=True)
class BatchCounts:
    """What the host knows of a batch after its one read.

    ``row_counts``: valid tokens per row (padded: per row of ``[B, T]``; packed: per sequence). ``row_starts``: a
    packed batch's ``cu_seqlens`` (None when padded). ``num_items``: ``num_items_in_batch`` as a number (None when
    not given).
    """

    row_counts: tuple[int, ...]
    row_starts: tuple[int, ...] | None = None
    num_items: float | None = None

    @property
    def valid_tokens(self) -> int:
        return sum(self.row_counts)


def _row_valid_counts(valid: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Valid tokens per row, on the device. Packed: from the prefix sum of ``valid`` at the offsets (clamped into
    range so that bad offsets, refused on the host, cannot index out of bounds first)."""
    if cu_seqlens is None:
        return valid.sum(-1)
    prefix = torch.cat([valid.new_zeros(1, dtype=torch.long), valid.long().cumsum(0)])
    offsets = cu_seqlens.long().clamp(0, valid.shape[0])
    return prefix[offsets[1:]] - prefix[offsets[:-1]]


def _binary_check(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool or not mask.numel():
        return mask.new_ones(1, dtype=torch.bool)
    return ((mask == 0) | (mask == 1)).all().reshape(1)


def _id_range(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if not ids.numel():
        return ids.new_zeros(2, dtype=torch.long)
    checked = torch.where(valid, ids, 0)  # 0 is in range: masked ids pass
    return torch.stack([checked.min(), checked.max()]).long()


def _check_id_range(name: str, lo: float, hi: float, vocab: int) -> None:
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name} holds token id {int(lo if lo < 0 else hi)}, outside the vocabulary [0, {vocab})")


def read_batch(
    *,
    hidden: torch.Tensor,
    vocab: int,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    num_items_in_batch=None,
) -> BatchCounts:
    """Read and check a batch (policy, or preference ``[2B, T]``) whose shapes are already valid: ``cu_seqlens``
    offsets, a 0/1 mask, a packed ``[n, H]`` hidden with one row per valid token, ``num_items_in_batch >= 0``, ids in
    ``[0, vocab)``. Raises ``ValueError`` naming the argument. Rows without a valid token are the loss's to judge
    (a preference loss: :func:`fused_gspo.preference.batch.check_empty_rows`)."""
    valid = completion_mask.bool()
    parts = [_binary_check(completion_mask), _id_range(completion_ids, valid), _row_valid_counts(valid, cu_seqlens)]
    if cu_seqlens is not None:
        parts.append(cu_seqlens)
    if isinstance(num_items_in_batch, torch.Tensor):
        parts.append(num_items_in_batch)
    binary, (lo, hi), counts, *rest = read_together(*parts)
    starts = rest.pop(0) if cu_seqlens is not None else None
    num_items = rest.pop(0)[0] if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch

    if starts is not None:
        n = completion_ids.shape[0]
        if starts[0] != 0 or starts[-1] != n or any(b < a for a, b in itertools.pairwise(starts)):
            shown = ", ".join(str(int(s)) for s in starts[:8])
            raise ValueError(
                f"cu_seqlens must start at 0, never decrease, and end at the number of packed positions ({n}), "
                f"got [{shown}{', ...' if len(starts) > 8 else ''}]"
            )
    if not binary[0]:
        raise ValueError("completion_mask must hold only 0 and 1")
    row_counts = tuple(int(c) for c in counts)
    every_position = hidden.dim() == 3 or (cu_seqlens is not None and hidden.shape[0] == completion_ids.shape[0])
    if not every_position and hidden.shape[0] != sum(row_counts):
        also = f" or one per packed position ({completion_ids.shape[0]})" if cu_seqlens is not None else ""
        raise ValueError(
            f"packed hidden ([N, H]) must hold one row per valid token ({sum(row_counts)}){also}, got {hidden.shape[0]}"
        )
    if num_items is not None and not float(num_items) >= 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {float(num_items)}")
    _check_id_range("completion_ids", lo, hi, vocab)
    return BatchCounts(
        row_counts=row_counts,
        row_starts=None if starts is None else tuple(int(s) for s in starts),
        num_items=None if num_items is None else float(num_items),
    )


def read_mask_rows(name: str, mask: torch.Tensor) -> tuple[int, ...]:
    """Valid tokens per row of a 0/1 ``[rows, T]`` mask (one read); ``ValueError`` naming ``name`` if it is not
    0/1."""
    binary, counts = read_together(_binary_check(mask), mask.bool().sum(1))
    if not binary[0]:
        raise ValueError(f"{name} must hold only 0 and 1")
    return tuple(int(c) for c in counts)


def read_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    """Check that every id is in ``[0, vocab)`` (one read)."""
    if ids.numel():
        ((lo, hi),) = read_together(torch.stack([ids.min(), ids.max()]))
        _check_id_range(name, lo, hi, vocab)


def valid_positions(valid: torch.Tensor, count: int) -> torch.Tensor:
    """The flat indices of ``valid``'s True entries, in order, ``[count]`` int64, without waiting for the device
    (``nonzero_static``; ``count`` is known from the host's read). Falls back to ``nonzero`` where the device has no
    ``nonzero_static`` (CUDA before torch 2.6)."""
    flat = valid.reshape(-1)
    if count == 0:
        return flat.new_zeros(0, dtype=torch.long)
    try:
        return torch.nonzero_static(flat, size=count).flatten()
    except NotImplementedError:  # no kernel for this device
        return flat.nonzero().flatten()
