"""The preference losses through the fused head (``preference/head.py``): every backend against the float64 eager
path, pairs kept whole in the single pass, the sorting losses in two phases, CPO's per-position mean logits, bad
inputs."""

import pytest
import torch
from conftest import backend_device, logits_staged_in, rel_err, workspace_for
from hypothesis import given, settings
from hypothesis import strategies as st

import fused_gspo
from fused_gspo.chunked import SinglePassFunction
from fused_gspo.head import HeadParams, TorchTileOps
from fused_gspo.preference import CPOLossConfig, DPOLossConfig
from fused_gspo.preference.head import PairLayout, pair_order, position_mean_logits


def draw_pairs(B: int, T: int, H: int, V: int, seed: int, with_bias: bool = False) -> dict:
    """Random float64 inputs of a preference loss: masks with holes but a valid token in every row, reference
    log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (1.5 / H**0.5)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = (torch.rand(2 * B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    out = dict(hidden=hidden, weight=weight, completion_ids=ids, completion_mask=mask)
    if with_bias:
        out["bias"] = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    current = torch.log_softmax(hidden @ weight.t() + out.get("bias", 0.0), -1).gather(-1, ids.unsqueeze(-1))[..., 0]
    seq = (current * mask).sum(1)
    ref = seq + 0.3 * torch.randn(2 * B, generator=g, dtype=torch.float64)
    out["ref_chosen_logps"], out["ref_rejected_logps"] = ref[:B], ref[B:]
    return out


@st.composite
def preference_configs(draw):
    """A DPO or CPO configuration TRL 1.16 accepts, with the options that change the gradient."""
    if draw(st.booleans()):
        base = draw(st.sampled_from(["sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero", "sigmoid_norm"]))
        losses = [base] + (["sft"] if draw(st.booleans()) and base != "hinge" else [])
        return DPOLossConfig(
            loss_type=losses,
            loss_weights=[1.0, 0.5][: len(losses)] if len(losses) > 1 else None,
            beta=draw(st.sampled_from([0.1, 0.5])),
            ld_alpha=draw(st.sampled_from([None, 0.4])),
            use_weighting=draw(st.booleans()) and "sft" not in losses and base != "hinge",
            label_smoothing=0.1 if base == "robust" else 0.0,
        )
    loss_type = draw(st.sampled_from(["sigmoid", "hinge", "ipo", "simpo", "alphapo"]))
    alpha = 0.25 if loss_type == "alphapo" else draw(st.sampled_from([0.0, 0.0, 0.3]))
    return CPOLossConfig(loss_type=loss_type, beta=2.5 if loss_type == "alphapo" else 0.2, alpha=alpha,
                         simpo_gamma=0.1, cpo_alpha=draw(st.sampled_from([0.0, 1.0])))  # fmt: skip


def run(problem: dict, dtype: torch.dtype, backend: str, config, **options):
    """The loss, the metrics and the gradients (hidden, weight, bias) on the CPU."""
    device = backend_device(backend)
    inputs = {k: v.to(device) for k, v in problem.items()}
    for name in ("hidden", "weight", "bias"):
        if name in inputs:
            inputs[name] = inputs[name].to(dtype).requires_grad_()
    if isinstance(config, CPOLossConfig):
        inputs.pop("ref_chosen_logps"), inputs.pop("ref_rejected_logps")
    out = fused_gspo.fused_preference_loss(**inputs, config=config, backend=backend, **options)
    leaves = [inputs[k] for k in ("hidden", "weight", "bias") if k in inputs]
    grads = [g.cpu() for g in torch.autograd.grad(out.loss, leaves)]
    return out, grads


def _conditioning(config, ref) -> float:
    """How much the loss amplifies the relative rounding of the sequence log-probs: AlphaPO's reward
    ``(1 - exp(-alpha * logp)) / alpha`` turns an error ``e`` of ``logp`` into a relative error ``|alpha| e`` of
    ``exp(-alpha * logp)``, ``|alpha * logp|`` times the log-prob's own relative error; 1 for every other loss."""
    if not isinstance(config, CPOLossConfig) or config.alpha == 0:
        return 1.0
    logps = torch.cat([ref.chosen_logps, ref.rejected_logps]).abs().max()
    return max(1.0, abs(config.alpha) * float(logps))


