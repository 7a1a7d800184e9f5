"""``use_fused_gspo_loss=True`` on TRL 1.16's DPOTrainer (``trl.DPOTrainer``).

What ``patch_trl()`` changes (and ``unpatch_trl()`` restores):

- ``DPOConfig`` gets the ``use_fused_gspo_loss`` dataclass field (:mod:`.config_field`).
- ``DPOTrainer._compute_loss`` (train and eval, ``compute_loss`` and ``prediction_step`` go through it): with the
  flag on, :func:`_fused_compute_loss`; off, TRL's own, untouched.
- ``DPOTrainer.compute_ref_log_probs`` (``precompute_ref_log_probs=True``, at construction and in ``evaluate``):
  with the flag on, the reference log-probs through the fused no-grad path.
- ``DPOTrainer.__init__``: with the flag on, what cannot be reproduced fails at construction with a ``ValueError``
  (a configuration :class:`~fused_gspo.preference.DPOLossConfig` refuses, context or sequence parallelism, an LM head
  without a floating weight or with a PEFT adapter on it, which TRL itself refuses first).

How the loss is computed. TRL's model call runs unchanged, ``model(**model_kwargs, labels=labels,
fused_lm_head=True)``: the forward TRL's ``add_fused_lm_head`` patched onto the model runs the backbone (DDP, PEFT,
gradient checkpointing, autocast, the MoE router bookkeeping, a ZeRO-3 / FSDP2 gather of the head all TRL's) and hands
``hidden, weight, bias, targets, temperature, softcap, logit_scale`` to ``ChunkedLogProbFunction.apply``, for which
:class:`fused_gspo.trl.stand_in.ChunkedLogProbStandIn` stands in. While :class:`_PreferenceRequest` is active, the
stand-in computes the whole DPO loss there with :func:`fused_gspo.preference.head.compute_preference_loss` (the
single pass where the planner picks it: ``6NHV``, the gradient formed while each chunk's logits are at hand, where
TRL's head recomputes them in its backward) and hands TRL's forward per-token log-probs and entropies in the layout
it scatters (the other three per-token outputs are None: only TRL's loss code reads them, and it does not run); the
log-probs carry the loss's gradient, whose backward then comes through the model's output as TRL's own loss's does
(:class:`fused_gspo.trl.stand_in.LossRelay`: ZeRO-3 gathers the head there for the fused backward). TRL
passes either every position (``[2B * (L - 1), H]``, devices without Triton, e.g. the CPU) or the valid tokens only
(``[n, H]``, Triton devices), as its ``_use_triton`` decides; with prompt-learning PEFT (prompt tuning, P-tuning) every
row has the virtual tokens' positions in front, and, when a row's first token is a completion token (an empty prompt),
one more valid label, which TRL's ``[:, -seq_len:]`` drops and so is dropped here.

The reference. ``ref_model``, or the policy with its PEFT adapter disabled (or switched to the ``"ref"`` adapter),
is called as TRL calls it with :class:`fused_gspo.trl.stand_in.LogProbRequest` active (no-grad fused log-probs), and
reduced with :func:`fused_gspo.preference.dpo.reference_logps` (sum, or LD-DPO's ``ld_alpha`` split). It runs
*before* the policy's forward, since the fused loss needs it there. TRL runs it after: the two orders give the same
numbers unless the reference pass draws random numbers (dropout active in it: PEFT, whose reference is the policy
in train mode, on a base model with dropout on, e.g. a config's attention dropout, which ``disable_dropout`` does not
reach), which is detected by comparing the random generators' states around it. Then the generators are rewound, and
TRL's order is followed exactly: the policy's forward only captures what the head receives, the reference runs again
(the first pass is discarded), and the loss is computed after the forward (under ZeRO-3 this fallback is refused at
run time: the head's gradient must be formed inside the forward there).

What the trainer adds around the loss, as TRL does: ``router_aux_loss_coef * outputs.aux_loss`` (MoE, the
``aux_loss`` the forward returned, logged as ``aux_loss``), ``num_tokens`` (the running ``attention_mask`` count,
divided by the tensor-parallel size), and the metrics under TRL's names, reduced with the accelerator's ``gather`` /
``gather_for_metrics`` where TRL uses each. ``return_outputs=True`` (deprecated in TRL) reruns the plain forward for
the logits, as TRL does. ``padding_free=True`` is turned off by TRL 1.16 itself (padded batches).

A row that has no completion token left to score (an empty prompt before a one-token completion, or a truncation that
keeps only a completion's first token) is fused like any other: its log-prob is 0, as in TRL. Only with an ``sft``
loss and no scored token in any chosen row (TRL's sft term is then NaN) does the batch run TRL's own
``_compute_loss``, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ..chunked import weight_gather
from ..head import HeadParams
from ..preference.batch import empty_rows_refusal, may_refuse_empty_rows
from ..preference.config import DPOLossConfig
from ..preference.dpo import reference_logps
from ..preference.head import MetricHooks, compute_preference_loss
from .config_field import flag_on, init_validated_by, logits_dtype_of
from .stand_in import LogProbRequest, LossRelay, active

# The chunked head's scratch budget for every fused DPO call (``"auto"``: the planner's default). Read at each call.
WORKSPACE_BYTES: int | str = "auto"

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
_warned: set = set()


# ---------------------------------------------------------------------------------------------------------------
# Trainer configuration -> DPOLossConfig


def dpo_config_for(trainer) -> DPOLossConfig:
    """The :class:`DPOLossConfig` of ``trainer``'s loss, from the attributes ``DPOTrainer._compute_loss`` reads.

    ``router_aux_loss_coef`` stays 0: the MoE auxiliary loss only exists once the model's forward has finished (it
    is computed after the LM head), so :func:`_fused_compute_loss` adds ``router_aux_loss_coef * aux_loss`` itself,
    where TRL adds it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL already warned about the configuration
        return DPOLossConfig(
            loss_type=list(trainer.loss_types),
            loss_weights=list(trainer.loss_weights),
            beta=trainer.beta,
            label_smoothing=trainer.label_smoothing,
            f_divergence_type=trainer.f_divergence_type,
            f_alpha_divergence_coef=trainer.f_alpha_divergence_coef,
            ld_alpha=trainer.ld_alpha,
            use_weighting=bool(trainer.use_weighting),
            discopop_tau=trainer.args.discopop_tau,
        )


