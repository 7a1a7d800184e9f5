"""DeepSpeed ZeRO-3: the head's weight released after the forward, and the fused backward's gradient for it.

ZeRO-3 keeps a parameter's elements partitioned across the processes and gathers the whole tensor only while a module
needs it; outside, the parameter's local tensor has 0 elements. Autograd accumulates a returned gradient into
``param.grad`` in the parameter's current shape, so the head must be gathered again when the fused backward hands
back its ``[V, H]`` gradient. Two mechanisms, tested here without and with DeepSpeed:

- :class:`fused_gspo.trl.stand_in.LossRelay`: the TRL adapters route the fused loss's backward through the model's
  output, where ZeRO-3's pre-backward hook gathers the head (as for TRL's own loss);
- :class:`fused_gspo.chunked._BackwardGather`: a backward that finds the head released enters the configured gather
  (:data:`fused_gspo.chunked.weight_gather`) and leaves it once the gradient has been accumulated.

The DeepSpeed tests run the real trainers under ``torch.distributed.run`` (1 and 2 CPU processes, gloo) in
``tests/workers/zero3_trainer.py``. DeepSpeed JIT-compiles a shared-memory communication op on first use (about a
minute of the CPU's time): it is built once into ``TORCH_EXTENSIONS_DIR`` (pytest's cache unless the variable is set)
and loaded from there afterwards.
"""

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import draw_problem, rel_err

from fused_gspo import fused_logprobs, fused_policy_loss
from fused_gspo.chunked import weight_gather

WORKERS = Path(__file__).parent / "workers"
TIMINGS = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


# ---------------------------------------------------------------------------------------------------------------
# Without DeepSpeed: a parameter released after the forward, as ZeRO-3 releases it


class Released:
    """A parameter that, like a ZeRO-3 one, holds 0 elements outside :meth:`gather` (which puts the whole tensor
    back, or does nothing when it is already there, as TRL's ``maybe_gather_lm_head_ctx``). ``events`` records the
    gathers, and the parameter's size whenever autograd accumulates its gradient."""

    def __init__(self, full: torch.Tensor):
        self.full = full
        self.param = torch.nn.Parameter(full.clone())
        self.events = []
        self.param.register_post_accumulate_grad_hook(lambda p: self.events.append(("accumulated", p.numel())))
        self.release()

    def release(self) -> None:
        self.param.data = self.full.new_empty(0)

    @contextlib.contextmanager
    def _gathered(self):
        self.events.append("gather")
        self.param.data = self.full.clone()
        try:
            yield
        finally:
            self.release()
            self.events.append("release")

    def gather(self, weight, bias=None):
        assert weight is self.param
        return contextlib.nullcontext() if weight.numel() else self._gathered()


def _policy(problem, weight, **cfg):
    hidden = problem["hidden"].float().detach().requires_grad_()
    out = fused_policy_loss(
        hidden, weight, problem["completion_ids"], problem["advantages"].float(), problem["completion_mask"],
        old_logps=problem["old_logps"].float(), backend="torch", **cfg,
    )  # fmt: skip
    return out, hidden


# the single pass (the gradient formed in the forward) and the two phases (the entropy quantile: recomputed in the
# backward)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
        dict(loss_type="dapo", top_entropy_quantile=0.5),
    ],
    ids=["single_pass", "two_phases"],
)
def test_a_released_head_is_gathered_until_its_gradient_is_accumulated(cfg):
    problem = draw_problem(3, 6, 16, 37, seed=11)
    head = Released(problem["weight"].float())
    token = weight_gather.set(head.gather)
    try:
        with head.gather(head.param):  # the forward runs inside the caller's gather, as in TRL's forward
            out, hidden = _policy(problem, head.param, **cfg)
    finally:
        weight_gather.reset(token)
    assert head.events == ["gather", "release"] and head.param.numel() == 0
    out.loss.backward()  # without the backward's own gather: "The size of tensor a (0) must match ... (16)"
    # gathered again for the backward, left only once the gradient has been accumulated into the whole parameter
    assert head.events[2:] == ["gather", ("accumulated", 37 * 16), "release"]
    assert head.param.numel() == 0

    weight = problem["weight"].float().requires_grad_()
    ref, ref_hidden = _policy(problem, weight, **cfg)
    ref.loss.backward()
    assert out.loss.item() == ref.loss.item()
    assert rel_err(head.param.grad, weight.grad) < 1e-6 and rel_err(hidden.grad, ref_hidden.grad) < 1e-6


@pytest.mark.parametrize("cfg", [dict(loss_type="dapo"), dict(loss_type="dapo", top_entropy_quantile=0.5)],
                         ids=["single_pass", "two_phases"])  # fmt: skip
