"""``use_fused_gspo_loss=True`` on TRL 1.16's GRPO, GMPO and RLOO trainers (and, through :mod:`.dpo` and
:mod:`.cpo`, its DPO and CPO trainers).

What ``patch_trl()`` changes, and ``unpatch_trl()`` restores:

- ``GRPOConfig``, ``RLOOConfig`` and ``GMPOConfig`` (and ``DPOConfig``, ``CPOConfig``) get a real dataclass field
  ``use_fused_gspo_loss: bool = False``
  (:mod:`.config_field`: command lines, ``to_dict()``, saved arguments). With it off, the trainers run TRL's own
  code, untouched.
- With it on, each trainer's ``_compute_loss`` runs :func:`fused_gspo.policy.compute_policy_loss` on the backbone's
  last hidden states and the LM head, and keeps TRL's bookkeeping (normalizers, entropy-bonus controller, MoE
  auxiliary loss, metrics under TRL's names, reduced across processes as TRL reduces them).

How the hidden states are reached: TRL scores tokens through the forward it patches onto the model; the call to its
chunked head is taken by :class:`.stand_in.ChunkedLogProbStandIn`, so PEFT, gradient checkpointing, multimodal
inputs, autocast and ``cast_lm_head_to_fp32`` all go through TRL's own plumbing. In ``_compute_loss`` the request
computes the whole loss there; elsewhere (the no-grad ``old``/``ref`` log-prob passes) it computes log-probs with
:func:`fused_gspo.fused_logprobs` (:class:`.stand_in.LogProbRequest`). The loss's backward comes through the model's
output, as TRL's own loss's (:class:`.stand_in.LossRelay`), so the hooks there run first: DeepSpeed ZeRO-3 gathers the
LM head there for the fused backward.

TRL versions: the patch replaces private methods of TRL 1.16.0 (:data:`TESTED_TRL_VERSIONS`); on any other version
:func:`patch_trl` raises instead of patching.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..config import PolicyLossConfig
from ..parallel import dispatch as vocab_parallel
from ..parallel.placements import is_dtensor
from ..policy import CrossProcess, compute_policy_loss
from . import cpo, dpo
from .config_field import add_flag_field, flag_on, init_validated_by, logits_dtype_of, remove_flag_field
from .stand_in import ChunkedLogProbStandIn, LogProbRequest, LossRelay, active, current_request
from .tensor_parallel import agree_on_seed, sharded_head, tensor_parallel_ranks

_saved: dict = {}

# The TRL releases whose private methods this adapter was written against and tested with
TESTED_TRL_VERSIONS = ("1.16.0",)


# ---------------------------------------------------------------------------------------------------------------
# The policy trainers' loss request


class _LossRequest:
    """Inside ``_compute_loss``: the whole policy loss, from the hidden states TRL's forward hands over.

    TRL passes either every position of the ``[B, L - 1]`` shifted sequence (devices without Triton) or only the
    positions whose label is a completion token (``completion_mask`` order). The loss mask may be narrower (tool
    masks); its rows are picked out of what TRL projected.
    """

    def __init__(self, *, completion_ids, completion_mask, loss_mask, input_len, config, loss_kwargs, hooks):
        self.completion_ids, self.completion_mask, self.loss_mask = completion_ids, completion_mask, loss_mask
        self.input_len, self.config, self.loss_kwargs, self.hooks = input_len, config, loss_kwargs, hooks
        self.output = None
        self.relay = LossRelay()

    def __call__(self, hidden, weight, bias, targets, temperature, softcap, logit_scale):
        B, T = self.completion_ids.shape
        config = _quiet_replace(
            self.config, temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=softcap
        )
        scored = self.completion_mask.bool()
        if hidden.shape[0] == B * (self.input_len - 1):
            tokens = hidden.view(B, self.input_len - 1, -1)[:, -T:]
        else:  # packed completion tokens; keep those the loss mask keeps
            tokens = hidden[self.loss_mask.bool()[scored]]
        kw = self.loss_kwargs

        def loss(tokens, weight, bias):
            return compute_policy_loss(
                tokens,
                weight,
                self.completion_ids,
                kw["advantages"],
                self.loss_mask,
                config=config,
                old_logps=kw.get("old_logps"),
                ref_logps=kw.get("ref_logps"),
                sampling_logps=kw.get("sampling_logps"),
                importance_sampling_ratio=kw.get("importance_sampling_ratio"),
                num_items_in_batch=kw.get("num_items_in_batch"),
                bias=bias,
                backend="auto",
                cross_process=self.hooks,
            )

        if is_dtensor(weight):  # a tensor-parallel head (.tensor_parallel): this rank's part of the call
            ids = {"completion_ids": self.completion_ids, "completion_mask": self.loss_mask}
            self.output = vocab_parallel.run(loss, tokens, weight, bias, backend="auto", tokens=ids)
        else:
            self.output = loss(tokens, weight, bias)
        # Hand TRL's forward per-token values in the layout it scatters back (it only logs their shapes' worth); the
        # log-probs carry the loss's gradient through the model's output (LossRelay)
        per_token = []
        for values in (self.output.logps, self.output.entropy):
            if hidden.shape[0] == B * (self.input_len - 1):
                padded = values.new_zeros(B, self.input_len - 1)
                padded[:, -T:] = values
                per_token.append(padded.reshape(-1))
            else:
                per_token.append(values[scored])
        return self.relay.carrier(per_token[0], self.output.loss), per_token[1], None, None, None


def _quiet_replace(config: PolicyLossConfig, **changes) -> PolicyLossConfig:
    # TRL already warned about the configuration when the trainer was built
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config.replace(**changes) if changes else config


# ---------------------------------------------------------------------------------------------------------------
# Trainer configuration -> PolicyLossConfig


def _accumulation(trainer, mode: str) -> dict:
    train = mode == "train"
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    return dict(
        gradient_accumulation_steps=steps if train else 1,
        steps_per_generation=(trainer.args.steps_per_generation or steps) if train else 1,
        num_processes=trainer.accelerator.num_processes,
    )


def policy_config_for(trainer, mode: str = "train", entropy_coef: float = 0.0) -> PolicyLossConfig:
    """The :class:`PolicyLossConfig` that reproduces ``trainer``'s loss (``mode``: "train" or "eval")."""
    from trl import RLOOTrainer
    from trl.experimental.gmpo import GMPOTrainer

    args = trainer.args
    common = dict(
        epsilon=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        temperature=trainer.temperature,
        logits_dtype=logits_dtype_of(trainer),
        **_accumulation(trainer, mode),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warned about the configuration when the trainer was built
        if isinstance(trainer, RLOOTrainer):
            return PolicyLossConfig(loss_type="rloo", **common)
        if isinstance(trainer, GMPOTrainer):
            # GMPOTrainer inherits GRPO's delta, off-policy mask, entropy bonus and importance-sampling level but its
            # loss applies none of them: handed over so that the config refuses them (a GMPO run does not silently
            # train without what it asked for)
            return PolicyLossConfig(
                loss_type="gmpo",
                beta=trainer.beta,
                top_entropy_quantile=trainer.top_entropy_quantile,
                delta=args.delta,
                off_policy_mask_threshold=trainer.off_policy_mask_threshold,
                importance_sampling_level=trainer.importance_sampling_level,
                entropy_coef=entropy_coef,
                **common,
            )
        return PolicyLossConfig(
            loss_type=trainer.loss_type,
            importance_sampling_level=trainer.importance_sampling_level,
            delta=args.delta,
            beta=trainer.beta,
            use_bias_correction_kl=args.use_bias_correction_kl,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg,
            max_completion_length=trainer.max_completion_length,
            top_entropy_quantile=trainer.top_entropy_quantile,
            off_policy_mask_threshold=trainer.off_policy_mask_threshold,
            entropy_coef=entropy_coef,
            **common,
        )


def _hooks(trainer) -> CrossProcess:
    """The accelerator's cross-process reductions, where TRL's ``_compute_loss`` uses them."""
    accelerator = trainer.accelerator
    sentinel = -1e9  # entropies are >= 0, so this pad value cannot collide with one

    def gather_values(values: torch.Tensor) -> torch.Tensor:
        gathered = accelerator.gather(accelerator.pad_across_processes(values, dim=0, pad_index=sentinel))
        gathered = gathered[gathered != sentinel]
        # a tensor-parallel model: the k ranks of each group hold the same values (the same bits: every rank merges
        # the statistics alike), which TRL's gather counts k times, and a quantile of k copies is not the quantile
        # of the values (torch.quantile interpolates between neighbours): keep one copy of each, as one process has
        ranks = tensor_parallel_ranks(accelerator.unwrap_model(trainer.model))
        if ranks is not None and len(ranks) > 1:
            k = len(ranks)
            ordered = gathered.sort().values
            # (only where the values do come k at a time: a gather that already counted each group once stays)
            if ordered.numel() % k == 0 and torch.equal(ordered[::k], ordered[k - 1 :: k]):
                gathered = ordered[::k]
        return gathered

    return CrossProcess(
        reduce_sum=lambda x: accelerator.reduce(x, reduction="sum"),
        gather=accelerator.gather,
        gather_values=gather_values,
    )


# ---------------------------------------------------------------------------------------------------------------
# The fused _compute_loss of each trainer

_MODEL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


def _score(trainer, model, inputs, loss_mask, config, loss_kwargs, compute_aux_loss=False):
    """Run TRL's scoring forward with a loss request active; returns the loss output and the MoE aux loss."""
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    request = _LossRequest(
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        loss_mask=loss_mask,
        input_len=input_ids.shape[1],
        config=config,
        loss_kwargs=loss_kwargs,
        hooks=_hooks(trainer),
    )
    with active(request), sharded_head(trainer, model):
        logps, _, aux_loss = trainer._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=compute_aux_loss,
            **{name: inputs.get(name) for name in _MODEL_INPUTS},
        )
    if request.output is None:
        raise RuntimeError(
            "use_fused_gspo_loss=True: the model's forward did not reach TRL's fused LM head, so the fused loss was "
            "never computed (was the model's forward replaced after the trainer was built?)"
        )
    # the loss's backward through the model's output, as TRL's own loss's (its hooks: ZeRO-3 gathers the head there)
    request.output.loss = request.relay.loss(request.output.loss, logps)
    return request.output, aux_loss


