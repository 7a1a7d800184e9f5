"""``use_fused_gspo_loss=True`` on TRL 1.16's CPOTrainer (``trl.experimental.cpo``): CPO, SimPO, AlphaPO.

What ``patch_trl()`` changes (and ``unpatch_trl()`` restores):

- ``CPOConfig`` gets the ``use_fused_gspo_loss`` dataclass field (:mod:`.config_field`).
- ``CPOTrainer.get_batch_loss_metrics``, the one place ``compute_loss`` and ``prediction_step`` (train and eval) get
  the loss and metrics from: with the flag on, the fused version below; off, TRL's own.
- ``CPOTrainer.__init__``: with the flag on, what cannot be reproduced fails at construction with a ``ValueError``
  (an encoder-decoder model, FSDP, an LM head that is not a plain linear layer such as LoRA on ``lm_head``, a
  configuration :class:`~fused_gspo.preference.CPOLossConfig` refuses).

How the hidden states are reached: TRL's own model call runs unchanged (``model(concatenated_input_ids,
attention_mask=..., use_cache=False[, output_router_logits=True])``: DDP's forward, PEFT's wrapper and adapters,
gradient checkpointing, autocast, the MoE router bookkeeping), but for its duration the LM head's ``nn.Linear`` has its
``forward`` replaced, on that instance only, by :class:`_HeadStandIn`. That stand-in receives exactly what the model
would project (the backbone's final-normed hidden states at every position, after the model's own slicing), computes
the whole CPO loss there with :func:`fused_gspo.preference.head.compute_preference_loss` from that input and the
head's own ``weight`` / ``bias``, and returns a one-column stand-in for the logits (the true logit of token 0). The
model then applies its softcap / logit scale to that one column, which costs nothing, and is never shown the
``[2B, L, V]`` logits. The head transform the fused loss applies (``final_logit_softcapping``, ``logit_scale`` and
its aliases, resolved from the config as TRL's ``add_fused_lm_head`` resolves them) is checked on every call against
what the model did to the probe column: a model that transforms its logits in a way the config does not describe
fails loudly instead of training on a different loss.

Why there rather than calling the backbone submodule: the backbone is reached through the model's forward, whose
wrappers (DDP's reducer, PEFT's adapter switching, ``torch.compile``, the MoE ``aux_loss``) a direct call would
bypass; and inside the head's forward the head's parameters are exactly as the model uses them (on the head's device,
under the model's autocast, and gathered by ZeRO-3's pre-forward hook). The probe column carries the loss's gradient
(:class:`fused_gspo.trl.stand_in.LossRelay`): the loss's backward comes through the model's logits and the head's
output, where ZeRO-3's pre-backward hook gathers the head again before the fused backward hands back its gradient
(and before the head's post-backward hook, on its input, which ZeRO-3 refuses to run first). Tested under DeepSpeed
ZeRO-3 on CPU (``tests/test_zero3.py``).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..chunked import weight_gather
from ..head import HeadParams
from ..preference.batch import empty_rows_refusal, may_refuse_empty_rows
from ..preference.config import CPOLossConfig
from ..preference.head import MetricHooks, compute_preference_loss
from .config_field import flag_on, init_validated_by, logits_dtype_of
from .stand_in import LossRelay

# The chunked head's scratch budget for every fused CPO call (``"auto"``: the planner's default, see docs/design.md;
# on CPU a fixed 512 MiB). Read at each call.
WORKSPACE_BYTES: int | str = "auto"


# ---------------------------------------------------------------------------------------------------------------
# Trainer configuration -> CPOLossConfig and the head transform


def cpo_config_for(trainer) -> CPOLossConfig:
    """The :class:`CPOLossConfig` of ``trainer``'s loss, from the attributes ``CPOTrainer.cpo_loss`` reads.

    ``router_aux_loss_coef`` stays 0: the MoE auxiliary loss only exists once the model's forward has finished (it is
    computed after the LM head), so :func:`_fused_get_batch_loss_metrics` adds ``aux_loss_coef * aux_loss`` itself,
    where TRL adds it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL already warned (label smoothing ignored by hinge / ipo)
        return CPOLossConfig(
            loss_type=trainer.loss_type,  # CPOConfig already turned "alphapo" into "simpo" with cpo_alpha=0
            beta=trainer.beta,
            label_smoothing=trainer.label_smoothing,
            cpo_alpha=trainer.cpo_alpha,
            simpo_gamma=getattr(trainer, "simpo_gamma", trainer.args.simpo_gamma),  # TRL sets it for "simpo" only
            alpha=trainer.alpha,
        )


