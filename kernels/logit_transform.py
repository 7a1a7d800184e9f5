"""The LM head's logit transform inside kernels: ``z = softcap(y * logit_scale) / temperature``.

``softcap(x) = c * tanh(x / c)``. Kernels receive three host-folded constants (see :func:`head_constants`):
``u_scale = logit_scale / c`` (the tanh argument's scale), ``z_scale`` (``c / temperature`` with the softcap,
``logit_scale / temperature`` without) and ``grad_scale = logit_scale / temperature``, so that
``dz/dy = grad_scale * sech^2(u)`` (just ``grad_scale`` without the softcap).

tanh and sech^2 are built from one ``exp`` here rather than taken from libdevice: the interpreter cannot call
libdevice, and this keeps the code it checks the code a GPU runs. Both stay within 1e-6 relative everywhere (a short
odd series near 0, where ``1 - e^{-2|u|}`` would cancel; just above its 1/16 switch tanh loses up to ~7e-7, a few
ulp; ``sech^2 = 4e / (1 + e)^2`` instead of ``1 - tanh^2``, which cancels where the softcap saturates).
"""

from __future__ import annotations

import triton
import triton.language as tl


def head_constants(logit_scale: float, softcap: float | None, temperature: float):
    """``(has_softcap, u_scale, z_scale, grad_scale)`` folded in double precision on the host."""
    logit_scale, temperature = float(logit_scale), float(temperature)
    if softcap is None:
        return False, 1.0, logit_scale / temperature, logit_scale / temperature
    softcap = float(softcap)
    return True, logit_scale / softcap, softcap / temperature, logit_scale / temperature


@triton.jit
def tanh_sech2(u):
    """``(tanh(u), sech(u)^2)`` elementwise, fp32, from ``e = exp(-2|u|)``."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    d = 1.0 + e
    a2 = a * a
    # tanh(a) = a - a^3/3 + 2a^5/15 - 17a^7/315 + O(a^9): below 1/16 the truncation is under 1e-11 relative
    series = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    t = tl.where(a < 0.0625, series, (1.0 - e) / d)
    t = tl.where(u < 0.0, -t, t)
    return t, 4.0 * e / (d * d)


@triton.jit
def head_logits(y, u_scale, z_scale, HAS_SOFTCAP: tl.constexpr):
    """Logits ``z`` from fp32 projections ``y``."""
    if HAS_SOFTCAP:
        t, _ = tanh_sech2(y * u_scale)
        z = t * z_scale
    else:
        z = y * z_scale
    return z
