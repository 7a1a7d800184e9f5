"""Which DTensor layouts a vocabulary-parallel call accepts, and the local tensors it runs on.

Accepted (everything else is refused with :class:`UnsupportedPlacementError`, naming the argument and its layout;
nothing is ever gathered silently):

- ``weight``: a DTensor ``[V, H]`` with placements ``(Shard(0),)`` on a 1-D mesh (the vocabulary split over the mesh,
  as ``ColwiseParallel`` and transformers' ``"colwise_gather_output"`` plan an LM head), even or uneven shards;
  or an LM-head module holding one (not an FSDP2 module: that one is unsharded by its own forward hooks).
- ``bias``: None, or a DTensor ``[V]`` ``(Shard(0),)`` on the same mesh.
- ``hidden`` (and CPO's ``position_hidden``): a plain tensor, taken as replicated (identical on every rank); a DTensor
  ``(Replicate(),)`` on the same mesh; or ``(Shard(d),)`` on its token dimension (``d = hidden.dim() - 2``: the
  sequence of ``[B, T, H]``, the packed tokens of ``[N, H]``), as sequence parallelism leaves it: gathered for the
  call, its gradient reduce-scattered back.
- every other tensor argument: plain tensors, identical on every rank.
"""

from __future__ import annotations

import torch
from torch import nn


class UnsupportedPlacementError(ValueError):
    """A DTensor argument whose mesh or placements a vocabulary-parallel call does not take."""


class ReplicaMismatchError(ValueError):
    """The ranks of a vocabulary-parallel call were handed different tokens, shapes or shards."""


def is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(x, DTensor)


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def is_vocab_parallel(weight) -> bool:
    """Whether ``weight`` (a tensor, or an LM-head module) calls for the vocabulary-parallel path: it is (or holds)
    a DTensor, and is not an FSDP2 module (whose forward hooks unshard it)."""
    if isinstance(weight, nn.Module):
        return not _is_fsdp(weight) and is_dtensor(getattr(weight, "weight", None))
    return is_dtensor(weight)


def _layout(x) -> str:
    return f"placements {tuple(x.placements)} on a {x.device_mesh.ndim}-D mesh of {x.device_mesh.size()} ranks"


def check_weight(weight) -> object:
    """The mesh of a ``(Shard(0),)`` DTensor ``weight``; :class:`UnsupportedPlacementError` for anything else."""
    from torch.distributed.tensor import Shard  # noqa: PLC0415

    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise UnsupportedPlacementError(
            f"weight: a vocabulary-parallel LM head takes a DTensor on a 1-D mesh, got {_layout(weight)}; pass the "
            "tensor-parallel sub-mesh's head (with FSDP2 + TP, shard the head over the TP mesh only)"
        )
    if weight.dim() != 2 or tuple(weight.placements) != (Shard(0),):
        raise UnsupportedPlacementError(
            f"weight: a DTensor LM-head weight [V, H] must be sharded over the vocabulary, placements (Shard(0),), got "
            f"{_layout(weight)} and shape {tuple(weight.shape)}; a replicated head is passed as weight.to_local(), any "
            "other layout is not supported (gathering it would defeat the sharding)"
        )
    return mesh


def check_bias(bias, mesh) -> None:
    from torch.distributed.tensor import Shard  # noqa: PLC0415

    if bias is None:
        return
    if not is_dtensor(bias) or bias.device_mesh != mesh or tuple(bias.placements) != (Shard(0),):
        got = _layout(bias) if is_dtensor(bias) else "a plain tensor"
        raise UnsupportedPlacementError(
            f"bias: with a vocabulary-sharded weight the bias must be sharded with it, a DTensor (Shard(0),) on the "
            f"weight's mesh, got {got}"
        )


def local_hidden(name: str, hidden, mesh) -> tuple[torch.Tensor, bool]:
    """``(the replicated local tensor, whether its gradient is summed by the call)`` for an accepted ``hidden``.

    A ``Shard(token dim)`` DTensor is gathered, and its local gradient handed back as a partial sum, which autograd's
    DTensor reduce-scatters to the shards (so the call does not all-reduce it)."""
    if not is_dtensor(hidden):
        return hidden, True
    from torch.distributed.tensor import Partial, Replicate, Shard  # noqa: PLC0415

    if hidden.device_mesh != mesh:
        raise UnsupportedPlacementError(
            f"{name}: a DTensor {name} must live on the weight's mesh {mesh}, got {hidden.device_mesh}"
        )
    (placement,) = hidden.placements
    if isinstance(placement, Replicate):
        return hidden.to_local(), True
    token_dim = hidden.dim() - 2
    if isinstance(placement, Shard) and hidden.dim() >= 2 and placement.dim % hidden.dim() == token_dim:
        gathered = hidden.redistribute(mesh, [Replicate()])
        return gathered.to_local(grad_placements=[Partial()]), False
    raise UnsupportedPlacementError(
        f"{name}: a DTensor {name} {tuple(hidden.shape)} must be Replicate() or sharded on its token dimension "
        f"(Shard({token_dim}), sequence parallelism), got {_layout(hidden)}"
    )


def refuse_beside_plain_weight(**tensors) -> None:
    """A DTensor among ``tensors`` when the weight is a plain tensor: :class:`UnsupportedPlacementError` naming it
    (rather than torch's error on mixing a DTensor with a tensor, deep inside the call)."""
    for name, x in tensors.items():
        if is_dtensor(x):
            raise UnsupportedPlacementError(
                f"{name}: a DTensor {name} ({_layout(x)}) is taken only beside a weight sharded over the vocabulary "
                f"(a DTensor (Shard(0),)); weight is a plain tensor here: pass {name} as a plain tensor "
                f"({name}.full_tensor(), or to_local() when it is replicated)"
            )


def refuse_dtensors(**tensors) -> None:
    for name, x in tensors.items():
        if is_dtensor(x):
            raise UnsupportedPlacementError(
                f"{name}: only weight, bias and hidden may be DTensors in a vocabulary-parallel call; pass {name} as "
                f"a plain tensor, the same on every rank (got {_layout(x)})"
            )


__all__ = [
    "ReplicaMismatchError",
    "UnsupportedPlacementError",
    "check_bias",
    "check_weight",
    "is_dtensor",
    "is_vocab_parallel",
    "local_hidden",
    "refuse_beside_plain_weight",
    "refuse_dtensors",
]
