"""The cost model: byte and FLOP counts against hand counts, roofline bounds, the floor, peak memory, and the
objective's kernel counts against a fresh profiler count."""

import collections

import pytest
import torch

from fused_gspo.head import TorchTileOps
from fused_gspo.plan import cost
from fused_gspo.plan.devices import get_profile
from fused_gspo.plan.runtime import chunk_format
from fused_gspo.triton_ops import TritonTileOps

# N=3 tokens, H=2, V=5 in bf16: small enough to count every byte by hand
SMALL = cost.Problem(tokens=3, hidden=2, vocab=5, dtype=torch.bfloat16)
# logits staged in fp32 (logits_dtype="float32")
TRITON_GPU = chunk_format(TritonTileOps, torch.bfloat16, True, torch.bfloat16, "float32")
TORCH_GPU = chunk_format(TorchTileOps, torch.bfloat16, True, torch.bfloat16, "float32")
TRITON_CPU = chunk_format(TritonTileOps, torch.bfloat16, False, torch.bfloat16, "float32")
# the default: logits staged in the 16-bit compute dtype, as TRL stages them
TRITON_GPU_16 = chunk_format(TritonTileOps, torch.bfloat16, True, torch.bfloat16)
TORCH_GPU_16 = chunk_format(TorchTileOps, torch.bfloat16, True, torch.bfloat16)
TRITON_CPU_16 = chunk_format(TritonTileOps, torch.bfloat16, False, torch.bfloat16)
# fp32 master weights under bf16 autocast: bf16 GEMMs, bf16 tile, fp32 inputs converted
AUTOCAST_GPU = chunk_format(TritonTileOps, torch.bfloat16, True, torch.float32)


def _by_name(stages):
    return {s.name: s for s in stages}


def test_chunk_formats_follow_backend_and_device():
    # Triton on CUDA, fp32 staging: fp32 tile, the 16-bit gradient written over it, bf16 GEMM operands
    assert (TRITON_GPU.grad_dtype, TRITON_GPU.operand_dtype, TRITON_GPU.temporaries) == (torch.bfloat16,) * 2 + (0,)
    assert TRITON_GPU.tile == torch.float32 and not TRITON_GPU.convert_grad and not TRITON_GPU.staged_16bit
    # torch on CUDA, fp32 staging: fp32 gradient cast for the GEMMs
    assert TORCH_GPU.grad_dtype == torch.float32 and TORCH_GPU.convert_grad
    # off CUDA the GEMMs run in fp32: the 16-bit gradient and the hidden rows are upcast
    assert TRITON_CPU.operand_dtype == torch.float32 and TRITON_CPU.convert_grad and TRITON_CPU.convert_hidden


def test_16bit_staging_is_the_default_for_16bit_compute():
    for fmt in (TRITON_GPU_16, TORCH_GPU_16, TRITON_CPU_16, AUTOCAST_GPU):
        # the projection writes the bf16 tile itself and the gradient overwrites it in place
        assert fmt.tile == fmt.projection == fmt.grad_dtype == torch.bfloat16 and fmt.staged_16bit
        assert fmt.stats_dtype == torch.float32
    assert TRITON_GPU_16.temporaries == 0 and TORCH_GPU_16.temporaries == 3  # the torch ops fold a float32 copy
    assert not TRITON_GPU_16.convert_grad and TRITON_CPU_16.convert_grad  # CPU's gradient GEMMs take fp32 operands
    assert AUTOCAST_GPU.convert_hidden and AUTOCAST_GPU.compute == torch.bfloat16
    # fp32 and fp64 compute keep their own dtype whatever the option says
    for dtype in (torch.float32, torch.float64):
        assert chunk_format(TritonTileOps, dtype, True, dtype).tile == dtype


