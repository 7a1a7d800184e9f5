"""Vocabulary-parallel calls on several CPU processes (gloo) against the single-process call on the same data.

``python -m torch.distributed.run --standalone --nproc_per_node K vocab_parallel.py OUT PART [PART ...]``. Every rank
draws the same data, runs each case twice (the head's weight a ``Shard(0)`` DTensor over the K ranks, and the plain
weight in this one process) and asserts equal loss, metrics, per-token outputs and gradients, and outputs identical
on every rank. Parts: ``functional`` (every objective class, vocabularies divisible and not by K, hidden layouts,
``fused_logprobs``, DPO and CPO, the torch and the Triton tile ops), ``training`` (a few optimizer steps of a tiny
model whose head is parallelized with ``parallelize_module``), ``refusals`` (the named errors), ``transformers`` (a
model loaded with ``tp_plan="auto"``). Each rank writes ``OUT/<part>-<rank>.json``: the checks it passed, with
their largest relative error, which the test reads back (so a part that silently did nothing fails).
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from conftest import draw_problem  # noqa: E402  (sets TRITON_INTERPRET without a GPU)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor  # noqa: E402

import fused_gspo  # noqa: E402
from fused_gspo.parallel import ReplicaMismatchError, UnsupportedPlacementError  # noqa: E402
from fused_gspo.preference import CPOLossConfig, DPOLossConfig  # noqa: E402

RANK, WORLD = 0, 1
CHECKS: dict[str, float] = {}


def rel(out, ref) -> float:
    out, ref = torch.as_tensor(out).detach().double(), torch.as_tensor(ref).detach().double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all() == torch.isfinite(ref).all(), (out, ref)
    return float((out - ref).norm() / max(float(ref.norm()), 1e-12))


def check(name: str, out, ref, tol: float) -> None:
    if isinstance(out, DTensor):
        out = out.full_tensor()
    err = rel(out, ref)
    if not err <= tol:
        raise AssertionError(f"rank {RANK}/{WORLD} {name}: relative error {err:.3e} > {tol:.1e}\n{out}\n{ref}")
    CHECKS[name] = max(CHECKS.get(name, 0.0), err)


def same_on_every_rank(name: str, *values: torch.Tensor) -> None:
    """The values' bits are the same on every rank."""
    mine = torch.cat([v.detach().double().reshape(-1) for v in values])
    everyone = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(everyone, mine)
    for r, theirs in enumerate(everyone):
        assert torch.equal(theirs, mine), f"{name}: rank {r} differs from rank {RANK}"
    CHECKS[f"{name}: identical on every rank"] = 0.0


def sharded(t, mesh, placement=None):
    return None if t is None else distribute_tensor(t.detach(), mesh, [placement or Shard(0)])


def leaves(head: dict, dtype, mesh=None, hidden_placement=None):
    """Fresh leaves of the head's inputs in ``dtype``: plain, or (``mesh``) the weight and bias sharded over the
    vocabulary and hidden as given (plain, or a DTensor with ``hidden_placement``)."""
    out = {}
    for name in ("hidden", "weight", "bias", "position_hidden"):
        t = head.get(name)
        if t is None:
            continue
        t = t.to(dtype)
        if mesh is not None and name in ("weight", "bias"):
            t = sharded(t, mesh)
        elif mesh is not None and name == "hidden" and hidden_placement is not None:
            t = sharded(t, mesh, hidden_placement)
        out[name] = t.detach().requires_grad_(name != "position_hidden")
    return out


