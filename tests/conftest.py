"""Shared fixtures and settings for the test suite.

Without a GPU, Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET must be set before any kernel
module is imported, so it is set here, first. ``-m gpu`` selects the GPU test mode (realistic shapes); those tests are
skipped where no CUDA device is present.
"""

import contextlib
import itertools
import os
from unittest import mock

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("FUSED_GSPO_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # CI replays a fixed stream of examples (a red CI must mean a regression); local runs draw new ones every time
    derandomize=os.environ.get("CI", "").lower() == "true",
    print_blob=True,
)
settings.load_profile("ci")

DEVICE = "cuda" if _HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="GPU test mode: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE


def draw_problem(
    B: int,
    T: int,
    H: int,
    V: int,
    *,
    seed: int,
    per_token_advantages: bool = False,
    off_policy: bool = True,
    with_ref: bool = False,
    with_sampling: bool = False,
    is_ratio_shape: str | None = None,
    with_bias: bool = False,
    empty_row: bool = False,
) -> dict:
    """Random float64 inputs of a policy loss (never zeros): a mask with holes, advantages bounded away from 0, and
    old/ref/sampling log-probs near the current ones so ratios are off-policy and clipping really happens."""
    import math

    from fused_gspo.head import HeadParams, full_logprobs

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (1.5 / math.sqrt(H))
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[:, 0] = 1
    if empty_row:
        mask[torch.randint(0, B, (1,), generator=g)] = 0
    shape = (B, T) if per_token_advantages else (B,)
    sign = torch.where(torch.rand(shape, generator=g) > 0.5, 1.0, -1.0).double()
    advantages = sign * (0.1 + torch.rand(shape, generator=g, dtype=torch.float64))
    problem = dict(hidden=hidden, weight=weight, completion_ids=ids, advantages=advantages, completion_mask=mask)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    if bias is not None:
        problem["bias"] = bias
    current, _ = full_logprobs(hidden, weight, bias, ids, HeadParams())

    def near(scale):
        return current + scale * torch.randn(B, T, generator=g, dtype=torch.float64)

    if off_policy:
        problem["old_logps"] = near(0.25)
    if with_ref:
        problem["ref_logps"] = near(0.3)
    if with_sampling:
        problem["sampling_logps"] = near(0.4)
    if is_ratio_shape == "token":
        problem["importance_sampling_ratio"] = torch.exp(0.2 * torch.randn(B, T, generator=g, dtype=torch.float64))
    elif is_ratio_shape == "sequence":
        problem["importance_sampling_ratio"] = torch.exp(0.2 * torch.randn(B, 1, generator=g, dtype=torch.float64))
    return problem


def backend_device(backend: str) -> str:
    """Where a backend's tests run: the GPU when there is one (Triton needs it without the interpreter), else CPU."""
    return DEVICE if backend in ("triton", "auto") else "cpu"


@contextlib.contextmanager
def logits_staged_in(dtype: torch.dtype | None):
    """The eager reference with its logits rounded to ``dtype`` (a straight-through rounding: the gradient passes as
    if it were not there), everything else as before: in float64, what a backend staging its logits in ``dtype``
    computes. As in TRL's chunked head, the product is rounded, then the bias added and the sum rounded again.
    None: unchanged."""
    import fused_gspo.head as head

    if dtype is None:
        yield
        return
    project = head._full_projection

    def round_through(y):
        return y + (y.to(dtype).to(y.dtype) - y).detach()

    def rounded(hidden, weight, bias, compute):
        y = round_through(project(hidden, weight, None, compute))
        return y if bias is None else round_through(y + bias.to(dtype).to(y.dtype))

    with mock.patch.object(head, "_full_projection", rounded):
        yield


