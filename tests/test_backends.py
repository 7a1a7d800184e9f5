"""Backend names: ``auto`` resolution, Triton's availability, the tile ops of each chunked backend."""

import pytest
import torch

from fused_gspo.backends import BACKENDS, resolve_backend, tile_ops_for, triton_tile_ops
from fused_gspo.head import TorchTileOps


def test_auto_backend_and_triton_availability():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if triton_tile_ops(required=False) is None:
        with pytest.raises(RuntimeError, match="backend='triton' is not available"):
            resolve_backend("triton", torch.device("cpu"))
    else:
        assert resolve_backend("triton", torch.device("cpu")) == "triton"


def test_every_backend_name_resolves_and_others_are_refused():
    for name in BACKENDS:
        assert resolve_backend(name, torch.device("cpu")) in ("eager", "torch", "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))


def test_tile_ops_of_the_chunked_backends():
    assert tile_ops_for("torch") is TorchTileOps
    assert tile_ops_for("triton").name == "triton"
    with pytest.raises(ValueError, match="no tile ops"):
        tile_ops_for("eager")
