"""Rows of a batch, padded or packed: the few reductions the loss math needs, written for both layouts.

A policy loss is made of per-token values (log-probs, masks, ratios) and per-row (per-sequence) values (advantages,
sequence ratios), combined by two operations: a sum over each row's tokens, and a row value broadcast to its tokens.

- :class:`PaddedRows`: TRL's layout, per-token tensors ``[B, T]``, per-row tensors ``[B]`` (or ``[B, 1]``). The sum is
  ``x.sum(-1)`` and the broadcast ``v.unsqueeze(-1)``: the loss math evaluates exactly TRL's expressions.
- :class:`PackedRows`: the padding-free layout of verl and OpenRLHF, per-token tensors ``[N]`` over the concatenated
  sequences marked by ``cu_seqlens`` ``[S + 1]``, per-row tensors ``[S]``. The sum is a segmented reduction and the
  broadcast a gather whose gradient is that same reduction: no atomics, so the same inputs give the same bits on a GPU,
  and nothing of size ``S x max_len`` is ever built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Rows:
    # False for a selection of rows (``select``): there a tensor's length no longer tells per-row from per-token
    # (a chunk of a packed batch with an empty sequence can hold as many positions as rows)
    whole = True

    def broadcast(self, x: torch.Tensor, per_row: bool) -> torch.Tensor:
        """``x`` shaped to combine with per-token tensors: a per-row value (``per_row``) expanded, a per-token one as
        it is. The caller says which: decided once on the whole batch (``PolicyBatch.is_per_row``) or known from the
        math (a sequence-level ratio), never inferred from a selection's shapes."""
        return self.expand(x) if per_row else x

    def is_per_row(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is per row (else per token), from its shape: only on the whole batch, where validation makes
        the shapes unambiguous (packed: ``S != N``)."""
        if not self.whole:
            raise RuntimeError(
                "is_per_row on a selection of rows: its shapes cannot tell per-row from per-token values; "
                "decide on the whole batch and carry the decision"
            )
        return self._is_per_row(x)

    def row_values(self, x: torch.Tensor) -> torch.Tensor:
        """A per-row value as a flat ``[rows]`` vector."""
        return x.reshape(-1)


class PaddedRows(_Rows):
    """``B`` rows of ``T`` positions; ``mask`` ``[B, T]``."""

    packed = False

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self.num = mask.shape[0]
        self.width = mask.shape[1]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sums ``[B]`` of per-token ``x`` ``[B, T]``."""
        return x.sum(-1)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """A per-row value (``[B]`` or ``[B, 1]``) shaped to broadcast against per-token tensors."""
        return v if v.dim() == 2 else v.unsqueeze(-1)

    def _is_per_row(self, x: torch.Tensor) -> bool:
        # [B] or [B, 1], TRL's test for a sequence-level value (so [B, 1] per-token values of T = 1 read as rows too)
        return x.dim() == 1 or x.shape[-1] == 1

    def token_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The per-token values of rows ``start:stop``."""
        return x[start:stop]

    def select(self, start: int, stop: int) -> PaddedRows:
        selected = PaddedRows(self.mask[start:stop])
        selected.whole = False
        return selected

    def row_starts(self) -> list[int]:
        """Offset of each row's first position in the flattened per-token layout, and the end: ``B + 1`` ints."""
        return [r * self.width for r in range(self.num + 1)]


class _ExpandRows(torch.autograd.Function):
    """``v[S] -> v[seq_ids]`` with a segmented-sum backward (a gather's default backward adds with atomics)."""

    @staticmethod
    def forward(ctx, v, seq_ids, lengths):
        ctx.save_for_backward(lengths)
        return v[seq_ids]

    @staticmethod
    def backward(ctx, grad):
        (lengths,) = ctx.saved_tensors
        return torch.segment_reduce(grad, "sum", lengths=lengths), None, None


class PackedRows(_Rows):
    """``S`` sequences concatenated into ``N`` positions, row ``i`` at ``[cu_seqlens[i], cu_seqlens[i + 1])``;
    ``mask`` ``[N]``. ``starts``: ``cu_seqlens`` on the host when the caller has read it (else read when needed)."""

    packed = True
    width = None  # rows have no common length

    def __init__(self, mask: torch.Tensor, cu_seqlens: torch.Tensor, starts: Sequence[int] | None = None):
        self.mask = mask
        self.cu_seqlens = cu_seqlens
        self.lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.num = self.lengths.shape[0]
        self.seq_ids = torch.repeat_interleave(
            torch.arange(self.num, device=mask.device), self.lengths, output_size=mask.shape[0]
        )
        self._starts: list[int] | None = None if starts is None else list(starts)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(x, "sum", lengths=self.lengths)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        return _ExpandRows.apply(v, self.seq_ids, self.lengths)

    def _is_per_row(self, x: torch.Tensor) -> bool:
        # [S] (validation refuses packed batches with S = N, where [S] and [N] look alike)
        return x.dim() == 1 and x.shape[0] == self.num

    def row_starts(self) -> list[int]:
        if self._starts is None:
            self._starts = self.cu_seqlens.tolist()
        return self._starts

    def token_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        starts = self.row_starts()
        return x[starts[start] : starts[stop]]

    def select(self, start: int, stop: int) -> PackedRows:
        starts = self.row_starts()
        cu = self.cu_seqlens[start : stop + 1] - starts[start]
        selected = PackedRows(
            self.mask[starts[start] : starts[stop]], cu, [s - starts[start] for s in starts[start : stop + 1]]
        )
        selected.whole = False
        return selected


def rows_of(
    mask: torch.Tensor, cu_seqlens: torch.Tensor | None = None, starts: Sequence[int] | None = None
) -> PaddedRows | PackedRows:
    """The rows of a batch: packed when ``cu_seqlens`` is given (``starts``: its values, if already on the host),
    padded ``[B, T]`` otherwise."""
    return PaddedRows(mask) if cu_seqlens is None else PackedRows(mask, cu_seqlens, starts)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` ``[S + 1]`` (int64) of a packed batch whose ``position_ids`` ``[N]`` restart at 0 with every
    sequence (the flash-attention / HF packed convention)."""
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be 1-D [N], got shape {tuple(position_ids.shape)}")
    n = position_ids.shape[0]
    if n == 0:
        return torch.zeros(1, dtype=torch.long, device=position_ids.device)
    starts = (position_ids == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("position_ids must start a sequence (0) at position 0")
    end = torch.tensor([n], device=position_ids.device)
    return torch.cat([starts, end]).long()
