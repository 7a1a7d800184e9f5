"""Which dtypes the head computes in, decided in one place for every backend, pass and entry point.

- **compute dtype**: what the three GEMMs' operands are rounded to. The inputs' promoted dtype, or, under
  ``torch.autocast`` on the inputs' device, the autocast dtype (float64 inputs excepted, as autocast never lowers
  them). TRL 1.16's chunked head and the model's own ``lm_head`` under autocast do the same, so a model kept in fp32
  master weights with ``bf16=True`` runs bf16 GEMMs either way.
- **staging dtype** (``logits_dtype``): what a chunk's ``[n, V]`` logits tile is written in. ``"auto"``: the compute
  dtype when it is 16-bit (bf16/fp16), as TRL stages its tiles, else the statistics dtype; ``"float32"``: always the
  statistics dtype (fp32; fp64 for fp64 inputs), for more precision than TRL keeps. The statistics are always folded
  in the statistics dtype, from whatever the tile holds.
- **statistics dtype**: fp32, or fp64 for fp64 inputs: per-token log-probs, entropies and the loss.

Gradients come back in each input's own dtype (an fp32 master weight gets an fp32 gradient under autocast).
"""

from __future__ import annotations

import torch

LOGITS_DTYPES = ("auto", "float32")
HALF_DTYPES = (torch.bfloat16, torch.float16)


def stats_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-token statistics (and of the loss) for GEMMs in ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_logits_dtype(value) -> str:
    """``logits_dtype`` as one of :data:`LOGITS_DTYPES` (``torch.float32`` is accepted for ``"float32"``)."""
    if value is torch.float32:
        return "float32"
    if isinstance(value, str) and value in LOGITS_DTYPES:
        return value
    raise ValueError(f"logits_dtype must be 'auto' or 'float32' (torch.float32), got {value!r}")


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype for these inputs, autocast included (see the module docstring)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    device_type = hidden.device.type
    if dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def staging_dtype(compute: torch.dtype, logits_dtype: str = "auto") -> torch.dtype:
    """The logits tile's dtype for GEMMs in ``compute`` (see the module docstring)."""
    if normalize_logits_dtype(logits_dtype) == "auto" and compute in HALF_DTYPES:
        return compute
    return stats_dtype_for(compute)


__all__ = ["HALF_DTYPES", "LOGITS_DTYPES", "compute_dtype", "normalize_logits_dtype", "staging_dtype",
           "stats_dtype_for"]  # fmt: skip