def test_workspace_bytes_per_token_by_hand():
    V, H = 5, 2
    assert TRITON_GPU.bytes_per_token(V, H) == 4 * V  # the fp32 row; the gradient lives in its first half
    assert TORCH_GPU.bytes_per_token(V, H) == 4 * V * 3 + 2 * V  # tile + 2 temporaries + the bf16 cast
    assert TRITON_CPU.bytes_per_token(V, H) == 4 * V + 4 * V + 4 * H  # tile + fp32 gradient copy + fp32 hidden row
    assert TRITON_GPU_16.bytes_per_token(V, H) == 2 * V  # the bf16 row, the gradient in place
    assert TORCH_GPU_16.bytes_per_token(V, H) == 2 * V + 3 * 4 * V  # + three float32 temporaries
    assert TRITON_CPU_16.bytes_per_token(V, H) == 2 * V + 4 * V + 4 * H  # + the fp32 gradient and hidden copies


def test_16bit_stages_by_hand():
    stages = _by_name(cost.chunk_stages(SMALL, TRITON_GPU_16, 3, "single_pass"))
    # y[3, 5] = X[3, 2] @ W.T written in bf16; read once by the statistics, read and overwritten by the gradient
    assert stages["projection"].bytes == (6 + 10) * 2 + 15 * 2
    assert stages["statistics"].bytes == 15 * 2
    assert stages["logits gradient"].bytes == 15 * (2 + 2)


def test_one_chunk_schedule_writes_the_gradients_once():
    """One chunk holding every token: dX and dW written straight in the inputs' dtype, no accumulator and no
    gradient output pass; its forward alone has no gradient stages."""
    h100 = get_profile("h100")
    one = cost.schedule_cost(SMALL, TRITON_GPU_16, [3], "single_pass", "fwd_bwd", h100)
    names = [r.name for r in one.totals]
    assert "gradient output" not in names and "host" in names
    stages = _by_name(one.phases[0][2])
    assert stages["dW"].bytes == (15 + 6) * 2 + 10 * 2  # bf16 out, written once
    assert stages["dX"].bytes == (15 + 10) * 2 + 6 * 2
    forward = cost.schedule_cost(SMALL, TRITON_GPU_16, [3], "single_pass", "fwd", h100)
    assert [r.name for r in forward.totals] == ["projection", "statistics", "objective", "finish", "host"]
    # fp32 master weights: dW handed back in fp32, written once
    autocast = cost.Problem(3, 2, 5, torch.bfloat16, output_dtype=torch.float32)
    assert cost.grad_weight(autocast, AUTOCAST_GPU, 3, direct=True).bytes == (15 + 6) * 2 + 10 * 4
    # several chunks keep the fp32 accumulator and its output pass
    two = cost.schedule_cost(SMALL, TRITON_GPU_16, [2, 1], "single_pass", "fwd_bwd", h100)
    assert "gradient output" in [r.name for r in two.totals]


def test_host_wait_by_hand():
    """The device idles once per host read, then only where the host launches slower than the device runs."""
    h100 = get_profile("h100")
    read, launch = h100.host_read_us * 1e-6, h100.host_launch_us * 1e-6
    slow = cost.Stage("gemm", flops=742e12 * 1e-3, operands="bf16")  # 1 ms: hides every launch after it
    tiny = cost.Stage("tiny", kernels=10)  # 10 kernels of 3 us each, launched every 20 us
    alone = cost.host_wait([tiny], h100).host_seconds
    # the last kernel ends one run after its launch, 10 launches in: idle = 10 launches + 1 run - 10 runs
    assert alone == pytest.approx(cost.HOST_READS_PER_CALL * read + 10 * launch + 3e-6 - 10 * 3e-6)
    behind = cost.host_wait([slow, tiny], h100).host_seconds
    assert behind == pytest.approx(cost.HOST_READS_PER_CALL * read + launch)  # only the first launch waits


