"""``kernels/scale_cast.py``: the gradients handed back, ``(acc * scale).to(dtype)`` in one pass.

The result must equal PyTorch's fp32 product rounded to nearest even, bit for bit: the kernel rounds once, as
``torch.mul(acc, scale).to(dtype)`` does (under the interpreter bf16 is rounded in software, see
``launch_config.LAUNCH_CONFIGS["interpreter"]["scale_cast"]``). Run under the Triton interpreter without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from fused_gspo.kernels.scale_cast import scale_cast  # noqa: E402
from fused_gspo.triton_ops import TritonTileOps  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@settings(max_examples=12)
@given(
    # sizes around the interpreter's block (65,536 elements): a partial last block, one exact block, several
    n=st.integers(1, 200_000),
    dtype=st.sampled_from(DTYPES),
    scale=st.floats(1e-3, 1e3).map(lambda s: s * (1 if s > 1 else -1)),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=65_536, dtype=torch.bfloat16, scale=0.25, seed=0)
def test_equals_the_float32_product_rounded_to_nearest_even(n, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    acc = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 4, (n,), generator=gen)).to(DEVICE)
    s = torch.tensor(scale, device=DEVICE)
    out = scale_cast(acc, s, dtype)
    expected = torch.mul(acc, s).to(dtype)
    assert out.dtype == dtype and out.shape == acc.shape
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip


def test_shape_is_kept_and_nonfinite_values_pass_through():
    acc = torch.randn(3, 70_000, device=DEVICE)
    acc[0, 5], acc[1, 6], acc[2, 7] = float("inf"), float("-inf"), float("nan")
    out = scale_cast(acc, torch.tensor(2.0, device=DEVICE), torch.bfloat16)
    assert out.shape == (3, 70_000)
    assert out[0, 5] == float("inf") and out[1, 6] == float("-inf") and torch.isnan(out[2, 7])
    finite = torch.isfinite(acc)
    assert torch.equal(out[finite], (acc[finite] * 2).bfloat16())


def test_tile_ops_fall_back_where_the_kernel_does_not_apply():
    """A float64 accumulator (fp64 inputs) and a strided one go through torch.mul."""
    acc64 = torch.randn(100, dtype=torch.float64, device=DEVICE)
    assert torch.equal(TritonTileOps.scale_cast(acc64, torch.tensor(3.0, device=DEVICE), torch.float32),
                       (acc64 * 3).float())  # fmt: skip
    strided = torch.randn(50, 40, device=DEVICE).t()
    assert torch.equal(TritonTileOps.scale_cast(strided, torch.tensor(0.5, device=DEVICE), torch.bfloat16),
                       (strided * 0.5).bfloat16())  # fmt: skip


@pytest.mark.parametrize(
    "acc, scale, dtype, match",
    [
        (torch.randn(4, dtype=torch.float64), torch.tensor(1.0), torch.bfloat16, "acc must be a contiguous float32"),
        (torch.randn(4, 4).t(), torch.tensor(1.0), torch.bfloat16, "acc must be a contiguous float32"),
        (torch.randn(4), torch.ones(2), torch.bfloat16, "scale must be one element"),
        (torch.randn(4), torch.tensor(1.0), torch.int32, "dtype must be bfloat16, float16 or float32"),
    ],
    ids=["float64_acc", "strided_acc", "two_element_scale", "integer_dtype"],
)
def test_bad_arguments_are_named(acc, scale, dtype, match):
    with pytest.raises(ValueError, match=match):
        scale_cast(acc.to(DEVICE), scale.to(DEVICE), dtype)