def test_a_head_released_without_a_gather_is_a_clear_error(cfg):
    problem = draw_problem(2, 5, 8, 29, seed=6)
    head = Released(problem["weight"].float())
    with head.gather(head.param):
        out, _ = _policy(problem, head.param, **cfg)
    with pytest.raises(
        RuntimeError, match=r"was \(29, 8\) in the forward but is \(0,\) in the backward .* LM-head module"
    ):
        out.loss.backward()


def test_fused_logprobs_gather_a_released_head_for_its_backward():
    problem = draw_problem(2, 5, 8, 29, seed=3)
    head = Released(problem["weight"].float())
    hidden = problem["hidden"].float().requires_grad_()
    token = weight_gather.set(head.gather)
    try:
        with head.gather(head.param):
            logp, entropy = fused_logprobs(hidden, head.param, problem["completion_ids"], return_entropy=True)
    finally:
        weight_gather.reset(token)
    (logp.sum() + entropy.sum()).backward()
    assert head.events[2:] == ["gather", ("accumulated", 29 * 8), "release"]
    weight = problem["weight"].float().requires_grad_()
    ref_logp, ref_entropy = fused_logprobs(problem["hidden"].float(), weight, problem["completion_ids"],
                                           return_entropy=True)  # fmt: skip
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert rel_err(head.param.grad, weight.grad) < 1e-6


def test_a_head_gathered_by_someone_else_is_left_to_them():
    """Under the TRL adapters ZeRO-3's own hook has gathered the head when the fused backward runs: the backward's
    gather is then a no-op, and the head stays as it was."""
    problem = draw_problem(2, 5, 8, 29, seed=4)
    head = Released(problem["weight"].float())
    token = weight_gather.set(head.gather)
    try:
        with head.gather(head.param):
            out, _ = _policy(problem, head.param, loss_type="dapo")
            out.loss.backward()
    finally:
        weight_gather.reset(token)
    assert head.events == ["gather", ("accumulated", 29 * 8), "release"]


def test_a_backward_that_never_accumulates_the_head_still_releases_it():
    """``torch.autograd.grad`` with other inputs: no accumulation into the head; released at the backward's end."""
    problem = draw_problem(2, 5, 8, 29, seed=5)
    head = Released(problem["weight"].float())
    token = weight_gather.set(head.gather)
    try:
        with head.gather(head.param):
            out, hidden = _policy(problem, head.param, loss_type="dapo", top_entropy_quantile=0.5)
    finally:
        weight_gather.reset(token)
    (grad,) = torch.autograd.grad(out.loss, [hidden])
    assert head.events[2:] == ["gather", "release"] and head.param.numel() == 0 and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Without DeepSpeed: the loss's backward relayed through the model's output


class _Fused(torch.autograd.Function):
    """Stands in for the fused loss: ``2 * x.sum()``; its backward records when it ran."""

    @staticmethod
    def forward(ctx, x, order):
        ctx.order = order
        return 2 * x.sum()

    @staticmethod
    def backward(ctx, grad):
        ctx.order.append("fused backward")
        return 2 * grad.expand(4), None


@pytest.mark.parametrize("valid", [[1, 0, 1, 1], [0, 0, 0, 0]], ids=["tokens", "no_token"])
def test_the_relay_runs_the_fused_backward_after_the_outputs_hooks(valid):
    """TRL's forward scatters the per-token values it is handed into its output (``masked_scatter``); a hook on that
    output (ZeRO-3's gather) must run before the fused backward, even when nothing is scored."""
    from fused_gspo.trl.stand_in import LossRelay

    order = []
    x = torch.randn(4, requires_grad=True)
    loss = _Fused.apply(x, order)
    relay = LossRelay()
    mask = torch.tensor(valid, dtype=torch.bool)
    values = torch.randn(int(mask.sum()))
    carried = relay.carrier(values, loss)
    output = torch.zeros(4).masked_scatter(mask, carried)  # what TRL's forward does with it
    output.register_hook(lambda g: order.append("output hook"))
    assert torch.equal(carried, values)
    relayed = relay.loss(loss, output)
    assert relayed.item() == loss.item()
    (3.0 * relayed).backward()
    assert order == ["output hook", "fused backward"]
    assert torch.equal(x.grad, torch.full((4,), 6.0))


def test_the_relay_fails_loudly_when_the_output_does_not_reach_the_carrier():
    from fused_gspo.trl.stand_in import LossRelay

    x = torch.randn(4, requires_grad=True)
    loss = _Fused.apply(x, [])
    relay = LossRelay()
    carried = relay.carrier(torch.randn(4), loss)
    cut = torch.randn(4, requires_grad=True) * 1.0  # an output computed without the carrier
    with pytest.raises(RuntimeError, match="not the per-token values"):
        relay.loss(loss, cut).backward()
    with pytest.raises(RuntimeError, match="does not depend on the per-token values"):
        relay.loss(loss, carried.detach())
    with pytest.raises(RuntimeError, match="without coming from the trainer's loss"):
        carried.sum().backward()  # the carrier differentiated directly


