"""The tile-ops contract: both backends implement it, and say which dtype their gradient comes in."""

import pytest
import torch

from fused_gspo.head import HeadParams, TorchTileOps
from fused_gspo.tile_ops import TileOps, has_fused_logprobs, stats_dtype_for
from fused_gspo.triton_ops import TritonTileOps


# both backends' tile ops
@pytest.mark.parametrize("ops", [TorchTileOps, TritonTileOps], ids=["torch", "triton"])
def test_both_backends_implement_the_contract(ops):
    assert isinstance(ops, TileOps)  # the classes themselves, with static methods, are the ops
    for name in ("name", "temporaries", "grad_dtype", "forward", "backward_"):
        assert hasattr(ops, name), name
    assert ops.temporaries >= 0
    for dtype in (torch.float32, torch.float64):
        assert ops.grad_dtype(dtype) == stats_dtype_for(dtype)


def test_gradient_dtype_per_backend():
    # Triton writes the 16-bit GEMM operand itself; the torch ops write the fp32 tile and leave the cast to the driver
    for dtype in (torch.bfloat16, torch.float16):
        assert TritonTileOps.grad_dtype(dtype) == dtype
        assert TorchTileOps.grad_dtype(dtype) == torch.float32
    assert has_fused_logprobs(TritonTileOps) and not has_fused_logprobs(TorchTileOps)


def test_torch_ops_refuse_a_gradient_dtype_they_cannot_write():
    y = torch.randn(2, 5)
    targets = torch.tensor([0, 4])
    logp, entropy, lse = TorchTileOps.forward(y, targets, HeadParams())
    with pytest.raises(ValueError, match="tile's dtype"):
        TorchTileOps.backward_(y, targets, lse, entropy, logp, None, HeadParams(), torch.bfloat16)