def compare_runs(name, call, head, dtype, mesh, tol, outputs, hidden_placement=None):
    """``call(**leaves)`` -> (loss to differentiate, {output name: tensor}) run plain and vocabulary-parallel."""
    ref_leaves = leaves(head, dtype)
    ref_loss, ref_out = call(**ref_leaves)
    ref_loss.backward()
    tp_leaves = leaves(head, dtype, mesh, hidden_placement)
    tp_loss, tp_out = call(**tp_leaves)
    tp_loss.backward()
    check(f"{name}: loss", tp_loss, ref_loss, tol)
    assert set(tp_out) == set(ref_out), (name, set(tp_out) ^ set(ref_out))
    for key in outputs if outputs is not None else ref_out:
        check(f"{name}: {key}", tp_out[key], ref_out[key], tol)
    for key in ("hidden", "weight", "bias"):
        if key in ref_leaves:
            grad = tp_leaves[key].grad
            if key in ("weight", "bias"):
                assert isinstance(grad, DTensor) and tuple(grad.placements) == (Shard(0),), (name, key, grad)
            if key == "hidden" and hidden_placement is not None:
                assert isinstance(grad, DTensor) and tuple(grad.placements) == (hidden_placement,), (name, grad)
            assert float(ref_leaves[key].grad.norm()) > 0, f"{name}: the reference's {key} gradient is zero"
            check(f"{name}: d{key}", grad, ref_leaves[key].grad, tol)
    same_on_every_rank(name, tp_loss, *(v for v in tp_out.values() if isinstance(v, torch.Tensor)))


# ---------------------------------------------------------------------------------------------------------------------
# Policy losses: one case per objective class


def packed(problem: dict) -> dict:
    """The padded problem's rows packed end to end (every position kept; the mask marks the scored ones)."""
    B, T, H = problem["hidden"].shape
    out = dict(
        hidden=problem["hidden"].reshape(B * T, H),
        weight=problem["weight"],
        completion_ids=problem["completion_ids"].reshape(-1),
        completion_mask=problem["completion_mask"].reshape(-1),
        advantages=problem["advantages"],
        old_logps=problem["old_logps"].reshape(-1),
        cu_seqlens=torch.arange(0, B * T + 1, T),
    )
    if "bias" in problem:
        out["bias"] = problem["bias"]
    return out


POLICY_CASES = {
    # token coupling, the single pass cutting anywhere; a KL term
    "dapo_kl": (dict(with_ref=True, with_bias=True), dict(loss_type="dapo", epsilon_high=0.28, beta=0.04)),
    # sequence coupling: chunks of whole sequences (GSPO)
    "gspo": (dict(), dict(loss_type="grpo", importance_sampling_level="sequence")),
    # GSPO-token with per-token advantages
    "gspo_token": (dict(per_token_advantages=True), dict(importance_sampling_level="sequence_token")),
    # GMPO's geometric mean (log space clipping)
    "gmpo": (dict(), dict(loss_type="gmpo", epsilon=0.4)),
    # the entropy quantile mask (two phases) with an entropy bonus (a gradient through the entropy)
    "entropy_mask_bonus": (dict(), dict(loss_type="grpo", top_entropy_quantile=0.5, entropy_coef=0.05)),
    # RLOO, and the head transform in TRL's order with a bias
    "rloo_transform": (
        dict(with_bias=True),
        dict(loss_type="rloo", temperature=0.7, logit_scale=1.3, final_logit_softcapping=2.5),
    ),
    # on-policy Dr. GRPO (old_logps=None)
    "on_policy_dr_grpo": (dict(off_policy=False), dict(loss_type="dr_grpo", max_completion_length=5)),
    # packed rows (cu_seqlens), sequence level
    "packed_gspo": (dict(with_bias=True), dict(loss_type="grpo", importance_sampling_level="sequence")),
}


