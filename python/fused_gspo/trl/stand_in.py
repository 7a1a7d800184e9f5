"""Where TRL's forward calls ``ChunkedLogProbFunction.apply``: the request a fused trainer path makes active.

TRL 1.16 scores tokens through the forward it patches onto the model (``add_fused_lm_head``): the backbone runs, the
LM head is gathered (FSDP2 ``full_tensor``, ZeRO-3 gather), and ``hidden, weight, bias, targets, temperature,
softcap, logit_scale`` go to ``ChunkedLogProbFunction.apply``. :class:`ChunkedLogProbStandIn` takes that call: while
a request is active (:func:`active`) the request computes what the trainer asked for; otherwise TRL's own function
runs. The policy adapter (:mod:`.patch`) and the preference adapters (:mod:`.dpo`, :mod:`.cpo`) each define their
loss requests on top of this module; :class:`LogProbRequest` is the one they share (no-grad ``old``/``ref`` passes).
"""

from __future__ import annotations

import contextlib
import contextvars

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

    TRL calls it with the head gathered (ZeRO-3) for the forward; a backward that recomputes the projection re-enters
    TRL's same gather (``maybe_gather_lm_head_ctx``), as TRL's own backward does.
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
