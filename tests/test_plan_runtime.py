"""The planner at call time: the chunk format a call runs with, and the one re-plan after running out of memory
(the re-plan logic on CPU, with the device's free memory and the allocator's failure stood in for)."""

import warnings

import pytest
import torch
from conftest import draw_problem, run_policy_loss, workspace_for

import fused_gspo
from fused_gspo import chunked
from fused_gspo.plan import runtime

V, H = 29, 8


@pytest.fixture
def scarce_memory(monkeypatch):
    """A device with ``free`` bytes free, whose allocator fails any workspace of more than ``limit`` tokens' rows
    (as a fragmented CUDA allocator would fail a budget that looked free)."""
    state = {"free": None, "limit": None, "failures": 0}
    monkeypatch.setattr(runtime, "free_device_bytes", lambda device: state["free"])
    monkeypatch.setattr(runtime, "_warned_oom", False)
    original = chunked._Workspace.__init__

    def init(self, hidden, weight, bias, call):
        widest = max((stop - start for start, stop in call.bounds), default=0)
        if state["limit"] is not None and widest > state["limit"]:
            state["failures"] += 1
            raise torch.OutOfMemoryError(f"stand-in: {widest} tokens of logits do not fit")
        original(self, hidden, weight, bias, call)

    monkeypatch.setattr(chunked._Workspace, "__init__", init)
    return state


def _row() -> int:
    return workspace_for(1, "torch", torch.float64, V, H)  # one token of float64 logits and their temporaries


# the single pass and the two phases (an entropy quantile), each re-planned after the allocator fails
@pytest.mark.parametrize("cfg", [dict(loss_type="dapo"), dict(loss_type="grpo", top_entropy_quantile=0.5)])
def test_out_of_memory_plans_again_within_the_free_memory_and_warns_once(scarce_memory, cfg):
    problem = draw_problem(3, 5, H, V, seed=2)
    ref, ref_grads = run_policy_loss(problem, torch.float64, "eager", **cfg)
    scarce_memory.update(limit=6, free=4 * 6 * _row())  # a quarter of it holds 6 tokens per chunk
    with pytest.warns(RuntimeWarning, match="ran out of device memory; planned again"):
        out, grads = run_policy_loss(problem, torch.float64, "torch", **cfg, workspace_bytes=15 * _row())
    assert scarce_memory["failures"] == 1
    assert torch.allclose(out.loss, ref.loss, rtol=1e-10) and torch.allclose(out.logps, ref.logps, rtol=1e-10)
    assert all(torch.allclose(g, r, rtol=1e-9, atol=1e-12) for g, r in zip(grads, ref_grads, strict=True))
    # warned once per process: the next failure re-plans silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_policy_loss(problem, torch.float64, "torch", **cfg, workspace_bytes=15 * _row())
    assert scarce_memory["failures"] == 2


def test_out_of_memory_that_no_smaller_plan_helps_is_raised(scarce_memory):
    problem = draw_problem(2, 4, H, V, seed=3)
    scarce_memory.update(limit=2, free=None)  # no free-memory reading (CPU): nothing to plan with
    with pytest.raises(torch.OutOfMemoryError, match="stand-in"):
        run_policy_loss(problem, torch.float64, "torch", loss_type="dapo", workspace_bytes=8 * _row())
    scarce_memory.update(free=8 * 4 * _row())  # the free memory holds no less than the failed budget
    with pytest.raises(torch.OutOfMemoryError, match="stand-in"):
        run_policy_loss(problem, torch.float64, "torch", loss_type="dapo", workspace_bytes=8 * _row())
    scarce_memory.update(limit=0, free=4 * 4 * _row())  # the smaller plan fails too: raised, not retried again
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match="stand-in"):
        run_policy_loss(problem, torch.float64, "torch", loss_type="dapo", workspace_bytes=8 * _row())


def test_a_vocabulary_parallel_call_raises_out_of_memory_instead_of_planning_again_alone(scarce_memory):
    """One rank re-planning on its own free memory would cut other chunks than the ranks it exchanges statistics
    with: mismatched collectives (a hang, or statistics of other tokens). Under an active shard the error is raised."""
    from fused_gspo.parallel import VocabShard, running_on

    scarce_memory.update(free=4 * 6 * _row())  # a quarter of it holds 6 tokens per chunk
    hidden, weight = torch.randn(12, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)

    def plan_for(budget):
        return runtime.plan_call(hidden, weight, None, fused_gspo.head.TorchTileOps, workspace_bytes=budget,
                                 coupling="token", row_counts=None, mode="fwd_bwd")  # fmt: skip

    attempts = []

    def run(plan):
        attempts.append(plan)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("stand-in: the first plan")
        return "ran again"

    with pytest.warns(RuntimeWarning, match="planned again"):  # one process: planned again
        assert runtime.run_planned(run, plan_for(12 * _row()), plan_for, "cpu") == "ran again"
    assert len(attempts) == 2 and attempts[1].num_chunks > attempts[0].num_chunks
    attempts.clear()
    with running_on(VocabShard(group=None, rank=0, size=2, starts=(0, 15, V))):
        with pytest.raises(torch.OutOfMemoryError, match="the first plan"):
            runtime.run_planned(run, plan_for(12 * _row()), plan_for, "cpu")
    assert len(attempts) == 1


