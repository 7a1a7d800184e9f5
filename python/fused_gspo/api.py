"""The public functional API: ``fused_policy_loss``, ``fused_logprobs`` and the ``FusedPolicyLoss`` module."""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .backends import BACKENDS, resolve_backend, tile_ops_for
from .chunked import ChunkedHead, logprobs, weight_gather
from .config import PolicyLossConfig, plain_number, validate_workspace_bytes
from .head import HeadParams, full_logprobs
from .parallel import dispatch as vocab_parallel
from .parallel.placements import check_weight, is_dtensor, is_vocab_parallel, local_hidden, refuse_beside_plain_weight
from .plan.runtime import plan_call, run_planned
from .policy import PolicyLossOutput, compute_policy_loss
from .rows import cu_seqlens_from_position_ids
from .validation import (
    validate_logprob_inputs,
    validate_policy_inputs,
    validate_position_ids,
    validate_preference_token_shapes,
)


def _resolve_config(config: PolicyLossConfig | None, overrides: dict) -> PolicyLossConfig:
    if config is not None and not isinstance(config, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    config = config or PolicyLossConfig()
    return config.replace(**overrides) if overrides else config


def _checked_head_options(temperature, logit_scale, softcap, logits_dtype) -> str:
    """The head options checked as the loss's config checks them (by name); the normalized ``logits_dtype``."""
    config = PolicyLossConfig(
        temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=softcap, logits_dtype=logits_dtype
    )
    return config.logits_dtype


def _through_module(head: nn.Module, fn, *args):
    """``fn(*args)`` run as ``head``'s forward, so that whatever hooks the module sees the call: FSDP2 unshards the
    head's parameters before it, reshards them after, and reduce-scatters their gradients in the backward, exactly as
    for ``head(hidden)``. ``fn`` reads ``head.weight`` / ``head.bias`` inside, where they are the full tensors."""
    if torch.compiler.is_compiling():
        # dynamo cannot trace swapping a module's forward; compiled, the head is read directly (FSDP2 under
        # torch.compile is not supported here)
        return fn(*args)
    if "forward" in head.__dict__:
        raise RuntimeError(f"{type(head).__name__} already has an instance-level forward; pass its weight instead")
    head.forward = fn
    try:
        return head(*args)
    finally:
        del head.forward


def _head_tensors(head: nn.Module, bias) -> tuple[torch.Tensor, torch.Tensor | None]:
    if bias is not None:
        raise ValueError("bias must be None when weight is an LM-head module: the module's own bias is used")
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"weight: an LM-head module must have a .weight tensor, {type(head).__name__} has none")
    module_bias = getattr(head, "bias", None)
    return head.weight, module_bias if isinstance(module_bias, torch.Tensor) else None


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    config: PolicyLossConfig | None = None,
    backend: str = "auto",
    **config_overrides,
) -> PolicyLossOutput:
    """A GRPO-family policy loss straight from the LM head's input, as TRL 1.16.0's ``_compute_loss`` computes it.

    Two layouts. Padded (TRL's): per-token tensors ``[B, T]``, per-sequence ones ``[B]``. Packed (verl's, OpenRLHF's):
    ``cu_seqlens`` ``[S + 1]`` (or ``position_ids`` ``[N]`` restarting at 0 with each sequence) marks ``S`` sequences
    concatenated into ``N`` positions; per-token tensors are ``[N]``, per-sequence ones ``[S]``; nothing is padded.

    Args:
        hidden: ``[B, T, H]`` float (bf16/fp16/fp32/fp64); ``hidden[:, t]`` predicts ``completion_ids[:, t]``.
            Packed: ``[N, H]``, position ``i`` predicting ``completion_ids[i]``. Either layout also takes ``[n, H]``:
            the hidden states of the ``n = completion_mask.sum()`` scored tokens only, in the order of
            ``completion_mask`` (nothing is gathered).
        weight: ``[V, H]`` LM-head weight, or the LM-head module itself (``nn.Linear``-like: ``.weight``, optional
            ``.bias``). With the module, the loss runs inside its forward call, so a module sharded with FSDP2
            (``fully_shard``) is unsharded for it and its gradient reduce-scattered as for ``lm_head(hidden)``.
            A DTensor weight sharded over the vocabulary (``Shard(0)`` on a 1-D mesh, tensor parallelism), or a
            module holding one, runs vocabulary-parallel: :mod:`fused_gspo.parallel` (accepted layouts:
            :mod:`fused_gspo.parallel.placements`).
        bias: optional ``[V]`` (None with a module).
        completion_ids: ``[B, T]`` integer token ids, in ``[0, V)`` where the mask is 1.
        advantages: ``[B]`` or ``[B, T]`` (per-token, e.g. GSPO-token); packed ``[S]`` or ``[N]``.
        completion_mask: ``[B, T]`` (packed ``[N]``) of 0/1 (bool, int or float); masked positions cost nothing.
        old_logps: ``[B, T]`` log-probs of the policy that sampled (RLOO also takes its ``[B]`` sequence sums);
            None means on-policy (the current log-probs, detached).
        ref_logps: ``[B, T]`` reference-model log-probs, required when ``beta != 0``.
        sampling_logps: ``[B, T]`` the sampler's (vLLM's) log-probs, read by the off-policy sequence mask.
        importance_sampling_ratio: ``[B, T]`` or ``[B, 1]`` (packed ``[N]`` or ``[S]``) vLLM correction, applied as
            TRL applies it.
        num_items_in_batch: token count the dapo/cispo/vespo losses divide by (default: the mask sum).
        cu_seqlens / position_ids: the packed layout's sequence boundaries (give one of them).
        config / config_overrides: a :class:`PolicyLossConfig` and/or its fields as keywords.
        backend: ``"auto"`` (triton on CUDA/XPU, torch elsewhere), ``"eager"``, ``"torch"`` or ``"triton"``.

    Returns:
        :class:`PolicyLossOutput` with ``loss``, ``metrics``, ``logps`` and ``entropy``.
    """
    if position_ids is not None:
        if cu_seqlens is not None:
            raise ValueError("give cu_seqlens or position_ids, not both")
        if not torch.compiler.is_compiling():  # compiled, the operator finds the sequences (data: no guard on them)
            validate_position_ids(position_ids, completion_ids)
            cu_seqlens, position_ids = cu_seqlens_from_position_ids(position_ids), None
    config = _resolve_config(config, config_overrides)
    # every optional tensor, handed on as one set to whichever path runs
    optional = dict(
        old_logps=old_logps,
        ref_logps=ref_logps,
        sampling_logps=sampling_logps,
        importance_sampling_ratio=importance_sampling_ratio,
        num_items_in_batch=plain_number(num_items_in_batch),  # a NumPy count, which the compiler cannot trace
        bias=bias,
        cu_seqlens=cu_seqlens,
        **({} if position_ids is None else {"position_ids": position_ids}),  # compiling only
    )
    if is_vocab_parallel(weight):  # a head split over the vocabulary across ranks: this rank's part of the call
        return vocab_parallel.run(
            lambda h, w, b: fused_policy_loss(h, w, completion_ids, advantages, completion_mask,
                                              **{**optional, "bias": b}, config=config, backend=backend),
            hidden, weight, bias, backend=backend,
            tokens={"completion_ids": completion_ids, "completion_mask": completion_mask, "cu_seqlens": cu_seqlens},
            others={"advantages": advantages, **{k: v for k, v in optional.items() if k != "bias"}},
        )  # fmt: skip
    if isinstance(weight, nn.Module):
        return _policy_loss_through_module(weight, hidden, (completion_ids, advantages, completion_mask), optional,
                                           config=config, backend=backend)  # fmt: skip
    refuse_beside_plain_weight(hidden=hidden, bias=bias)
    if torch.compiler.is_compiling():
        # one custom operator for the compiler; the checks that read values run inside it
        validate_policy_inputs(
            config, hidden=hidden, weight=weight, completion_ids=completion_ids, advantages=advantages,
            completion_mask=completion_mask, values=False, **optional,
        )  # fmt: skip
        return ops.policy_loss_call(
            hidden, weight, completion_ids, advantages, completion_mask, config=config, backend=backend, **optional
        )
    return compute_policy_loss(
        hidden, weight, completion_ids, advantages, completion_mask, config=config, backend=backend, **optional
    )