def test_single_pass_chunk_stages_by_hand():
    stages = _by_name(cost.chunk_stages(SMALL, TRITON_GPU, 3, "single_pass"))
    assert list(stages) == ["projection", "statistics", "objective", "logits gradient", "dX", "dW"]
    # y[3, 5] = X[3, 2] @ W.T: 2*3*5*2 FLOPs; reads X and W in bf16, writes y in fp32
    assert stages["projection"].flops == 60 and stages["projection"].bytes == (6 + 10) * 2 + 15 * 4
    assert stages["statistics"].bytes == 15 * 4 and stages["statistics"].exps == 15
    assert stages["logits gradient"].bytes == 15 * (4 + 2)  # fp32 read, bf16 write
    # dX[3, 2] = G[3, 5] @ W[5, 2]: reads G and W in bf16, writes its rows of dX in fp32 once
    assert stages["dX"].flops == 60 and stages["dX"].bytes == (15 + 10) * 2 + 6 * 4
    # dW[5, 2] += G.T[5, 3] @ X[3, 2]: reads G and X, reads and writes the fp32 dW
    assert stages["dW"].flops == 60 and stages["dW"].bytes == (15 + 6) * 2 + 10 * 4 * 2
    assert stages["objective"].kernels == cost.OBJECTIVE_KERNELS_PER_CHUNK


def test_optional_stages_by_hand():
    with_bias = cost.Problem(3, 2, 5, torch.bfloat16, bias=True, softcap=True)
    torch_stages = _by_name(cost.chunk_stages(with_bias, TORCH_GPU, 3, "recompute"))
    assert "statistics" not in torch_stages and "objective" not in torch_stages
    assert torch_stages["gradient cast"].bytes == 15 * (4 + 2)
    assert torch_stages["bias gradient"].bytes == 15 * 2
    # the bias is added in a second pass over the fp32 tile (read and write) after reading the bf16 bias
    assert torch_stages["projection"].bytes == (6 + 10) * 2 + 15 * 4 + 15 * 4 * 2 + 5 * 2
    assert torch_stages["logits gradient"].exps == 30  # the softcap's tanh costs a second exp
    out = cost.gradient_output(with_bias, TORCH_GPU)
    assert out.bytes == (10 + 6 + 5) * (4 + 2) and out.kernels == 3


def test_two_phase_recomputes_the_projection():
    single = cost.schedule_cost(SMALL, TRITON_GPU, [2, 1], "single_pass", "fwd_bwd", get_profile("h100"))
    two = cost.schedule_cost(SMALL, TRITON_GPU, [2, 1], "two_phase", "fwd_bwd", get_profile("h100"))
    flops = {c: sum(r.flops for r in costing.totals) for c, costing in (("single", single), ("two", two))}
    assert flops == {"single": 6 * 3 * 2 * 5, "two": 8 * 3 * 2 * 5}  # 6NHV against 8NHV
    assert [r.count for r in single.totals if r.name == "objective"] == [2]


def test_roofline_picks_the_binding_resource():
    h100 = get_profile("h100")
    gemm = cost.Stage("g", flops=742e12 * 1e-3, bytes=1e6, operands="bf16")
    seconds, bound = gemm.seconds(h100)
    assert bound == "compute" and seconds == pytest.approx(1e-3 + 3e-6, rel=0.01)
    stream = cost.Stage("s", bytes=3.0e9, exps=1e6)
    assert stream.seconds(h100)[1] == "memory"
    assert cost.Stage("k", kernels=40).seconds(h100) == pytest.approx((40 * 3e-6, "launch"))


def test_reference_shape_figures():
    """The figures the GPU plan was reasoned with (N=8192, H=4096, V=151936, bf16, H100): the floor is ~41 ms; each
    chunk's dW read-modify-write moves 2 x 2.5 GB, memory-bound below ~1,000 tokens per chunk."""
    ref = cost.Problem(8192, 4096, 151936, torch.bfloat16)
    h100 = get_profile("h100")
    floor = cost.floor_cost(ref, "fwd_bwd", h100)
    assert 40 < floor.ms < 43
    small = cost.grad_weight(ref, TRITON_GPU, 590)
    assert small.bytes == pytest.approx(8 * 151936 * 4096 + 2 * 590 * (151936 + 4096))
    assert small.seconds(h100)[1] == "memory"
    assert cost.grad_weight(ref, TRITON_GPU, 2048).seconds(h100)[1] == "compute"