# the chunked backends in the dtypes they serve, against the float64 eager path on the same rounded inputs;
# workspaces of 1-3 tokens' rows: chunks of one pair, or several. float32: 3e-5, as a margin near IPO's target
# cancels digits (random draws reached 2e-5 in the gradient); AlphaPO's exponent scales it further (_conditioning)
@pytest.mark.parametrize(
    "backend,dtype,tol",
    [("torch", torch.float32, 3e-5), ("triton", torch.float32, 3e-5), ("triton", torch.bfloat16, 2e-2)],
)
@settings(max_examples=25)
@given(config=preference_configs(), shape=st.tuples(st.integers(1, 3), st.integers(2, 6)),
       softcap=st.sampled_from([None, 4.0]), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_backend_matches_float64_reference(backend, dtype, tol, config, shape, softcap, seed):
    B, T = shape
    V = 23
    problem = draw_pairs(B, T, 6, V, seed, with_bias=seed % 2 == 0)
    rounded = {k: (v.to(dtype).double() if k in ("hidden", "weight", "bias") else v) for k, v in problem.items()}
    head = dict(final_logit_softcapping=softcap, temperature=0.9)
    workspace = workspace_for(2 * T * (1 + seed % 3), backend, dtype, V, 6)  # whole pairs, one to three per chunk
    with logits_staged_in(dtype if dtype != torch.float32 else None):  # bf16 inputs: logits staged in bf16, as TRL
        ref, ref_grads = run(rounded, torch.float64, "eager", config, **head)
    out, grads = run(problem, dtype, backend, config, workspace_bytes=workspace, **head)
    tol = tol * _conditioning(config, ref)
    assert rel_err(out.loss.cpu(), ref.loss, floor=0.1) < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want, floor=1e-3) < tol
    assert rel_err(out.chosen_logps.cpu(), ref.chosen_logps) < tol
    assert rel_err(out.rejected_logps.cpu(), ref.rejected_logps) < tol
    assert out.metrics.keys() == ref.metrics.keys()
    for key, value in ref.metrics.items():
        got = float(out.metrics[key])
        if "accuracies" in key or "accuracy" in key:  # a comparison may flip on a tie in bf16
            assert abs(got - float(value)) <= (0.5 if dtype == torch.bfloat16 else 1e-6), key
        else:
            assert abs(got - float(value)) <= 5 * tol * max(1.0, abs(float(value))), (key, got, float(value))


def _refuses_empty_rows(config, counts) -> bool:
    """Where TRL's loss divides by an empty row's count (NaN): CPO's averaged log-probs; a mean over the chosen
    tokens (DPO's sft, CPO's NLL) with none in any chosen row."""
    B = len(counts) // 2
    if isinstance(config, CPOLossConfig) and config.loss_type in ("ipo", "simpo") and 0 in counts:
        return True
    chosen_mean = "sft" in config.loss_type if isinstance(config, DPOLossConfig) else config.cpo_alpha != 0
    return chosen_mean and not any(counts[:B])


