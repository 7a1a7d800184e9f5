"""Shared fixtures and settings for the test suite.

Without a GPU, Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET must be set before any kernel
module is imported, so it is set here, first. ``-m gpu`` selects the GPU test mode (realistic shapes); those tests are
skipped where no CUDA device is present.
"""

import os

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


def cast_problem(problem: dict, dtype: torch.dtype, requires_grad: bool = True, device: str = "cpu") -> dict:
    """The head's float inputs in ``dtype`` (leaves with grad), everything on ``device``."""
    out = {k: v.to(device) for k, v in problem.items()}
    for name in ("hidden", "weight", "bias"):
        if name in out:
            out[name] = out[name].to(dtype).detach().requires_grad_(requires_grad)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, floor), in float64; NaN anywhere gives inf."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / max(float(ref.norm()), floor))
