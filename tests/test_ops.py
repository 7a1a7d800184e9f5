"""``torch.compile``: the custom operators, a training step compiled whole (``fullgraph=True``) equal to eager, and
no recompilation when the data or (marked dynamic) the shapes change."""

import pytest
import torch
from conftest import draw_problem, rel_err
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
@pytest.mark.parametrize("needs", [[True, True, False], [False, True, False], [False, False, False]])
def test_opcheck_policy_loss(needs):
    config = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence_token")
    x, weight, _, rest = _inputs(seed=4)
    args = (x, weight.detach(), None, rest["completion_ids"], rest["advantages"], rest["completion_mask"],
            rest["old_logps"], None, None, None, None, None, ops.config_key(config), "torch", needs,
            torch.float32)  # fmt: skip
    torch.library.opcheck(ops.policy_loss_op, args)


def test_opcheck_logprobs():
    x, weight, bias, rest = _inputs(seed=6, with_bias=True)
    ids = rest["completion_ids"].reshape(-1)
    h = x.reshape(-1, x.shape[-1])
    head = HeadParams(temperature=0.8, softcap=4.0)
    args = (h, weight.detach(), bias.detach(), ids, head.temperature, head.logit_scale, head.softcap, "torch", "auto",
            [True, True, True], torch.float32, "auto")  # fmt: skip
    torch.library.opcheck(ops.logprobs_op, args)


def test_config_round_trips_through_the_operator_key():
    config = PolicyLossConfig(loss_type="vespo", epsilon_high=0.3, delta=None, workspace_bytes=1 << 20, beta=0.1)
    assert ops._config(ops.config_key(config)) == config