# rows with nothing to score: fused as TRL computes them (a log-prob of 0), refused only where TRL's loss is NaN
@settings(max_examples=20)
@given(config=preference_configs(), B=st.integers(1, 3), rows=st.sets(st.integers(0, 5), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_rows_with_nothing_to_score(config, B, rows, seed):
    problem = draw_pairs(B, 4, 6, 23, seed)
    mask = problem["completion_mask"].clone()
    mask[[r for r in rows if r < 2 * B]] = 0
    problem["completion_mask"] = mask
    workspace = 23 * 4 * 3 * 4 * (1 + seed % 3)
    if _refuses_empty_rows(config, mask.sum(1).tolist()):
        with pytest.raises(ValueError, match="completion_mask"):
            run(problem, torch.float32, "torch", config, workspace_bytes=workspace)
        return
    ref, ref_grads = run(problem, torch.float64, "eager", config)
    out, grads = run(problem, torch.float32, "torch", config, workspace_bytes=workspace)
    assert torch.isfinite(ref.loss) and rel_err(out.loss, ref.loss, floor=0.1) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want, floor=1e-3) < 1e-5
    empty = mask.sum(1) == 0
    assert not torch.cat([out.chosen_logps, out.rejected_logps])[empty].any()  # a sum over no token
    for key, value in ref.metrics.items():
        assert abs(float(out.metrics[key]) - float(value)) <= 5e-5 * max(1.0, abs(float(value))), key


def _spy(monkeypatch):
    seen = []
    original = SinglePassFunction.apply

    def spy(*args):
        seen.append(args[4].bounds)
        return original(*args)

    monkeypatch.setattr(SinglePassFunction, "apply", spy)
    return seen


def test_single_pass_keeps_both_members_of_every_pair(monkeypatch):
    problem = draw_pairs(4, 5, 6, 23, seed=1)
    seen = _spy(monkeypatch)
    counts = problem["completion_mask"].sum(1)
    pairs = counts[:4] + counts[4:]
    pair_ends = pairs.cumsum(0).tolist()
    # room for about two pairs per chunk (the torch tile ops: the tile and 2 temporaries, fp32)
    run(problem, torch.float32, "torch", DPOLossConfig(), workspace_bytes=23 * 4 * 3 * 2 * int(pairs.max()))
    assert len(seen) == 1 and len(seen[0]) > 1
    assert all(stop in pair_ends for _, stop in seen[0])


def test_sorting_losses_run_two_phases(monkeypatch):
    problem = draw_pairs(3, 4, 6, 23, seed=2)
    seen = _spy(monkeypatch)
    out, _ = run(problem, torch.float32, "torch", DPOLossConfig(loss_type="aot"))
    ref, _ = run(problem, torch.float64, "eager", DPOLossConfig(loss_type="aot"))
    assert seen == [] and rel_err(out.loss, ref.loss) < 1e-5


def test_pair_layout_orders_tokens_pair_by_pair():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)  # B = 2
    layout = PairLayout(mask)
    assert pair_order(2, "cpu").tolist() == [0, 2, 1, 3]
    # chosen 0 (positions 0, 1), rejected 0 (7, 8), chosen 1 (3), rejected 1 (9, 10, 11)
    assert layout.positions.tolist() == [0, 1, 7, 8, 3, 9, 10, 11]
    assert layout.pair_counts == [4, 4]
    hidden = torch.arange(12.0).view(4, 3, 1)
    packed = hidden[mask]  # row-major valid tokens
    assert torch.equal(layout.gather(hidden), layout.gather(packed, packed=True))
    values = torch.arange(1.0, 9.0)
    assert torch.equal(layout.scatter(values)[mask], values[torch.argsort(layout.positions)])


def test_packed_hidden_equals_every_position():
    problem = draw_pairs(2, 5, 6, 23, seed=3)
    valid = problem["completion_mask"].bool()
    config = DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    full, full_grads = run(problem, torch.float32, "torch", config)
    packed, packed_grads = run({**problem, "hidden": problem["hidden"][valid]}, torch.float32, "torch", config)
    assert rel_err(packed.loss, full.loss) < 1e-6 and rel_err(packed_grads[0], full_grads[0][valid]) < 1e-6


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_packed_hidden_shaped_like_the_mask(backend):
    """One valid token per row (n = 2B) and H = T: the packed [n, H] hidden has the mask's shape, and is still read
    as packed (it was read as [2B, T] positions: a crash)."""
    B, T = 2, 3
    problem = draw_pairs(B, T, T, 23, seed=5)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    mask[torch.arange(2 * B), torch.tensor([0, 2, 1, 1])] = 1
    problem["completion_mask"] = mask
    valid = mask.bool()
    config = DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])
    full, full_grads = run(problem, torch.float64, backend, config)
    packed_hidden = problem["hidden"][valid]
    assert packed_hidden.shape == mask.shape
    packed, packed_grads = run({**problem, "hidden": packed_hidden}, torch.float64, backend, config)
    assert rel_err(packed.loss, full.loss) < 1e-12 and rel_err(packed_grads[0], full_grads[0][valid]) < 1e-12


