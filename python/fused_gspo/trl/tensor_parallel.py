"""The TRL adapter with a tensor-parallel model: the LM head split over the vocabulary, and the ranks of each
tensor-parallel group sampling alike.

Two things, both only with ``use_fused_gspo_loss=True`` and a model whose LM head is a DTensor (loaded with
transformers' ``tp_plan="auto"`` / ``DistributedConfig(tp_size=...)``, or parallelized with ``parallelize_module``):

- **The head stays sharded.** TRL's fused forward (``add_fused_lm_head``) gathers a DTensor head with
  ``full_tensor()`` before scoring. While the adapter scores, :func:`sharded_head` makes the model show TRL a
  :class:`ShardedHead` instead (TRL only reads its ``.device`` and hands it on), and the adapter's requests take the
  DTensor back (:func:`unwrap`) and run vocabulary-parallel (:mod:`fused_gspo.parallel`): no ``[V, H]`` gather.
- **One seed per tensor-parallel group.** ``GRPOTrainer.__init__`` seeds every process apart
  (``set_seed(seed, device_specific=True)``), so the ranks of one tensor-parallel group sample different completions
  for the same prompts, and the sharded layers then mix them: TRL's gradient is silently wrong. After the trainer is
  built, :func:`agree_on_seed` seeds every rank of a group with ``seed + (the group's lowest global rank)``: one
  group samples one batch, and different data-parallel groups still sample apart. (If the ranks of a group were
  still handed different completions, the vocabulary-parallel call refuses them by name,
  :class:`fused_gspo.parallel.ReplicaMismatchError`.)
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from ..parallel.placements import is_dtensor, is_vocab_parallel


class ShardedHead:
    """A DTensor head parameter in TRL's hands: not a DTensor (so TRL does not gather it), with the ``.device`` TRL
    reads; :func:`unwrap` gives the DTensor back."""

    def __init__(self, tensor):
        self.tensor = tensor

    @property
    def device(self):
        return self.tensor.device

    @property
    def dtype(self):
        return self.tensor.dtype


def unwrap(x):
    """The DTensor behind a :class:`ShardedHead`; anything else unchanged."""
    return x.tensor if isinstance(x, ShardedHead) else x


@contextlib.contextmanager
def sharded_head(trainer, model):
    """While the block runs, ``model``'s ``get_output_embeddings()`` (what TRL's fused forward reads) shows its DTensor
    head as :class:`ShardedHead` objects. Nothing changes for a head that is not split over the vocabulary."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    get_head = getattr(unwrapped, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not is_vocab_parallel(head):
        yield
        return
    bias = getattr(head, "bias", None)
    view = SimpleNamespace(weight=ShardedHead(head.weight), bias=None if bias is None else ShardedHead(bias))
    had_own = "get_output_embeddings" in unwrapped.__dict__
    previous = unwrapped.__dict__.get("get_output_embeddings")
    unwrapped.get_output_embeddings = lambda: view
    try:
        yield
    finally:
        if had_own:
            unwrapped.get_output_embeddings = previous
        else:
            del unwrapped.get_output_embeddings


def tensor_parallel_ranks(model) -> list[int] | None:
    """The global ranks of the tensor-parallel group ``model``'s LM head is split over, or None when it is not."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = unwrap(getattr(head, "weight", None))  # while the adapter scores, the head shows as a ShardedHead
    if not is_dtensor(weight):
        return None
    return [int(r) for r in weight.device_mesh.mesh.flatten().tolist()]


def agree_on_seed(trainer) -> None:
    """Seed the ranks of each tensor-parallel group alike (``args.seed`` plus the group's lowest global rank), in
    place of TRL's per-process seed; nothing without a tensor-parallel head."""
    ranks = tensor_parallel_ranks(trainer.accelerator.unwrap_model(trainer.model))
    if ranks is None:
        return
    from accelerate.utils import set_seed  # noqa: PLC0415

    set_seed(trainer.args.seed + min(ranks), device_specific=False)


__all__ = ["ShardedHead", "agree_on_seed", "sharded_head", "tensor_parallel_ranks", "unwrap"]
