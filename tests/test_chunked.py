"""The chunked driver: bounded workspace, chunk sizing, and peak memory that stays flat as N * V grows."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import draw_problem, rel_err

from fused_gspo.chunked import ChunkedHead, LogProbFunction, SinglePassFunction, _GradAccumulators, _Workspace
from fused_gspo.head import HeadParams, TorchTileOps


class SumObjective:
    """The smallest :class:`fused_gspo.chunked.ChunkObjective`: L = sum of log-probs (dL/dlogp = 1)."""

    def __init__(self):
        self.seen = []

    def grad(self, start, stop, stats):
        self.seen.append((start, stop))
        return torch.ones_like(stats.logp), None

    def finish(self, stats):
        self.total = stats.logp.sum()
        return self.total.detach()


def _call(bounds, ops=TorchTileOps):
    return ChunkedHead(HeadParams(), ops, tuple(bounds))


def test_every_token_is_scored_exactly_once(monkeypatch):
    """Outputs start poisoned (NaN) and the driver refuses chunks that leave a token unscored or score one twice."""
    hidden, weight = torch.randn(5, 3), torch.randn(7, 3)
    targets = torch.randint(0, 7, (5,))
    original = TorchTileOps.forward

    class CountingOps(TorchTileOps):
        calls = 0

        @staticmethod
        def forward(y, t, head):
            CountingOps.calls += 1
            return original(y, t, head)

    logp, *_ = LogProbFunction.apply(hidden, weight, None, targets, _call([(0, 2), (2, 4), (4, 5)], CountingOps))
    assert CountingOps.calls == 3 and torch.isfinite(logp).all()
    for bounds in ([(0, 2), (4, 5)], [(0, 3), (2, 5)], [(0, 4)], [(0, 5), (5, 5)]):
        with pytest.raises(ValueError, match="tile"):
            SinglePassFunction.apply(hidden, weight, None, targets, _call(bounds), SumObjective())


def test_single_pass_runs_the_chunk_objective_protocol():
    """grad() per chunk in order, finish() once; the gradient is that of finish()'s loss."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=g)
    objective = SumObjective()
    loss, logp, _ = SinglePassFunction.apply(hidden, weight, None, targets, _call([(0, 2), (2, 5), (5, 6)]), objective)
    assert objective.seen == [(0, 2), (2, 5), (5, 6)]
    loss.backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = torch.log_softmax(ref_h @ ref_w.t(), -1).gather(-1, targets.unsqueeze(-1)).sum()
    ref.backward()
    assert rel_err(loss, ref) < 1e-6 and rel_err(logp.sum(), ref) < 1e-6
    assert rel_err(hidden.grad, ref_h.grad) < 1e-5 and rel_err(weight.grad, ref_w.grad) < 1e-5


class ScaledSumObjective(SumObjective):
    """L = scale * sum of log-probs, ``scale`` a tensor input of the objective's own (dL/dscale = sum of log-probs)."""

    def __init__(self, scale):
        super().__init__()
        self.inputs = (scale,)
        self.scale = scale.detach()

    def grad(self, start, stop, stats):
        return self.scale * torch.ones_like(stats.logp), None

    def finish(self, stats):
        self.input_grads = (stats.logp.sum(),)
        return (self.scale * stats.logp.sum()).detach()


