"""The entry of a vocabulary-parallel call: from DTensor arguments to this rank's part of the ordinary call.

:func:`run` checks the layouts (:mod:`.placements`), takes the local shards (``to_local``, so that autograd hands the
weight's gradient back as a ``Shard(0)`` DTensor), agrees with the other ranks in one handshake
(:func:`.collectives.handshake`: the shards' offsets, the free memory every rank plans with, and a check that every
rank holds the same tokens and arguments of the same shapes and dtypes), then runs the public function itself on
the local tensors with the :class:`.context.VocabShard` active. The public functions call it first thing
(:mod:`fused_gspo.api`).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..plan.runtime import free_device_bytes
from .collectives import fingerprint, handshake
from .context import VocabShard, running_on
from .placements import (
    ReplicaMismatchError,
    check_bias,
    check_weight,
    is_dtensor,
    local_hidden,
    refuse_dtensors,
)

_MIB = 1 << 20


def head_of(weight, bias):
    """``(weight, bias)`` of an LM-head module (its own bias; the ``bias`` argument must then be None) or of a
    weight tensor."""
    if not isinstance(weight, nn.Module):
        return weight, bias
    if bias is not None:
        raise ValueError("bias must be None when weight is an LM-head module: the module's own bias is used")
    module_bias = getattr(weight, "bias", None)
    return weight.weight, module_bias if isinstance(module_bias, torch.Tensor) else None


def run(
    fn: Callable,
    hidden,
    weight,
    bias,
    *,
    backend: str,
    tokens: Mapping[str, torch.Tensor | None],
    others: Mapping[str, object] | None = None,
    extra_hidden: Mapping[str, torch.Tensor | None] | None = None,
):
    """``fn(hidden, weight, bias, **extra_hidden)`` on this rank's local tensors, vocabulary-parallel.

    ``tokens``: the integer tensors every rank must hold alike (ids, masks), checked by fingerprint. ``others``: the
    remaining arguments, refused if a DTensor hides among them. ``extra_hidden``: more hidden states (CPO's
    ``position_hidden``), localized like ``hidden`` (used without gradient).
    """
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "a vocabulary-parallel call (DTensor weight) is not supported under torch.compile: compile the model "
            "around the loss, not through it"
        )
    if backend == "eager":
        raise ValueError(
            "backend='eager' materializes the whole [tokens, vocab] logits and is not vocabulary-parallel; with a "
            "DTensor weight use backend='auto', 'torch' or 'triton'"
        )
    weight, bias = head_of(weight, bias)
    mesh = check_weight(weight)
    check_bias(bias, mesh)
    refuse_dtensors(**{k: v for k, v in {**tokens, **(others or {})}.items() if isinstance(v, torch.Tensor)})
    x, reduce = local_hidden("hidden", hidden, mesh)
    extras = {name: None if h is None else local_hidden(name, h, mesh)[0] for name, h in (extra_hidden or {}).items()}
    local_weight = weight.to_local()
    local_bias = None if bias is None else bias.to_local()
    # every tensor argument's layout is agreed on, so that a check one rank alone fails (another shape, a missing
    # input) fails on every rank here, not on one rank while the others wait in a collective of the call
    layouts = {"hidden": x, **extras, **tokens, **{k: v for k, v in (others or {}).items() if _is_tensor_or_none(v)}}
    shard = _agree(mesh, local_weight, weight.shape[0], x.device, layouts, tokens, reduce)
    with running_on(shard):
        return fn(x, local_weight, local_bias, **extras)


def _is_tensor_or_none(value) -> bool:
    return value is None or isinstance(value, torch.Tensor)


def _layout_fingerprint(t: torch.Tensor | None) -> torch.Tensor:
    """A fingerprint of a tensor argument's shape, dtype and ``requires_grad`` (None: its own value), on the host."""
    if t is None:
        return fingerprint(torch.tensor([-1]))
    dtype = zlib.crc32(str(t.dtype).encode())  # not hash(): Python's string hashes differ between processes
    return fingerprint(torch.tensor([t.dim(), *t.shape, dtype, int(t.requires_grad)], dtype=torch.long))


def _agree(mesh, local_weight, vocab: int, device: torch.device, layouts, tokens, reduce: bool) -> VocabShard:
    """The handshake: every rank's shard size, free memory (MiB, -1 off CUDA), fingerprints of every tensor
    argument's layout (``layouts``) and of each token tensor's values; refuses ranks that disagree."""
    free = free_device_bytes(device)
    values = [local_weight.shape[0], -1 if free is None else int(free) // _MIB]
    # the layouts first: a rank with other shapes or inputs must fail here, not in a later collective
    values += [_layout_fingerprint(t) for t in layouts.values()]
    named = {name: t for name, t in tokens.items() if t is not None}
    values += [fingerprint(t.to(device)) for t in named.values()]
    table = handshake(mesh.get_group(), mesh.size(), values, device)
    rows = [row[0] for row in table]
    starts = tuple(itertools.accumulate(rows, initial=0))
    if starts[-1] != vocab:
        raise ReplicaMismatchError(f"weight: the shards' rows {rows} do not add up to the vocabulary {vocab}")
    labels = [f"{n}: the ranks of the vocabulary-parallel mesh hold tensors of different shapes, dtypes or "
              "requires_grad (or None on some ranks)" for n in layouts]  # fmt: skip
    labels += [f"{n}: the ranks of the vocabulary-parallel mesh hold different values" for n in named]
    for column, label in enumerate(labels, start=2):
        if len({row[column] for row in table}) > 1:
            raise ReplicaMismatchError(
                f"{label}; every tensor but the head's shards must be the same on every rank (a tensor-parallel "
                "group samples the same completions). If weight is FSDP2's sharded parameter (data parallelism), "
                "pass the LM-head module itself instead"
            )
    frees = [row[1] for row in table]
    free_bytes = float(min(frees) * _MIB) if min(frees) >= 0 else None
    return VocabShard(mesh.get_group(), mesh.get_local_rank(), mesh.size(), starts, reduce, free_bytes)


__all__ = ["head_of", "is_dtensor", "run"]
