"""``torch.compile``: the custom operators, a training step compiled whole (``fullgraph=True``) equal to eager, and
no recompilation when the data or (marked dynamic) the shapes change."""

import itertools

import numpy as np
import pytest
import torch
from conftest import draw_packed_problem, draw_problem, rel_err
from torch._dynamo.testing import CompileCounterWithBackend

import fused_gspo
from fused_gspo import ops
from fused_gspo.config import PolicyLossConfig
from fused_gspo.head import HeadParams


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(H: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh())


def _inputs(B=3, T=6, H=8, V=29, seed=0, **opts):
    problem = draw_problem(B, T, H, V, seed=seed, **opts)
    x = problem.pop("hidden").float()
    weight = problem.pop("weight").float().requires_grad_()
    bias = problem.pop("bias", None)
    rest = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in problem.items()}
    return x, weight, (None if bias is None else bias.float().requires_grad_()), rest


def _step(model, weight, bias, config, backend="torch"):
    def step(x, completion_ids, advantages, completion_mask, **optional):
        out = fused_gspo.fused_policy_loss(
            model(x), weight, completion_ids, advantages, completion_mask, bias=bias, config=config,
            backend=backend, **optional,
        )  # fmt: skip
        return out.loss, out.metrics, out.logps

    return step


def _grads(loss, model, weight, bias):
    leaves = [*model.parameters(), weight] + ([bias] if bias is not None else [])
    return torch.autograd.grad(loss, leaves)


# one objective per strategy: token-coupled single pass (DAPO), sequence-coupled single pass (off-policy GSPO with a
# KL term), two phases (the entropy quantile), and GMPO with an LM-head bias and a softcap
CASES = {
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28), {}),
    "gspo_kl": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04), dict(with_ref=True)),
    "entropy_quantile": (dict(loss_type="dr_grpo", top_entropy_quantile=0.5, entropy_coef=0.01), {}),
    "gmpo_bias_softcap": (dict(loss_type="gmpo", epsilon=0.4, final_logit_softcapping=3.0), dict(with_bias=True)),
}


# one objective per strategy (see CASES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_is_one_graph_and_matches_eager(case):
    cfg_kwargs, opts = CASES[case]
    config = PolicyLossConfig(workspace_bytes=29 * 4 * 3 * 4, **cfg_kwargs)
    x, weight, bias, rest = _inputs(seed=len(case), **opts)
    model = _model(x.shape[-1])
    step = _step(model, weight, bias, config)

    explanation = torch._dynamo.explain(step)(x, **rest)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons

    loss, metrics, logps = torch.compile(step, fullgraph=True, backend="aot_eager")(x, **rest)
    grads = _grads(2.5 * loss, model, weight, bias)
    ref_loss, ref_metrics, ref_logps = step(x, **rest)  # eager: the autograd.Function path
    ref_grads = _grads(2.5 * ref_loss, model, weight, bias)
    assert rel_err(loss, ref_loss) < 1e-6 and rel_err(logps, ref_logps) < 1e-6
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))
    assert list(metrics) == list(ref_metrics) == list(fused_gspo.objectives.metric_names(config))
    assert all(abs(float(metrics[k]) - float(ref_metrics[k])) < 1e-6 for k in metrics)


def test_inductor_on_cpu_compiles_the_step():
    config = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    x, weight, bias, rest = _inputs(seed=5)
    model = _model(x.shape[-1])
    step = _step(model, weight, bias, config)
    loss, _, _ = torch.compile(step, fullgraph=True)(x, **rest)
    ref_loss, _, _ = step(x, **rest)
    assert rel_err(loss, ref_loss) < 1e-6
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(_grads(loss, model, weight, bias),
                                                      _grads(ref_loss, model, weight, bias), strict=True))  # fmt: skip


