"""The public API against the float64 reference: every backend, objective and option; degenerate and bad inputs."""

import math

import pytest
import torch
from conftest import (
    SEQUENCE_TRAINERS,
    backend_device,
    cast_problem,
    draw_problem,
    logits_staged_in,
    objectives,
    rel_err,
    run_policy_loss,
    workspace_for,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fused_gspo
from fused_gspo import fused_logprobs, fused_policy_loss


def _floats(metrics: dict) -> dict[str, float]:
    """Metrics are 0-dim tensors (no host synchronisation when they are made); compare their values."""
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
    return {k: float(v) for k, v in metrics.items()}


def _check_metrics(metrics, ref_metrics, tol, one_token):
    """Metrics equal; a clip fraction may differ by one token (``one_token``) that sits on a clip boundary."""
    assert metrics.keys() == ref_metrics.keys()
    for key, ref in ref_metrics.items():
        value = metrics[key]
        if math.isnan(ref):
            assert math.isnan(value), key
        elif key.startswith(("clip_ratio", "cispo_clip")):
            assert abs(value - ref) <= one_token + 1e-9, (key, value, ref)
        else:
            assert abs(value - ref) <= tol * max(1.0, abs(ref)), (key, value, ref)


# every backend in the dtypes it serves, each against the float64 eager path on the same rounded inputs (and the
# same 16-bit logits, for the default staging of 16-bit inputs; logits_dtype="float32" keeps them unrounded)
@pytest.mark.parametrize(
    "backend,dtype,tol,logits_dtype",
    [
        ("eager", torch.float32, 1e-5, "auto"),
        ("torch", torch.float32, 1e-5, "auto"),
        ("torch", torch.bfloat16, 1e-2, "auto"),
        ("torch", torch.bfloat16, 1e-2, "float32"),
        ("triton", torch.float32, 1e-5, "auto"),
        ("triton", torch.bfloat16, 1e-2, "auto"),
        ("triton", torch.float16, 1e-2, "auto"),
        ("triton", torch.bfloat16, 1e-2, "float32"),
    ],
)
@settings(max_examples=40)
@given(objective=objectives(), shape=st.tuples(st.integers(1, 4), st.integers(1, 7)), seed=st.integers(0, 2**31 - 1))
def test_backend_matches_float64_reference(backend, dtype, tol, logits_dtype, objective, shape, seed):
    cfg, opts = objective
    B, T = shape
    H, V = 12, 37
    if dtype in (torch.bfloat16, torch.float16):
        # bf16 logits can move a token across the entropy quantile or the clip boundary: keep those exact
        cfg = {**cfg, "top_entropy_quantile": 1.0}
    problem = draw_problem(B, T, H, V, seed=seed, **opts)
    # Workspace for 1-3 tokens per chunk: many chunks, cut mid-sequence or between sequences
    workspace = workspace_for(1 + seed % 3, backend if backend != "eager" else "torch", dtype, V, H, logits_dtype)
    # The reference sees the same rounded inputs as the backend, in float64, and 16-bit logits where the backend
    # stages them in 16 bits (bf16/fp16 inputs, logits_dtype="auto"), as TRL does
    rounded = {k: (v.to(dtype).double() if k in ("hidden", "weight", "bias") else v) for k, v in problem.items()}
    staged = dtype if dtype in (torch.bfloat16, torch.float16) and logits_dtype == "auto" else None
    with logits_staged_in(staged):
        ref, ref_grads = run_policy_loss(rounded, torch.float64, "eager", **cfg, workspace_bytes=workspace)
    out, grads = run_policy_loss(problem, dtype, backend, **cfg, workspace_bytes=workspace, logits_dtype=logits_dtype)

    assert out.loss.dtype == torch.float32
    # The loss sums terms of both signs (advantages, entropy bonus) of order 0.1-1: measure it against that scale,
    # not against a total that may cancel to ~0
    assert rel_err(out.loss, ref.loss, floor=0.1) < tol, (out.loss, ref.loss)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        assert rel_err(got, want) < tol
    valid = problem["completion_mask"].bool()
    assert rel_err(out.logps, ref.logps) < tol and rel_err(out.entropy, ref.entropy) < tol
    assert (out.logps[~valid] == 0).all() and (out.entropy[~valid] == 0).all()
    if dtype == torch.float32:
        shortest = int(problem["completion_mask"].sum(1).clamp(min=1).min())
        _check_metrics(out.metrics, ref.metrics, tol, one_token=1.0 / shortest)
    else:
        assert out.metrics.keys() == ref.metrics.keys()
        assert abs(out.metrics["entropy"] - ref.metrics["entropy"]) < 5e-2 * max(1.0, abs(ref.metrics["entropy"]))


# ---------------------------------------------------------------------------------------------------------------
# Degenerate inputs


# the reference and the chunked path: token-, sequence- and RLOO/GMPO-level normalizers with nothing to score
@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo", "gmpo", "rloo"])
def test_no_valid_token_gives_zero_gradients(backend, loss_type):
    problem = draw_problem(2, 4, 8, 11, seed=1)
    problem["completion_mask"] = torch.zeros(2, 4, dtype=torch.long)
    out, grads = run_policy_loss(problem, torch.float32, backend, loss_type=loss_type, epsilon=0.2)
    # TRL's value: token sums vanish; GMPO and RLOO see a ratio of exactly 1 for an empty sequence, so -mean(A)
    expected = -problem["advantages"].mean().item() if loss_type in SEQUENCE_TRAINERS else 0.0
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert out.metrics["entropy"] == 0.0


# a single valid token: the smallest chunk, one row
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_one_token(backend):
    problem = draw_problem(1, 1, 5, 7, seed=2)
    out, grads = run_policy_loss(
        problem, torch.float32, backend, loss_type="grpo", importance_sampling_level="sequence"
    )
    ref, ref_grads = run_policy_loss(
        problem, torch.float64, "eager", loss_type="grpo", importance_sampling_level="sequence"
    )
    assert rel_err(out.loss, ref.loss) < 1e-5
    assert all(rel_err(g, r) < 1e-5 for g, r in zip(grads, ref_grads, strict=True))


def test_sequence_longer_than_65535_tokens():
    B, T, H, V = 1, 70_000, 4, 9
    problem = draw_problem(B, T, H, V, seed=4)
    out, grads = run_policy_loss(
        problem, torch.float32, "torch", loss_type="grpo", importance_sampling_level="sequence"
    )
    ref, ref_grads = run_policy_loss(
        problem, torch.float64, "eager", loss_type="grpo", importance_sampling_level="sequence"
    )
    assert rel_err(out.loss, ref.loss) < 1e-5
    assert all(rel_err(g, r) < 1e-4 for g, r in zip(grads, ref_grads, strict=True))


def test_vocabulary_of_256k():
    problem = draw_problem(2, 3, 4, 256_000, seed=5)
    out, grads = run_policy_loss(problem, torch.float32, "torch", loss_type="dapo")
    ref, ref_grads = run_policy_loss(problem, torch.float64, "eager", loss_type="dapo")
    eager, eager_grads = run_policy_loss(problem, torch.float32, "eager", loss_type="dapo")
    assert rel_err(out.loss, ref.loss) < 1e-5
    # dhidden = (onehot - p) @ W sums 256k float32 terms that nearly cancel: eager float32 is as far off as we are
    for g, r, e in zip(grads, ref_grads, eager_grads, strict=True):
        assert rel_err(g, r) < max(1e-5, 1.5 * rel_err(e, r))


# strided views and a bf16 hidden with an fp32 head, through the reference and the chunked path
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_non_contiguous_and_mixed_dtype_inputs(backend):
    problem = draw_problem(3, 6, 10, 23, seed=6, with_ref=True, with_bias=True)
    ref, ref_grads = run_policy_loss(problem, torch.float64, "eager", loss_type="grpo", beta=0.04)
    # hidden as a transposed view, weight as the transpose of an [H, V] tensor, bf16 hidden with an fp32 head
    hidden = problem["hidden"].transpose(0, 1).contiguous().transpose(0, 1).float().requires_grad_()
    weight_t = problem["weight"].t().contiguous().float().requires_grad_()
    bias = problem["bias"].float().requires_grad_()
    out = fused_policy_loss(
        hidden,
        weight_t.t(),
        problem["completion_ids"].int(),
        problem["advantages"].double(),
        problem["completion_mask"].bool(),
        ref_logps=problem["ref_logps"],
        old_logps=problem["old_logps"].float(),
        bias=bias,
        loss_type="grpo",
        beta=0.04,
        backend=backend,
    )
    assert not hidden.is_contiguous() and not weight_t.t().is_contiguous()
    grads = torch.autograd.grad(out.loss, [hidden, weight_t, bias])
    assert rel_err(out.loss, ref.loss) < 1e-5
    assert rel_err(grads[0], ref_grads[0]) < 1e-5
    assert rel_err(grads[1].t(), ref_grads[1]) < 1e-5
    assert rel_err(grads[2], ref_grads[2]) < 1e-5

    mixed = fused_policy_loss(
        problem["hidden"].bfloat16(),
        problem["weight"].float(),
        problem["completion_ids"],
        problem["advantages"],
        problem["completion_mask"],
        ref_logps=problem["ref_logps"],
        old_logps=problem["old_logps"],
        bias=problem["bias"].float(),
        loss_type="grpo",
        beta=0.04,
        backend=backend,
    )
    assert rel_err(mixed.loss, ref.loss) < 1e-2


# both gradient paths (input embedding and LM head) land in one shared weight
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_tied_embeddings(backend):
    """The LM head shares its weight with the input embedding: both gradient paths must land in it."""
    torch.manual_seed(0)
    V, H, B, T = 19, 8, 2, 5
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    advantages = torch.tensor([0.7, -0.4])

    def loss_and_grad(backend_, dtype):
        emb = torch.nn.Embedding(V, H, _weight=torch.randn(V, H, generator=torch.Generator().manual_seed(1)).to(dtype))
        hidden = torch.tanh(emb(ids))
        out = fused_policy_loss(hidden, emb.weight, ids, advantages, mask, backend=backend_, loss_type="grpo")
        out.loss.backward()
        return out.loss, emb.weight.grad

    loss, grad = loss_and_grad(backend, torch.float32)
    ref_loss, ref_grad = loss_and_grad("eager", torch.float64)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


# the README's autograd list: checkpoint (both modes), two calls in one loss, .grad accumulation, inference_mode; one
# chunk (the single pass keeping its tile) and several (2 tokens each), the single pass and the two phases
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens_per_chunk", [None, 2])
def test_autograd_uses_of_the_loss(backend, tokens_per_chunk):
    from torch.utils.checkpoint import checkpoint

    problem = draw_problem(3, 5, 6, 17, seed=14, with_bias=True)
    workspace = "auto" if tokens_per_chunk is None else workspace_for(2, backend, torch.float32, 17, 6)
    names = ("hidden", "weight", "bias")
    for cfg in (dict(loss_type="dapo"), dict(loss_type="grpo", top_entropy_quantile=0.5)):
        ref, ref_grads = run_policy_loss(problem, torch.float64, "eager", **cfg)

        def loss_of(inputs, cfg=cfg, **over):
            return fused_policy_loss(**{**inputs, **over}, backend=backend, workspace_bytes=workspace, **cfg).loss

        for reentrant in (True, False):
            inputs = cast_problem(problem, torch.float32)
            leaves = [inputs[k] for k in names]
            checkpoint(lambda h, w, b, inputs=inputs: loss_of(inputs, hidden=h, weight=w, bias=b), *leaves,
                       use_reentrant=reentrant).backward()  # fmt: skip
            assert all(rel_err(x.grad, r) < 1e-5 for x, r in zip(leaves, ref_grads, strict=True)), reentrant
        inputs = cast_problem(problem, torch.float32)
        leaves = [inputs[k] for k in names]
        for x in leaves:
            x.grad = torch.ones_like(x)  # accumulated into, as autograd does
        (loss_of(inputs) + 2.0 * loss_of(inputs)).backward()
        assert all(rel_err(x.grad - 1, 3 * r) < 1e-5 for x, r in zip(leaves, ref_grads, strict=True))
        with torch.inference_mode():
            loss = loss_of(cast_problem(problem, torch.float32, requires_grad=False))
        assert not loss.requires_grad and rel_err(loss, ref.loss) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# fused_logprobs and the module


# any leading shape of targets, vocabularies down to one entry, with and without a softcap
@pytest.mark.parametrize("backend", ["eager", "torch"])
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    vocab=st.integers(1, 40),
    softcap=st.sampled_from([None, 2.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_logprobs_matches_log_softmax(backend, shape, vocab, softcap, seed):
    g = torch.Generator().manual_seed(seed)
    H = 6
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, H, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, tuple(shape), generator=g)
    kw = dict(bias=bias, temperature=0.8, logit_scale=1.3, final_logit_softcapping=softcap)

    def reference(h, w, b):
        z = (h @ w.t() + b) * 1.3
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp_all = torch.log_softmax(z / 0.8, -1)
        return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

    leaves = [x.float().requires_grad_() for x in (hidden, weight, bias)]
    logp, entropy = fused_logprobs(
        leaves[0],
        leaves[1],
        targets,
        return_entropy=True,
        backend=backend,
        workspace_bytes=1024,
        **{**kw, "bias": leaves[2]},
    )
    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref_logp, ref_entropy = reference(*ref_leaves)
    assert logp.shape == targets.shape and logp.dtype == torch.float32
    # A near-deterministic row has a log-prob near 0 and a tiny entropy that float32 knows only to ~1e-6 absolute:
    # floor the norms at 1
    assert rel_err(logp, ref_logp, floor=1.0) < 1e-5 and rel_err(entropy, ref_entropy, floor=1.0) < 1e-5
    weights = torch.randn(targets.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((logp * weights).sum() + (entropy * weights.flip(-1)).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_logp * weights).sum() + (ref_entropy * weights.flip(-1)).sum(), ref_leaves)
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(grads, ref_grads, strict=True))


def test_fused_logprobs_without_grad():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with torch.no_grad():
        logp = fused_logprobs(hidden, weight, torch.tensor([0, 4, 2]), backend="torch")
    assert logp.shape == (3,) and (logp < 0).all() and not logp.requires_grad


def test_module_holds_its_config():
    problem = draw_problem(2, 4, 6, 13, seed=9)
    module = fused_gspo.FusedPolicyLoss(loss_type="grpo", importance_sampling_level="sequence", backend="torch")
    assert "sequence" in repr(module)
    inputs = cast_problem(problem, torch.float32)
    out = module(**inputs)
    ref = fused_policy_loss(**inputs, loss_type="grpo", importance_sampling_level="sequence", backend="eager")
    assert rel_err(out.loss, ref.loss) < 1e-5
    with pytest.raises(ValueError, match="backend"):
        fused_gspo.FusedPolicyLoss(backend="gpu")


# [n, H] hidden states of the valid tokens only, an empty row included
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_packed_hidden_equals_padded(backend):
    problem = draw_problem(3, 6, 8, 21, seed=12, empty_row=True)
    cfg = dict(loss_type="grpo", importance_sampling_level="sequence", backend=backend)
    padded = cast_problem(problem, torch.float32)
    out = fused_policy_loss(**padded, **cfg)
    (grad,) = torch.autograd.grad(out.loss, [padded["hidden"]])
    valid = problem["completion_mask"].bool()
    packed_hidden = problem["hidden"][valid].float().requires_grad_()
    packed = fused_policy_loss(**{**padded, "hidden": packed_hidden}, **cfg)
    (packed_grad,) = torch.autograd.grad(packed.loss, [packed_hidden])
    assert rel_err(packed.loss, out.loss) < 1e-6 and _floats(out.metrics) == pytest.approx(_floats(packed.metrics))
    assert rel_err(packed_grad, grad[valid]) < 1e-6 and (grad[~valid] == 0).all()
    assert rel_err(packed.policy_loss, out.policy_loss) < 1e-6


# the no-grad pass: the torch chunks, and Triton's matmul-with-epilogue kernel
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_old_and_ref_logprob_pass_without_grad(backend):
    """Under no_grad the triton backend takes its matmul-with-epilogue kernel; every backend matches the reference."""
    problem = draw_problem(3, 5, 16, 45, seed=21)
    valid = problem["completion_mask"].bool()
    hidden, targets = problem["hidden"][valid], problem["completion_ids"][valid]
    ref = fused_logprobs(hidden, problem["weight"], targets, return_entropy=True, backend="eager", temperature=0.9)
    device = backend_device(backend)
    with torch.no_grad():
        got = fused_logprobs(
            hidden.float().to(device), problem["weight"].float().to(device), targets.to(device),
            return_entropy=True, backend=backend, temperature=0.9,
        )  # fmt: skip
    assert all(rel_err(g.cpu(), r) < 1e-5 for g, r in zip(got, ref, strict=True))


# no atomics: the same bits twice, for both chunked backends
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_results_are_deterministic(backend):
    """Same inputs, same bits: no atomics, no order-dependent reductions."""
    problem = draw_problem(3, 6, 10, 53, seed=31, with_ref=True)
    cfg = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, workspace_bytes=53 * 4 * 4 * 4)
    first, first_grads = run_policy_loss(problem, torch.float32, backend, **cfg)
    second, second_grads = run_policy_loss(problem, torch.float32, backend, **cfg)
    assert torch.equal(first.loss, second.loss) and _floats(first.metrics) == _floats(second.metrics)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Packed batches (cu_seqlens): every objective equals the padded call on the same data


