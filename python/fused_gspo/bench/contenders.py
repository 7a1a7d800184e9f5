"""The contenders: each a way of computing the loss (and the log-probs) through the LM head.

A contender's ``prepare`` says why it cannot run ("unavailable: ..." when a library or device is missing,
"unsupported: ..." for an objective it has no code for) or gets ready; ``step(mode)`` gives the callable that is
checked and timed. ``note`` (optional) is printed under the table.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch

from ..api import fused_logprobs, fused_policy_loss
from ..backends import resolve_backend
from ..config import PolicyLossConfig
from ..objectives import PolicyBatch, evaluate
from .problem import Inputs

CONTENDERS = ("eager", "torch", "triton", "trl", "liger", "torch_lce", "floor")

Outputs = dict[str, torch.Tensor]


class Contender:
    """A way of computing the loss. Subclasses give ``loss`` and ``logprobs``; ``step`` turns them into modes."""

    name = ""
    description = ""
    note = ""  # printed under the table when set (what the reader must know to read the figures)

    def prepare(self, inputs: Inputs, cfg: PolicyLossConfig) -> str | None:
        """Get ready to run on these inputs; return why it cannot ("unavailable: ..." / "unsupported: ..."), or None."""
        return None

    def loss(self, inputs: Inputs, cfg: PolicyLossConfig) -> torch.Tensor:
        raise NotImplementedError

    def logprobs(self, inputs: Inputs, cfg: PolicyLossConfig) -> torch.Tensor:
        raise NotImplementedError

    def step(self, mode: str, inputs: Inputs, cfg: PolicyLossConfig) -> Callable[[], Outputs]:
        """A no-argument callable running one ``mode`` and returning what the check compares."""
        if mode == "logprobs":

            def run() -> Outputs:
                with torch.no_grad():
                    return {"logps": self.logprobs(inputs, cfg)}

        elif mode == "fwd":

            def run() -> Outputs:
                with torch.enable_grad():
                    return {"loss": self.loss(inputs, cfg)}

        else:

            def run() -> Outputs:
                with torch.enable_grad():
                    loss = self.loss(inputs, cfg)
                    dhidden, dweight = torch.autograd.grad(loss, (inputs.hidden, inputs.weight))
                return {"loss": loss.detach(), "dhidden": dhidden, "dweight": dweight}

        return run


def _loss_from_logps(logp: torch.Tensor, entropy: torch.Tensor, inputs: Inputs, cfg: PolicyLossConfig) -> torch.Tensor:
    """TRL's loss math on per-valid-token log-probs and entropies: scattered back to ``[B, T]``, then
    ``fused_gspo.objectives.evaluate`` (the objective and TRL's logged metrics, which TRL computes every step)."""
    valid = inputs.mask.bool()
    logps = logp.new_zeros(valid.shape).masked_scatter(valid, logp)
    entropy = entropy.new_zeros(valid.shape).masked_scatter(valid, entropy)
    batch = PolicyBatch(inputs.mask, inputs.advantages, inputs.old_logps, inputs.ref_logps).to(torch.float32)
    terms, _metrics, _ = evaluate(logps, entropy, batch, cfg)
    return terms.loss


class FusedGspo(Contender):
    """Our ``fused_policy_loss`` / ``fused_logprobs`` with one backend."""

    def __init__(self, backend: str):
        self.name = self.backend = backend
        self.description = f"fused_gspo.fused_policy_loss(backend={backend!r})"
        if backend == "eager":
            self.description += ": full [N, V] logits in the input dtype, autograd"

    def prepare(self, inputs, cfg):
        try:
            resolve_backend(self.backend, inputs.device)
        except RuntimeError as exc:
            return f"unavailable: {exc}"
        if self.backend == "triton" and inputs.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "unavailable: no GPU (on CPU the Triton kernels only run under TRITON_INTERPRET=1, far too slow)"
        return None

    def loss(self, inputs, cfg):
        return fused_policy_loss(
            inputs.hidden,
            inputs.weight,
            inputs.ids,
            inputs.advantages,
            inputs.mask,
            old_logps=inputs.old_logps,
            ref_logps=inputs.ref_logps,
            config=cfg,
            backend=self.backend,
        ).loss

    def logprobs(self, inputs, cfg):
        logp, _entropy = fused_logprobs(
            inputs.x_valid,
            inputs.weight,
            inputs.ids_valid,
            temperature=cfg.temperature,
            logit_scale=cfg.logit_scale,
            final_logit_softcapping=cfg.final_logit_softcapping,
            return_entropy=True,
            backend=self.backend,
            workspace_bytes=cfg.workspace_bytes,
        )
        return logp


class TrlChunked(Contender):
    """TRL 1.16's default: its chunked LM head, then the loss in eager PyTorch.

    The head is ``trl.kernels.ChunkedLogProbFunction`` called as ``trl.trainer.utils.add_fused_lm_head`` calls it
    (valid tokens only, vocabulary tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``, ``outputs=("log_probs", "entropy")`` as
    ``GRPOTrainer`` patches the policy model). For the loss math we reuse ``fused_gspo.objectives.policy_objective``
    and ``policy_metrics`` rather than instantiating a trainer: they mirror ``GRPOTrainer._compute_loss`` term for
    term and are cross-checked against TRL's own ``_compute_loss`` in the test suite.
    """

    name = "trl"
    outputs = ("log_probs", "entropy")

    def __init__(self):
        self.description = "trl.kernels.ChunkedLogProbFunction + TRL's loss math (fused_gspo.objectives)"

    def prepare(self, inputs, cfg):
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: PLC0415
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: TRL's chunked LM head cannot be imported ({exc})"
        self.function, self.chunk_size = ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE
        self.description = (
            f"trl.kernels.ChunkedLogProbFunction (vocab tile {self.chunk_size}, outputs={self.outputs}) "
            "+ TRL's loss math (fused_gspo.objectives.policy_objective)"
        )
        return None

    def _head(self, x, weight, targets, cfg):
        logp, entropy, *_ = self.function.apply(
            x,
            weight,
            None,
            targets,
            cfg.temperature,
            self.chunk_size,
            cfg.final_logit_softcapping,
            cfg.logit_scale,
            self.outputs,
        )
        return logp, entropy

    def loss(self, inputs, cfg):
        valid = inputs.mask.bool()
        logp, entropy = self._head(inputs.hidden[valid], inputs.weight, inputs.ids[valid], cfg)
        return _loss_from_logps(logp, entropy, inputs, cfg)

    def logprobs(self, inputs, cfg):
        return self._head(inputs.x_valid, inputs.weight, inputs.ids_valid, cfg)[0]


class Liger(Contender):
    """Liger-Kernel's ``LigerFusedLinearGRPOLoss``: chunks of ``chunk_size`` sequences, each through a vocabulary-
    chunked log-prob function and the loss, with the gradient formed in the forward. Its defaults are kept
    (``chunk_size=1``; ``compiled=True``, which torch.compiles the loss math, on GPU only: on CPU it would only add
    compile time). Its log-prob pass (``chunk_forward``) has no entropy."""

    name = "liger"
    SUPPORTED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

    def __init__(self):
        self.description = "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss"

    def prepare(self, inputs, cfg):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: PLC0415
            from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: liger-kernel cannot be imported ({exc})"
        why = self.unsupported(inputs, cfg)
        if why:
            return f"unsupported: {why}"
        compiled = inputs.device.type == "cuda"
        self.module = LigerFusedLinearGRPOLoss(
            beta=cfg.beta,
            compiled=compiled,
            use_ref_model=cfg.beta != 0.0,
            epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.effective_epsilon_high,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length or inputs.hidden.shape[1],
            importance_sampling_level=cfg.importance_sampling_level,
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
            temperature=cfg.temperature,
            delta=cfg.delta,
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            vespo_k_pos=cfg.vespo_k_pos,
            vespo_lambda_pos=cfg.vespo_lambda_pos,
            vespo_k_neg=cfg.vespo_k_neg,
            vespo_lambda_neg=cfg.vespo_lambda_neg,
        )
        self.chunk_forward = LigerFusedLinearPPOBase.chunk_forward
        self.description = f"liger_kernel LigerFusedLinearGRPOLoss(chunk_size=1, compiled={compiled})"
        return None

    def unsupported(self, inputs: Inputs, cfg: PolicyLossConfig) -> str | None:
        """What of the objective LigerFusedLinearGRPOLoss (0.8.x) has no parameter or code path for."""
        if cfg.loss_type not in self.SUPPORTED_LOSSES:
            return f"loss_type={cfg.loss_type!r} (it has {', '.join(self.SUPPORTED_LOSSES)})"
        if cfg.importance_sampling_level not in ("token", "sequence"):
            return f"importance_sampling_level={cfg.importance_sampling_level!r} (it has 'token' and 'sequence')"
        if cfg.importance_sampling_level == "sequence" and cfg.loss_type in ("cispo", "sapo", "vespo"):
            return f"importance_sampling_level='sequence' with loss_type={cfg.loss_type!r}"
        if cfg.final_logit_softcapping is not None or cfg.logit_scale != 1.0:
            return "final_logit_softcapping / logit_scale (its head is hidden @ W.T / temperature)"
        if cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef != 0.0:
            return "entropy masking or an entropy bonus (it computes no entropy)"
        if cfg.off_policy_mask_threshold is not None:
            return "off_policy_mask_threshold"
        if cfg.num_processes != 1 or cfg.gradient_accumulation_steps != 1 or cfg.steps_per_generation not in (None, 1):
            return "TRL's accumulation/process normalizers"
        if inputs.advantages.dim() != 1:
            return "per-token advantages"
        if cfg.loss_type == "luspo" and (cfg.importance_sampling_level == "token" or cfg.beta != 0.0):
            # Its luspo is an earlier TRL's, (loss * mask.sum(1)).mean() over every [B, T] position, padding
            # included; TRL 1.16 sums each row's valid tokens, (loss * mask).sum(-1).mean(). They agree only when
            # the loss is one term per row (sequence level, no KL) or no row is padded.
            if not bool(inputs.mask.bool().all()):
                why = "importance_sampling_level='token'" if cfg.beta == 0.0 else f"beta={cfg.beta}"
                return (
                    f"loss_type='luspo' with {why} and padded rows (its luspo averages (loss * length) over every "
                    "[B, T] position, padding included; TRL 1.16 sums each row's valid tokens)"
                )
        return None

    def loss(self, inputs, cfg):
        loss, _metrics = self.module(
            inputs.hidden,
            inputs.weight,
            inputs.ids,
            inputs.mask,
            inputs.advantages,
            ref_per_token_logps=inputs.ref_logps,
            old_per_token_logps=inputs.old_logps,
        )
        return loss

    def logprobs(self, inputs, cfg):
        x, ids = inputs.x_valid.unsqueeze(0), inputs.ids_valid.unsqueeze(0)
        return self.chunk_forward(x, inputs.weight, ids, temperature=cfg.temperature).squeeze(0)


class TorchLinearCrossEntropy(Contender):
    """PyTorch's own fused head (torch >= 2.13): ``torch.nn.functional.linear_cross_entropy(x, W, ids,
    reduction="none", options=torch.nn.LinearCrossEntropyOptions())``, the chunked implementation (rows in chunks
    of ``batch_chunk_size``, never the full ``[n, V]`` logits; with ``reduction="none"`` its backward recomputes
    each chunk's logits). Its per-token cross entropy is ``-log p(target)``: on the valid tokens, negated, scattered
    back to ``[B, T]``, then the same loss math as ``trl`` (``fused_gspo.objectives``).

    What it cannot express is reported "unsupported", never approximated: it computes no entropy (entropy masking, an
    entropy bonus), has no logit softcapping, and no logit scale: ``logit_scale / temperature`` is folded into the
    hidden states (``x * s``, whose gradient autograd carries back) only when ``s`` is a power of two, where the
    product is exact (checked on the inputs: no overflow or underflow), else unsupported.

    ``prepare`` probes which path the call takes (PyTorch falls back to its full-logits reference path, with a
    warning, for configurations the chunked one lacks): the result goes to the description and the table's note.
    """

    name = "torch_lce"

    def __init__(self):
        self.description = (
            "torch.nn.functional.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()) "
            "+ TRL's loss math (fused_gspo.objectives); no entropy"
        )
        self.scale = 1.0

    @staticmethod
    def available() -> str | None:
        F = torch.nn.functional
        if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
            return (
                f"unavailable: torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy with "
                "torch.nn.LinearCrossEntropyOptions (torch >= 2.13)"
            )
        return None

    def unsupported(self, inputs: Inputs, cfg: PolicyLossConfig) -> str | None:
        """What of the objective or head ``linear_cross_entropy`` cannot compute exactly."""
        if cfg.top_entropy_quantile < 1.0 or cfg.entropy_coef != 0.0:
            return "entropy masking or an entropy bonus (linear_cross_entropy computes no entropy)"
        if cfg.final_logit_softcapping is not None:
            return "final_logit_softcapping (linear_cross_entropy's logits are x @ W.T, no softcap)"
        scale = cfg.logit_scale / cfg.temperature
        if scale != 1.0:
            what = f"temperature={cfg.temperature} / logit_scale={cfg.logit_scale}"
            if math.frexp(scale)[0] != 0.5:
                return (
                    f"{what}: no logit scale in linear_cross_entropy, and x * {scale:g} is exact only for powers of 2"
                )
            x = inputs.x_valid
            if not torch.equal((x * scale) / scale, x):
                return f"{what}: x * {scale:g} over- or underflows in {x.dtype}"
        return None

    def prepare(self, inputs, cfg):
        why = self.available()
        if why:
            return why
        why = self.unsupported(inputs, cfg)
        if why:
            return f"unsupported: {why}"
        self.options = torch.nn.LinearCrossEntropyOptions()
        self.scale = cfg.logit_scale / cfg.temperature
        if inputs.autocast is not None and self.ignores_autocast(inputs):
            dtype = str(inputs.autocast).removeprefix("torch.")
            return f"unsupported: linear_cross_entropy ignores torch.autocast({dtype}) here (it computes in float32)"
        path = self.probe(inputs)
        if self.scale != 1.0:
            path += f"; logit scale {self.scale:g} folded into x (exact: a power of 2)"
        self.description = (
            f"torch.nn.functional.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions()): "
            f"{path} + TRL's loss math (fused_gspo.objectives); no entropy"
        )
        self.note = path
        return None

    def ignores_autocast(self, inputs: Inputs) -> bool:
        """Whether ``linear_cross_entropy`` gives the same bits under ``torch.autocast`` as without it, on a few
        valid tokens (a 16-bit computation would round them differently)."""
        x, weight, ids = inputs.x_valid[:8], inputs.weight.detach(), inputs.ids_valid[:8]
        with torch.no_grad():
            plain = self._ce(x, weight, ids)
            with torch.autocast(inputs.device.type, dtype=inputs.autocast):
                autocast = self._ce(x, weight, ids)
        return torch.equal(plain.float(), autocast.float())

    def probe(self, inputs: Inputs) -> str:
        """Which path ``linear_cross_entropy`` takes here: one valid token through it, with grad, recording
        warnings. The chunked op's autograd node names it; a fallback warns."""
        x = inputs.x_valid[:1].detach().clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            out = self._ce(x, inputs.weight.detach(), inputs.ids_valid[:1])
        chunked = out.grad_fn is not None and "chunked" in type(out.grad_fn).__name__
        messages = "; ".join(" ".join(str(w.message).split()) for w in caught)
        if not chunked:
            return f"FALLS BACK to the reference path (full [n, V] logits): {messages or 'no warning given'}"
        text = "chunked path (torch_nn::_linear_cross_entropy_batch_chunked_no_reduction)"
        try:  # the resolved chunking: a private helper, so only if it is there
            opts = self.options._adjust(
                num_batches=inputs.valid_tokens,
                in_features=inputs.hidden.shape[-1],
                num_classes=inputs.weight.shape[0],
                dtype=inputs.hidden.dtype,
                device=inputs.device,
            )
            dtype = str(opts.acc_dtype).replace("torch.", "")
            text += f", batch_chunk_size={opts.batch_chunk_size}, acc_policy={opts.acc_policy}, acc_dtype={dtype}"
        except Exception:  # noqa: BLE001  (informative only)
            pass
        return text + (f"; warnings: {messages}" if messages else "")

    def _ce(self, x, weight, targets):
        if self.scale != 1.0:
            x = x * self.scale
        return torch.nn.functional.linear_cross_entropy(x, weight, targets, reduction="none", options=self.options)

    def loss(self, inputs, cfg):
        valid = inputs.mask.bool()
        logp = -self._ce(inputs.hidden[valid], inputs.weight, inputs.ids[valid]).float()
        # No entropy: zeros stand in for TRL's entropy metric (the objectives that need it are unsupported)
        return _loss_from_logps(logp, torch.zeros_like(logp), inputs, cfg)

    def logprobs(self, inputs, cfg):
        return -self._ce(inputs.x_valid, inputs.weight, inputs.ids_valid)


class GemmFloor(Contender):
    """The bare LM-head GEMMs at the valid tokens' shape and the input dtype: the time no implementation beats.
    Under ``--autocast``, the GEMMs in the autocast dtype on copies cast once, outside the timed runs."""

    name = "floor"
    description = "bare GEMMs: X @ W.T (fwd, logprobs); + G @ W and G.T @ X with G the [n, V] product (fwd_bwd)"

    def step(self, mode, inputs, cfg):
        x, w = inputs.x_valid, inputs.weight.detach()
        autocast = getattr(inputs, "autocast", None)
        if autocast is not None:
            x, w = x.to(autocast), w.to(autocast)

        def run() -> Outputs:
            with torch.no_grad():
                y = x @ w.t()
                if mode != "fwd_bwd":
                    return {}
                return {"dx": y @ w, "dw": y.t() @ x}

        return run


def build_contenders(names: list[str]) -> list[Contender]:
    makers = {
        "eager": lambda: FusedGspo("eager"),
        "torch": lambda: FusedGspo("torch"),
        "triton": lambda: FusedGspo("triton"),
        "trl": TrlChunked,
        "liger": Liger,
        "torch_lce": TorchLinearCrossEntropy,
        "floor": GemmFloor,
    }
    return [makers[name]() for name in names]