@pytest.mark.gpu
# one objective per strategy (see CASES), on CUDA with the Triton kernels inside the operator
@pytest.mark.parametrize("case", list(CASES))
def test_inductor_on_cuda_compiles_the_step(case):
    cfg_kwargs, opts = CASES[case]
    config = PolicyLossConfig(**cfg_kwargs)
    x, weight, bias, rest = _inputs(B=4, T=64, H=256, V=4099, seed=len(case), **opts)
    x, weight = x.cuda(), weight.detach().cuda().requires_grad_()
    bias = None if bias is None else bias.detach().cuda().requires_grad_()
    rest = {k: v.cuda() for k, v in rest.items()}
    model = _model(x.shape[-1]).cuda()
    step = _step(model, weight, bias, config, backend="triton")
    loss, metrics, logps = torch.compile(step, fullgraph=True)(x, **rest)
    ref_loss, ref_metrics, ref_logps = step(x, **rest)
    # the same kernels run eagerly and compiled; only the model's own ops may be fused differently by inductor
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(logps, ref_logps) < 1e-5
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(_grads(loss, model, weight, bias),
                                                      _grads(ref_loss, model, weight, bias), strict=True))  # fmt: skip
    assert all(abs(float(metrics[k]) - float(ref_metrics[k])) < 1e-5 for k in metrics)


def test_no_recompilation_when_the_valid_tokens_or_dynamic_shapes_change():
    config = PolicyLossConfig(loss_type="dapo")
    x, weight, bias, rest = _inputs(B=3, T=6, seed=1)
    model = _model(x.shape[-1])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_step(model, weight, bias, config), fullgraph=True, backend=counter)
    compiled(x, **rest)
    fewer = dict(rest, completion_mask=rest["completion_mask"] * (torch.rand(3, 6) > 0.5))
    compiled(x, **fewer)
    assert counter.frame_count == 1  # the valid-token count lives inside the operator
    for T in (7, 9):  # a new sequence length, marked dynamic: one more compile at most, then none
        x2, _, _, rest2 = _inputs(B=3, T=T, seed=T)
        for t in (x2, *rest2.values()):
            if t.dim() >= 2:
                torch._dynamo.mark_dynamic(t, 1)
        compiled(x2, **rest2)
    assert counter.frame_count <= 2


def test_compiled_fused_logprobs():
    x, weight, _, rest = _inputs(seed=2)
    model = _model(x.shape[-1])

    def step(x, ids):
        logp, entropy = fused_gspo.fused_logprobs(model(x), weight, ids, return_entropy=True, temperature=0.7,
                                                  backend="torch")  # fmt: skip
        return logp.sum() + 0.3 * entropy.sum(), logp

    explanation = torch._dynamo.explain(step)(x, rest["completion_ids"])
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    value, logp = torch.compile(step, fullgraph=True, backend="aot_eager")(x, rest["completion_ids"])
    ref_value, ref_logp = step(x, rest["completion_ids"])
    assert rel_err(value, ref_value) < 1e-6 and rel_err(logp, ref_logp) < 1e-6
    grads = _grads(value, model, weight, None)
    ref_grads = _grads(ref_value, model, weight, None)
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


def test_value_checks_run_inside_the_operator():
    """Under compilation the checks that read data are not traced: the operator makes them when it runs."""
    config = PolicyLossConfig(loss_type="dapo")
    x, weight, bias, rest = _inputs(seed=3)
    step = torch.compile(_step(_model(x.shape[-1]), weight, bias, config), fullgraph=True, backend="aot_eager")
    bad = dict(rest, completion_ids=rest["completion_ids"].masked_fill(rest["completion_mask"].bool(), 10**6))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        step(x, **bad)


# the operators' registrations (schema, fake tensors, autograd) as PyTorch checks them
# needs: hidden, weight, bias, advantages, completion_mask, old_logps, ref_logps, sampling_logps, importance ratio
@pytest.mark.parametrize(
    "needs",
    [[True, True, False] + [False] * 6, [False, True, False] + [False] * 6, [False] * 9,
     [True, True, False, True, False, True, False, False, False]],
)  # fmt: skip
def test_opcheck_policy_loss(needs):
    config = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence_token")
    x, weight, _, rest = _inputs(seed=4)
    args = (x, weight.detach(), None, rest["completion_ids"], rest["advantages"], rest["completion_mask"],
            rest["old_logps"], None, None, None, None, None, None, *ops.config_args(config), "torch",
            needs, torch.float32)  # fmt: skip
    torch.library.opcheck(ops.policy_loss_op, args)


def test_opcheck_logprobs():
    x, weight, bias, rest = _inputs(seed=6, with_bias=True)
    ids = rest["completion_ids"].reshape(-1)
    h = x.reshape(-1, x.shape[-1])
    head = HeadParams(temperature=0.8, softcap=4.0)
    args = (h, weight.detach(), bias.detach(), ids, ops.head_args(head), "torch", 0, [True, True, True], torch.float32,
            "auto")  # fmt: skip
    torch.library.opcheck(ops.logprobs_op, args)