def test_peak_counts_workspace_accumulators_and_outputs():
    p = cost.Problem(100, 8, 50, torch.bfloat16)
    workspace = 10 * TRITON_GPU.bytes_per_token(50, 8)
    accumulators = (50 * 8 + 100 * 8) * 4
    outputs = (50 * 8 + 100 * 8) * 2
    stats = 100 * 8 * 4
    peak = cost.peak_bytes(p, TRITON_GPU, 10, "single_pass", "fwd_bwd", weight_copy=False)
    assert peak == max(workspace + stats + accumulators, accumulators + outputs + stats)
    # one chunk of every token: the tile lives until the backward writes the outputs; no accumulators
    whole = 100 * TRITON_GPU_16.bytes_per_token(50, 8)
    one_chunk = cost.peak_bytes(p, TRITON_GPU_16, 100, "single_pass", "fwd_bwd", weight_copy=False)
    assert one_chunk == whole + stats + outputs


_VIEWS = {
    "aten::view", "aten::slice", "aten::select", "aten::as_strided", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::t", "aten::transpose", "aten::detach", "aten::alias", "aten::_reshape_alias",
    "aten::reshape", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::permute", "aten::expand_as",
    "aten::view_as", "aten::result_type", "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
    "aten::detach_", "aten::to", "aten::requires_grad_", "aten::contiguous", "aten::new_empty",
}  # fmt: skip


def _kernels(fn) -> int:
    """Leaf ATen ops that are not views: what would be a kernel launch on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    parents = {e.id for e in events for c in e.cpu_children if c.name.startswith("aten::")}
    counted = collections.Counter(e.name for e in events if e.id not in parents and e.name not in _VIEWS)
    return sum(counted.values())


def test_objective_kernel_counts_match_a_fresh_count(monkeypatch):
    """The model's per-chunk and final kernel counts stay within 40% of what the GSPO objective launches today."""
    import fused_gspo
    from fused_gspo import policy

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 16, 8, 64
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T)
    old = torch.randn(B, T, generator=g) * 0.1 - 4
    counts = {"grad": [], "finish": []}
    original_grad, original_finish = policy.PolicyChunkObjective.grad, policy.PolicyChunkObjective.finish
    original_metrics = policy.policy_metrics

    def grad(self, *args):
        out = []
        counts["grad"].append(_kernels(lambda: out.append(original_grad(self, *args))))
        return out[0]

    def finish(self, *args):
        out = []
        counts["finish"].append(_kernels(lambda: out.append(original_finish(self, *args))))
        return out[0]

    def metrics(*args, **kwargs):
        out = []
        counts["finish"].append(_kernels(lambda: out.append(original_metrics(*args, **kwargs))))
        return out[0]

    monkeypatch.setattr(policy.PolicyChunkObjective, "grad", grad)
    monkeypatch.setattr(policy.PolicyChunkObjective, "finish", finish)
    monkeypatch.setattr(policy, "policy_metrics", metrics)
    fused_gspo.fused_policy_loss(
        hidden, weight, ids, torch.randn(B, generator=g), mask, old_logps=old, backend="torch",
        loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=T * V * 12,
    )  # fmt: skip
    assert len(counts["grad"]) == B  # one row per chunk
    per_chunk, final = max(counts["grad"]), sum(counts["finish"])
    assert abs(per_chunk - cost.OBJECTIVE_KERNELS_PER_CHUNK) <= 0.4 * per_chunk, per_chunk
    assert abs(final - cost.FINISH_KERNELS) <= 0.4 * final, final