# a plain head (the linear identity) and a softcapped one (a no-grad chunked pass), against the full logits' mean
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_position_mean_logits(softcap):
    g = torch.Generator().manual_seed(4)
    hidden, weight, bias = (
        torch.randn(4, 7, 5, generator=g),
        torch.randn(31, 5, generator=g),
        torch.randn(31, generator=g),
    )
    head = HeadParams(temperature=0.8, logit_scale=1.2, softcap=softcap)
    got = position_mean_logits(hidden, weight, bias, head, TorchTileOps, 31 * 12 * 3)
    want = head.transform(hidden.double() @ weight.double().t() + bias.double()).mean(-1)
    assert rel_err(got, want) < 1e-6


def test_eager_cpo_takes_no_workspace():
    """The eager backend ignores workspace_bytes, CPO's softcapped ``logits/*`` mean included (a budget below one
    logits row was refused there, while DPO's eager path ran)."""
    problem = draw_pairs(2, 4, 6, 23, seed=7)
    config = CPOLossConfig(loss_type="simpo", simpo_gamma=0.1)
    head = dict(final_logit_softcapping=3.0)
    eager, eager_grads = run(problem, torch.float64, "eager", config, workspace_bytes=8, **head)
    torch_, torch_grads = run(problem, torch.float64, "torch", config, **head)
    for name in ("logits/chosen", "logits/rejected"):
        assert rel_err(torch.as_tensor(eager.metrics[name]), torch.as_tensor(torch_.metrics[name])) < 1e-12
    assert rel_err(eager.loss, torch_.loss) < 1e-12 and rel_err(eager_grads[1], torch_grads[1]) < 1e-12


def test_bad_inputs_are_refused():
    problem = draw_pairs(2, 4, 6, 23, seed=5)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        run({**problem, "hidden": problem["hidden"][:3], "completion_ids": problem["completion_ids"][:3],
             "completion_mask": problem["completion_mask"][:3]}, torch.float32, "torch", DPOLossConfig())  # fmt: skip
    empty = problem["completion_mask"].clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="averages each row's log-probs.*none in chosen row 1"):
        run({**problem, "completion_mask": empty}, torch.float32, "torch", CPOLossConfig(loss_type="simpo"))
    empty[0] = 0
    with pytest.raises(ValueError, match="sft loss averages over the chosen rows' tokens"):
        run({**problem, "completion_mask": empty}, torch.float32, "torch", DPOLossConfig(loss_type=["sigmoid", "sft"]))
    with pytest.raises(ValueError, match="NLL term"):
        run({**problem, "completion_mask": empty}, torch.float32, "torch", CPOLossConfig(cpo_alpha=0.5))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        run({**problem, "ref_chosen_logps": problem["ref_chosen_logps"][:1]}, torch.float32, "torch", DPOLossConfig())
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        run({k: v for k, v in problem.items() if k != "ref_rejected_logps"}, torch.float32, "torch", DPOLossConfig())
    valid = problem["completion_mask"].bool()
    with pytest.raises(ValueError, match="position_hidden"):
        run({**problem, "hidden": problem["hidden"][valid]}, torch.float32, "torch", CPOLossConfig())
    with pytest.raises(TypeError, match="DPOLossConfig or a CPOLossConfig"):
        fused_gspo.fused_preference_loss(problem["hidden"], problem["weight"], problem["completion_ids"],
                                         problem["completion_mask"], config=fused_gspo.PolicyLossConfig())  # fmt: skip


