"""``kernels/logit_transform.py``: the head transform inside the kernels, ``tanh`` / ``sech^2`` from one ``exp``.

Elementwise against float64 through a tiny test kernel (near 0, where ``1 - e^{-2|u|}`` would cancel, across the
series/closed-form switch at ``|u| = 1/16``, and deep in the softcap's saturation, where ``1 - tanh^2`` would be 0),
then through the gradient kernel that multiplies by ``sech^2``. Run under the Triton interpreter without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, HEAD_IDS, HEADS

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_gspo.head import HeadParams  # noqa: E402
from fused_gspo.kernels import logits_grad  # noqa: E402
from fused_gspo.kernels.logit_transform import head_constants, head_logits, tanh_sech2  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_buffers")

EPS = torch.finfo(torch.float32).eps
TINY = torch.finfo(torch.float32).tiny  # the smallest normal fp32


@triton.jit
def _transform_kernel(u_ptr, tanh_ptr, sech2_ptr, z_ptr, z_softcap_ptr, n, u_scale, z_scale, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    ok = offsets < n
    u = tl.load(u_ptr + offsets, mask=ok, other=0.0)
    t, s = tanh_sech2(u)
    tl.store(tanh_ptr + offsets, t, mask=ok)
    tl.store(sech2_ptr + offsets, s, mask=ok)
    tl.store(z_ptr + offsets, head_logits(u, u_scale, z_scale, False), mask=ok)
    tl.store(z_softcap_ptr + offsets, head_logits(u, u_scale, z_scale, True), mask=ok)


def _run(u: torch.Tensor, u_scale: float = 1.0, z_scale: float = 1.0):
    """``(tanh, sech2, z, z_softcap)`` of float32 ``u`` from the kernel helpers."""
    u = u.to(DEVICE)
    outs = [torch.full_like(u, float("nan")) for _ in range(4)]
    _transform_kernel[(1,)](u, *outs, u.numel(), u_scale, z_scale, BLOCK=triton.next_power_of_2(u.numel()))
    return [o.cpu() for o in outs]


def _magnitudes() -> torch.Tensor:
    """``|u|`` from fp32's smallest normal to deep saturation, dense around the switch at 1/16."""
    return torch.cat(
        [
            torch.logspace(-37, -1, 300, dtype=torch.float64),
            torch.linspace(0.055, 0.075, 200, dtype=torch.float64),
            torch.linspace(0.08, 60.0, 400, dtype=torch.float64),
        ]
    ).float()


def test_tanh_sech2_accuracy():
    mag = _magnitudes()
    u32 = torch.cat([mag, -mag, torch.zeros(1), torch.tensor([float("inf"), -float("inf")])])
    tanh, sech2, _, _ = _run(u32)
    u = u32.double()
    finite = torch.isfinite(u)
    ref_tanh, ref_sech2 = torch.tanh(u), 1.0 / torch.cosh(u[finite]) ** 2

    # tanh: full relative precision everywhere (the series keeps it near 0, where (1 - e) / (1 + e) cancels)
    rel = (tanh.double() - ref_tanh).abs() / ref_tanh.abs().clamp_min(1e-300)
    rel[u == 0] = tanh[u == 0].abs().double()
    assert rel.max() <= 1.5e-6, f"tanh: relative error {rel.max():.2e} at u = {u[rel.argmax()].item():.6g}"
    assert (tanh.abs() <= 1.0).all(), "|tanh| > 1: the softcap would exceed c"
    assert (tanh[u.abs() >= 10] == torch.sign(u32[u.abs() >= 10])).all(), "tanh saturates to exactly +-1"

    # sech^2: full relative precision while it is a normal fp32 (|u| < 43.5), the exp's argument rounding aside
    # (condition number 2|u|); 4 e / (1 + e)^2 never cancels, where 1 - tanh^2 is 0 from |u| ~ 9 on
    s, a = sech2[finite].double(), u[finite].abs()
    normal = ref_sech2 >= TINY
    rel = (s - ref_sech2).abs()[normal] / ref_sech2[normal]
    bound = 4 * EPS * (1 + 2 * a[normal])
    worst = (rel / bound).argmax()
    assert (rel <= bound).all(), f"sech^2: relative error {rel[worst]:.2e} at |u| = {a[normal][worst].item():.6g}"
    assert ((s - ref_sech2).abs()[~normal] <= TINY).all(), "sech^2 past fp32's normal range"
    assert (sech2[u.isinf()] == 0).all() and (tanh[u.isinf()] == torch.sign(u32[u.isinf()])).all()

    # odd and even, bit for bit; exact at 0
    n = mag.numel()
    assert torch.equal(tanh[:n], -tanh[n : 2 * n]) and torch.equal(sech2[:n], sech2[n : 2 * n])
    assert tanh[2 * n] == 0 and sech2[2 * n] == 1