def _pack(problem: dict, seed: int):
    """The padded problem as packed sequences: each row a random-length prompt (masked), then its positions up to
    the last valid one. Per-token tensors become [N], per-row ones [S]; the padded twin gets the same neutral values
    (vLLM ratio 1) where the packed rows have no position, so both hold the same data."""
    g = torch.Generator().manual_seed(seed)
    mask = problem["completion_mask"]
    B, T = mask.shape
    lengths = [int(row.nonzero().max()) + 1 if row.any() else 0 for row in mask]
    prompts = torch.randint(0, 4, (B,), generator=g).tolist()
    padded = dict(problem)
    if "importance_sampling_ratio" in padded and padded["importance_sampling_ratio"].shape == (B, T):
        keep = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
        padded["importance_sampling_ratio"] = torch.where(keep, padded["importance_sampling_ratio"], 1.0)
    H = problem["hidden"].shape[-1]
    packed = {k: [] for k in ("hidden", "completion_ids", "completion_mask", "old_logps", "ref_logps",
                              "sampling_logps", "importance_sampling_ratio", "advantages")}  # fmt: skip
    positions = []  # (row, col) of each packed completion position, -1 for prompts
    offset = 0
    for b in range(B):
        p, c = prompts[b], lengths[b]
        packed["hidden"].append(torch.cat([torch.randn(p, H, generator=g, dtype=torch.float64),
                                           problem["hidden"][b, :c]]))  # fmt: skip
        packed["completion_ids"].append(torch.cat([torch.zeros(p, dtype=torch.long), problem["completion_ids"][b, :c]]))
        packed["completion_mask"].append(torch.cat([torch.zeros(p, dtype=mask.dtype), mask[b, :c]]))
        for name in ("old_logps", "ref_logps", "sampling_logps"):
            if name in problem:
                packed[name].append(torch.cat([torch.full((p,), -3.0, dtype=torch.float64), problem[name][b, :c]]))
        positions += [(-1, -1)] * p + [(b, t) for t in range(c)]
        offset += p + c
    out = {k: torch.cat(v) for k, v in packed.items() if v}
    if problem["advantages"].dim() == 1:
        out["advantages"] = problem["advantages"]
    else:
        rows = [(torch.full((prompts[b],), 0.5, dtype=torch.float64), problem["advantages"][b, : lengths[b]])
                for b in range(B)]  # fmt: skip
        out["advantages"] = torch.cat([torch.cat(row) for row in rows])
    ratio = padded.get("importance_sampling_ratio")
    if ratio is not None:
        if ratio.shape == (B, 1):
            out["importance_sampling_ratio"] = ratio.squeeze(1)
        else:
            out["importance_sampling_ratio"] = torch.cat(
                [torch.cat([torch.ones(prompts[b], dtype=torch.float64), ratio[b, : lengths[b]]]) for b in range(B)]
            )
    for name in ("weight", "bias"):
        if name in problem:
            out[name] = problem[name]
    sizes = torch.tensor([prompts[b] + lengths[b] for b in range(B)])
    out["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    return padded, out, positions


# the float64 reference exactly, the chunked backends in float32 with chunks of 1-4 tokens
@pytest.mark.parametrize("backend,dtype,tol", [("eager", torch.float64, 1e-10), ("torch", torch.float32, 1e-5),
                                               ("triton", torch.float32, 1e-5)])  # fmt: skip
@settings(max_examples=25)
# T >= 2: TRL reads any [B, 1] tensor as per-sequence, entropy included, so a one-token padded batch averages its
# metrics over rows, masked ones too; the packed layout has no such quirk
@given(objective=objectives(), shape=st.tuples(st.integers(1, 4), st.integers(2, 6)), seed=st.integers(0, 2**31 - 1))
def test_packed_sequences_equal_the_padded_batch(backend, dtype, tol, objective, shape, seed):
    cfg, opts = objective
    B, T = shape
    problem = draw_problem(B, T, 8, 23, seed=seed, **opts)
    padded, packed, positions = _pack(problem, seed)
    assume(len(packed["cu_seqlens"]) - 1 != int(packed["cu_seqlens"][-1]))  # refused: see the next test
    workspace = 23 * 4 * 3 * (1 + seed % 4)  # 1-4 tokens per chunk: rows split across chunks, or whole rows
    ref, ref_grads = run_policy_loss(padded, dtype, backend, **cfg, workspace_bytes=workspace)
    out, grads = run_policy_loss(packed, dtype, backend, **cfg, workspace_bytes=workspace)
    assert rel_err(out.loss, ref.loss, floor=0.1) < tol
    valid = packed["completion_mask"].bool()
    rows_cols = [positions[i] for i in valid.nonzero().flatten().tolist()]
    index = tuple(torch.tensor([rc[i] for rc in rows_cols], dtype=torch.long) for i in (0, 1))
    assert rel_err(out.logps[valid], ref.logps[index]) < tol
    assert rel_err(out.entropy[valid], ref.entropy[index]) < tol
    # hidden's gradient lands on the packed positions that hold the padded tokens; weight's is the same
    packed_rows = [i for i, (r, _) in enumerate(positions) if r >= 0]
    rows = torch.tensor([positions[i][0] for i in packed_rows], dtype=torch.long)
    cols = torch.tensor([positions[i][1] for i in packed_rows], dtype=torch.long)
    assert rel_err(grads[0][packed_rows], ref_grads[0][rows, cols]) < tol
    prompt_rows = [i for i, (r, _) in enumerate(positions) if r < 0]
    assert (grads[0][prompt_rows] == 0).all()
    assert all(rel_err(g, r) < tol for g, r in zip(grads[1:], ref_grads[1:], strict=True))
    assert out.metrics.keys() == ref.metrics.keys()
    for key, value in ref.metrics.items():
        assert float(value) == pytest.approx(float(out.metrics[key]), rel=tol, abs=tol, nan_ok=True), key


def test_packed_layout_takes_position_ids_and_rejects_bad_offsets():
    problem = draw_problem(2, 4, 6, 11, seed=3)
    _, packed, _ = _pack(problem, 3)
    cu = packed.pop("cu_seqlens")
    position_ids = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:], strict=True)])
    inputs = cast_problem(packed, torch.float32)
    by_ids = fused_policy_loss(**inputs, position_ids=position_ids, backend="torch", loss_type="grpo")
    by_cu = fused_policy_loss(**inputs, cu_seqlens=cu, backend="torch", loss_type="grpo")
    assert torch.equal(by_ids.loss, by_cu.loss)
    with pytest.raises(ValueError, match="not both"):
        fused_policy_loss(**inputs, cu_seqlens=cu, position_ids=position_ids)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        fused_policy_loss(**inputs, cu_seqlens=cu + 1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        fused_policy_loss(**{**inputs, "advantages": torch.ones(3)}, cu_seqlens=cu)
    with pytest.raises(ValueError, match="max_completion_length"):
        fused_policy_loss(**inputs, cu_seqlens=cu, loss_type="dr_grpo", max_completion_length=None)
    # as many sequences as positions: [S] and [N] look alike
    one_each = {k: v[:2] for k, v in inputs.items() if k not in ("weight", "bias")}
    with pytest.raises(ValueError, match="as many sequences as positions"):
        fused_policy_loss(**one_each, weight=inputs["weight"], cu_seqlens=torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# Preference losses (the math and the head: tests/test_preference_*.py)


def test_fused_preference_loss_module_forms_and_reference_pass():
    from fused_gspo.preference import CPOLossConfig, DPOLossConfig
    from fused_gspo.preference.dpo import reference_logps

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 2, 5, 6, 19
    hidden = torch.randn(2 * B, T, H, generator=g)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    mask[1, 3:] = 0
    head = torch.nn.Linear(H, V, bias=True)
    ref_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g)
    ref_chosen, ref_rejected = fused_gspo.preference_reference_logps(
        ref_hidden, head, ids, mask, ld_alpha=0.5, backend="torch"
    )
    per_token = torch.log_softmax(head(ref_hidden), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    expected = reference_logps(per_token.detach(), mask, 0.5)
    assert rel_err(ref_chosen, expected[0]) < 1e-5 and rel_err(ref_rejected, expected[1]) < 1e-5

    refs = dict(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    by_module = fused_gspo.fused_preference_loss(hidden, head, ids, mask, beta=0.2, backend="torch", **refs)
    by_tensors = fused_gspo.fused_preference_loss(
        hidden, head.weight, ids, mask, bias=head.bias, config=DPOLossConfig(beta=0.2), backend="eager", **refs
    )
    assert rel_err(by_module.loss, by_tensors.loss) < 1e-5
    module = fused_gspo.FusedPreferenceLoss(CPOLossConfig(loss_type="simpo"), backend="torch", temperature=0.9)
    assert "simpo" in repr(module)
    out = module(hidden, head, ids, mask)
    ref = fused_gspo.fused_preference_loss(
        hidden, head.weight, ids, mask, bias=head.bias, config=CPOLossConfig(loss_type="simpo"), temperature=0.9,
        backend="eager",
    )  # fmt: skip
    assert rel_err(out.loss, ref.loss) < 1e-5 and set(out.metrics) == set(ref.metrics)
    with pytest.raises(ValueError, match="bias must be None"):
        fused_gspo.fused_preference_loss(hidden, head, ids, mask, bias=head.bias, **refs)


def test_preference_reference_logps_rejects_what_the_loss_rejects():
    """The reference pass checks its batch as fused_preference_loss does; it returned mispaired values for an odd row
    count, read a mask of 2s or halves as valid (and LD-DPO's positions from its cumsum), and took any ld_alpha."""
    g = torch.Generator().manual_seed(8)
    B, T, H, V = 2, 4, 6, 11
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.ones(2 * B, T, dtype=torch.long)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        fused_gspo.preference_reference_logps(hidden[:3], weight, ids[:3], mask[:3])
    for bad in (2 * mask, 0.5 * mask):
        with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
            fused_gspo.preference_reference_logps(hidden, weight, ids, bad, ld_alpha=0.5)
    with pytest.raises(ValueError, match="ld_alpha must be in"):
        fused_gspo.preference_reference_logps(hidden, weight, ids, mask, ld_alpha=2.0)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_gspo.preference_reference_logps(torch.randn(2 * B, T + 1, H), weight, ids, mask)
    with pytest.raises(ValueError, match="one row per valid token"):
        fused_gspo.preference_reference_logps(torch.randn(5, H), weight, ids, mask)