def test_the_relay_is_a_no_op_without_gradients():
    from fused_gspo.trl.stand_in import LossRelay

    relay = LossRelay()
    loss = torch.tensor(1.5)
    values = torch.randn(3)
    assert relay.carrier(values, loss) is values and relay.loss(loss, values) is loss


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3, real trainers, 1 and 2 processes

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or not torch.distributed.is_available(),
    reason="needs deepspeed (the test extra) and torch.distributed",
)


@pytest.fixture(scope="session")
def torch_extensions_dir(request, tmp_path_factory) -> str:
    """Where DeepSpeed's JIT-compiled communication op is built, once, and loaded from afterwards."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = getattr(request.config, "cache", None)  # kept between runs, unless the cache plugin is off
    return str(cache.mkdir("torch_extensions") if cache is not None else tmp_path_factory.mktemp("torch_extensions"))


def _zero3(out: Path, processes: int, cases: list[str], extensions: str) -> dict:
    """Run the worker; ``{case: [each rank's result]}``."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": extensions, "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(WORKERS / "zero3_trainer.py"), str(out), *cases]  # fmt: skip
    # the first run builds DeepSpeed's communication op: minutes on a busy 2-core machine
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-8000:]
    return {case: [torch.load(out / f"{case}-{rank}.pt", weights_only=False) for rank in range(processes)]
            for case in cases}  # fmt: skip


# Each flag-on run of 2 steps (tests/workers/zero3_trainer.py, CASES): the fused loss requests TRL's trainer makes
# (the custom loop calls fused_policy_loss itself), the strategy the gradient takes, whether TRL asks for no-grad
# log-probs (old or reference)
FLAG_ON = {
    "gspo": (2, "single_pass", True),
    "gspo_tied": (2, "single_pass", True),
    "dapo": (2, "two_phase", True),
    "dpo": (2, "single_pass", True),
    "cpo": (2, "single_pass", False),
    "loop": (0, "single_pass", False),
}


@needs_deepspeed
@pytest.mark.parametrize(
    "processes,cases",
    [(1, ["gspo", "gspo_tied", "dpo", "loop"]), (2, ["gspo", "dapo", "dpo", "cpo"])],
    ids=["1_process", "2_processes"],
)
def test_trainers_under_zero3_flag_off_equals_on(tmp_path, torch_extensions_dir, processes, cases):
    """Loss, gradient norm, every logged metric and the trained weights equal flag off; the head partitioned (0 local
    elements) between steps, whole when its gradient is accumulated, and gathered exactly as long as in TRL's own
    path; both processes end with the same weights."""
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(WORKERS))
    from trl_helpers import assert_same_training
    from zero3_trainer import model_and_tokenizer

    results = _zero3(tmp_path, processes, cases, torch_extensions_dir)
    for case, ranks in results.items():
        initial_model, _ = model_and_tokenizer(tied=case.endswith("_tied"))
        initial = initial_model.state_dict()
        head_numel = initial["lm_head.weight"].numel()
        for result in ranks:
            off, on = result["off"], result["on"]
            assert result["world"] == processes
            # partitioned: each process keeps its share; outside the gathers the parameter holds nothing
            assert off["head"]["partition"] == (head_numel, math.ceil(head_numel / processes), processes)
            assert off["head"]["at_step_end"] == [("ZeroParamStatus.NOT_AVAILABLE", 0)] * 2, case
            assert off["head"]["at_accumulation"] == [head_numel] * 2, case
            assert on["head"] == off["head"], case  # the same lifetime of the gathered head at every probed point
            assert off["fused_calls"] == dict.fromkeys(off["fused_calls"], 0)
            requests, strategy, no_grad_passes = FLAG_ON[case]
            calls = on["fused_calls"]
            assert calls["loss"] == requests and calls[strategy] == 2 and (calls["logprobs"] > 0) == no_grad_passes
            assert calls["own_gather"] == 0, case  # ZeRO-3's own hooks had gathered the head for every backward
            assert_same_training((off["logs"], off["weights"]), (on["logs"], on["weights"]), initial=initial)
        if processes == 2:
            first, second = ranks
            for run in ("off", "on"):
                assert all(torch.equal(t, second[run]["weights"][n]) for n, t in first[run]["weights"].items())
                untimed = [[{k: v for k, v in e.items() if k not in TIMINGS} for e in r[run]["logs"]] for r in ranks]
                assert untimed[0] == untimed[1], (case, run)