def test_single_pass_hands_the_objective_s_own_inputs_their_gradient():
    """Inputs passed after the objective get its ``input_grads``, times the incoming gradient (issue 23)."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,), generator=g)
    objective = ScaledSumObjective(scale)
    loss, _, _ = SinglePassFunction.apply(hidden, weight, None, targets, _call([(0, 3), (3, 5)]), objective, scale)
    got = torch.autograd.grad(3.0 * loss, [hidden, weight, scale])
    ref_loss = scale * torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets.unsqueeze(-1)).sum()
    want = torch.autograd.grad(3.0 * ref_loss, [hidden, weight, scale])
    assert rel_err(loss, ref_loss) < 1e-14
    assert all(rel_err(a, b) < 1e-13 for a, b in zip(got, want, strict=True))


def test_gradient_output_is_scaled_in_place():
    """The saved fp32 gradients are scaled without a second fp32 copy (fp32 inputs get the accumulator itself back);
    16-bit inputs get one fused scale-and-cast."""
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(4, 3).to(dtype).requires_grad_()
        weight = torch.randn(5, 3).to(dtype).requires_grad_()
        workspace = _Workspace(hidden, weight, None, _call([(0, 4)]))
        acc = _GradAccumulators(hidden, weight, None, (True, True, False), workspace)
        acc.dx.copy_(torch.randn(4, 3))
        acc.dw.copy_(torch.randn(5, 3))
        acc.summed = True  # as after a chunk's add
        expected = [acc.dx * 2.5, acc.dw * 2.5]
        dw_storage = acc.dw.data_ptr()
        dx, dw, db = acc.results(scale=torch.tensor(2.5))
        assert db is None and dx.dtype == dw.dtype == dtype
        assert torch.equal(dw, expected[1].to(dtype)) and torch.equal(dx, expected[0].to(dtype))
        assert (dw.data_ptr() == dw_storage) == (dtype == torch.float32)


def test_weight_gradient_without_any_chunk_is_zero():
    """dW and db are written by the first chunk (no zero fill); with no chunk at all they come back as zeros."""
    hidden = torch.randn(0, 3).requires_grad_()
    weight, bias = torch.randn(5, 3).requires_grad_(), torch.randn(5).requires_grad_()
    workspace = _Workspace(hidden, weight, bias, _call([]))
    acc = _GradAccumulators(hidden, weight, bias, (True, True, True), workspace)
    acc.dw.fill_(float("nan")), acc.db.fill_(float("nan"))
    dx, dw, db = acc.results(scale=torch.tensor(2.0))
    assert dx.shape == (0, 3) and torch.equal(dw, torch.zeros(5, 3)) and torch.equal(db, torch.zeros(5))


def test_single_pass_gradient_is_scaled_by_the_incoming_gradient():
    problem = draw_problem(2, 5, 6, 17, seed=11, off_policy=False)
    from fused_gspo import fused_policy_loss

    def grads(scale):
        h = problem["hidden"].float().requires_grad_()
        out = fused_policy_loss(
            h,
            problem["weight"].float(),
            problem["completion_ids"],
            problem["advantages"],
            problem["completion_mask"],
            loss_type="dapo",
            backend="torch",
        )
        (out.loss * scale).backward()
        return h.grad

    assert rel_err(grads(3.0), 3.0 * grads(1.0)) < 1e-6


_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    from fused_gspo import fused_policy_loss
    from fused_gspo.bench import ProcessMemory
    backend, B, T, H, V = sys.argv[1], *map(int, sys.argv[2:6])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    adv = torch.randn(B, generator=g)

    def step():
        out = fused_policy_loss(hidden, weight, ids, adv, mask, backend=backend, loss_type="grpo",
                                importance_sampling_level="sequence", workspace_bytes=4 << 20)
        out.loss.backward()
        hidden.grad = weight.grad = None

    step()  # warm every code path once
    probe = ProcessMemory.create()
    assert isinstance(probe, ProcessMemory), probe.method
    print(json.dumps({"peak_kib": probe.peak_mib(step) * 1024}))
    """
)


def _peak_kib(backend: str, B: int, T: int, H: int, V: int) -> float:
    """Peak resident memory of one forward + backward above what was resident before it, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, backend, str(B), str(T), str(H), str(V)],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak-RSS counter is Linux's /proc")
def test_torch_backend_peak_is_flat_while_eager_grows_with_n_times_v():
    """Process high-water mark above the inputs, N * V growing 8x: the torch backend's stays within its 4 MiB
    workspace (plus O(N + V*H) buffers); the eager backend's grows with the logits (N * V * 4 bytes, several copies)."""
    H = 16
    small = dict(B=4, T=64, H=H, V=8192)  # N*V = 2M logits: 8 MiB in fp32
    large = dict(B=16, T=128, H=H, V=8192)  # 8x: 64 MiB in fp32
    torch_small, torch_large = _peak_kib("torch", **small), _peak_kib("torch", **large)
    eager_small, eager_large = _peak_kib("eager", **small), _peak_kib("eager", **large)
    logits_large_kib = 16 * 128 * 8192 * 4 // 1024
    assert torch_large - torch_small < 12 * 1024, (torch_small, torch_large)
    assert torch_large < logits_large_kib / 2, (torch_large, logits_large_kib)
    assert eager_large > logits_large_kib, (eager_large, logits_large_kib)
    assert eager_large - eager_small > 4 * (torch_large - torch_small) + 32 * 1024


