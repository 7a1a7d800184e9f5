"""The chunked driver: bounded workspace, chunk sizing, and peak memory that stays flat as N * V grows."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import draw_problem, rel_err

from fused_gspo.chunked import LogProbFunction, SinglePassPolicyFunction, tokens_per_chunk
from fused_gspo.head import HeadParams, TorchTileOps


def test_tokens_per_chunk_fits_the_workspace():
    vocab = 151_936
    n = tokens_per_chunk(vocab, torch.float32, 512 * 2**20, TorchTileOps.temporaries)
    assert n * vocab * 4 * (1 + TorchTileOps.temporaries) <= 512 * 2**20
    assert (n + 1) * vocab * 4 * (1 + TorchTileOps.temporaries) > 512 * 2**20
    assert tokens_per_chunk(vocab, torch.float32, 1, 0) == 1  # always makes progress


def test_unscored_tokens_stay_nan(monkeypatch):
    """Outputs start poisoned: if the driver skipped a chunk, NaN would reach the caller."""
    hidden, weight = torch.randn(5, 3), torch.randn(7, 3)
    targets = torch.randint(0, 7, (5,))
    original = TorchTileOps.forward

    class SkippingOps(TorchTileOps):
        calls = 0

        @staticmethod
        def forward(y, t, head):
            SkippingOps.calls += 1
            return original(y, t, head)

    logp, _ = LogProbFunction.apply(hidden, weight, None, targets, HeadParams(), SkippingOps, 7 * 4 * 4 * 2)
    assert SkippingOps.calls == 3 and torch.isfinite(logp).all()

    bounds = [(0, 2), (4, 5)]  # tokens 2 and 3 never scored
    loss, logp, _ = SinglePassPolicyFunction.apply(
        hidden,
        weight,
        None,
        targets,
        HeadParams(),
        TorchTileOps,
        10**6,
        bounds,
        lambda s, e, lp, ent: (torch.ones_like(lp), None),
        lambda lp, ent: lp.sum(),
    )
    assert torch.isnan(logp[2:4]).all() and torch.isnan(loss)


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
        logp, entropy = LogProbFunction.apply(hidden, weight, None, torch.tensor([0, 6, 2, 3]), HeadParams(),
                                              TorchTileOps, 1 << 20)  # fmt: skip
    finally:
        weight_gather.reset(token)
    assert events == []  # the forward runs inside the caller's own gather
    (logp.sum() + entropy.sum()).backward()
    assert events == [("enter", (7, 3)), ("exit", (7, 3))]
    assert hidden.grad is not None and weight.grad is not None


def test_chunks_count_the_cast_gradient_when_operands_are_half_precision():
    """On CUDA the logits gradient is cast to bf16/fp16 for the GEMMs: that copy is part of the workspace."""
    vocab, budget = 1000, 1_000_000
    fp32_only = tokens_per_chunk(vocab, torch.float32, budget, 0)
    with_cast = tokens_per_chunk(vocab, torch.float32, budget, 0, torch.bfloat16)
    assert fp32_only == budget // (vocab * 4) and with_cast == budget // (vocab * 6)
    assert tokens_per_chunk(vocab, torch.float32, budget, 0, torch.float32) == fp32_only