# a head weight that is a transpose (an [H, V] parameter's .t()): the eager backend's autograd handed back gradients
# in its layout, not the fake implementation's, and inductor's stride assertion failed the compiled step
def test_opcheck_with_a_transposed_weight_on_the_eager_backend():
    x, _, _, rest = _inputs(seed=12)
    weight = torch.randn(x.shape[-1], 29, generator=torch.Generator().manual_seed(12)).t()
    config = PolicyLossConfig(loss_type="dapo")
    args = (x, weight, None, rest["completion_ids"], rest["advantages"], rest["completion_mask"], rest["old_logps"],
            None, None, None, None, None, None, *ops.config_args(config), "eager", [True, True] + [False] * 7,
            torch.float32)  # fmt: skip
    torch.library.opcheck(ops.policy_loss_op, args)
    h, ids = x.reshape(-1, x.shape[-1]), rest["completion_ids"].reshape(-1)
    options = (ops.head_args(HeadParams()), "eager", 0, [True, True, False], torch.float32, "auto")
    _, entropy, lse = ops.logprobs_op(h, weight, None, ids, *options)
    grads = (torch.randn_like(lse), torch.randn_like(lse))
    torch.library.opcheck(ops.logprobs_backward_op, (h, weight, None, ids, lse, entropy, *grads, *options))


def test_config_round_trips_through_the_operator_arguments():
    for config in (
        PolicyLossConfig(loss_type="vespo", epsilon_high=0.3, delta=None, workspace_bytes=1 << 20, beta=0.1),
        PolicyLossConfig(loss_type="dr_grpo", epsilon=0.1 + 0.2, max_completion_length=None, steps_per_generation=4,
                         top_entropy_quantile=0.7, gradient_accumulation_steps=2, entropy_coef=1e-3),
    ):  # fmt: skip
        key, numbers = ops.config_args(config)
        back = ops._config(key, numbers)
        assert back == config
        assert all(type(getattr(back, f)) is type(getattr(config, f)) for f in ops._FIELDS)  # ints stay ints
        assert ops._key_shapes(key) == (fused_gspo.objectives.metric_names(config), config.top_entropy_quantile < 1)


# A config passed to the compiled step as an argument: a new one recompiles, and a number that changed is traced as a
# symbol from then on (with dynamic=True from the first call), which the operator takes as a tensor (issue 23: a
# second config crashed, "repr_impl not implemented"); each call equals eager mode
@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_step_takes_new_configs(dynamic):
    x, weight, bias, rest = _inputs(seed=8, with_ref=True)
    model = _model(x.shape[-1])

    def step(x, config, completion_ids, advantages, completion_mask, **optional):
        out = fused_gspo.fused_policy_loss(model(x), weight, completion_ids, advantages, completion_mask,
                                           config=config, backend="torch", **optional)  # fmt: skip
        return out.loss, out.metrics

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    configs = [
        PolicyLossConfig(loss_type="dr_grpo", epsilon=0.2, max_completion_length=6),
        PolicyLossConfig(loss_type="dr_grpo", epsilon=0.3, max_completion_length=6),  # a float changes
        PolicyLossConfig(loss_type="dr_grpo", epsilon=0.25, beta=0.04, max_completion_length=8),  # more, and an int
        PolicyLossConfig(loss_type="dr_grpo", epsilon=0.25, beta=0.04, max_completion_length=8, entropy_coef=0.1),
    ]
    for config in configs:
        loss, metrics = compiled(x, config, **rest)
        ref_loss, ref_metrics = step(x, config, **rest)
        assert rel_err(loss, ref_loss) < 1e-6 and metrics.keys() == ref_metrics.keys()
        assert all(abs(float(metrics[k]) - float(ref_metrics[k])) < 1e-6 for k in metrics)
        grads, ref_grads = _grads(loss, model, weight, None), _grads(ref_loss, model, weight, None)
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


# a config built from NumPy scalars (a sweep's np.linspace, np.int64 counts): eager mode took it, but torch.compile
# traces a NumPy scalar as an array, and the compiled step failed; the config now holds the Python numbers
def test_compiled_step_takes_a_config_of_numpy_scalars():
    x, weight, bias, rest = _inputs(seed=13)
    config = PolicyLossConfig(loss_type="dr_grpo", epsilon=np.float64(0.25), max_completion_length=np.int64(6),
                              top_entropy_quantile=np.float32(0.5), use_bias_correction_kl=np.bool_(True))  # fmt: skip
    names = ("epsilon", "max_completion_length", "use_bias_correction_kl")
    assert [type(getattr(config, name)) for name in names] == [float, int, bool]
    step = _step(_model(x.shape[-1]), weight, bias, config)
    loss, metrics, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(x, **rest)
    ref_loss, ref_metrics, _ = step(x, **rest)
    assert rel_err(loss, ref_loss) < 1e-6 and metrics.keys() == ref_metrics.keys()