def test_recomputing_backward_reenters_the_weight_gather():
    """Sharded setups (ZeRO-3) release the head after the forward: the backward must gather it again."""
    import contextlib

    from fused_gspo import fused_logprobs
    from fused_gspo.chunked import weight_gather

    events = []

    @contextlib.contextmanager
    def gather(weight, bias):
        events.append(("enter", tuple(weight.shape)))
        yield
        events.append(("exit", tuple(weight.shape)))

    hidden = torch.randn(4, 3, requires_grad=True)
    weight = torch.randn(7, 3, requires_grad=True)
    token = weight_gather.set(gather)
    try:
        logp, entropy = fused_logprobs(hidden, weight, torch.tensor([0, 6, 2, 3]), return_entropy=True, backend="torch")
    finally:
        weight_gather.reset(token)
    assert events == []  # the forward runs inside the caller's own gather
    (logp.sum() + entropy.sum()).backward()
    assert events == [("enter", (7, 3)), ("exit", (7, 3))]
    assert hidden.grad is not None and weight.grad is not None


# create_graph=True through either Function, one chunk and several: a clear refusal, never a partial second derivative
@pytest.mark.parametrize("loss_type", ["dapo", "grpo_entropy_quantile"])
@pytest.mark.parametrize("workspace_bytes", ["auto", 4 * 17 * 4 * 2])
def test_double_backward_is_refused(loss_type, workspace_bytes):
    """The single pass (dapo) and the two phases (a global entropy quantile) both refuse a backward that builds a
    graph: the one-chunk single pass used to hand back a second derivative through ``dX = G @ W``'s ``W`` alone
    (0.3765 where the true one differs), and the others failed inside an ``out=`` GEMM."""
    from fused_gspo import fused_logprobs, fused_policy_loss

    problem = draw_problem(2, 5, 6, 17, seed=12)
    cfg = dict(loss_type="dapo") if loss_type == "dapo" else dict(loss_type="grpo", top_entropy_quantile=0.5)
    h = problem["hidden"].float().requires_grad_()
    w = problem["weight"].float().requires_grad_()
    inputs = {**problem, "hidden": h, "weight": w}
    out = fused_policy_loss(**inputs, backend="torch", workspace_bytes=workspace_bytes, **cfg)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, [h], create_graph=True)
    logp = fused_logprobs(h, w, problem["completion_ids"], backend="torch", workspace_bytes=workspace_bytes)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(logp.sum(), [h], create_graph=True)
    # a plain backward afterwards is unaffected
    (grad,) = torch.autograd.grad(fused_policy_loss(**inputs, backend="torch", **cfg).loss, [h])
    (ref,) = torch.autograd.grad(fused_policy_loss(**inputs, backend="eager", **cfg).loss, [h])
    assert rel_err(grad, ref) < 1e-5


# the one-chunk single pass reads W and the hidden rows again in its backward, as autograd's saved tensors are read
@pytest.mark.parametrize("modified", ["weight", "hidden"])
def test_one_chunk_backward_refuses_inputs_modified_in_place(modified):
    """An in-place change of the weight (or of packed hidden states, which the chunk uses without a copy) between
    forward and backward raised in the eager and two-phase paths but silently gave the gradient of the new values
    here (twice the true dX after ``weight.mul_(2)``)."""
    from fused_gspo import fused_policy_loss

    problem = draw_problem(2, 5, 6, 17, seed=13)
    valid = problem["completion_mask"].bool()
    h = problem["hidden"][valid].float().requires_grad_()
    w = problem["weight"].float().requires_grad_()
    inputs = {**problem, "hidden": h, "weight": w}
    out = fused_policy_loss(**inputs, backend="torch", loss_type="dapo")
    with torch.no_grad():
        (w if modified == "weight" else h).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    # inference tensors have no version counter: a frozen head made under inference_mode still trains the hidden
    with torch.inference_mode():
        frozen = problem["weight"].float()
    out = fused_policy_loss(**{**inputs, "weight": frozen}, backend="torch", loss_type="dapo")
    (grad,) = torch.autograd.grad(out.loss, [h])
    ref = fused_policy_loss(**{**inputs, "weight": frozen.clone()}, backend="eager", loss_type="dapo")
    assert rel_err(grad, torch.autograd.grad(ref.loss, [h])[0]) < 1e-5