def _policy_loss_through_module(head: nn.Module, hidden, per_token, optional: dict, **kwargs) -> PolicyLossOutput:
    """:func:`fused_policy_loss` with the head's own weight and bias, inside its forward (:func:`_through_module`)."""
    result = []

    def forward(hidden_):
        head_weight, head_bias = _head_tensors(head, optional["bias"])
        result.append(fused_policy_loss(hidden_, head_weight, *per_token, **{**optional, "bias": head_bias}, **kwargs))
        loss = result[0].loss  # the one output the module's backward hooks need (as a view, they warn)
        return loss.clone() if not torch.compiler.is_compiling() and loss._is_view() else loss

    result[0].loss = _through_module(head, forward, hidden)
    return result[0]


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
    workspace_bytes: int | str = "auto",
    logits_dtype: str | torch.dtype = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Differentiable log-probs of ``targets`` under ``softmax(head(hidden @ weight.T + bias))``, never holding
    the logits.

    ``hidden``: ``[..., H]``; ``weight``: ``[V, H]``, or the LM-head module (as in :func:`fused_policy_loss`: run
    inside its forward, FSDP2-ready); ``targets``: ``[...]`` integer ids in ``[0, V)``.
    Returns float32 log-probs shaped like ``targets`` (and the entropy, same shape, with ``return_entropy=True``);
    float64 inputs give float64. Gradients flow to ``hidden``, ``weight`` and ``bias`` from both outputs.
    ``workspace_bytes``: the chunked backends' scratch budget (``"auto"``: see ``docs/design.md``).
    ``logits_dtype``: ``"auto"`` stages each chunk's logits in the GEMMs' dtype when it is 16-bit, as TRL does;
    ``"float32"`` (or ``torch.float32``) keeps them in fp32 (:mod:`fused_gspo.precision`). Under ``torch.autocast``
    the GEMMs run in the autocast dtype; the gradients come back in each input's own dtype.
    A DTensor weight sharded over the vocabulary runs vocabulary-parallel (:mod:`fused_gspo.parallel`).
    """
    if is_vocab_parallel(weight):
        return vocab_parallel.run(
            lambda h, w, b: fused_logprobs(
                h, w, targets, bias=b, temperature=temperature, logit_scale=logit_scale,
                final_logit_softcapping=final_logit_softcapping, return_entropy=return_entropy, backend=backend,
                workspace_bytes=workspace_bytes, logits_dtype=logits_dtype,
            ),
            hidden, weight, bias, backend=backend, tokens={"targets": targets},
        )  # fmt: skip
    if isinstance(weight, nn.Module):
        head_module = weight

        def forward(hidden_):
            head_weight, head_bias = _head_tensors(head_module, bias)
            flat = fused_logprobs(
                hidden_.reshape(-1, hidden_.shape[-1]), head_weight, targets.reshape(-1), bias=head_bias,
                temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
                return_entropy=True, backend=backend, workspace_bytes=workspace_bytes, logits_dtype=logits_dtype,
            )  # fmt: skip
            # module hooks warn about views (not traced: dynamo has no _is_view)
            return flat if torch.compiler.is_compiling() else tuple(t.clone() if t._is_view() else t for t in flat)

        logp, entropy = (t.view(targets.shape) for t in _through_module(head_module, forward, hidden))
        return (logp, entropy) if return_entropy else logp
    refuse_beside_plain_weight(hidden=hidden, bias=bias)
    logits_dtype = _checked_head_options(temperature, logit_scale, final_logit_softcapping, logits_dtype)
    validate_workspace_bytes(workspace_bytes)
    compiling = torch.compiler.is_compiling()
    validate_logprob_inputs(hidden=hidden, weight=weight, targets=targets, bias=bias, values=not compiling)
    backend = resolve_backend(backend, hidden.device)
    head = HeadParams(temperature, logit_scale, final_logit_softcapping)
    shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    if compiling:  # one custom operator for the compiler (the token ids are checked inside it)
        logp, entropy = ops.logprobs_call(
            flat_hidden, weight, flat_targets, bias, head, backend, workspace_bytes, logits_dtype
        )
    elif backend == "eager":
        logp, entropy = full_logprobs(flat_hidden, weight, bias, flat_targets, head)
    else:
        tile_ops = tile_ops_for(backend)
        grad_possible = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)
        )

        def plan_for(budget):
            return plan_call(
                flat_hidden,
                weight,
                bias,
                tile_ops,
                workspace_bytes=budget,
                coupling="global",
                row_counts=None,
                mode="fwd_bwd" if grad_possible else "logprobs",
                softcap=final_logit_softcapping is not None,
                logits_dtype=logits_dtype,
            )

        def run(plan):
            call = ChunkedHead(head, tile_ops, tuple(plan.bounds), weight_gather.get(), fmt=plan.fmt)
            return logprobs(flat_hidden, weight, bias, flat_targets, call)

        stats = run_planned(run, plan_for(workspace_bytes), plan_for, flat_hidden.device)
        logp, entropy = stats.logp, stats.entropy
    logp, entropy = logp.view(shape), entropy.view(shape)
    return (logp, entropy) if return_entropy else logp


class FusedPolicyLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_policy_loss`, holding a :class:`PolicyLossConfig` and a backend.

    ``FusedPolicyLoss(loss_type="grpo", importance_sampling_level="sequence")(hidden, lm_head.weight, ids, adv, mask)``
    """

    def __init__(self, config: PolicyLossConfig | None = None, backend: str = "auto", **config_overrides):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = _resolve_config(config, config_overrides)
        self.backend = backend

    def forward(self, hidden, weight, completion_ids, advantages, completion_mask, **kwargs) -> PolicyLossOutput:
        return fused_policy_loss(
            hidden,
            weight,
            completion_ids,
            advantages,
            completion_mask,
            config=self.config,
            backend=self.backend,
            **kwargs,
        )

    def extra_repr(self) -> str:
        cfg = self.config
        return f"loss_type={cfg.loss_type!r}, level={cfg.importance_sampling_level!r}, backend={self.backend!r}"


