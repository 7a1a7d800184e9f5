"""The host's one read of a batch: the counts equal a direct computation, every bad value is refused by name, and a
whole call (forward and backward) reads the device exactly once."""

import contextlib

import pytest
import torch
from conftest import draw_problem
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import fused_gspo
from fused_gspo.host_values import read_batch, read_together, valid_positions


@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1))
def test_read_together_returns_each_tensor_exactly(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randint(-(2**40), 2**40, (n,), generator=g) for n in sizes]  # exact in float64
    assert read_together(*parts) == [p.tolist() for p in parts]


def _packed_batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    mask = (torch.rand(n, generator=g) > 0.3).long()
    ids = torch.randint(0, 7, (n,), generator=g)
    return cu, mask, ids


@given(
    lengths=st.lists(st.integers(0, 6), min_size=2, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    num_items=st.sampled_from([None, 3, 12.5, "tensor"]),
)
def test_policy_counts_equal_a_direct_computation(lengths, seed, num_items):
    cu, mask, ids = _packed_batch(lengths, seed)
    items = torch.tensor(17) if num_items == "tensor" else num_items
    counts = read_batch(
        hidden=torch.zeros(len(ids), 2), vocab=7, completion_ids=ids, completion_mask=mask, cu_seqlens=cu,
        num_items_in_batch=items,
    )  # fmt: skip
    expected = [int(mask[a:b].sum()) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    assert counts.row_counts == tuple(expected)
    assert counts.row_starts == tuple(cu.tolist())
    assert counts.valid_tokens == int(mask.sum())
    assert counts.num_items == (17.0 if num_items == "tensor" else num_items)
    # the padded layout: per row of [B, T]
    padded = torch.stack([mask[: len(mask) // 2 * 2 : 2], mask[1 : len(mask) // 2 * 2 : 2]])
    counts = read_batch(
        hidden=torch.zeros(*padded.shape, 2), vocab=7, completion_ids=torch.zeros_like(padded),
        completion_mask=padded.bool(), cu_seqlens=None, num_items_in_batch=None,
    )  # fmt: skip
    assert counts.row_counts == tuple(padded.sum(1).tolist()) and counts.row_starts is None


@given(valid=st.lists(st.booleans(), min_size=0, max_size=40))
def test_valid_positions_equal_nonzero(valid):
    flat = torch.tensor(valid, dtype=torch.bool)
    assert torch.equal(valid_positions(flat, int(flat.sum())), flat.nonzero().flatten())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(cu_seqlens=torch.tensor([1, 3, 6])), "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), "never decrease"),
        (dict(cu_seqlens=torch.tensor([0, 3, 5])), r"end at the number of packed positions \(6\)"),
        (dict(completion_mask=torch.tensor([1, 0, 2, 1, 1, 0])), "completion_mask must hold only 0 and 1"),
        (dict(completion_ids=torch.tensor([0, 1, 7, 3, 4, 5])), "completion_ids holds token id 7"),
        (dict(completion_ids=torch.tensor([-2, 0, 1, 3, 4, 5])), "completion_ids holds token id -2"),
        (dict(hidden=torch.zeros(5, 2)), r"one row per valid token \(4\) or one per packed position \(6\), got 5"),
        (dict(num_items_in_batch=torch.tensor(-1.0)), "num_items_in_batch must be >= 0"),
    ],
)
def test_bad_values_are_refused_by_name(change, match):
    batch = dict(
        hidden=torch.zeros(6, 2), vocab=7, completion_ids=torch.tensor([0, 1, 2, 3, 4, 5]),
        completion_mask=torch.tensor([1, 0, 1, 1, 1, 0]), cu_seqlens=torch.tensor([0, 3, 6]), num_items_in_batch=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        read_batch(**{**batch, **change})
    # a masked id out of range is not an error
    read_batch(**{**batch, "completion_ids": torch.tensor([0, 9, 2, 3, 4, 5])})


def test_preference_read_counts_rows_and_checks_the_packed_count():
    ids = torch.ones(4, 2).long()
    mask = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 1]])  # an empty row is the loss's to judge, not the read's
    with pytest.raises(ValueError, match=r"one row per valid token \(4\), got 6"):
        read_batch(hidden=torch.zeros(6, 3), vocab=5, completion_ids=ids, completion_mask=mask)
    with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
        read_batch(hidden=torch.zeros(4, 2, 3), vocab=5, completion_ids=ids, completion_mask=mask * 3)
    counts = read_batch(hidden=torch.zeros(4, 3), vocab=5, completion_ids=ids, completion_mask=mask)
    assert counts.row_counts == (2, 0, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# One read per call


class _Reads(TorchDispatchMode):
    """Counts host reads of tensor values: the ops that copy a value to the host (``item``, a data-dependent
    ``nonzero``) and ``tolist`` (which reads without dispatching). On a GPU each one waits for the device."""

    _OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
            "aten.equal.default", "aten.masked_select.default"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self._OPS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_reads(monkeypatch):
    mode = _Reads()
    original = torch.Tensor.tolist

    def tolist(self):
        mode.reads.append("tolist")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with mode:
        yield mode.reads


def _policy_inputs(packed: bool):
    problem = draw_problem(3, 8, 6, 13, seed=5)
    problem = {k: (v.float() if v.is_floating_point() else v) for k, v in problem.items() if v is not None}
    problem["hidden"].requires_grad_(True)
    problem["weight"].requires_grad_(True)
    if packed:  # every row's positions back to back; the mask keeps its holes
        cu = torch.tensor([0, 8, 16, 24])
        flat = {k: problem[k].reshape(24, *problem[k].shape[2:]) for k in ("completion_ids", "completion_mask",
                                                                            "old_logps")}  # fmt: skip
        hidden = problem["hidden"].detach().reshape(24, -1).requires_grad_(True)
        problem = {**problem, **flat, "hidden": hidden, "cu_seqlens": cu}
    return problem


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "objective",
    [dict(loss_type="dapo"), dict(loss_type="grpo", importance_sampling_level="sequence"),
     dict(loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=5 * 13 * 12)],
    ids=["token", "sequence", "two_phase"],
)  # fmt: skip
def test_a_policy_call_reads_the_device_once(monkeypatch, packed, objective):
    """Forward and backward together: one read before the first chunk (the checks and the counts), none after."""
    problem = _policy_inputs(packed)
    with _counting_reads(monkeypatch) as reads:
        out = fused_gspo.fused_policy_loss(**problem, num_items_in_batch=torch.tensor(40), backend="torch", **objective)
        forward = list(reads)
        out.loss.backward()
    assert forward == ["tolist"], forward
    assert reads == forward, reads[len(forward) :]


def test_logprobs_and_preference_calls_read_the_device_once(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (4, 6), generator=g)
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    with _counting_reads(monkeypatch) as reads:
        fused_gspo.fused_logprobs(hidden, weight, ids, backend="torch").sum().backward()
        assert reads == ["tolist"], reads
        out = fused_gspo.fused_preference_loss(
            hidden, weight, ids, mask, ref_chosen_logps=torch.randn(2, generator=g),
            ref_rejected_logps=torch.randn(2, generator=g), backend="torch",
        )  # fmt: skip
        out.loss.backward()
    assert reads == ["tolist", "tolist"], reads


@pytest.mark.gpu
def test_a_num_items_tensor_on_the_cpu_beside_cuda_inputs():
    """TRL hands num_items_in_batch on the inputs' device, a custom loop may hand a CPU scalar: both are read."""
    problem = {k: v.to("cuda") for k, v in draw_problem(3, 5, 8, 23, seed=1).items()}
    on_cpu = fused_gspo.fused_policy_loss(**problem, num_items_in_batch=torch.tensor(11.0), loss_type="dapo")
    as_float = fused_gspo.fused_policy_loss(**problem, num_items_in_batch=11.0, loss_type="dapo")
    assert torch.equal(on_cpu.loss, as_float.loss)