# every head: the host-folded constants give softcap(y * scale) / temperature and its derivative
@pytest.mark.parametrize("head", HEADS, ids=HEAD_IDS)
def test_head_constants_fold_the_transform(head):
    has_softcap, u_scale, z_scale, grad_scale = head_constants(head.logit_scale, head.softcap, head.temperature)
    assert has_softcap == (head.softcap is not None)
    y = torch.linspace(-80, 80, 161, dtype=torch.float64, requires_grad=True)
    ref = head.transform(y)
    (ref_grad,) = torch.autograd.grad(ref.sum(), y)
    y = y.detach()
    if has_softcap:
        z, dz = torch.tanh(y * u_scale) * z_scale, grad_scale / torch.cosh(y * u_scale) ** 2
    else:
        z, dz = y * z_scale, torch.full_like(y, grad_scale)
    torch.testing.assert_close(z, ref.detach(), rtol=1e-14, atol=0)
    # (autograd's tanh derivative is 1 - tanh^2: absolutely, not relatively, accurate in saturation)
    torch.testing.assert_close(dz, ref_grad, rtol=1e-12, atol=1e-15)

    # the kernel's logits (head_logits, both branches) from the same constants, against float64
    y32 = y.float()
    _, _, z_plain, z_softcap = _run(y32, u_scale, z_scale)
    z_kernel = z_softcap if has_softcap else z_plain
    ref = head.transform(y32.double())
    err = (z_kernel.double() - ref).abs()
    assert (err <= (1.5e-6 + 2 * EPS) * ref.abs()).all(), f"z: relative error {(err / ref.abs()).max():.2e}"


def test_gradient_keeps_precision_in_saturation():
    """``dL/dy`` of a small softcap: entries in saturation (``|u|`` up to 40, sech^2 ~ 1e-34) keep their relative
    precision instead of flushing to 0 (``1 - tanh^2``); elementwise against float64."""
    head = HeadParams(temperature=0.9, logit_scale=1.0, softcap=2.0)
    mag = torch.cat(
        [torch.logspace(-9, -1, 60, dtype=torch.float64), torch.linspace(0.1, 40.0, 120, dtype=torch.float64)]
    )
    y = (torch.stack([mag, -mag, mag.flip(0)]) * head.softcap / head.logit_scale).float()
    n, vocab = y.shape
    targets = torch.tensor([0, vocab // 2, vocab - 1])
    u = y.double() * head.logit_scale / head.softcap
    z = head.softcap * torch.tanh(u) / head.temperature
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    lse, entropy = torch.logsumexp(z, -1), -(p * log_p).sum(-1)
    g_logp = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    g_ent = torch.tensor([0.4, 0.9, -0.5], dtype=torch.float64)
    dz = g_logp[:, None] * (torch.nn.functional.one_hot(targets, vocab) - p) - g_ent[:, None] * p * (
        log_p + entropy[:, None]
    )
    ref = dz * (head.logit_scale / head.temperature) / torch.cosh(u) ** 2
    out = (
        logits_grad.logits_grad_(
            y.to(DEVICE),
            targets.to(DEVICE),
            lse.float().to(DEVICE),
            entropy.float().to(DEVICE),
            g_logp.float().to(DEVICE),
            g_ent.float().to(DEVICE),
            head.logit_scale,
            head.softcap,
            head.temperature,
        )
        .cpu()
        .double()
    )
    assert (ref.abs() >= TINY).all()
    rel = (out - ref).abs() / ref.abs()
    saturated = u.abs() >= 10
    assert saturated.sum() > 100
    assert rel[saturated].max() <= 1e-5, f"saturated entries: relative error {rel[saturated].max():.2e}"
    assert rel.max() <= 1e-5, f"relative error {rel.max():.2e} at u = {u.flatten()[rel.argmax()].item():.4g}"