def head_params_for(config) -> HeadParams:
    """The transform the model applies to its logits, read from its (text) config as TRL's ``add_fused_lm_head``
    reads it: ``final_logit_softcapping``; ``logit_scale``, else ``output_multiplier``, else ``lm_head_multiplier``,
    else ``1 / logits_scaling`` (``logits_scaling`` for HyperCLOVA X). CPO scores at temperature 1."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return HeadParams(
        temperature=1.0,
        logit_scale=1.0 if scale is None else float(scale),
        softcap=None if softcap is None else float(softcap),
    )


# ---------------------------------------------------------------------------------------------------------------
# The LM head: which linear layers project, and the stand-in that computes the loss in their place


def _unwrap(trainer, model):
    return trainer.accelerator.unwrap_model(model)


def _is_plain_linear(module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def head_linears(model) -> list[nn.Linear]:
    """The plain ``nn.Linear`` layer(s) that project the LM head's input to the logits.

    The output embeddings themselves, or PEFT's ``ModulesToSaveWrapper`` around such a layer (``modules_to_save=
    ["lm_head"]``: whichever copy is active runs, and is the one intercepted). Anything else (LoRA on the head, a
    quantized head, a custom projection) raises ``ValueError``: its output is not ``x @ W.T + b`` of one weight.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"the model ({type(model).__name__}) exposes no LM head (get_output_embeddings() is None): there is "
            "nothing to fuse the loss with"
        )
    if _is_plain_linear(head):
        linears = [head]
    elif type(head).__name__ == "ModulesToSaveWrapper" and hasattr(head, "original_module"):
        linears = [head.original_module, *head.modules_to_save.values()]
        if not all(_is_plain_linear(m) for m in linears):
            linears = []
    else:
        linears = []
    if not linears:
        raise ValueError(
            f"the LM head is a {type(head).__name__}, not a plain torch.nn.Linear (LoRA or another adapter on "
            "lm_head, a quantized or custom head): the fused loss needs logits = hidden @ weight.T + bias of one "
            "weight. Leave lm_head out of the PEFT target_modules (modules_to_save=['lm_head'] is supported)"
        )
    for linear in linears:
        if not linear.weight.is_floating_point():
            raise ValueError(f"the LM head's weight is {linear.weight.dtype}: the fused loss needs a floating weight")
    return linears


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


