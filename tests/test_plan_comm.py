"""The planner's view of a vocabulary-parallel call (``plan/comm.py`` and its use in the cost model, ``explain`` and
``plan_call``): bytes per collective, the link per device profile, and every rank planning the same chunks."""

import pytest
import torch

from fused_gspo import explain
from fused_gspo.head import TorchTileOps
from fused_gspo.parallel import VocabShard
from fused_gspo.plan import comm, get_profile
from fused_gspo.plan.runtime import plan_call


def test_bytes_per_collective():
    # a chunk of 100 tokens over 8 ranks: 3 fp32 statistics per token to each of 7 others
    assert comm.statistics_exchange_bytes(100, 8, 4) == 7 * 100 * 3 * 4
    assert comm.statistics_exchange_bytes(100, 8, 4, comm.EXTRA_STATISTICS_FLOATS) == 7 * 100 * 7 * 4
    # dX in fp32: a ring all-reduce sends 2 (k - 1) / k of it, a reduce-scatter half that
    assert comm.hidden_grad_bytes(10, 4096, 8, 4) == pytest.approx(2 * 7 / 8 * 10 * 4096 * 4)
    assert comm.hidden_grad_bytes(10, 4096, 8, 4, sequence_parallel=True) == pytest.approx(7 / 8 * 10 * 4096 * 4)
    assert comm.per_token_bytes(4096, 8) == pytest.approx(7 * 3 * 4 + 2 * 7 / 8 * 4096 * 4)
    assert comm.per_token_bytes(4096, 1) == 0


def test_every_profile_has_a_link():
    assert get_profile("h100").link_bandwidth == 450e9  # NVLink 4, each way
    assert get_profile("b200").link_bandwidth == 900e9
    assert get_profile("l40s").link_bandwidth == 32e9  # PCIe Gen4 x16
    assert 0 < get_profile("cpu").link_rate < get_profile("a100").link_rate


def test_explain_shows_the_split():
    one = explain(8192, 4096, 151936, device="h100", loss_type="dapo")
    eight = explain(8192, 4096, 151936, device="h100", loss_type="dapo", tensor_parallel=8)
    names = [row.name for row in eight.stages]
    assert "statistics exchange" in names and "dX sum over ranks" in names and "handshake" in names
    assert not any(row.wire_bytes for row in one.stages) and one.wire_bytes == 0
    assert eight.shard_vocab == 18992 and eight.tensor_parallel == 8
    # what crosses the wire per token: the dX all-reduce (fp32) and 3 fp32 statistics per rank
    assert eight.wire_bytes_per_token == pytest.approx(comm.per_token_bytes(4096, 8), rel=1e-3)
    projection = {row.name: row for row in eight.stages}["projection"]
    assert projection.flops == pytest.approx(2 * 8192 * 4096 * 18992)
    assert eight.predicted_ms < one.predicted_ms / 4  # each rank does an eighth of the GEMMs, plus the traffic
    text = str(eight)
    assert "V=151936 over 8 ranks (18992 rows each)" in text and "MB sent" in text and "B per token" in text
    assert "MB sent" not in str(one)
    sequence = explain(8192, 4096, 151936, device="h100", loss_type="dapo", tensor_parallel=8, sequence_parallel=True)
    rows = {row.name: row for row in sequence.stages}
    # bf16 hidden states gathered, their gradient reduce-scattered: 7/8 of 2 bytes x N x H each
    assert rows["hidden gather"].wire_bytes == pytest.approx(7 / 8 * 8192 * 4096 * 2)
    assert rows["dX sum over ranks"].wire_bytes == pytest.approx(7 / 8 * 8192 * 4096 * 2)
    with pytest.raises(ValueError, match="tensor_parallel"):
        explain(8192, 4096, 151936, tensor_parallel=0)


class _ShardedOps:
    """Tile ops as a vocabulary-parallel call hands them to the planner (only ``.shard`` matters here)."""

    name, temporaries = "torch", 2
    grad_dtype = staticmethod(TorchTileOps.grad_dtype)

    def __init__(self, shard):
        self.shard = shard


@pytest.mark.parametrize("coupling", ["token", "sequence", "global"])
def test_every_rank_plans_the_same_chunks(coupling):
    """Uneven shards (37 rows over 4 ranks: 10, 10, 10, 7) plan on the largest one, so every rank cuts the same
    chunks and their collectives line up."""
    starts = (0, 10, 20, 30, 37)
    hidden = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    plans = []
    for rank in range(4):
        shard = VocabShard(group=None, rank=rank, size=4, starts=starts)
        weight = torch.randn(starts[rank + 1] - starts[rank], 8, dtype=torch.float64, requires_grad=True)
        plans.append(plan_call(hidden, weight, None, _ShardedOps(shard), workspace_bytes=10 * 8 * 3 * 7,
                               coupling=coupling, row_counts=[5] * 8, mode="fwd_bwd"))  # fmt: skip
    assert all(p.bounds == plans[0].bounds and p.strategy == plans[0].strategy for p in plans)
    assert len(plans[0].bounds) > 1 and max(b - a for a, b in plans[0].bounds) <= 7
