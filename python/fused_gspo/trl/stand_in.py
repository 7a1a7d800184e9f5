"""Where TRL's forward calls ``ChunkedLogProbFunction.apply``: the request a fused trainer path makes active.

TRL 1.16 scores tokens through the forward it patches onto the model (``add_fused_lm_head``): the backbone runs, the
LM head is gathered (FSDP2 ``full_tensor``, ZeRO-3 gather), and ``hidden, weight, bias, targets, temperature,
softcap, logit_scale`` go to ``ChunkedLogProbFunction.apply``. :class:`ChunkedLogProbStandIn` takes that call: while
a request is active (:func:`active`) the request computes what the trainer asked for; otherwise TRL's own function
runs. The policy adapter (:mod:`.patch`) and the preference adapters (:mod:`.dpo`, :mod:`.cpo`) each define their
loss requests on top of this module; :class:`LogProbRequest` is the one they share (no-grad ``old``/``ref`` passes),
and :class:`LossRelay` takes each loss's backward through the model's output, as TRL's own loss's.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ..api import fused_logprobs
from ..chunked import weight_gather
from .tensor_parallel import unwrap

_request: contextvars.ContextVar = contextvars.ContextVar("fused_gspo_request", default=None)


def current_request():
    """The active request, or ``None`` when TRL's own chunked head should run."""
    return _request.get()


@contextlib.contextmanager
def active(request):
    """Make ``request`` answer TRL's ``ChunkedLogProbFunction.apply`` calls within the block."""
    token = _request.set(request)
    try:
        yield request
    finally:
        _request.reset(token)


class ChunkedLogProbStandIn:
    """Where TRL calls ``ChunkedLogProbFunction.apply``: ours while a request is active, TRL's otherwise.

    TRL calls it with the head gathered (ZeRO-3) for the forward. For the backward, the loss requests relay their
    loss's gradient through the model's output (:class:`LossRelay`), where ZeRO-3's hook gathers the head again, as
    for TRL's own loss; TRL's gather (``maybe_gather_lm_head_ctx``) is also set as :data:`~fused_gspo.chunked.
    weight_gather`, which a backward enters only if it finds the head released all the same.
    """

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, *rest):
        request = _request.get()
        if request is None:
            return self.original.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, *rest
            )
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        token = weight_gather.set(maybe_gather_lm_head_ctx)
        try:  # a tensor-parallel head reaches here as a stand-in TRL did not gather (.tensor_parallel)
            weight, bias = unwrap(weight), unwrap(bias)
            return request(hidden, weight, bias, targets, float(temperature), softcap, float(logit_scale))
        finally:
            weight_gather.reset(token)


class LogProbRequest:
    """TRL asks for log-probs (and entropies): the fused log-prob path, differentiable if grads are on, with the
    trainer's staging (``fused_gspo_logits_dtype``)."""

    def __init__(self, logits_dtype: str = "auto"):
        self.logits_dtype = logits_dtype

    def __call__(self, hidden, weight, bias, targets, temperature, softcap, logit_scale):
        logp, entropy = fused_logprobs(
            hidden,
            weight,
            targets,
            bias=bias,
            temperature=temperature,
            logit_scale=logit_scale,
            final_logit_softcapping=softcap,
            return_entropy=True,
            logits_dtype=self.logits_dtype,
        )
        return logp, entropy, None, None, None


class LossRelay:
    """Routes a fused loss's backward through the model's output, where the backward of TRL's own loss passes.

    The fused loss is computed inside the model's forward, where TRL's chunked head would run, and reaches the
    trainer past the model's outputs. But hooks on a module's output fire only for gradients that flow through it,
    and DeepSpeed ZeRO-3 relies on one: its pre-backward hook on the model's output gathers the LM head's weight
    (a parameter the forward read outside the head's own module) for the backward, where the fused backward returns
    the head's gradient; without it the weight is still released (0 elements) and the gradient does not fit. On the
    head's own module (CPO's stand-in) the same hook pairs with a post-backward hook on the head's input, and ZeRO-3
    refuses to run the second without the first.

    So the per-token values the forward hands back for the model's output are a carrier (:meth:`carrier`), and the
    trainer's loss is :meth:`loss`: its value is the fused loss's, its backward sends a zero gradient into the model's
    output, and when that has come through the output's hooks and TRL's own operations to the carrier, the carrier
    hands the fused loss the gradient the trainer's loss received. Values are untouched, and the fused backward runs
    strictly after the output's hooks. If the zero gradient never reaches the carrier, the backward fails loudly
    rather than leave the fused loss without its gradient.
    """

    def __init__(self):
        self._grad: torch.Tensor | None = None

    def carrier(self, values: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """``values`` (what the forward returns for the model's output) as the carrier of ``loss``'s gradient."""
        if not (torch.is_grad_enabled() and loss.requires_grad):
            return values
        return _Carrier.apply(values.detach(), loss, self)

    def loss(self, loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``loss``'s value, its gradient relayed through ``output`` (a model output computed from the carrier)."""
        if not (torch.is_grad_enabled() and loss.requires_grad):
            return loss
        if not output.requires_grad:
            raise RuntimeError(
                "use_fused_gspo_loss=True: the model's output does not depend on the per-token values the fused "
                "head handed back, so the fused loss's gradient cannot be relayed through it"
            )
        return _Relay.apply(loss.detach(), output, self)

    def _delivered(self) -> None:
        if self._grad is not None:
            self._grad = None
            raise RuntimeError(
                "use_fused_gspo_loss=True: the backward reached the model's output but not the per-token values the "
                "fused head handed back (something between them dropped the gradient), so the fused loss's gradient "
                "was not delivered"
            )


class _Relay(torch.autograd.Function):
    """``value`` (the fused loss's), with a zero gradient sent into ``output``; the incoming gradient is kept for the
    carrier."""

    @staticmethod
    def forward(ctx, value, output, relay: LossRelay):
        ctx.relay = relay
        ctx.output_like = (output.shape, output.dtype, output.device)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.relay._grad = grad
        # the carrier's backward consumes it during this backward pass; checked once the pass is over
        torch.autograd.Variable._execution_engine.queue_callback(ctx.relay._delivered)
        shape, dtype, device = ctx.output_like
        return None, torch.zeros(shape, dtype=dtype, device=device), None


class _Carrier(torch.autograd.Function):
    """``values`` unchanged, attached to ``loss``: its backward hands ``loss`` the relayed gradient (the gradient
    arriving here, zero, only says that the output's hooks have run)."""

    @staticmethod
    def forward(ctx, values, loss, relay: LossRelay):
        ctx.relay = relay
        return values.clone()

    @staticmethod
    def backward(ctx, _arrived):
        grad, ctx.relay._grad = ctx.relay._grad, None
        if grad is None:
            raise RuntimeError(
                "use_fused_gspo_loss=True: a gradient reached the per-token values the fused head handed back without "
                "coming from the trainer's loss; only the trainer's loss can be differentiated"
            )
        return None, grad, None
