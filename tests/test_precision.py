"""Which dtypes the head computes in: the compute dtype (autocast included), the staging of the logits, and the
``logits_dtype`` option's checks."""

import pytest
import torch

from fused_gspo import PolicyLossConfig
from fused_gspo.precision import compute_dtype, normalize_logits_dtype, staging_dtype, stats_dtype_for


def _pair(hidden_dtype, weight_dtype):
    return torch.ones(2, 3, dtype=hidden_dtype), torch.ones(5, 3, dtype=weight_dtype)


# the inputs' promoted dtype outside autocast, whatever autocast would do elsewhere
@pytest.mark.parametrize(
    "hidden_dtype,weight_dtype,expected",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.float64, torch.float32, torch.float64),
    ],
)
def test_compute_dtype_outside_autocast_is_the_promoted_dtype(hidden_dtype, weight_dtype, expected):
    assert compute_dtype(*_pair(hidden_dtype, weight_dtype)) == expected


def test_compute_dtype_follows_autocast_on_the_inputs_device():
    fp32 = _pair(torch.float32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(*fp32) == torch.bfloat16
        assert compute_dtype(*_pair(torch.float16, torch.float16)) == torch.bfloat16  # autocast's dtype wins
        assert compute_dtype(*_pair(torch.float64, torch.float64)) == torch.float64  # never lowered, as autocast
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(*fp32) == torch.float16
    with torch.autocast("cpu", enabled=False):
        assert compute_dtype(*fp32) == torch.float32
    # autocast on another device type leaves CPU tensors alone
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        assert compute_dtype(*fp32) == torch.float32


def test_staging_follows_the_compute_dtype_unless_asked_for_float32():
    assert staging_dtype(torch.bfloat16) == torch.bfloat16
    assert staging_dtype(torch.float16, "auto") == torch.float16
    assert staging_dtype(torch.bfloat16, "float32") == torch.float32
    assert staging_dtype(torch.bfloat16, torch.float32) == torch.float32
    assert staging_dtype(torch.float32) == torch.float32
    assert staging_dtype(torch.float64, "float32") == torch.float64  # fp64's statistics stay fp64
    assert stats_dtype_for(torch.bfloat16) == torch.float32 and stats_dtype_for(torch.float64) == torch.float64


def test_logits_dtype_option_is_checked_by_name():
    assert normalize_logits_dtype(torch.float32) == "float32"
    assert PolicyLossConfig(logits_dtype=torch.float32).logits_dtype == "float32"
    assert PolicyLossConfig().logits_dtype == "auto"
    for bad in ("bf16", torch.bfloat16, None, 32):
        with pytest.raises(ValueError, match="logits_dtype"):
            PolicyLossConfig(logits_dtype=bad)
    with pytest.raises(ValueError, match="logits_dtype"):
        PolicyLossConfig().replace(logits_dtype="float16")