class _HeadStandIn:
    """Stands in for the LM head's ``forward`` during one model call: computes the loss from the head's input and
    returns the real logit of vocabulary entry 0 (``[2B, L, 1]``), so that what the model does to its logits
    afterwards can be checked (:meth:`check`)."""

    def __init__(self, *, completion_ids, completion_mask, config, head, hooks, train_eval, logits_dtype="auto"):
        self.completion_ids, self.completion_mask = completion_ids, completion_mask
        self.config, self.head, self.hooks, self.train_eval = config, head, hooks, train_eval
        self.logits_dtype = logits_dtype
        self.output = None
        self.probe = None
        self.relay = LossRelay()

    def __call__(self, linear: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            raise RuntimeError("use_fused_gspo_loss=True: the model called its LM head twice in one forward")
        rows, width = self.completion_mask.shape
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (rows, width + 1):
            raise RuntimeError(
                "use_fused_gspo_loss=True: the LM head received hidden states of shape "
                f"{tuple(hidden.shape)}, expected [{rows}, {width + 1}, H] (every position of the concatenated batch)"
            )
        weight, bias = linear.weight, linear.bias
        if weight.device.type == "meta":
            raise RuntimeError("use_fused_gspo_loss=True: the LM head's weight is offloaded (on the meta device)")
        hidden = hidden.to(weight.device)
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        token = weight_gather.set(maybe_gather_lm_head_ctx)  # a recomputing backward gathers a ZeRO-3 head again
        try:
            self.output = compute_preference_loss(
                hidden[:, :-1],  # column t scores label t + 1, as get_batch_logps shifts
                weight,
                self.completion_ids.to(weight.device),
                self.completion_mask.to(weight.device),
                config=self.config,
                bias=bias,
                position_hidden=hidden,  # CPO's logits/* average every position, the last one included
                head=self.head,
                workspace_bytes=WORKSPACE_BYTES,
                logits_dtype=self.logits_dtype,
                hooks=self.hooks,
                train_eval=self.train_eval,
            )
        finally:
            weight_gather.reset(token)
        with torch.no_grad():  # nothing saved for a backward: a view of the gathered weight would keep it all alive
            probe = F.linear(hidden, weight[:1], None if bias is None else bias[:1])
        self.probe = probe
        # the probe carries the loss's gradient through the head's output and the model's (LossRelay)
        return self.relay.carrier(probe, self.output.loss)

    def check(self, outputs) -> None:
        """The loss was computed, and the model transformed the probe column as the fused head transforms logits."""
        if self.output is None:
            raise RuntimeError(
                "use_fused_gspo_loss=True: the model's forward never called its LM head (get_output_embeddings()), "
                "so the fused loss was not computed"
            )
        logits = getattr(outputs, "logits", None)
        if logits is None or tuple(logits.shape) != tuple(self.probe.shape):
            raise RuntimeError(
                "use_fused_gspo_loss=True: the model's logits are not its LM head's output position by position "
                f"(got {None if logits is None else tuple(logits.shape)} for a head output of "
                f"{tuple(self.probe.shape)})"
            )
        expected = self.head.transform(self.probe.float())
        actual = logits.detach().float().to(expected.device)
        tol = _tolerance(self.probe.dtype)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if not torch.allclose(actual, expected, rtol=tol, atol=tol * max(scale, 1e-6)):
            err = float((actual - expected).abs().max())
            raise RuntimeError(
                "use_fused_gspo_loss=True: the model transforms its LM head's output in a way its config does not "
                f"describe (fused head: {self.head}; max |logit - expected| = {err:.3e}); the fused loss would "
                "differ from TRL's"
            )


class _Intercept:
    """For the duration of a ``with``: the given linear layers' ``forward`` (instance attribute) is the stand-in."""

    def __init__(self, linears, stand_in):
        self.linears, self.stand_in = linears, stand_in
        self.saved = []

    def __enter__(self):
        for linear in self.linears:
            self.saved.append((linear, linear.__dict__.get("forward")))
            linear.forward = functools.partial(self.stand_in, linear)
        return self.stand_in

    def __exit__(self, *exc):
        for linear, previous in reversed(self.saved):
            if previous is None:
                del linear.forward
            else:
                linear.forward = previous
        self.saved.clear()
        return False


# ---------------------------------------------------------------------------------------------------------------
# The fused get_batch_loss_metrics


def _fused_get_batch_loss_metrics(self, model, batch, train_eval, original):
    """``CPOTrainer.get_batch_loss_metrics`` through the fused head: same loss (``losses.mean() + cpo_alpha *
    nll_loss [+ aux_loss_coef * aux_loss]``) and metrics (``eval_``-prefixed in eval), no ``[2B, L, V]`` logits.

    A batch where TRL's loss is NaN (a row with nothing to score under averaged log-probs, or no chosen token under
    the NLL term), which the fused loss refuses, runs TRL's own ``original`` instead, with a warning."""
    concatenated = self.concatenated_inputs(
        batch, is_encoder_decoder=False, padding_value=self.pad_token_id, device=self.accelerator.device
    )
    labels = concatenated["concatenated_labels"][:, 1:]  # get_batch_logps: labels[:, 1:] against logits[:, :-1]
    mask = labels != -100
    config = cpo_config_for(self)
    refusal = may_refuse_empty_rows(config) and empty_rows_refusal(config, mask.sum(1).tolist(), "the labels")
    if refusal:  # one host read, for the configs that can refuse
        warnings.warn(f"use_fused_gspo_loss=True: TRL's own loss computes this batch (NaN there): {refusal}",
                      stacklevel=3)  # fmt: skip
        return original(self, model, batch, train_eval)
    stand_in = _HeadStandIn(
        completion_ids=labels.masked_fill(~mask, 0),
        completion_mask=mask,
        config=config,
        head=head_params_for(_unwrap(self, model).config),
        hooks=MetricHooks(gather_for_metrics=self.accelerator.gather_for_metrics),
        train_eval=train_eval,
        logits_dtype=logits_dtype_of(self),
    )
    model_kwargs = {"output_router_logits": True} if self.aux_loss_enabled else {}
    with _Intercept(head_linears(_unwrap(self, model)), stand_in):
        outputs = model(
            concatenated["concatenated_input_ids"],
            attention_mask=concatenated["concatenated_attention_mask"],
            use_cache=False,
            **model_kwargs,
        )
    stand_in.check(outputs)
    out = stand_in.output
    # the loss's backward through the model's logits and the head's output, as TRL's own loss's: ZeRO-3's
    # pre-backward hook on the head's output gathers the head there, and must fire before the one on its input
    loss = stand_in.relay.loss(out.loss, outputs.logits)
    if self.aux_loss_enabled:
        loss = loss + self.aux_loss_coef * outputs.aux_loss
    metrics = {name: value.item() for name, value in out.metrics.items()}  # TRL stores Python floats
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Construction checks


def validate_trainer(trainer) -> None:
    """Raise ``ValueError`` if ``trainer``'s loss cannot be reproduced through the fused head."""
    if trainer.is_encoder_decoder:
        raise ValueError(
            "use_fused_gspo_loss=True supports decoder-only models: CPOTrainer scores an encoder-decoder's "
            "unshifted decoder logits, which the fused CPO path does not reproduce"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "use_fused_gspo_loss=True is not supported with FSDP on CPOTrainer: the LM head's weight is resharded "
            "after the forward, before the fused loss's backward reads it"
        )
    try:
        cpo_config_for(trainer)
    except ValueError as exc:
        raise ValueError(f"use_fused_gspo_loss=True cannot reproduce this trainer's loss: {exc}") from exc
    model = _unwrap(trainer, trainer.model)
    try:
        head_linears(model)
    except ValueError as exc:
        raise ValueError(f"use_fused_gspo_loss=True cannot reproduce this trainer's loss: {exc}") from exc
    head = head_params_for(model.config)
    for name, value in (("logit_scale", head.logit_scale), ("final_logit_softcapping", head.softcap)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"use_fused_gspo_loss=True: the model config's {name} is {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Patching


def _switch(original):
    @functools.wraps(original)
    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        if flag_on(self):
            return _fused_get_batch_loss_metrics(self, model, batch, train_eval, original)
        return original(self, model, batch, train_eval)

    return get_batch_loss_metrics


def targets() -> list:
    """(owner, attribute, replacement factory) for the TRL attributes this trainer's switch replaces."""
    from trl.experimental.cpo import CPOTrainer

    return [
        (CPOTrainer, "get_batch_loss_metrics", _switch),
        (CPOTrainer, "__init__", init_validated_by(validate_trainer)),
    ]


def config_classes() -> list:
    """The config classes that get the ``use_fused_gspo_loss`` field."""
    from trl.experimental.cpo import CPOConfig

    return [CPOConfig]