# --------------------------------------------------------------------------------------------------------------------
# Preference losses


def _resolve_preference_config(config, overrides: dict):
    from .preference import CPOLossConfig, DPOLossConfig  # noqa: PLC0415

    if config is None:
        return DPOLossConfig(**overrides)
    if not isinstance(config, (DPOLossConfig, CPOLossConfig)):
        raise TypeError(f"config must be a DPOLossConfig or a CPOLossConfig, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


# The preference losses have no custom operator: under torch.compile they run eagerly, as one graph break (traced,
# their host reads of the mask broke the graph a dozen times, and fullgraph=True failed on an unrelated construct)
_PREFERENCE_EAGER = (
    "the preference losses have no custom operator and run eagerly under torch.compile (one graph break); "
    "call them outside a fullgraph=True region"
)


@torch.compiler.disable(reason=_PREFERENCE_EAGER)
def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
    completion_lengths: torch.Tensor | None = None,
    position_hidden: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    workspace_bytes: int | str = "auto",
    logits_dtype: str | torch.dtype = "auto",
    config=None,
    backend: str = "auto",
    **config_overrides,
):
    """A preference loss (DPO, CPO, SimPO, AlphaPO) straight from the LM head's input, as TRL 1.16.0's
    ``DPOTrainer`` / ``CPOTrainer`` compute it, with their metrics.

    Args:
        hidden: ``[2B, T, H]`` in TRL's concatenated layout (rows ``[0, B)`` chosen, ``[B, 2B)`` rejected;
            ``hidden[:, t]`` predicts ``completion_ids[:, t]``), or ``[n, H]``: the valid tokens only, row-major.
        weight: ``[V, H]`` LM-head weight, or the LM-head module (run inside its forward: FSDP2-ready); a DTensor
            sharded over the vocabulary runs vocabulary-parallel (:mod:`fused_gspo.parallel`).
        completion_ids / completion_mask: ``[2B, T]``. A row may have no valid token (its log-prob is 0, as in
            TRL) except where the loss would divide by zero (:func:`fused_gspo.preference.batch.check_empty_rows`).
        ref_chosen_logps / ref_rejected_logps: ``[B]`` reference sequence log-probs (DPO; from the dataset or
            :func:`preference_reference_logps`).
        aux_loss: a MoE load-balancing loss, added with the config's ``router_aux_loss_coef``.
        completion_lengths: ``[2B]`` DPO ``ipo``/``sigmoid_norm`` lengths when they differ from the mask's counts.
        position_hidden: CPO's ``logits/*`` metrics average the logits at every position of the input:
            ``[2B, P, H]`` hidden states of all of them (default: ``hidden`` when it is ``[2B, T, H]``).
        temperature / logit_scale / final_logit_softcapping: the head transform, as in :func:`fused_logprobs`.
        workspace_bytes / logits_dtype: the chunked backends' budget and logits staging, as in :func:`fused_logprobs`.
        config / config_overrides: a :class:`fused_gspo.preference.DPOLossConfig` (the default) or
            :class:`~fused_gspo.preference.CPOLossConfig`, and/or its fields as keywords.

    Returns:
        :class:`fused_gspo.preference.head.PreferenceLossOutput`: ``loss``, ``metrics`` (the trainer's names),
        ``chosen_logps`` / ``rejected_logps`` ``[B]``, ``logps`` / ``entropy`` ``[2B, T]``.

    Under ``torch.compile`` it runs eagerly (a graph break; ``fullgraph=True`` refuses it, naming this reason).
    """
    from .preference.head import compute_preference_loss  # noqa: PLC0415

    config = _resolve_preference_config(config, config_overrides)
    logits_dtype = _checked_head_options(temperature, logit_scale, final_logit_softcapping, logits_dtype)
    validate_workspace_bytes(workspace_bytes)
    if is_vocab_parallel(weight):
        per_pair = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, aux_loss=aux_loss,
                        completion_lengths=completion_lengths)  # fmt: skip
        return vocab_parallel.run(
            lambda h, w, b, position_hidden: fused_preference_loss(
                h, w, completion_ids, completion_mask, bias=b, position_hidden=position_hidden, **per_pair,
                temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
                workspace_bytes=workspace_bytes, logits_dtype=logits_dtype, config=config, backend=backend,
            ),
            hidden, weight, bias, backend=backend,
            tokens={"completion_ids": completion_ids, "completion_mask": completion_mask}, others=per_pair,
            extra_hidden={"position_hidden": position_hidden},
        )  # fmt: skip
    options = dict(
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        aux_loss=aux_loss,
        completion_lengths=completion_lengths,
        position_hidden=position_hidden,
        head=HeadParams(temperature, logit_scale, final_logit_softcapping),
        workspace_bytes=workspace_bytes,
        logits_dtype=logits_dtype,
        config=config,
        backend=backend,
    )
    if not isinstance(weight, nn.Module):
        refuse_beside_plain_weight(hidden=hidden, bias=bias, position_hidden=position_hidden)
        return compute_preference_loss(hidden, weight, completion_ids, completion_mask, bias=bias, **options)
    result = []

    def forward(hidden_):
        head_weight, head_bias = _head_tensors(weight, bias)
        result.append(compute_preference_loss(hidden_, head_weight, completion_ids, completion_mask, bias=head_bias,
                                              **options))  # fmt: skip
        loss = result[0].loss
        return loss.clone() if not torch.compiler.is_compiling() and loss._is_view() else loss

    result[0].loss = _through_module(weight, forward, hidden)
    return result[0]