def _compact(device) -> bool:
    """Whether TRL's fused forward hands over only the valid tokens on ``device`` (Triton devices) rather than every
    position: its own test, looked up where its forward looks it up."""
    import trl.trainer.utils as trl_utils

    return bool(trl_utils._use_triton(device))


def _hooks(trainer) -> MetricHooks:
    return MetricHooks(gather=trainer.accelerator.gather, gather_for_metrics=trainer.accelerator.gather_for_metrics)


# ---------------------------------------------------------------------------------------------------------------
# The request: the DPO loss where TRL's fused head would score the policy's tokens


class _PreferenceRequest:
    """Active during the policy's forward: computes the DPO loss from the hidden states TRL's forward hands over.

    ``completion_mask`` / ``input_ids``: the batch's ``[2B, L]`` (unshifted, as collated). ``ref``: ``(chosen,
    rejected)`` reference sequence log-probs, or None to only capture the head's inputs (:meth:`finish` computes the
    loss later). After the call: ``output`` (a :class:`~fused_gspo.preference.head.PreferenceLossOutput`).
    """

    def __init__(self, *, completion_mask, input_ids, config, ref, hooks, train_eval, logits_dtype="auto"):
        self.completion_mask, self.input_ids = completion_mask, input_ids
        self.config, self.ref, self.hooks, self.train_eval = config, ref, hooks, train_eval
        self.logits_dtype = logits_dtype
        self.output = None
        self.captured = None
        self.relay = LossRelay()

    def __call__(self, hidden, weight, bias, targets, temperature, softcap, logit_scale):
        if self.output is not None or self.captured is not None:
            raise RuntimeError("use_fused_gspo_loss=True: the model scored its LM head twice in one forward")
        device = hidden.device
        full = self.completion_mask.to(device)
        self.mask = full[:, 1:]
        self.ids = self.input_ids.to(device)[:, 1:].masked_fill(self.mask == 0, 0)
        self.lengths = full.sum(dim=1)  # ipo / sigmoid_norm divide by the unshifted completion length
        tokens, layout = self._tokens(hidden, full)
        head = HeadParams(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
        if self.ref is None:  # deferred: the reference pass runs after this forward (see the module docstring)
            self.captured = (tokens, weight, bias, head)
            zeros = torch.zeros(hidden.shape[0], dtype=torch.float32, device=device)
            return zeros, None, None, None, None
        self.output = self._compute(tokens, weight, bias, head)
        per_token = [self._scatter(values, layout) for values in (self.output.logps, self.output.entropy)]
        # the log-probs carry the loss's gradient through the model's output (LossRelay)
        return self.relay.carrier(per_token[0], self.output.loss), per_token[1], None, None, None

    def _tokens(self, hidden, full):
        """The hidden states of the scored tokens, ``[2B, T, H]`` (every position handed over) or ``[n, H]`` (the
        valid tokens, row-major), and how to lay per-token values out for TRL's forward."""
        rows, T = self.mask.shape
        if not _compact(hidden.device):  # every position; prompt-learning PEFT's virtual tokens in front
            width, rest = divmod(hidden.shape[0], rows)
            if rest == 0 and width >= T:
                return hidden.reshape(rows, width, -1)[:, width - T :], ("every", width)
            raise RuntimeError(
                f"use_fused_gspo_loss=True: TRL's forward handed over {hidden.shape[0]} hidden states for every "
                f"position of {rows} sequences of {T + 1} tokens"
            )
        # Only the valid tokens: those of the shifted completion mask, and, with prompt-learning PEFT, in front of
        # each row whose first token is a completion token (an empty prompt), the label of that first token (scored
        # from the last virtual token), which TRL's [:, -seq_len:] drops
        valid = self.mask.bool()
        lead = full[:, :1].bool()
        extended = torch.cat([lead, valid], dim=1)
        counts = torch.stack([valid.sum(), extended.sum()]).tolist()
        if hidden.shape[0] == counts[0]:
            return hidden, ("valid", valid)
        if hidden.shape[0] == counts[1]:
            keep = torch.cat([torch.zeros_like(lead), valid], dim=1)[extended]
            return hidden[keep], ("extended", extended)
        raise RuntimeError(
            f"use_fused_gspo_loss=True: TRL's forward handed over {hidden.shape[0]} hidden states for a batch with "
            f"{counts[0]} completion tokens to score"
        )

    def _scatter(self, values: torch.Tensor, layout) -> torch.Tensor:
        """``[2B, T]`` per-token values in the layout of what TRL's forward handed over (it scatters them back)."""
        kind, arg = layout
        if kind == "every":
            rows, T = values.shape
            padded = values.new_zeros(rows, arg)
            padded[:, arg - T :] = values
            return padded.reshape(-1)
        if kind == "valid":
            return values[arg]
        return torch.cat([values.new_zeros(values.shape[0], 1), values], dim=1)[arg]

    def _compute(self, tokens, weight, bias, head):
        ref_chosen, ref_rejected = (t.to(tokens.device) for t in self.ref)
        return compute_preference_loss(
            tokens,
            weight,
            self.ids,
            self.mask,
            config=self.config,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            bias=bias,
            completion_lengths=self.lengths,
            head=head,
            workspace_bytes=WORKSPACE_BYTES,
            logits_dtype=self.logits_dtype,
            hooks=self.hooks,
            train_eval=self.train_eval,
        )

    def finish(self, ref) -> None:
        """The deferred loss, once the reference is known, from what the forward captured."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        self.ref = ref
        tokens, weight, bias, head = self.captured
        token = weight_gather.set(maybe_gather_lm_head_ctx)
        try:
            self.output = self._compute(tokens, weight, bias, head)
        finally:
            weight_gather.reset(token)


# ---------------------------------------------------------------------------------------------------------------
# The reference pass


class _GeneratorStates:
    """The CPU's and the accelerators' random generator states: did a pass draw random numbers, and rewind it."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.devices = {}
        for name in ("cuda", "xpu"):
            module = getattr(torch, name, None)
            initialized = getattr(module, "is_initialized", None)
            if module is not None and module.is_available() and initialized is not None and initialized():
                self.devices[name] = module.get_rng_state_all()

    def changed(self) -> bool:
        now = _GeneratorStates()
        if not torch.equal(now.cpu, self.cpu) or now.devices.keys() != self.devices.keys():
            return True
        return any(
            not all(torch.equal(a, b) for a, b in zip(now.devices[name], states, strict=True))
            for name, states in self.devices.items()
        )

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for name, states in self.devices.items():
            getattr(torch, name).set_rng_state_all(states)


def _reference_per_token(call, logits_dtype: str) -> torch.Tensor:
    """``call()`` (a no-grad model call with ``fused_lm_head=True``) through the fused log-prob path."""
    with active(LogProbRequest(logits_dtype)):
        return call().log_probs


def _loss_reference(trainer, model_kwargs, labels, shift_mask):
    """The reference pass of ``DPOTrainer._compute_loss``, fused: ``(ref_chosen_logps, ref_rejected_logps)``."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    # The reference only needs log-probs: no router logits (TRL drops them too)
    ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        if is_peft_model(trainer.model) and trainer.ref_model is None:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                per_token = _reference_per_token(
                    lambda: trainer.model(**ref_kwargs, labels=labels, fused_lm_head=True), logits_dtype_of(trainer)
                )
        else:
            per_token = _reference_per_token(
                lambda: trainer.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True), logits_dtype_of(trainer)
            )
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
    return reference_logps(per_token[:, -shift_mask.size(1) :], shift_mask, trainer.ld_alpha)


def _fused_compute_ref_log_probs(self, model, inputs):
    """``DPOTrainer.compute_ref_log_probs`` through the fused no-grad path (same model call, same reduction)."""
    from accelerate.utils import is_peft_model
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    adapter_context = contextlib.nullcontext()
    if self.ref_model is None and is_peft_model(self.model):
        unwrapped = self.accelerator.unwrap_model(self.model)
        adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    with (
        torch.no_grad(),
        disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        adapter_context,
        self.accelerator.autocast(),
    ):
        per_token = _reference_per_token(
            lambda: model(**model_kwargs, labels=labels, fused_lm_head=True), logits_dtype_of(self)
        )
    shift_mask = inputs["completion_mask"][..., 1:]
    return reference_logps(per_token[:, -shift_mask.size(1) :], shift_mask, self.ld_alpha)


# ---------------------------------------------------------------------------------------------------------------
# The fused _compute_loss


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return is_deepspeed_zero3_enabled()


def _fused_compute_loss(self, model, inputs, return_outputs, original):
    """``DPOTrainer._compute_loss`` through the fused head: same loss (``sum_k w_k * mean(loss_k)`` [+
    ``router_aux_loss_coef * aux_loss``]), gradient and metrics, no ``[2B, L, V]`` logits."""
    mode = "train" if self.model.training else "eval"
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    config = dpo_config_for(self)
    # Rows with nothing to score are fused (their log-prob is 0, as in TRL), except where TRL's loss is NaN (the sft
    # term's mean over the chosen tokens when no chosen row has one): a host read only for the configs that can refuse
    refusal = may_refuse_empty_rows(config) and empty_rows_refusal(config, shift_mask.sum(1).tolist(), "the batch")
    if refusal:
        _warn_once("empty", f"use_fused_gspo_loss=True: TRL's own loss computes such batches (NaN there): {refusal}")
        return original(self, model, inputs, return_outputs)

    model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    if self.aux_loss_enabled:  # MoE: the model returns outputs.aux_loss
        model_kwargs["output_router_logits"] = True
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    request = _PreferenceRequest(
        completion_mask=completion_mask,
        input_ids=inputs["input_ids"],
        config=config,
        ref=None,
        hooks=_hooks(self),
        train_eval=mode,
        logits_dtype=logits_dtype_of(self),
    )
    if self.precompute_ref_logps:
        request.ref = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
    else:
        states = _GeneratorStates()
        ref = _loss_reference(self, model_kwargs, labels, shift_mask)
        if states.changed():  # a stochastic reference pass: rewind, and follow TRL's order (policy, then reference)
            if _zero3_enabled():
                raise RuntimeError(
                    "use_fused_gspo_loss=True: the reference pass draws random numbers (dropout is active in it, e.g. "
                    "PEFT on a base model whose dropout is on), so it must run after the policy's forward, as in "
                    "TRL; under DeepSpeed ZeRO-3 the fused loss cannot then be formed inside the forward. Turn the "
                    "dropout off (disable_dropout=True, and the model config's attention dropout)"
                )
            states.restore()
        else:
            request.ref = ref

    with active(request):
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    if request.output is None and request.captured is None:
        raise RuntimeError(
            "use_fused_gspo_loss=True: the model's forward did not reach TRL's fused LM head, so the fused loss was "
            "never computed (was the model's forward replaced after the trainer was built?)"
        )
    if request.output is None:
        request.finish(_loss_reference(self, model_kwargs, labels, shift_mask))
        loss = request.output.loss  # computed after the forward: nothing to relay
    else:  # the loss's backward through the model's output, as TRL's own loss's (ZeRO-3 gathers the head there)
        loss = request.relay.loss(request.output.loss, outputs.log_probs)
    out = request.output

    metrics = self._metrics[mode]
    if self.aux_loss_enabled:
        aux_loss = outputs.aux_loss
        loss = loss + self.router_aux_loss_coef * aux_loss
        metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
    values = {name: value.item() for name, value in out.metrics.items()}  # TRL logs Python floats
    metrics["entropy"].append(values.pop("entropy"))
    if mode == "train":
        num_tokens_in_batch = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        self._total_train_tokens += num_tokens_in_batch // self._tp_size
    metrics["num_tokens"] = [self._total_train_tokens]
    for name, value in values.items():
        metrics[name].append(value)

    if return_outputs:
        warnings.warn(
            "`return_outputs=True`, and the logits it passes to `compute_metrics`, are deprecated and will be removed "
            "in v2.0.0. The fused LM head does not build the logits, so they are recomputed with an extra forward "
            "pass.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            outputs = model(**model_kwargs)
    return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------------------------------------------------------
# Construction checks


def validate_trainer(trainer) -> None:
    """Raise ``ValueError`` if ``trainer``'s loss cannot be reproduced through the fused head."""
    from accelerate.utils import is_peft_model

    try:
        dpo_config_for(trainer)
    except ValueError as exc:
        raise ValueError(f"use_fused_gspo_loss=True cannot reproduce this trainer's loss: {exc}") from exc
    parallelism = trainer.accelerator.parallelism_config
    for name in ("cp_size", "sp_size"):
        size = (getattr(parallelism, name, 1) or 1) if parallelism is not None else 1
        if size > 1:
            raise ValueError(
                f"use_fused_gspo_loss=True is not supported with {name}={size} on DPOTrainer: the DPO loss of a pair "
                "reads the log-probs of its whole sequences, which context / sequence parallelism splits across ranks"
            )
    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model):
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"use_fused_gspo_loss=True: the model ({type(model).__name__}) exposes no LM head weight "
            "(get_output_embeddings()): there is nothing to fuse the loss with"
        )
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise ValueError(
            "use_fused_gspo_loss=True: a PEFT adapter on lm_head is not supported (the fused loss reads "
            "lm_head.weight directly, so the adapter would never be trained): remove 'lm_head' from target_modules"
        )
    if not head.weight.is_floating_point():
        raise ValueError(
            f"use_fused_gspo_loss=True: the LM head's weight is {head.weight.dtype} (a quantized head?): the fused "
            "loss needs a floating weight"
        )


# ---------------------------------------------------------------------------------------------------------------
# Patching


def _switch_compute_loss(original):
    @functools.wraps(original)
    def _compute_loss(self, model, inputs, return_outputs=False):
        if flag_on(self):
            return _fused_compute_loss(self, model, inputs, return_outputs, original)
        return original(self, model, inputs, return_outputs)

    return _compute_loss


def _switch_compute_ref_log_probs(original):
    @functools.wraps(original)
    def compute_ref_log_probs(self, model, inputs):
        if flag_on(self):
            return _fused_compute_ref_log_probs(self, model, inputs)
        return original(self, model, inputs)

    return compute_ref_log_probs


def targets() -> list:
    """(owner, attribute, replacement factory) for the TRL attributes this trainer's switch replaces."""
    from trl import DPOTrainer

    return [
        (DPOTrainer, "_compute_loss", _switch_compute_loss),
        (DPOTrainer, "compute_ref_log_probs", _switch_compute_ref_log_probs),
        (DPOTrainer, "__init__", init_validated_by(validate_trainer)),
    ]


def config_classes() -> list:
    """The config classes that get the ``use_fused_gspo_loss`` field."""
    from trl import DPOConfig

    return [DPOConfig]
