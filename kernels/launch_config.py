"""Launch parameters of every kernel in one table, and the host-side choices derived from it.

Two regimes: compiled kernels on a GPU, and the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) used by the
development machines and CI. The interpreter's cost grows with the number of block iterations (each iteration is a
handful of NumPy calls on a whole block), so it gets the largest blocks; a GPU gets blocks sized for registers and
occupancy. Kernels take these as ``tl.constexpr`` block sizes; lengths and counts are runtime arguments.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

# Debugging/testing aid: when True, buffers the kernels are meant to fill entirely are created filled with NaN, so an
# element a kernel fails to write shows up instead of reading back whatever memory held
POISON_BUFFERS = False

# The merge kernel reads every split of a row in one block of this width, so it bounds the number of vocabulary
# splits (and keeps grid axis 1 far below CUDA's 65,535).
MAX_SPLITS = 64

LAUNCH_CONFIGS = {
    "gpu": {
        # one row x one vocabulary split, BLOCK_V logits per iteration; SPLIT_LOGITS per split (the split count
        # depends on V only, so a token's statistics never depend on how many tokens share its launch)
        "logsumexp_stats": {"BLOCK_V": 2048, "num_warps": 8, "SPLIT_LOGITS": 16384},
        # BLOCK_R rows x all splits
        "merge_stats": {"BLOCK_R": 32, "num_warps": 4},
        # one row x BLOCK_V logits per iteration
        "logits_grad": {"BLOCK_V": 2048, "num_warps": 8},
        # BLOCK_SIZE elements of an fp32 gradient accumulator, scaled and cast
        "scale_cast": {"BLOCK_SIZE": 4096, "num_warps": 8},
        # BLOCK_N tokens x BLOCK_V vocabulary entries, BLOCK_H of the hidden size per tl.dot (bf16/fp16 operands;
        # sm_90 offline compile of the unit-stride variant contiguous inputs run: 202 registers, no spills, 96 KiB
        # shared memory)
        "linear_logprob": {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "num_warps": 8, "num_stages": 3},
        # fp32 operands (3xTF32 dots): twice the shared memory per element (sm_90: 194 registers, 64 KiB)
        "linear_logprob_fp32": {"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 32, "num_warps": 8, "num_stages": 3},
        # enough programs in flight to fill the machine: vocabulary splits are added until rows x splits reach
        # programs_per_sm x SMs
        "programs_per_sm": 8,
    },
    "interpreter": {
        "logsumexp_stats": {"BLOCK_V": 4096, "num_warps": 1, "SPLIT_LOGITS": 1 << 20},
        "merge_stats": {"BLOCK_R": 256, "num_warps": 1},
        # software_bf16_rounding: the interpreter's fp32 -> bf16 conversion truncates (Triton 3.9); a GPU rounds to
        # nearest even, which the kernel then does in integer arithmetic
        "logits_grad": {"BLOCK_V": 4096, "num_warps": 1, "software_bf16_rounding": True},
        "scale_cast": {"BLOCK_SIZE": 1 << 16, "num_warps": 1, "software_bf16_rounding": True},
        # bf16_dot_in_fp32: the interpreter's tl.dot multiplies bf16 operands' raw bits (Triton 3.9)
        "linear_logprob": {
            "BLOCK_N": 64,
            "BLOCK_V": 512,
            "BLOCK_H": 128,
            "num_warps": 1,
            "num_stages": 1,
            "bf16_dot_in_fp32": True,
        },
        "linear_logprob_fp32": {"BLOCK_N": 64, "BLOCK_V": 512, "BLOCK_H": 128, "num_warps": 1, "num_stages": 1},
        # one program per row already runs serially; extra splits only add launches
        "programs_per_sm": 1,
    },
}


def new_buffer(shape, device, dtype=torch.float32) -> torch.Tensor:
    """An uninitialized buffer for a kernel to fill (NaN-filled when :data:`POISON_BUFFERS` is set)."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def regime() -> str:
    return "interpreter" if interpreting() else "gpu"


def launch_config(kernel: str, **overrides) -> dict:
    """The table's entry for ``kernel`` in the current regime, with ``overrides`` (None values ignored) applied."""
    config = dict(LAUNCH_CONFIGS[regime()][kernel])
    config.update({key: value for key, value in overrides.items() if value is not None})
    for key, value in config.items():
        if key.startswith("BLOCK_") and (value < 1 or value & (value - 1)):
            raise ValueError(f"{kernel}: {key} must be a power of two, got {value}")
    return config


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to keep ``device`` busy."""
    per_sm = LAUNCH_CONFIGS[regime()]["programs_per_sm"]
    if device.type == "cuda" and not interpreting():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return per_sm * _multiprocessors(index)
    return per_sm


def vocab_splits(row_programs: int, vocab: int, block_v: int, device: torch.device, num_splits: int | None = None):
    """``(num_splits, split_size)``: the vocabulary cut into contiguous, block-aligned, non-empty ranges.

    ``num_splits`` (None: enough to reach :func:`target_programs` with ``row_programs`` programs per split) is capped
    by the number of blocks and by :data:`MAX_SPLITS`; ``split_size`` is a multiple of ``block_v``.
    """
    blocks = triton.cdiv(vocab, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(target_programs(device), max(row_programs, 1))
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    split_size = triton.cdiv(blocks, num_splits) * block_v
    return triton.cdiv(vocab, split_size), split_size


def fixed_vocab_splits(vocab: int, block_v: int, split_logits: int, num_splits: int | None = None):
    """``(num_splits, split_size)`` as :func:`vocab_splits`, but with about ``split_logits`` logits per split: a
    function of the vocabulary alone. The statistics kernel splits this way so that a token's log-prob is the same
    bits whichever chunk, pass or launch scores it (the no-grad pass and the training pass must agree exactly)."""
    if num_splits is None:
        num_splits = triton.cdiv(vocab, split_logits)
    blocks = triton.cdiv(vocab, block_v)
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    split_size = triton.cdiv(blocks, num_splits) * block_v
    return triton.cdiv(vocab, split_size), split_size


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
