"""``kernels/launch_config.py``: the launch table, vocabulary splits, and what the kernels' signatures leave to
run time.

Host-side only (no kernel is launched), so these run the same with or without a GPU.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_gspo.kernels import launch_config, linear_logprob, logits_grad, logsumexp_stats  # noqa: E402

KERNEL_MODULES = [logsumexp_stats, logits_grad, linear_logprob]

# the kernels the host code launches (the other @triton.jit functions are device helpers they call)
LAUNCHED = {
    "_split_stats_kernel": logsumexp_stats._split_stats_kernel,
    "merge_stats_kernel": logsumexp_stats.merge_stats_kernel,
    "_logits_grad_kernel": logits_grad._logits_grad_kernel,
    "_linear_split_stats_kernel": linear_logprob._linear_split_stats_kernel,
}

# The compile-time switches a kernel may take besides block sizes: each selects a code path, never a length, so the
# number of compiled variants stays bounded (a new one must be added here on purpose)
FLAGS = {"NARROW_IN_PLACE", "SOFTWARE_BF16_ROUNDING", "NUM_STAGES", "EXTRA"}

# the arguments that vary from call to call: one compiled kernel must serve every value
LENGTHS = {"n_rows", "vocab", "hidden_size", "split_size", "num_splits"}


def _jit_kernels() -> dict:
    """Every ``*_kernel`` @triton.jit function of the kernel modules (compiled or interpreted)."""
    found = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and inspect.isfunction(getattr(value, "fn", None)):
                found[name] = value
    return found


def _parameters(kernel) -> dict[str, bool]:
    """``{name: is_constexpr}`` of a kernel's arguments."""
    fn = getattr(kernel, "fn", kernel)
    return {
        name: param.annotation in (tl.constexpr, "tl.constexpr")
        for name, param in inspect.signature(fn).parameters.items()
    }


def _not_specialized(kernel) -> set[str]:
    """The names in the kernel's ``do_not_specialize`` (a JITFunction keeps it as an attribute, the interpreter's
    InterpretedFunction in ``kwargs``)."""
    listed = getattr(kernel, "do_not_specialize", None)
    if listed is None:
        listed = getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    names = list(_parameters(kernel))
    return {names[item] if isinstance(item, int) else item for item in listed}


def test_every_launched_kernel_is_checked():
    assert set(_jit_kernels()) == set(LAUNCHED)


# every kernel the host code launches
@pytest.mark.parametrize("name", list(LAUNCHED))
def test_lengths_are_runtime_arguments(name):
    """Only block sizes and feature flags are tl.constexpr: no recompilation per sequence length or vocabulary."""
    kernel = LAUNCHED[name]
    params = _parameters(kernel)
    for arg, is_constexpr in params.items():
        if is_constexpr:
            assert arg.startswith(("BLOCK_", "HAS_", "DOT_")) or arg in FLAGS, f"{name}: {arg} is a constexpr"
        else:
            assert not arg.isupper(), f"{name}: {arg} looks like a compile-time switch but is a runtime argument"
    lengths = LENGTHS & set(params)
    assert lengths, f"{name} takes no length at all"
    assert not any(params[arg] for arg in lengths)
    assert not any(params[arg] for arg in params if arg.startswith("stride"))
    # the token count changes with every chunk (the last one is short): Triton would otherwise compile a variant for
    # n_rows == 1 and one for multiples of 16
    if "n_rows" in params:
        assert "n_rows" in _not_specialized(kernel), f"{name}: n_rows is specialized"


# both regimes: the GPU's table and the interpreter's (ids not "gpu": that keyword marks the GPU test mode)
@pytest.mark.parametrize("regime", list(launch_config.LAUNCH_CONFIGS), ids=lambda regime: f"{regime}_table")
def test_launch_table_blocks_are_powers_of_two(regime):
    table = launch_config.LAUNCH_CONFIGS[regime]
    assert set(table) == set(launch_config.LAUNCH_CONFIGS["gpu"]), "both regimes configure the same kernels"
    for kernel, cfg in table.items():
        if not isinstance(cfg, dict):
            assert isinstance(cfg, int) and cfg >= 1, f"{regime}/{kernel}"
            continue
        assert cfg["num_warps"] in (1, 2, 4, 8, 16), f"{regime}/{kernel}: num_warps {cfg['num_warps']}"
        assert cfg.get("num_stages", 1) >= 1
        blocks = {key: value for key, value in cfg.items() if key.startswith("BLOCK_")}
        assert blocks, f"{regime}/{kernel} has no block size"
        for key, value in blocks.items():
            assert value >= 1 and value & (value - 1) == 0, f"{regime}/{kernel}: {key} = {value}"
        # tl.dot needs at least 16 on each side of its tiles
        if kernel.startswith("linear_logprob"):
            assert min(blocks.values()) >= 16, f"{regime}/{kernel}: {blocks}"
    # the merge kernel reads all splits of a row in one tl.arange(0, MAX_SPLITS) block
    assert launch_config.MAX_SPLITS & (launch_config.MAX_SPLITS - 1) == 0
    assert launch_config.MAX_SPLITS <= 65535