def policy_case(name, V, mesh, dtype=torch.float64, backend="torch", tol=1e-10, hidden_placement=None):
    draw, config = POLICY_CASES[name]
    problem = draw_problem(3, 5, 8, V, seed=V * 31 + len(name), **draw)
    if name.startswith("packed"):
        problem = packed(problem)
    head = {k: problem.pop(k) for k in ("hidden", "weight", "bias") if k in problem}
    rows = -(-V // WORLD)
    workspace = rows * 8 * 3 * 6  # chunks of a few tokens (whole rows of 5 for sequence coupling) on every rank

    def call(hidden, weight, bias=None):
        out = fused_gspo.fused_policy_loss(
            hidden, weight, **problem, bias=bias, backend=backend, workspace_bytes=workspace, **config
        )
        values = {"logps": out.logps, "entropy": out.entropy, **{f"metric {k}": v for k, v in out.metrics.items()}}
        if out.entropy_mask is not None:
            values["entropy_mask"] = out.entropy_mask
        return out.loss, values

    label = f"{name} V={V} {backend} {str(dtype)[6:]}" + (f" hidden {hidden_placement!r}" if hidden_placement else "")
    compare_runs(label, call, head, dtype, mesh, tol, None, hidden_placement)


# ---------------------------------------------------------------------------------------------------------------------
# Preference losses and fused_logprobs


def draw_pairs(B, T, H, V, seed, with_bias=False):
    """DPO/CPO inputs whose targets are often a row's argmax, with weight row V - 1 a copy of row 0 (in another
    shard): exact ties across ranks, where the first argmax (row 0) is the one TRL's accuracy counts."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(H))
    direction = hidden.mean((0, 1))
    weight[0] = weight[V - 1] = 6.0 * direction / direction.norm()  # the argmax at about a third of the positions
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if with_bias else None
    if bias is not None:
        bias[V - 1] = bias[0]
    logits = hidden @ weight.t() + (0.0 if bias is None else bias)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    pick = torch.rand(2 * B, T, generator=g)
    first = logits.argmax(-1)
    ids = torch.where(pick < 0.5, first, ids)  # the first argmax ...
    ids = torch.where((pick < 0.25) & (first == 0), torch.full_like(ids, V - 1), ids)  # ... or the row tied with it
    mask = (torch.rand(2 * B, T, generator=g) > 0.25).long()
    mask[:, 0] = 1
    current = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1))[..., 0]
    ref = (current * mask).sum(1) + 0.3 * torch.randn(2 * B, generator=g, dtype=torch.float64)
    head = dict(hidden=hidden, weight=weight, bias=bias)
    batch = dict(completion_ids=ids, completion_mask=mask, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    return head, batch


PREFERENCE_CASES = {
    # WPO weights (log sum p^2), logits/* (the mean logit) and mean_token_accuracy (the first argmax)
    "dpo_wpo": (DPOLossConfig(loss_type="sigmoid", use_weighting=True), dict()),
    "dpo_sft_softcap_bias": (
        DPOLossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        dict(final_logit_softcapping=3.0, temperature=0.8, with_bias=True),
    ),
    "dpo_aot_two_phases": (DPOLossConfig(loss_type="aot"), dict()),
    # CPO's logits/* over every position: without a softcap the vocabulary mean of the weight, with one a scored pass
    "cpo_simpo_nll": (CPOLossConfig(loss_type="simpo", cpo_alpha=1.0, simpo_gamma=0.1), dict(with_bias=True)),
    "cpo_alphapo_softcap": (
        CPOLossConfig(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1),
        dict(final_logit_softcapping=2.5, logit_scale=-0.8),
    ),
}


def preference_case(name, V, mesh, dtype=torch.float64, backend="torch", tol=1e-10):
    config, options = PREFERENCE_CASES[name]
    options = dict(options)
    head, batch = draw_pairs(2, 5, 8, V, seed=V * 17 + len(name), with_bias=options.pop("with_bias", False))
    if head["bias"] is None:
        head.pop("bias")
    if isinstance(config, CPOLossConfig):
        batch.pop("ref_chosen_logps"), batch.pop("ref_rejected_logps")
        head["position_hidden"] = head["hidden"] * 0.5 + 0.1  # the prompt and completion positions, say
    workspace = -(-V // WORLD) * 8 * 3 * 12

    def call(hidden, weight, bias=None, position_hidden=None):
        out = fused_gspo.fused_preference_loss(
            hidden, weight, **batch, bias=bias, position_hidden=position_hidden, config=config, backend=backend,
            workspace_bytes=workspace, **options,
        )  # fmt: skip
        values = {"chosen": out.chosen_logps, "rejected": out.rejected_logps, "logps": out.logps}
        return out.loss, {**values, **{f"metric {k}": v for k, v in out.metrics.items()}}

    if name == "dpo_wpo":  # the accuracy must be able to tell a tie across shards from a hit
        _, ref = call(**leaves(head, dtype))
        accuracy = float(ref["metric mean_token_accuracy"])
        assert 0.05 < accuracy < 0.95, f"the draw's accuracy {accuracy} would not test the first-argmax merge"
        logits = head["hidden"] @ head["weight"].t() + (head["bias"] if "bias" in head else 0.0)
        tied = (batch["completion_ids"] == V - 1) & (logits.argmax(-1) == 0) & batch["completion_mask"].bool()
        assert tied.any(), "no target ties the first argmax from another shard"
    compare_runs(f"{name} V={V} {backend} {str(dtype)[6:]}", call, head, dtype, mesh, tol, None)


def logprobs_case(V, mesh, dtype=torch.float64, backend="torch", tol=1e-10):
    g = torch.Generator().manual_seed(V)
    head = dict(
        hidden=torch.randn(4, 6, 8, generator=g, dtype=torch.float64),
        weight=torch.randn(V, 8, generator=g, dtype=torch.float64) * 0.5,
        bias=torch.randn(V, generator=g, dtype=torch.float64) * 0.3,
    )
    targets = torch.randint(0, V, (4, 6), generator=g)
    upstream = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)

    def call(hidden, weight, bias):
        logp, entropy = fused_gspo.fused_logprobs(
            hidden, weight, targets, bias=bias, temperature=1.2, final_logit_softcapping=4.0, return_entropy=True,
            backend=backend, workspace_bytes=-(-V // WORLD) * 8 * 3 * 5,
        )  # fmt: skip
        return (logp * upstream[0].to(dtype)).sum() + (entropy * upstream[1].to(dtype)).sum(), {
            "logp": logp,
            "entropy": entropy,
        }

    compare_runs(f"fused_logprobs V={V} {backend} {str(dtype)[6:]}", call, head, dtype, mesh, tol, None)
    with torch.no_grad():  # the no-grad pass (old / reference log-probs): no fused kernel, the chunked one
        plain = fused_gspo.fused_logprobs(head["hidden"], head["weight"], targets, backend=backend)
        split = fused_gspo.fused_logprobs(head["hidden"], sharded(head["weight"], mesh), targets, backend=backend)
    check(f"fused_logprobs no-grad V={V} {backend}", split, plain, tol)


def reference_logps_case(V, mesh, tol=1e-10):
    """``preference_reference_logps`` (the no-grad reference pass) on a sharded head, hidden plain or a DTensor."""
    head, batch = draw_pairs(2, 5, 8, V, seed=V, with_bias=True)
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    plain = fused_gspo.preference_reference_logps(head["hidden"], head["weight"], ids, mask, bias=head["bias"])
    for placement in (None, Shard(1), Replicate()):
        hidden = head["hidden"] if placement is None else sharded(head["hidden"], mesh, placement)
        split = fused_gspo.preference_reference_logps(
            hidden, sharded(head["weight"], mesh), ids, mask, bias=sharded(head["bias"], mesh), backend="torch"
        )
        for side, got, ref in zip(("chosen", "rejected"), split, plain, strict=True):
            check(f"preference_reference_logps V={V} hidden {placement!r}: {side}", got, ref, tol)


def vocabularies(ranks: int) -> tuple[int, int]:
    """Divisible by the mesh size, and not (at 3 ranks 27, not 24: V=24's draw clips every RLOO ratio, no gradient)."""
    return (27 if ranks == 3 else 8 * ranks), 8 * ranks + 5


def part_functional(mesh) -> None:
    for V in vocabularies(WORLD):
        for name in POLICY_CASES:
            policy_case(name, V, mesh)
        for name in PREFERENCE_CASES:
            preference_case(name, V, mesh)
        logprobs_case(V, mesh)
    V = 8 * WORLD + 5
    # hidden as a replicated DTensor, and sequence-parallel (Shard(1): gathered, its gradient reduce-scattered)
    policy_case("gspo", V, mesh, hidden_placement=Replicate())
    policy_case("gspo", V, mesh, hidden_placement=Shard(1))
    policy_case("packed_gspo", V, mesh, hidden_placement=Shard(0))
    reference_logps_case(V, mesh)
    # float32 inputs (statistics and collectives in fp32)
    policy_case("gspo_token", V, mesh, dtype=torch.float32, tol=2e-5)
    # the Triton tile ops (under the interpreter on CPU): targets outside the shard select no column there too
    policy_case("dapo_kl", V, mesh, dtype=torch.float32, backend="triton", tol=2e-5)
    preference_case("dpo_wpo", V, mesh, dtype=torch.float32, backend="triton", tol=2e-5)
    if WORLD == 4:  # DTensor cuts rows ceil(V / 4) at a time: the last rank holds no row at all at V=3 and V=5
        for V in (3, 5):
            rows = sharded(torch.zeros(V, 1), mesh).to_local().shape[0]
            step = -(-V // 4)
            assert rows == max(0, min(step, V - RANK * step)) and (rows == 0) == (RANK == 3), (V, RANK, rows)
        policy_case("gspo", 3, mesh)  # fewer rows than ranks
        preference_case("dpo_sft_softcap_bias", 5, mesh)


# ---------------------------------------------------------------------------------------------------------------------
# A few optimizer steps of a tiny model, its LM head parallelized with parallelize_module


class TinyPolicy(torch.nn.Module):
    def __init__(self, V: int, H: int):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.mixer = torch.nn.Linear(H, H)
        self.lm_head = torch.nn.Linear(H, V, bias=True)

    def forward(self, ids):
        x = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
        return torch.tanh(self.mixer(x))


def part_training(mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    V, H, B, T, steps = 8 * WORLD + 3, 16, 4, 6, 4
    torch.manual_seed(0)
    single = TinyPolicy(V, H).double()
    split = TinyPolicy(V, H).double()
    split.load_state_dict(single.state_dict())
    parallelize_module(split, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
    assert isinstance(split.lm_head.weight, DTensor)
    initial = {name: p.detach().clone() for name, p in single.named_parameters()}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=2e-2) for m in (single, split)]
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        ids = torch.randint(0, V, (B, T + 1), generator=g)
        mask = (torch.rand(B, T, generator=g) > 0.2).long()
        mask[:, 0] = 1
        advantages = torch.randn(B, generator=g, dtype=torch.float64)
        old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05 - math.log(V)
        losses = []
        for model, optimizer in zip((single, split), optimizers, strict=True):
            optimizer.zero_grad()
            out = fused_gspo.fused_policy_loss(
                model(ids[:, :-1]), model.lm_head, ids[:, 1:], advantages, mask, old_logps=old, backend="torch",
                loss_type="grpo", importance_sampling_level="sequence", workspace_bytes=V * 24 * 6,
            )  # fmt: skip
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss)
        check(f"training step {step}: loss", losses[1], losses[0], 1e-10)
    for (name, p_single), (_, p_split) in zip(single.named_parameters(), split.named_parameters(), strict=True):
        assert isinstance(p_split, DTensor) == name.startswith("lm_head"), name
        assert rel(p_single, initial[name]) > 1e-3, f"{name} did not train"
        check(f"training after {steps} AdamW steps: {name}", p_split, p_single, 1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Refused layouts


def expect(name: str, error: type, words: list[str], fn) -> None:
    try:
        fn()
    except error as exc:
        missing = [w for w in words if w not in str(exc)]
        assert not missing, f"{name}: {missing} not in the message: {exc}"
        CHECKS[f"refused: {name}"] = 0.0
        return
    raise AssertionError(f"{name}: no {error.__name__} raised")


def part_refusals(mesh) -> None:
    V = 8 * WORLD + 5
    problem = draw_problem(2, 4, 8, V, seed=5, with_bias=True)
    hidden, weight, bias = problem.pop("hidden"), problem.pop("weight"), problem.pop("bias")

    def loss(h=hidden, w=None, b=None, backend="torch", **overrides):
        w = sharded(weight, mesh) if w is None else w
        return fused_gspo.fused_policy_loss(h, w, bias=b, backend=backend, **{**problem, **overrides})

    expect("weight Shard(1)", UnsupportedPlacementError, ["weight", "Shard(dim=1)"],
           lambda: loss(w=sharded(weight, mesh, Shard(1))))  # fmt: skip
    expect("weight Replicate()", UnsupportedPlacementError, ["weight", "Replicate()", "to_local"],
           lambda: loss(w=sharded(weight, mesh, Replicate())))  # fmt: skip
    expect("plain bias with a sharded weight", UnsupportedPlacementError, ["bias", "plain tensor"],
           lambda: loss(b=bias))  # fmt: skip
    expect("bias Replicate()", UnsupportedPlacementError, ["bias"], lambda: loss(b=sharded(bias, mesh, Replicate())))
    expect("hidden sharded on its hidden dimension", UnsupportedPlacementError, ["hidden", "Shard(1)"],
           lambda: loss(h=sharded(hidden, mesh, Shard(2))))  # fmt: skip
    expect("a DTensor advantages", UnsupportedPlacementError, ["advantages"],
           lambda: loss(advantages=sharded(problem["advantages"], mesh, Replicate())))  # fmt: skip
    expect("backend='eager'", ValueError, ["eager", "vocabulary-parallel"], lambda: loss(backend="eager"))
    other_ids = (problem["completion_ids"] + RANK) % V  # each rank sampled its own completions
    expect("ranks holding different tokens", ReplicaMismatchError, ["completion_ids", "same on every rank"],
           lambda: loss(completion_ids=other_ids))  # fmt: skip
    other_hidden = hidden[:, : 4 - RANK % 2]  # each rank with its own sequence length
    expect("ranks holding different shapes", ReplicaMismatchError, ["shape"],
           lambda: loss(h=other_hidden, completion_ids=problem["completion_ids"][:, : 4 - RANK % 2],
                        completion_mask=problem["completion_mask"][:, : 4 - RANK % 2],
                        old_logps=problem["old_logps"][:, : 4 - RANK % 2]))  # fmt: skip
    # an argument one rank alone would refuse (another shape, a missing input, another dtype): refused on every rank
    # in the handshake, not by that rank's checks while the others wait in the call's first all-gather
    odd = RANK == WORLD - 1
    longer = torch.cat([problem["advantages"], problem["advantages"][:1]])
    expect("advantages of another shape on one rank", ReplicaMismatchError, ["advantages", "shapes"],
           lambda: loss(advantages=longer if odd else problem["advantages"]))  # fmt: skip
    expect("ref_logps missing on one rank", ReplicaMismatchError, ["ref_logps", "None"],
           lambda: loss(beta=0.1, ref_logps=None if odd else problem["old_logps"]))  # fmt: skip
    expect("hidden of another dtype on one rank", ReplicaMismatchError, ["hidden", "dtypes"],
           lambda: loss(h=hidden.float() if odd else hidden))  # fmt: skip
    expect("hidden wanting a gradient on one rank only", ReplicaMismatchError, ["hidden", "requires_grad"],
           lambda: loss(h=hidden.detach().requires_grad_(not odd)))  # fmt: skip
    # a DTensor beside a plain (replicated) weight: refused by name, not by torch's mixed DTensor/tensor error
    expect("a Shard(1) hidden beside a plain weight", UnsupportedPlacementError, ["hidden", "plain tensor"],
           lambda: loss(h=sharded(hidden, mesh, Shard(1)), w=weight))  # fmt: skip
    expect("a sharded bias beside a plain weight", UnsupportedPlacementError, ["bias", "plain tensor"],
           lambda: loss(w=weight, b=sharded(bias, mesh)))  # fmt: skip
    replicated = sharded(hidden, mesh, Replicate())
    expect("fused_logprobs: a Replicate() hidden beside a plain weight", UnsupportedPlacementError, ["hidden"],
           lambda: fused_gspo.fused_logprobs(replicated, weight, problem["completion_ids"]))  # fmt: skip
    pairs = dict(completion_ids=problem["completion_ids"], completion_mask=problem["completion_mask"])
    expect("CPO: a position_hidden DTensor beside a plain weight", UnsupportedPlacementError, ["position_hidden"],
           lambda: fused_gspo.fused_preference_loss(hidden, weight, **pairs, config=CPOLossConfig(),
                                                    position_hidden=replicated))  # fmt: skip
    expect("preference_reference_logps: a DTensor hidden beside a plain weight", UnsupportedPlacementError,
           ["hidden", "plain tensor"],
           lambda: fused_gspo.preference_reference_logps(replicated, weight, **pairs))  # fmt: skip
    if WORLD == 4:
        mesh_2d = init_device_mesh("cpu", (2, 2))
        expect("a 2-D mesh", UnsupportedPlacementError, ["1-D mesh"],
               lambda: loss(w=distribute_tensor(weight, mesh_2d, [Shard(0), Replicate()])))  # fmt: skip
    # the session still works after the refusals (no collective left half-done)
    out = loss()
    same_on_every_rank("a call after the refusals", out.loss)


# ---------------------------------------------------------------------------------------------------------------------
# A model loaded with transformers' tensor parallelism


def part_transformers(mesh, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(out_dir, "tiny-qwen2")
    if RANK == 0:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=8 * WORLD + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=WORLD, max_position_embeddings=64,
                             tie_word_embeddings=False)  # fmt: skip
        Qwen2ForCausalLM(config).save_pretrained(path)
    dist.barrier()
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    split = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, tp_plan="auto")
    weight = split.lm_head.weight
    assert isinstance(weight, DTensor) and tuple(weight.placements) == (Shard(0),), weight
    V = single.config.vocab_size
    initial = {name: p.detach().clone() for name, p in single.named_parameters()}
    sharded_layers = [name for name, p in split.named_parameters() if isinstance(p, DTensor)]
    assert "model.layers.0.mlp.down_proj.weight" in sharded_layers, sharded_layers  # the backbone is split too
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (single, split)]
    for step in range(2):
        g = torch.Generator().manual_seed(7 + step)
        ids = torch.randint(0, V, (3, 9), generator=g)
        mask = (torch.rand(3, 4, generator=g) > 0.2).long()
        mask[:, 0] = 1
        advantages = torch.randn(3, generator=g, dtype=torch.float64)
        old = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.05 - math.log(V)
        losses = []
        for model, optimizer in zip((single, split), optimizers, strict=True):
            optimizer.zero_grad()
            hidden = model.model(ids[:, :-1]).last_hidden_state[:, -4:]
            out = fused_gspo.fused_policy_loss(
                hidden, model.lm_head, ids[:, -4:], advantages, mask, old_logps=old, backend="torch",
                loss_type="grpo", importance_sampling_level="sequence",
            )  # fmt: skip
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss)
        check(f"transformers tp_plan step {step}: loss", losses[1], losses[0], 1e-10)
    moved = [name for name, p in single.named_parameters() if rel(p, initial[name]) > 1e-6]
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"} <= set(moved), moved
    for (name, p_single), (_, p_split) in zip(single.named_parameters(), split.named_parameters(), strict=True):
        check(f"transformers tp_plan after 2 SGD steps: {name}", p_split, p_single, 1e-9)


def main(out_dir: str, parts: list[str]) -> None:
    global RANK, WORLD
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (WORLD,))
    for part in parts:
        CHECKS.clear()
        if part == "transformers":
            part_transformers(mesh, out_dir)
        else:
            globals()[f"part_{part}"](mesh)
        with open(os.path.join(out_dir, f"{part}-{RANK}.json"), "w") as f:
            json.dump({"world": WORLD, "checks": CHECKS}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