# Every tensor that may carry a gradient: hidden, weight, bias, and a MoE aux loss made differentiable in a stand-in
# router (issue 23: the single pass gave the router no gradient); the reference log-probs too, which the loss reads
# detached as TRL does (no gradient on any path). The eager gradients to float64 rounding on both chunked backends
# (the Triton backend's float64 chunks go to the PyTorch tile ops), and in float32 through the Triton kernels.
@pytest.mark.parametrize(
    "backend,dtype,tol",
    [("torch", torch.float64, 1e-12), ("triton", torch.float64, 1e-12), ("triton", torch.float32, 3e-5)],
)
@pytest.mark.parametrize(
    "config,pairs_per_chunk,strategy",
    [
        (DPOLossConfig(loss_type="sigmoid", router_aux_loss_coef=0.5), 2, "single_pass"),
        (CPOLossConfig(loss_type="simpo", router_aux_loss_coef=0.5, simpo_gamma=0.1, cpo_alpha=1.0), 2, "single_pass"),
        (DPOLossConfig(loss_type="aot", router_aux_loss_coef=0.5), 2, "two_phase"),  # couples every pair
        (CPOLossConfig(loss_type="sigmoid", router_aux_loss_coef=0.5), 0, "two_phase"),  # a pair outgrows a chunk
    ],
    ids=["dpo-sigmoid", "cpo-simpo", "dpo-aot", "cpo-small-workspace"],
)
def test_every_input_that_requires_grad_gets_the_eager_gradient(monkeypatch, backend, dtype, tol, config,
                                                                pairs_per_chunk, strategy):  # fmt: skip
    problem = draw_pairs(3, 4, 6, 23, seed=8, with_bias=True)
    if isinstance(config, CPOLossConfig):
        del problem["ref_chosen_logps"], problem["ref_rejected_logps"]
    problem["router"] = torch.randn(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    longest = int((problem["completion_mask"][:3].sum(1) + problem["completion_mask"][3:].sum(1)).max())
    ops = fused_gspo.backends.tile_ops_for(backend)
    tokens = max(pairs_per_chunk * longest, 2)  # pairs_per_chunk 0: two tokens, less than any pair
    workspace = tokens * 23 * dtype.itemsize * (1 + ops.temporaries)
    seen = _spy(monkeypatch)

    def grads(backend, **options):
        # the reference sees the backend's rounded inputs, in float64
        leaves = {k: v.to(dtype).to(dtype if backend != "eager" else torch.float64).requires_grad_()
                  for k, v in problem.items() if v.is_floating_point()}  # fmt: skip
        router = leaves.pop("router")
        aux_loss = (router.softmax(0) * router).sum()  # any differentiable function of the router
        inputs = {**{k: v for k, v in problem.items() if k != "router"}, **leaves}
        out = fused_gspo.fused_preference_loss(**inputs, aux_loss=aux_loss, config=config, backend=backend, **options)
        leaves["router"] = router
        return out.loss, dict(zip(leaves, torch.autograd.grad(out.loss, list(leaves.values()), allow_unused=True),
                                  strict=True))  # fmt: skip

    loss, got = grads(backend, workspace_bytes=workspace)
    assert (seen != []) == (strategy == "single_pass")
    ref_loss, want = grads("eager")
    assert rel_err(loss, ref_loss, floor=0.1) < tol
    assert got.keys() == want.keys() and {"hidden", "weight", "bias", "router"} <= got.keys()
    for name, ref_grad in want.items():
        if name.startswith("ref_"):
            assert ref_grad is None and got[name] is None, name
        else:
            assert ref_grad is not None and float(ref_grad.norm()) > 0 and got[name] is not None, name
            assert got[name].dtype == dtype and rel_err(got[name], ref_grad) < tol, name