def test_interpreter_workarounds_stay_off_the_gpu():
    """The interpreter's fixes (bf16 rounding done in software, bf16 dots in fp32) must never reach compiled kernels:
    a GPU rounds to nearest even and multiplies bf16 on tensor cores by itself."""
    gpu, interpreter = launch_config.LAUNCH_CONFIGS["gpu"], launch_config.LAUNCH_CONFIGS["interpreter"]
    for kernel, cfg in gpu.items():
        if isinstance(cfg, dict):
            assert not cfg.get("software_bf16_rounding", False), kernel
            assert not cfg.get("bf16_dot_in_fp32", False), kernel
            # the interpreter configures the same launch parameters, plus only its workarounds
            extra = set(interpreter[kernel]) - set(cfg)
            assert extra <= {"software_bf16_rounding", "bf16_dot_in_fp32"}, f"{kernel}: {extra}"
    # Triton 3.9's interpreter truncates fp32 -> bf16 and multiplies bf16 raw bits in tl.dot
    assert interpreter["logits_grad"]["software_bf16_rounding"]
    assert interpreter["linear_logprob"]["bf16_dot_in_fp32"]


def test_launch_config_applies_overrides_and_checks_blocks():
    assert launch_config.regime() == ("interpreter" if launch_config.interpreting() else "gpu")
    table = launch_config.LAUNCH_CONFIGS[launch_config.regime()]["logits_grad"]
    assert launch_config.launch_config("logits_grad") == table
    assert launch_config.launch_config("logits_grad", BLOCK_V=None) == table  # None: the table's value
    assert launch_config.launch_config("logits_grad", BLOCK_V=64)["BLOCK_V"] == 64
    # the table itself is left as it was
    assert launch_config.LAUNCH_CONFIGS[launch_config.regime()]["logits_grad"] == table
    for bad in (0, 3, 96, -64):
        with pytest.raises(ValueError, match="power of two"):
            launch_config.launch_config("logsumexp_stats", BLOCK_V=bad)


def test_vocab_splits_cover_the_vocabulary():
    for vocab in (1, 7, 64, 65, 700, 151_936, 262_144):
        for block in (64, 2048):
            for rows in (1, 3, 100_000):
                for requested in (None, 1, 5, 1000):
                    splits, size = launch_config.vocab_splits(rows, vocab, block, torch.device("cpu"), requested)
                    assert 1 <= splits <= launch_config.MAX_SPLITS
                    assert size % block == 0
                    assert (splits - 1) * size < vocab <= splits * size  # every split non-empty, all covered
                    if requested is not None:
                        assert splits <= max(requested, 1)


def test_vocab_splits_fill_the_device():
    """Without a requested count, splits are added until rows x splits reaches the target program count."""
    device = torch.device("cpu")
    target = launch_config.target_programs(device)
    assert target == launch_config.LAUNCH_CONFIGS[launch_config.regime()]["programs_per_sm"]
    for rows in (1, 2, 3, 1000):
        splits, _ = launch_config.vocab_splits(rows, 262_144, 64, device)
        assert splits == min(triton.cdiv(target, rows), launch_config.MAX_SPLITS)


def test_new_buffer_poisoning(monkeypatch):
    monkeypatch.setattr(launch_config, "POISON_BUFFERS", True)
    poisoned = launch_config.new_buffer((3, 5), "cpu")
    assert poisoned.dtype == torch.float32 and poisoned.shape == (3, 5) and poisoned.isnan().all()
    monkeypatch.setattr(launch_config, "POISON_BUFFERS", False)
    assert launch_config.new_buffer((4,), "cpu", dtype=torch.float64).dtype == torch.float64


def test_device_guard_is_a_no_op_off_cuda():
    with launch_config.device_guard(torch.zeros(1)):
        pass