def workspace_for(tokens: int, backend: str, dtype: torch.dtype, vocab: int, hidden: int, logits_dtype="auto") -> int:
    """A ``workspace_bytes`` holding exactly ``tokens`` tokens per chunk for ``backend`` with inputs of ``dtype``
    (the row bytes the planner counts: the staged logits row, the tile ops' temporaries, converted copies)."""
    from fused_gspo.backends import tile_ops_for
    from fused_gspo.plan.runtime import chunk_format

    device = backend_device(backend)
    fmt = chunk_format(tile_ops_for(backend), dtype, device == "cuda", dtype, logits_dtype)
    return tokens * fmt.bytes_per_token(vocab, hidden)


def cast_problem(problem: dict, dtype: torch.dtype, requires_grad: bool = True, device: str = "cpu") -> dict:
    """The head's float inputs in ``dtype`` (leaves with grad), everything on ``device``."""
    out = {k: v.to(device) for k, v in problem.items()}
    for name in ("hidden", "weight", "bias"):
        if name in out:
            out[name] = out[name].to(dtype).detach().requires_grad_(requires_grad)
    return out


def run_policy_loss(problem: dict, dtype: torch.dtype, backend: str, **cfg):
    """``fused_policy_loss`` on ``problem`` in ``dtype``: its output and the gradients w.r.t. hidden, weight (and
    bias), brought back to the CPU for comparison."""
    from fused_gspo import fused_policy_loss

    inputs = cast_problem(problem, dtype, device=backend_device(backend))
    out = fused_policy_loss(**inputs, backend=backend, **cfg)
    leaves = [inputs[k] for k in ("hidden", "weight", "bias") if k in inputs]
    grads = torch.autograd.grad(out.loss, leaves)
    out.loss, out.logps, out.entropy = out.loss.cpu(), out.logps.cpu(), out.entropy.cpu()
    return out, [g.cpu() for g in grads]


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, floor), in float64; NaN anywhere gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / max(float(ref.norm()), floor))


# ----------------------------------------------------------------------------------------------------------------------
# Shared by the Triton kernel tests (tests/test_kernels_*.py) and the Triton tile ops' tests (tests/test_triton_ops.py)

import math  # noqa: E402

from hypothesis import strategies as st  # noqa: E402

from fused_gspo.head import HeadParams  # noqa: E402

# every head transform: identity, temperature only, logit scale only, a small softcap (most logits saturated) with all
# three folded together, and a realistic softcap (Gemma's 30: nothing saturates at these spreads)
HEADS = [
    HeadParams(),
    HeadParams(temperature=0.7),
    HeadParams(logit_scale=1.7),
    HeadParams(temperature=1.3, logit_scale=0.6, softcap=2.5),
    HeadParams(temperature=0.9, softcap=30.0),
]
HEAD_IDS = ["plain", "temperature", "logit_scale", "softcap_small", "softcap_30"]

# tile shapes for hypothesis: 1 to 12 rows; a one-entry vocabulary or up to 700 entries (rows spanning several blocks
# with a small BLOCK_V); logits spread from flat (0.5) to peaked (12: entropy << |lse|)
tile_shapes = dict(
    n=st.integers(1, 12),
    vocab=st.one_of(st.just(1), st.integers(2, 700)),
    seed=st.integers(0, 2**31 - 1),
    spread=st.sampled_from([0.5, 3.0, 12.0]),
)