def test_fused_logprobs_and_preference_losses_plan_again_too(scarce_memory):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(10, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g).double()
    ids = torch.randint(0, V, (10,), generator=g)
    ref = fused_gspo.fused_logprobs(hidden, weight, ids, backend="eager")
    scarce_memory.update(limit=3, free=4 * 3 * _row())
    with pytest.warns(RuntimeWarning, match="planned again"):
        got = fused_gspo.fused_logprobs(hidden, weight, ids, backend="torch", workspace_bytes=10 * _row())
    assert torch.allclose(got, ref, rtol=1e-12)
    mask = torch.ones(2, 5, dtype=torch.long)
    out = fused_gspo.fused_preference_loss(
        hidden.view(2, 5, H), weight, ids.view(2, 5), mask, backend="torch", workspace_bytes=10 * _row(),
        ref_chosen_logps=torch.tensor([-3.0]), ref_rejected_logps=torch.tensor([-4.0]), loss_type="sigmoid",
    )  # fmt: skip
    eager = fused_gspo.fused_preference_loss(
        hidden.view(2, 5, H), weight, ids.view(2, 5), mask, backend="eager",
        ref_chosen_logps=torch.tensor([-3.0]), ref_rejected_logps=torch.tensor([-4.0]), loss_type="sigmoid",
    )  # fmt: skip
    assert torch.allclose(out.loss, eager.loss, rtol=1e-10)
    assert scarce_memory["failures"] == 2


def test_the_plan_carries_the_format_the_driver_runs():
    """The chunk format (compute and staging dtypes) is decided with the plan, autocast included, and the driver
    allocates its tile in that staging dtype."""
    hidden, weight = torch.randn(6, H), torch.randn(V, H)
    from fused_gspo.head import TorchTileOps

    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = runtime.plan_call(hidden, weight, None, TorchTileOps, workspace_bytes="auto", coupling="token",
                                 row_counts=None, mode="fwd_bwd", needs=(True, True, False))  # fmt: skip
    assert plan.fmt.compute == plan.fmt.tile == torch.bfloat16
    plain = runtime.plan_call(hidden, weight, None, TorchTileOps, workspace_bytes="auto", coupling="token",
                              row_counts=None, mode="fwd_bwd", logits_dtype="float32")  # fmt: skip
    assert plain.fmt.compute == plain.fmt.tile == torch.float32
    call = chunked.ChunkedHead(fused_gspo.head.HeadParams(), TorchTileOps, ((0, 6),), fmt=plan.fmt)
    assert chunked._Workspace(hidden, weight, None, call).buffer.dtype == torch.bfloat16


def test_free_memory_respects_the_per_process_memory_fraction(monkeypatch):
    """``free_device_bytes``: the driver's free memory plus the allocator's unused cache, and no more than a
    ``set_per_process_memory_fraction`` cap leaves (what the re-plan after an out-of-memory error plans within).
    The CUDA queries are stood in for."""
    gib = 1 << 30
    state = {"fraction": 1.0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 8 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: state["fraction"],
                        raising=False)  # fmt: skip
    cuda = torch.device("cuda", 0)
    assert runtime.free_device_bytes(torch.device("cpu")) is None
    assert runtime.free_device_bytes(cuda) == 62 * gib  # no cap: 60 free + 2 cached
    state["fraction"] = 0.25  # a cap of 20 GiB, 10 reserved: 10 more can be reserved, plus the 2 cached
    assert runtime.free_device_bytes(cuda) == 12 * gib
    state["fraction"] = 0.1  # a cap under what is reserved: only the cache is left
    assert runtime.free_device_bytes(cuda) == 2 * gib


@pytest.mark.gpu
def test_gpu_out_of_memory_under_a_memory_fraction_plans_again_and_warns_once(monkeypatch):
    """On CUDA, under ``torch.cuda.set_per_process_memory_fraction``: an explicit budget whose one chunk (the whole
    batch's 500 MiB bf16 tile) cannot fit under the cap runs out of memory once, is planned again within the memory
    the cap leaves, warns once, and gives the unconstrained call's result (to the rounding of other chunks)."""
    monkeypatch.setattr(runtime, "_warned_oom", False)
    B, T, H, V = 16, 512, 512, 32_000
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, T, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) * (2 / H**0.5)).bfloat16()
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    advantages, mask = torch.randn(B, device="cuda", generator=g), torch.ones(B, T, device="cuda")

    def run(budget):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fused_gspo.fused_policy_loss(h, w, ids, advantages, mask, backend="triton", loss_type="dapo",
                                           workspace_bytes=budget)  # fmt: skip
        return (out.loss.detach(), out.logps.detach(), *torch.autograd.grad(out.loss, (h, w)))

    ref = run("auto")
    one_chunk = workspace_for(B * T, "triton", torch.bfloat16, V, H)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    previous = (
        torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") else 1.0
    )
    # room for the clones, the gradients, an fp32 dW accumulator and chunks of ~1/6 of the batch; not for one chunk
    headroom = 400 << 20
    assert B * T * V * 2 > headroom
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + headroom) / total)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run(one_chunk)
            again = run(one_chunk)  # out of memory again, planned again without a second warning
    finally:
        torch.cuda.set_per_process_memory_fraction(previous)
        torch.cuda.empty_cache()
    warned = [str(w.message) for w in caught if "ran out of device memory" in str(w.message)]
    assert len(warned) == 1, [str(w.message) for w in caught]
    for result in (got, again):
        for name, tol, value, expected in zip(("loss", "logps", "dX", "dW"), (1e-3, 1e-3, 1e-2, 1e-2), result, ref,
                                              strict=True):  # fmt: skip
            assert float((value.double() - expected.double()).norm() / expected.double().norm()) < tol, name