@torch.compiler.disable(reason=_PREFERENCE_EAGER)
def preference_reference_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor | nn.Module,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    ld_alpha: float | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    backend: str = "auto",
    workspace_bytes: int | str = "auto",
    logits_dtype: str | torch.dtype = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ref_chosen_logps, ref_rejected_logps)`` ``[B]``: the reference model's sequence log-probs as
    ``DPOTrainer`` reduces them (``ld_alpha``: LD-DPO's shared/tail form), from its hidden states ``[2B, T, H]`` (or
    ``[n, H]``, the valid tokens row-major) and head, by the no-grad fused pass. With a head sharded over the
    vocabulary, ``hidden`` may be a DTensor as in :func:`fused_preference_loss` (gathered here)."""
    from .host_values import read_batch  # noqa: PLC0415
    from .preference import DPOLossConfig  # noqa: PLC0415
    from .preference.dpo import reference_logps  # noqa: PLC0415

    # the checks fused_preference_loss makes: the rows pair up, and ld_alpha as DPOLossConfig takes it
    validate_preference_token_shapes(hidden=hidden, completion_ids=completion_ids, completion_mask=completion_mask)
    DPOLossConfig(ld_alpha=ld_alpha)
    head_weight = weight.weight if isinstance(weight, nn.Module) else weight
    if is_dtensor(hidden):  # picking the valid tokens needs the local tensor: gathered here, as the call would
        if not is_vocab_parallel(weight):
            refuse_beside_plain_weight(hidden=hidden)
        mesh = check_weight(head_weight)
        with torch.no_grad():
            hidden = local_hidden("hidden", hidden, mesh)[0]
    # and, in one read, a 0/1 mask (LD-DPO counts its positions), one packed row per valid token, ids in range
    read_batch(
        hidden=hidden, vocab=head_weight.shape[0], completion_ids=completion_ids, completion_mask=completion_mask
    )
    valid = completion_mask.bool()
    with torch.no_grad():
        logp = fused_logprobs(
            hidden[valid] if hidden.dim() == 3 else hidden, weight, completion_ids[valid], bias=bias,
            temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=final_logit_softcapping,
            backend=backend, workspace_bytes=workspace_bytes, logits_dtype=logits_dtype,
        )  # fmt: skip
        per_token = torch.zeros(valid.shape, dtype=logp.dtype, device=logp.device).masked_scatter(valid, logp)
    return reference_logps(per_token, completion_mask, ld_alpha)


class FusedPreferenceLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_preference_loss`, holding its config, head transform and backend.

    ``FusedPreferenceLoss(CPOLossConfig(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1))(hidden, lm_head,
    ids, mask)``
    """

    def __init__(self, config=None, backend: str = "auto", **options):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        head_keys = ("temperature", "logit_scale", "final_logit_softcapping", "workspace_bytes", "logits_dtype")
        self.head_options = {k: options.pop(k) for k in head_keys if k in options}
        self.config = _resolve_preference_config(config, options)
        self.backend = backend

    def forward(self, hidden, weight, completion_ids, completion_mask, **kwargs):
        return fused_preference_loss(
            hidden, weight, completion_ids, completion_mask, config=self.config, backend=self.backend,
            **self.head_options, **kwargs,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{type(self.config).__name__}(loss_type={self.config.loss_type!r}), backend={self.backend!r}"