@pytest.fixture(scope="module")
def poison_buffers():
    """Buffers the kernels must fill are created NaN-filled (``launch_config.POISON_BUFFERS``) for the module, so an
    element left unwritten fails. Opt in with ``pytestmark = pytest.mark.usefixtures("poison_buffers")``."""
    from fused_gspo.kernels import launch_config  # noqa: PLC0415  (imports triton: after TRITON_INTERPRET is set)

    previous = launch_config.POISON_BUFFERS
    launch_config.POISON_BUFFERS = True
    yield
    launch_config.POISON_BUFFERS = previous


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str, atol: float = 1e-7) -> None:
    """``||out - ref|| <= rtol * ||ref|| + atol * sqrt(numel)`` (the floor for an all-zero reference); NaN fails."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values (unwritten or NaN)"
    err = (out64 - ref64).norm().item()
    bound = rtol * ref64.norm().item() + atol * math.sqrt(max(ref64.numel(), 1))
    assert err <= bound, f"{what}: ||out - ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref64.norm().item():.3e})"


def assert_max_close(ours, theirs, what: str, rel: float, atol: float = 1e-300) -> None:
    """Elementwise: the largest absolute difference within ``rel`` times the largest magnitude of either side; both
    sides finite and of one shape (the preference losses' comparisons with TRL). ``atol``: a floor for a float32
    side whose values can sit near zero while its rounding error stays that of its O(1) intermediates."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), (what, ours, theirs)
    scale = float(torch.cat([ours.abs().flatten(), theirs.abs().flatten(), ours.new_zeros(1)]).max())
    err = float(torch.cat([(ours - theirs).abs().flatten(), ours.new_zeros(1)]).max())
    assert err <= rel * scale + atol, f"{what}: max abs diff {err:.3e} at scale {scale:.3e}\n{ours}\n{theirs}"


def projection(n: int, vocab: int, seed: int, spread: float, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A nonzero float32 ``[n, V]`` projection on :data:`DEVICE` (a view with row stride ``V + pad``, the padding
    filled with 123.0) and targets hitting both ends of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * spread
    y = torch.where(y == 0, torch.full_like(y, 0.25), y).float()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[-1] = vocab - 1
    targets[0] = 0 if n > 1 else targets[0]
    buffer = torch.full((n, vocab + pad), 123.0, device=DEVICE)
    view = buffer[:, :vocab]
    view.copy_(y)
    return view, targets.to(DEVICE)


def row_grads(n: int, seed: int, present: bool) -> torch.Tensor | None:
    """A nonzero float32 ``[n]`` upstream gradient on :data:`DEVICE`, or None (``present=False``: no such term)."""
    if not present:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    return torch.where(g == 0, torch.full_like(g, 0.5), g).float().to(DEVICE)


# ----------------------------------------------------------------------------------------------------------------------
# The GPU test mode's findings and the plans a call ran


FINDINGS_ENV = "FUSED_GSPO_FINDINGS"


def record_finding(name: str, **data) -> dict:
    """What a GPU test saw that is worth keeping whether it passes or not (e.g. whether cuBLAS rounds a logit alike
    across chunkings): one JSON line ``{"finding": name, ...}`` appended to the file named by ``$FUSED_GSPO_FINDINGS``
    when it is set (``bench/gpu_issue21.sh`` sets it), and returned."""
    import json

    entry = {"finding": name, **data}
    path = os.environ.get(FINDINGS_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(entry, default=str) + "\n")
    return entry


@pytest.fixture
def planned_chunks(monkeypatch):
    """The plans the chunked calls ran, in order: ``(strategy, bounds)`` of each ``fused_logprobs``,
    ``fused_policy_loss`` and ``fused_preference_loss`` call that planned (the plan first tried; a re-plan after an
    out-of-memory error is not listed)."""
    import fused_gspo.api
    import fused_gspo.policy
    import fused_gspo.preference.head

    seen = []
    for module in (fused_gspo.api, fused_gspo.policy, fused_gspo.preference.head):
        original = module.run_planned

        def recording(run, plan, replan, device, _original=original):
            seen.append((plan.strategy, [tuple(b) for b in plan.bounds]))
            return _original(run, plan, replan, device)

        monkeypatch.setattr(module, "run_planned", recording)
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# Random objectives, and packed batches with their padded twins (tests/test_api.py, tests/test_policy.py)

import fused_gspo  # noqa: E402

SEQUENCE_TRAINERS = ("gmpo", "rloo")


@st.composite
def objectives(draw):
    """A random objective and the inputs it needs: (config overrides, :func:`draw_problem` options)."""
    loss_type = draw(st.sampled_from(fused_gspo.LOSS_TYPES))
    trainer_only = loss_type in SEQUENCE_TRAINERS
    cfg = {"loss_type": loss_type}
    if not trainer_only:
        cfg["importance_sampling_level"] = draw(st.sampled_from(fused_gspo.LEVELS))
        cfg["off_policy_mask_threshold"] = draw(st.sampled_from([None, 0.02]))
        cfg["entropy_coef"] = draw(st.sampled_from([0.0, 0.05]))
        if loss_type != "cispo":
            cfg["delta"] = draw(st.sampled_from([None, 1.6]))
    if loss_type != "rloo":
        cfg["beta"] = draw(st.sampled_from([0.0, 0.04]))
        cfg["use_bias_correction_kl"] = draw(st.booleans())
        cfg["top_entropy_quantile"] = draw(st.sampled_from([1.0, 1.0, 0.6]))
    cfg["epsilon"] = 0.4 if loss_type == "gmpo" else 0.2
    cfg["epsilon_high"] = draw(st.sampled_from([None, 0.28 if loss_type != "cispo" else 4.0]))
    cfg["temperature"] = draw(st.sampled_from([1.0, 0.7]))
    cfg["logit_scale"] = draw(st.sampled_from([1.0, 0.5]))
    cfg["final_logit_softcapping"] = draw(st.sampled_from([None, 3.0]))
    opts = {
        "off_policy": draw(st.booleans()),
        "with_ref": cfg.get("beta", 0.0) != 0.0,
        "with_sampling": not trainer_only and draw(st.booleans()),
        "is_ratio_shape": None if trainer_only else draw(st.sampled_from([None, "token", "sequence"])),
        "per_token_advantages": not trainer_only and draw(st.booleans()),
        "with_bias": draw(st.booleans()),
        "empty_row": draw(st.booleans()),
    }
    return cfg, opts


def draw_packed_problem(
    lengths: list[int], H: int, V: int, *, seed: int, sequence_old_logps: bool = False, holes: bool = True, **opts
):
    """A packed batch of sequences of the given ``lengths`` (0: an empty completion; every position packed, its mask
    with random holes unless ``holes=False``) and its padded twin, float64 inputs of a policy loss:
    ``(packed, padded, keep)``.

    The padded twin is ``[S, max(lengths) + 1]``: every row ends in positions the packed batch does not have (masked,
    with random hidden states and ids that must not matter; a vLLM ratio of 1, which TRL's VESPO sums over them).
    ``keep`` ``[S, T]`` marks the padded positions the packed batch holds, in its order. ``opts``:
    :func:`draw_problem`'s (``per_token_advantages``, ``off_policy``, ``with_ref``, ``with_sampling``,
    ``is_ratio_shape``, ``with_bias``); ``sequence_old_logps``: RLOO's per-sequence old log-probs (sums) ``[S]``."""
    opts.pop("empty_row", None)  # the lengths say which sequences are empty
    S, T = len(lengths), max(lengths, default=0) + 1
    padded = draw_problem(S, T, H, V, seed=seed, **opts)
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # the positions both layouts hold
    padded["completion_mask"] = ((torch.rand(S, T, generator=g) > (0.3 if holes else -1.0)) & keep).long()
    ratio = padded.get("importance_sampling_ratio")
    if ratio is not None and ratio.shape == (S, T):
        padded["importance_sampling_ratio"] = torch.where(keep, ratio, 1.0)
    if sequence_old_logps:
        padded["old_logps"] = (padded["old_logps"] * padded["completion_mask"]).sum(-1)
    packed = {}
    for name, x in padded.items():
        if name in ("weight", "bias") or x.shape[:1] != (S,) or x.dim() == 1:
            packed[name] = x  # the head, and per-sequence values [S]
        elif x.shape[:2] == (S, 1) and name == "importance_sampling_ratio":
            packed[name] = x.squeeze(1)  # per sequence: [S, 1] padded, [S] packed
        else:
            packed[name] = x[keep]
    packed["cu_seqlens"] = torch.tensor([0, *itertools.accumulate(lengths)])
    return packed, padded, keep