def test_compiled_step_takes_a_numpy_num_items_in_batch():
    """A NumPy token count (an np.float64 from a data pipeline) compiles as eager mode takes it (it failed to trace)."""
    x, weight, bias, rest = _inputs(seed=14)
    step = _step(_model(x.shape[-1]), weight, bias, PolicyLossConfig(loss_type="dapo"))
    loss, _, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(x, **rest, num_items_in_batch=np.float64(7))
    ref_loss, _, _ = step(x, **rest, num_items_in_batch=7.0)
    assert rel_err(loss, ref_loss) < 1e-6


# fused_logprobs with its default arguments, and with a temperature and a budget, under dynamic=True: every float is
# symbolic from the first call (issue 23: the config's checks called math.isfinite on one)
def test_compiled_fused_logprobs_with_dynamic_numbers():
    x, weight, _, rest = _inputs(seed=9)
    ids = rest["completion_ids"]

    def step(x, ids, temperature=None, workspace_bytes=None):
        options = {} if temperature is None else dict(temperature=temperature, workspace_bytes=workspace_bytes)
        return fused_gspo.fused_logprobs(x, weight, ids, backend="torch", **options)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for args in ((), (0.7, 29 * 4 * 9), (1.3, 29 * 4 * 15)):
        logp = compiled(x, ids, *args)
        ref = step(x, ids, *args)
        assert rel_err(logp, ref) < 1e-6
        assert rel_err(torch.autograd.grad(logp.sum(), weight)[0], torch.autograd.grad(ref.sum(), weight)[0]) < 1e-5


# numbers that change every step (a KL coefficient or an entropy bonus on a schedule, a temperature) compile once more,
# then are traced as symbols: a float reached the operators through torch.tensor(...) or as a float argument, where
# the compiler specialized it, so every new value recompiled and the ninth failed fullgraph=True
@pytest.mark.parametrize("dynamic", [None, True])
def test_changing_floats_do_not_recompile_every_step(dynamic):
    x, weight, bias, rest = _inputs(seed=14, with_ref=True, with_bias=True)
    base = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=29 * 4 * 3 * 4)

    def step(x, beta, entropy_coef, temperature):
        config = base.replace(beta=beta, entropy_coef=entropy_coef, temperature=temperature)
        loss = fused_gspo.fused_policy_loss(x, weight, **rest, bias=bias, config=config, backend="torch").loss
        logp = fused_gspo.fused_logprobs(x, weight, rest["completion_ids"], bias=bias, temperature=temperature,
                                         final_logit_softcapping=4.0 + temperature, backend="torch")  # fmt: skip
        return loss + 0.1 * logp.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter, dynamic=dynamic)
    frames = []
    for i in range(10):
        numbers = (0.02 + 0.01 * i, 0.001 * (i + 1), 0.8 + 0.05 * i)
        value, ref = compiled(x, *numbers), step(x, *numbers)
        assert rel_err(value, ref) < 1e-6
        assert rel_err(torch.autograd.grad(value, weight)[0], torch.autograd.grad(ref, weight)[0]) < 1e-5
        frames.append(counter.frame_count)
    assert frames[-1] == frames[2] <= 2, frames


