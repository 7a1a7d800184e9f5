"""The entry of a vocabulary-parallel call: from DTensor arguments to this rank's part of the ordinary call.

:func:`run` checks the layouts (:mod:`.placements`), takes the local shards (``to_local``, so that autograd hands the
weight's gradient back as a ``Shard(0)`` DTensor), agrees with the other ranks in one handshake
(:func:`.collectives.handshake`: the shards' offsets, the free memory every rank plans with, and a check that every
rank holds the same tokens), then runs the public function itself on the local tensors with the
:class:`.context.VocabShard` active. The public functions call it first thing (:mod:`fused_gspo.api`).
"""

from __future__ import annotations

import itertools
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
    shard = _agree(mesh, local_weight, weight.shape[0], x, tokens, reduce)
    with running_on(shard):
        return fn(x, local_weight, local_bias, **extras)


def _agree(mesh, local_weight, vocab: int, hidden: torch.Tensor, tokens, reduce: bool) -> VocabShard:
    """The handshake: every rank's shard size, free memory (MiB, -1 off CUDA), and fingerprints of the hidden
    states' shape and of each token tensor; refuses ranks that disagree."""
    device = hidden.device
    free = free_device_bytes(device)
    named = {"hidden's shape": torch.tensor(hidden.shape, dtype=torch.long)}
    named.update((name, t) for name, t in tokens.items() if t is not None)
    # the tensors' shapes first: a rank with other shapes must fail here, not in a later collective
    shapes = [fingerprint(torch.tensor(t.shape, dtype=torch.long)) for t in named.values()]
    values = [local_weight.shape[0], -1 if free is None else int(free) // _MIB, *shapes]
    values += [fingerprint(t.to(device)) for t in named.values()]
    table = handshake(mesh.get_group(), mesh.size(), values, device)
    rows = [row[0] for row in table]
    starts = tuple(itertools.accumulate(rows, initial=0))
    if starts[-1] != vocab:
        raise ReplicaMismatchError(f"weight: the shards' rows {rows} do not add up to the vocabulary {vocab}")
    names = list(named)
    for column, label in enumerate([f"{n} (shape)" for n in names] + names, start=2):
        if len({row[column] for row in table}) > 1:
            raise ReplicaMismatchError(
                f"{label}: the ranks of the vocabulary-parallel mesh hold different values; every tensor but the "
                "head's shards must be the same on every rank (a tensor-parallel group samples the same "
                "completions). If weight is FSDP2's sharded parameter (data parallelism), pass the LM-head module "
                "itself instead"
            )
    frees = [row[1] for row in table]
    free_bytes = float(min(frees) * _MIB) if min(frees) >= 0 else None
    return VocabShard(mesh.get_group(), mesh.get_local_rank(), mesh.size(), starts, reduce, free_bytes)


__all__ = ["head_of", "is_dtensor", "run"]