def _log(trainer, mode: str, metrics: dict, skip=("policy_loss", "entropy_coef")) -> None:
    for name, value in metrics.items():
        if name not in skip:
            trainer._metrics[mode][name].append(value.item())  # TRL logs Python floats


def _grpo_compute_loss(self, model, inputs):
    mode = "train" if self.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    apply_coef = 0.0
    if self._entropy_bonus_enabled:
        # The coefficient and gate in force since the last optimizer step, as TRL applies them
        adaptive_off = self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target
        apply_coef = 0.0 if adaptive_off else self.entropy_coef
    config = policy_config_for(self, mode, apply_coef)
    if self.loss_type == "vespo":
        is_ratio = inputs.get("importance_sampling_ratio")
    elif self.use_vllm and self.vllm_importance_sampling_correction:
        is_ratio = inputs["importance_sampling_ratio"]
    else:
        is_ratio = None
    loss_kwargs = dict(
        advantages=inputs["advantages"],
        old_logps=inputs.get("old_per_token_logps"),
        ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
        sampling_logps=inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None,
        importance_sampling_ratio=is_ratio,
        num_items_in_batch=inputs.get("num_items_in_batch"),
    )
    out, aux_loss = _score(self, model, inputs, mask, config, loss_kwargs, compute_aux_loss=self.aux_loss_enabled)
    loss = out.loss
    if self._entropy_bonus_enabled:
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(out.policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":
            _adaptive_entropy_update(self, out, mask)
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
    if self.aux_loss_enabled:
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log(self, mode, out.metrics)
    return loss


def _adaptive_entropy_update(trainer, out, mask) -> None:
    """TRL's adaptive entropy controller: window-global token-weighted entropy, stepped at each optimizer step."""
    effective = mask if out.entropy_mask is None else mask * out.entropy_mask
    stats = torch.stack([(out.entropy * effective).sum(), effective.sum().to(out.entropy.dtype)])
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    args = trainer.args
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None


def _gmpo_compute_loss(self, model, inputs):
    mode = "train" if self.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    loss_kwargs = dict(
        advantages=inputs["advantages"],
        old_logps=inputs.get("old_per_token_logps"),
        ref_logps=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
    )
    out, _ = _score(self, model, inputs, mask, policy_config_for(self, mode), loss_kwargs)
    _log(self, mode, out.metrics)
    return out.loss


def _rloo_compute_loss(self, model, inputs):
    mode = "train" if self.model.training else "eval"
    loss_kwargs = dict(advantages=inputs["advantages"], old_logps=inputs["old_logps"])
    out, aux_loss = _score(
        self,
        model,
        inputs,
        inputs["completion_mask"],
        policy_config_for(self, mode),
        loss_kwargs,
        compute_aux_loss=self.aux_loss_enabled,
    )
    loss = out.loss
    if self.aux_loss_enabled:  # RLOO's loss is unscaled (the HF Trainer divides it), so is its aux term
        loss = loss + self.router_aux_loss_coef * aux_loss
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log(self, mode, out.metrics)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Patching


def _switch(original, fused):
    @functools.wraps(original)
    def _compute_loss(self, model, inputs):
        return fused(self, model, inputs) if flag_on(self) else original(self, model, inputs)

    return _compute_loss


def _fused_logps_when_flagged(original):
    @functools.wraps(original)
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if not flag_on(self) or current_request() is not None:
            return original(self, *args, **kwargs)
        model = args[0] if args else kwargs["model"]
        with active(LogProbRequest(logits_dtype_of(self))), sharded_head(self, model):
            return original(self, *args, **kwargs)

    return _get_per_token_logps_and_entropies


def _validate_policy_trainer(trainer) -> None:
    # the entropy bonus as configured (1.0 where adaptive control starts it at 0), so that a refusal names its value
    entropy_coef = (
        (trainer.__dict__.get("entropy_coef") or 1.0) if trainer.__dict__.get("_entropy_bonus_enabled") else 0.0
    )
    try:
        policy_config_for(trainer, "train", entropy_coef)
    except ValueError as exc:
        raise ValueError(f"use_fused_gspo_loss=True cannot reproduce this trainer's loss: {exc}") from exc
    agree_on_seed(trainer)  # a tensor-parallel model: the ranks of a group sample alike (.tensor_parallel)


def _targets():
    """(owner, attribute, replacement factory) for every TRL attribute the patch replaces: the policy trainers'
    here, the preference trainers' from their own modules (:mod:`.dpo`, :mod:`.cpo`)."""
    import trl.trainer.utils as trl_utils
    from trl import GRPOTrainer, RLOOTrainer
    from trl.experimental.gmpo import GMPOTrainer

    return [
        (trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbStandIn),
        (GRPOTrainer, "_compute_loss", lambda f: _switch(f, _grpo_compute_loss)),
        (GMPOTrainer, "_compute_loss", lambda f: _switch(f, _gmpo_compute_loss)),
        (RLOOTrainer, "_compute_loss", lambda f: _switch(f, _rloo_compute_loss)),
        (GRPOTrainer, "_get_per_token_logps_and_entropies", _fused_logps_when_flagged),
        (RLOOTrainer, "_get_per_token_logps_and_entropies", _fused_logps_when_flagged),
        (GRPOTrainer, "__init__", init_validated_by(_validate_policy_trainer)),
        (RLOOTrainer, "__init__", init_validated_by(_validate_policy_trainer)),
        *dpo.targets(),
        *cpo.targets(),
    ]


def _config_classes():
    from trl import GRPOConfig, RLOOConfig
    from trl.experimental.gmpo import GMPOConfig

    return [GRPOConfig, RLOOConfig, GMPOConfig, *dpo.config_classes(), *cpo.config_classes()]


def check_trl_version() -> None:
    """Raise ``RuntimeError`` unless the installed TRL is one the adapter was tested with: the patch replaces private
    methods (``_compute_loss``, ``_get_per_token_logps_and_entropies``, ``_ChunkedLogProbFunction``), whose
    signatures and semantics change between releases without notice."""
    import trl

    installed = getattr(trl, "__version__", "unknown")
    if installed not in TESTED_TRL_VERSIONS:
        raise RuntimeError(
            f"fused_gspo's TRL adapter (use_fused_gspo_loss) was built against TRL {' / '.join(TESTED_TRL_VERSIONS)}, "
            f"but TRL {installed} is installed; it patches TRL's private methods, so on another release it could "
            f"compute a different loss without an error, and it refuses to patch. Install "
            f"trl=={TESTED_TRL_VERSIONS[-1]} (pip install 'fused-gspo[trl]'), or call fused_gspo.fused_policy_loss "
            "directly, which does not depend on TRL."
        )


def patch_trl() -> None:
    """Give TRL's GRPO, GMPO, RLOO, DPO and CPO configs the ``use_fused_gspo_loss`` field and their trainers the
    switch.

    Idempotent; :func:`unpatch_trl` restores TRL exactly. With the flag off nothing about TRL changes. Raises
    ``RuntimeError`` naming the tested versions, and patches nothing, on a TRL release other than
    :data:`TESTED_TRL_VERSIONS`.
    """
    if _saved.get("patched"):
        return
    check_trl_version()
    for cls in _config_classes():
        add_flag_field(cls)
    originals = []
    for owner, name, make in _targets():
        original = owner.__dict__[name]
        originals.append((owner, name, original))
        setattr(owner, name, make(original))
    _saved["patched"] = originals


def unpatch_trl() -> None:
    """Undo :func:`patch_trl` (a no-op when TRL is not patched)."""
    originals = _saved.pop("patched", None)
    if not originals:
        return
    for owner, name, original in originals:
        setattr(owner, name, original)
    for cls in _config_classes():
        remove_flag_field(cls)


def is_patched() -> bool:
    return bool(_saved.get("patched"))