# the objective's own inputs that require grad (advantages, old log-probs, the vLLM ratio) get the eager gradient
# through the operator, single pass and two phases (issue 23: dropped by the single pass)
@pytest.mark.parametrize("top_entropy_quantile", [1.0, 0.5])
def test_compiled_step_gives_the_objective_s_inputs_their_gradient(top_entropy_quantile):
    config = PolicyLossConfig(loss_type="dapo", top_entropy_quantile=top_entropy_quantile, workspace_bytes=29 * 4 * 9)
    x, weight, bias, rest = _inputs(seed=7, is_ratio_shape="token", per_token_advantages=True)
    for name in ("advantages", "old_logps", "importance_sampling_ratio"):
        rest[name].requires_grad_()
    step = _step(_model(x.shape[-1]), weight, bias, config)
    leaves = [weight, rest["advantages"], rest["old_logps"], rest["importance_sampling_ratio"]]
    loss, _, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(x, **rest)
    ref_loss, _, _ = step(x, **rest)
    assert rel_err(loss, ref_loss) < 1e-6
    grads, ref_grads = torch.autograd.grad(1.5 * loss, leaves), torch.autograd.grad(1.5 * ref_loss, leaves)
    assert all(float(r.norm()) > 0 and rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


# position_ids under fullgraph=True: the sequences they mark are data, found inside the operator (issue 23: a guard
# on int(starts[0]) broke the graph); new boundaries recompile only for the per-sequence advantages' new shape, once
def test_compiled_step_takes_position_ids():
    packed, _, _ = draw_packed_problem([2, 3, 1, 4], 8, 29, seed=10, off_policy=True)
    x = packed.pop("hidden").float()
    weight = packed.pop("weight").float().requires_grad_()
    cu = packed.pop("cu_seqlens")
    rest = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in packed.items()}
    model = _model(x.shape[-1])
    config = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=29 * 4 * 3 * 4)

    def step(x, completion_ids, advantages, completion_mask, old_logps, position_ids=None, cu_seqlens=None):
        out = fused_gspo.fused_policy_loss(
            model(x), weight, completion_ids, advantages, completion_mask, old_logps=old_logps, config=config,
            position_ids=position_ids, cu_seqlens=cu_seqlens, backend="torch",
        )  # fmt: skip
        return out.loss, out.logps

    def position_ids_of(cu):
        return torch.cat([torch.arange(int(b - a)) for a, b in itertools.pairwise(cu.tolist())])

    explanation = torch._dynamo.explain(step)(x, **rest, position_ids=position_ids_of(cu))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    # the same positions cut into other sequences (no empty one: position ids cannot mark those), per-sequence
    # advantages of the new count
    for cut in (cu, torch.tensor([0, 4, 5, 10]), torch.tensor([0, 7, 10])):
        inputs = dict(rest, advantages=torch.randn(len(cut) - 1, generator=torch.Generator().manual_seed(len(cut))))
        loss, logps = compiled(x, **inputs, position_ids=position_ids_of(cut))
        ref_loss, ref_logps = step(x, **inputs, cu_seqlens=cut)
        assert rel_err(loss, ref_loss) < 1e-6 and rel_err(logps, ref_logps) < 1e-6
        grads, ref_grads = _grads(loss, model, weight, None), _grads(ref_loss, model, weight, None)
        assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))
    assert counter.frame_count == 2  # [S] advantages: S = 4, then a dynamic S
    with pytest.raises(ValueError, match="position_ids must start a sequence"):
        compiled(x, **inputs, position_ids=position_ids_of(cut) + 1)


# the preference losses have no custom operator: compiled, they run eagerly as one graph break, and fullgraph=True
# refuses them by name (traced, they broke the graph a dozen times, recompiled per mask, and fullgraph=True failed
# on "ContextVar.get")
def test_compiled_preference_loss_runs_eagerly_as_one_graph_break():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(29, 8, generator=g)).requires_grad_()
    ids = torch.randint(0, 29, (4, 5), generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1

    def step(hidden, ids, mask):
        ref = fused_gspo.preference_reference_logps(hidden.detach(), weight.detach(), ids, mask, backend="torch")
        out = fused_gspo.fused_preference_loss(torch.tanh(hidden), weight, ids, mask, ref_chosen_logps=ref[0] - 0.1,
                                               ref_rejected_logps=ref[1] + 0.2, backend="torch")  # fmt: skip
        return 2.0 * out.loss, out.metrics

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter)
    compiled(hidden, ids, mask.flip(1).clamp(max=1) | (torch.arange(5) == 4))
    frames = counter.frame_count  # the graphs around the two calls
    loss, metrics = compiled(hidden, ids, mask)
    assert counter.frame_count == frames  # nothing traced reads the mask: another one does not recompile
    ref_loss, ref_metrics = step(hidden, ids, mask)
    assert rel_err(loss, ref_loss) < 1e-6 and metrics.keys() == ref_metrics.keys()
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref_grads = torch.autograd.grad(ref_loss, [hidden, weight])
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads, ref_grads, strict=True))
    with pytest.raises(torch._dynamo.exc.Unsupported, match="preference losses have no custom operator"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, ids, mask)
