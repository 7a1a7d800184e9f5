"""Rows of a batch: the padded layout is TRL's own expressions, the packed one the same sums without padding."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fused_gspo.rows import PackedRows, PaddedRows, cu_seqlens_from_position_ids


@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_packed_sums_and_broadcasts_equal_the_padded_ones(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    S, T = len(lengths), max(max(lengths), 1)
    padded_mask = (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).double()
    values = torch.randn(S, T, generator=g, dtype=torch.float64) * padded_mask
    cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths).cumsum(0)])
    packed = PackedRows(padded_mask[padded_mask.bool()], cu)
    padded = PaddedRows(padded_mask)
    flat = values[padded_mask.bool()]
    assert torch.allclose(packed.sum(flat), padded.sum(values), rtol=0, atol=1e-12)
    row_values = torch.randn(S, generator=g, dtype=torch.float64)
    assert torch.equal(packed.expand(row_values), padded.expand(row_values).expand(S, T)[padded_mask.bool()])
    # the broadcast's gradient is the segmented sum (deterministic, no atomics)
    leaf = row_values.clone().requires_grad_()
    weights = torch.randn(flat.shape, generator=g, dtype=torch.float64)
    (packed.expand(leaf) * weights).sum().backward()
    assert torch.allclose(leaf.grad, packed.sum(weights), rtol=0, atol=1e-12)


def test_row_selection_keeps_offsets_local():
    cu = torch.tensor([0, 2, 2, 5, 6])
    rows = PackedRows(torch.ones(6), cu)
    assert rows.row_starts() == [0, 2, 2, 5, 6] and rows.num == 4
    sub = rows.select(1, 3)
    assert sub.cu_seqlens.tolist() == [0, 0, 3] and sub.mask.shape == (3,)
    x = torch.arange(6.0)
    assert rows.token_rows(x, 2, 4).tolist() == [2.0, 3.0, 4.0, 5.0]
    assert rows.is_per_row(torch.zeros(4)) and not rows.is_per_row(torch.zeros(6))


def test_padded_rows_read_per_row_values_as_trl_does():
    rows = PaddedRows(torch.ones(3, 5))
    assert rows.is_per_row(torch.zeros(3)) and rows.is_per_row(torch.zeros(3, 1))
    assert not rows.is_per_row(torch.zeros(3, 5))
    assert rows.broadcast(torch.ones(3), True).shape == (3, 1) and rows.broadcast(torch.ones(3, 5), False).shape == (
        3,
        5,
    )
    assert rows.row_starts() == [0, 5, 10, 15]


def test_cu_seqlens_from_position_ids():
    position_ids = torch.tensor([0, 1, 2, 0, 0, 1])
    assert cu_seqlens_from_position_ids(position_ids).tolist() == [0, 3, 4, 6]
    assert cu_seqlens_from_position_ids(torch.zeros(0, dtype=torch.long)).tolist() == [0]
    with pytest.raises(ValueError, match="start a sequence"):
        cu_seqlens_from_position_ids(torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="1-D"):
        cu_seqlens_from_position_ids(torch.zeros(2, 3, dtype=torch.long))


def test_a_selection_of_rows_cannot_tell_per_row_from_per_token():
    """Rows 0-2 of sequences of 1, 0, 2 and 3 tokens hold 3 positions: a [3] tensor of theirs could be per row or per
    token, so a selection refuses to guess (issue 23); the whole batch (S != N, validated) still reads shapes."""
    rows = PackedRows(torch.ones(6), torch.tensor([0, 1, 1, 3, 6]))
    assert rows.is_per_row(torch.zeros(4)) and not rows.is_per_row(torch.zeros(6))
    for sub in (rows.select(0, 3), PaddedRows(torch.ones(3, 5)).select(1, 3)):
        with pytest.raises(RuntimeError, match="selection of rows"):
            sub.is_per_row(torch.zeros(3))
    sub = rows.select(0, 3)
    values = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(sub.broadcast(values, per_row=False), values)
    assert torch.equal(sub.broadcast(values, per_row=True), torch.tensor([1.0, 3.0, 3.0]))
