"""The contenders for the preference objectives (``--objective dpo|cpo``), on :class:`PreferenceInputs`.

``loss(inputs, objective)`` is the training step's loss (``fwd``, ``fwd_bwd``); ``logprobs(inputs, objective)`` the
DPO reference pass: the ``[2B]`` sequence log-probs (chosen, then rejected) of the reference model's hidden states
and head, without grad (CPO has no reference model, so no ``logprobs`` mode).
"""

from __future__ import annotations

import types
import warnings

import torch

from ..api import fused_logprobs, fused_preference_loss
from ..preference import DPOLossConfig, PreferenceBatch, evaluate_preference
from ..preference.dpo import reference_logps
from .contenders import Contender, FusedGspo, GemmFloor
from .preference_problem import PreferenceInputs, PreferenceObjective

PREFERENCE_CONTENDERS = ("eager", "torch", "triton", "trl", "liger", "floor")
# Liger-Kernel 0.8's LigerFusedLinearDPOLoss loss types (ipo raises NotImplementedError there)
LIGER_DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop",
)  # fmt: skip


def _scatter(values: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """Per-valid-token values back to ``[2B, T]``, zero elsewhere: ``add_fused_lm_head``'s ``masked_scatter``."""
    return None if values is None else values.new_zeros(valid.shape).masked_scatter(valid, values)


class PreferenceFused(FusedGspo):
    """Our ``fused_preference_loss`` with one backend; its ``logprobs`` mode is ``preference_reference_logps``'s
    pass (``fused_logprobs`` on the reference model's valid tokens, reduced by ``preference.dpo.reference_logps``)
    with ``--workspace-bytes``, which ``preference_reference_logps`` does not take."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.description = f"fused_gspo.fused_preference_loss(backend={backend!r}) + TRL's metrics"
        if backend == "eager":
            self.description += (
                ": full [n, V] logits of the valid tokens in the input dtype, autograd (the projection is made "
                "twice: with grad for log-probs and entropy, without for the metrics' statistics)"
            )

    def loss(self, inputs: PreferenceInputs, objective: PreferenceObjective):
        return fused_preference_loss(
            inputs.hidden,
            inputs.weight,
            inputs.ids,
            inputs.mask,
            ref_chosen_logps=inputs.ref_chosen_logps,
            ref_rejected_logps=inputs.ref_rejected_logps,
            config=objective.loss,
            backend=self.backend,
            workspace_bytes=objective.workspace_bytes,
            **objective.head_kwargs,
        ).loss

    def logprobs(self, inputs: PreferenceInputs, objective: PreferenceObjective):
        valid = inputs.mask.bool()
        logp = fused_logprobs(
            inputs.ref_hidden[valid],
            inputs.ref_weight,
            inputs.ids[valid],
            backend=self.backend,
            workspace_bytes=objective.workspace_bytes,
            **objective.head_kwargs,
        )
        return torch.cat(reference_logps(_scatter(logp, valid), inputs.mask, objective.loss.ld_alpha))


class PreferenceTrl(Contender):
    """What TRL 1.16 does for the loss.

    DPO (``DPOTrainer``): the policy through the head ``add_fused_lm_head`` installs, ``trl.kernels
    .ChunkedLogProbFunction`` on the valid tokens (vocabulary tiles of ``_CHUNKED_LOGPROB_CHUNK_SIZE``) with the
    outputs ``DPOTrainer`` asks for, ``("log_probs", "entropy", "mean_logits", "is_top1")`` (+ ``"log_sum_sq_probs"``
    with ``use_weighting``), each ``masked_scatter``-ed back to ``[2B, T]``, then ``DPOTrainer._compute_loss``'s math
    and metrics, here ``fused_gspo.preference.evaluate_preference`` (cross-checked against TRL's code in the test
    suite). The reference pass (``logprobs``): the same function, no grad, ``outputs=("log_probs",)`` (the reference
    model's head is added with the defaults), reduced as ``compute_ref_log_probs`` reduces it.

    CPO (``CPOTrainer``, ``trl.experimental.cpo``): the model's logits ``[2B, T, V]`` for every position,
    ``hidden @ W.T`` in the input dtype (softcapped ``c * tanh(z / c)`` as the model's forward does), then TRL's own
    code: ``CPOTrainer.get_batch_logps`` (``selective_log_softmax``: log-softmax and gather, sum or mean over the
    labels not ``-100``), ``nn.CrossEntropyLoss()`` on the chosen rows' logits for ``nll_loss`` (when ``cpo_alpha !=
    0``), ``CPOTrainer.cpo_loss`` and ``losses.mean() + cpo_alpha * nll_loss``, and its metrics (``logits/*``: the mean
    of all the logits), kept as tensors (TRL calls ``.item()`` on each). The positions are TRL's unshifted ones
    (``is_encoder_decoder=True``: logits and labels aligned), so the decoder-only model's extra final position is
    not there.
    """

    name = "trl"

    def __init__(self):
        self.description = "TRL 1.16 (trl.kernels.ChunkedLogProbFunction for DPO, CPOTrainer's full logits for CPO)"

    def prepare(self, inputs, objective):
        try:
            from trl.kernels import ChunkedLogProbFunction  # noqa: PLC0415
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: TRL's chunked LM head cannot be imported ({exc})"
        self.function, self.chunk_size = ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE
        if objective.family == "dpo":
            self.outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
            if objective.loss.use_weighting:
                self.outputs += ("log_sum_sq_probs",)
            self.description = (
                f"trl.kernels.ChunkedLogProbFunction (vocab tile {self.chunk_size}, outputs={self.outputs}) on the "
                "valid tokens + DPOTrainer's loss math and metrics (fused_gspo.preference.evaluate_preference)"
            )
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TRLExperimentalWarning on import
                from trl.experimental.cpo import CPOTrainer  # noqa: PLC0415
        except ImportError as exc:
            return f"unavailable: trl.experimental.cpo cannot be imported ({exc})"
        self.trainer = CPOTrainer
        cfg = objective.loss
        self.self_ = types.SimpleNamespace(
            alpha=cfg.alpha,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            simpo_gamma=cfg.simpo_gamma,
            label_smoothing=cfg.label_smoothing,
            accelerator=types.SimpleNamespace(device=inputs.device),
        )
        self.labels = inputs.ids.masked_fill(inputs.mask == 0, -100)
        self.note = "CPOTrainer holds the full [2B, T, V] logits of every position (padding included)"
        self.description = (
            "CPOTrainer's path: full [2B, T, V] logits hidden @ W.T in the input dtype, CPOTrainer.get_batch_logps "
            "(selective_log_softmax), nn.CrossEntropyLoss for nll_loss, CPOTrainer.cpo_loss, and its metrics"
        )
        return None

    def _head(self, x, weight, targets, objective, outputs):
        return self.function.apply(
            x, weight, None, targets, 1.0, self.chunk_size, objective.final_logit_softcapping, 1.0, outputs
        )

    def loss(self, inputs, objective):
        if objective.family == "cpo":
            return self._cpo_loss(inputs, objective)
        valid = inputs.mask.bool()
        logp, entropy, log_sum_sq, mean_logits, is_top1 = (
            _scatter(t, valid)
            for t in self._head(inputs.hidden[valid], inputs.weight, inputs.ids[valid], objective, self.outputs)
        )
        batch = PreferenceBatch(
            mask=inputs.mask,
            entropy=entropy.detach(),
            mean_logits=mean_logits,
            is_top1=is_top1,
            log_sum_sq_probs=log_sum_sq,
            ref_chosen_logps=inputs.ref_chosen_logps,
            ref_rejected_logps=inputs.ref_rejected_logps,
        )
        terms, _metrics = evaluate_preference(logp, batch, objective.loss)
        return terms.loss

    def _cpo_loss(self, inputs, objective):
        cfg, trainer = objective.loss, self.trainer
        labels = self.labels.clone()  # concatenated_forward's labels.clone() for nll_loss
        logits = inputs.hidden @ inputs.weight.t()
        cap = objective.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        B = inputs.num_pairs
        if cfg.cpo_alpha == 0:
            nll_loss = torch.tensor(0.0).to(inputs.device)
        else:
            nll_loss = torch.nn.CrossEntropyLoss()(logits[:B].reshape(-1, logits.shape[-1]), labels[:B].reshape(-1))
        # get_batch_logps writes 0 over the -100 labels in place: on the decoder-only path, of a clone it makes
        all_logps = trainer.get_batch_logps(
            logits, self.labels.clone(), average_log_prob=cfg.loss_type in ["ipo", "simpo"], is_encoder_decoder=True
        )
        losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(self.self_, all_logps[:B], all_logps[B:])
        loss = losses.mean() + cfg.cpo_alpha * nll_loss
        # get_batch_loss_metrics' metrics (without the .item() syncs)
        self.metrics = {
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logits/chosen": logits[:B].detach().mean(),
            "logits/rejected": logits[B:].detach().mean(),
            "nll_loss": nll_loss.detach(),
        }
        return loss

    def logprobs(self, inputs, objective):
        valid = inputs.mask.bool()
        logp = self._head(inputs.ref_hidden[valid], inputs.ref_weight, inputs.ids[valid], objective, ("log_probs",))[0]
        return torch.cat(reference_logps(_scatter(logp, valid), inputs.mask, objective.loss.ld_alpha))


class PreferenceLiger(Contender):
    """Liger-Kernel's fused linear preference losses, with their defaults (one pair per chunk: the chosen and the
    rejected row ``[2, T, H]``; ``compiled=True`` on GPU only), the gradient formed in the forward.

    Each chunk materializes its ``[2, T, V]`` logits for every position (padding included; the masked ones are
    ignored through ``-100`` targets) and their float32 log-softmax. DPO: ``LigerFusedLinearDPOLoss`` takes the
    reference model's hidden states and head (``ref_input``, ``ref_weight``), not reference log-probs, so its forward
    also runs the reference pass (a no-grad ``[2, T, V]`` chunk per pair) that the other contenders are given
    precomputed; its ``logprobs`` mode is that pass alone (``chunk_forward`` per pair, as its forward runs it). CPO:
    ``LigerFusedLinearCPOLoss`` for ``sigmoid``, ``LigerFusedLinearSimPOLoss`` for ``simpo`` (length-averaged), the
    NLL term (``alpha=cpo_alpha``) on the chosen rows. Both also compute their own metrics (sequence log-probs, mean
    logits, rewards), not TRL's (no entropy or token accuracy).
    """

    name = "liger"

    def __init__(self):
        self.description = "liger_kernel.chunked_loss LigerFusedLinear{DPO,CPO,SimPO}Loss"

    def unsupported(self, objective: PreferenceObjective) -> str | None:
        """What of the objective Liger-Kernel 0.8's preference losses have no parameter or code path for."""
        if objective.final_logit_softcapping is not None:
            return "final_logit_softcapping (its logits are hidden @ W.T)"
        cfg = objective.loss
        if isinstance(cfg, DPOLossConfig):
            if len(cfg.loss_type) > 1:
                return f"several loss types {cfg.loss_type} (it takes one)"
            (loss_type,) = cfg.loss_type
            if loss_type not in LIGER_DPO_LOSS_TYPES:
                return f"DPO loss_type={loss_type!r} (it has {', '.join(LIGER_DPO_LOSS_TYPES)})"
            if cfg.weights != (1.0,):
                return f"loss_weights={cfg.loss_weights}"
            if cfg.f_divergence_type != "reverse_kl":
                return f"f_divergence_type={cfg.f_divergence_type!r} (its scores are the log-ratios: reverse KL)"
            if cfg.ld_alpha is not None:
                return "ld_alpha (LD-DPO: it sums the whole completion)"
            if cfg.use_weighting:
                return "use_weighting (WPO: it computes no log sum p^2)"
            if cfg.router_aux_loss_coef:
                return "router_aux_loss_coef"
            return None
        if cfg.loss_type not in ("sigmoid", "simpo"):
            return (
                f"CPO loss_type={cfg.loss_type!r} (LigerFusedLinearCPOLoss is sigmoid, LigerFusedLinearSimPOLoss simpo)"
            )
        if cfg.alpha != 0.0:
            return f"alpha={cfg.alpha} (AlphaPO's reward (1 - p^-alpha) / alpha)"
        if cfg.router_aux_loss_coef:
            return "router_aux_loss_coef"
        return None

    def prepare(self, inputs, objective):
        try:
            from liger_kernel.chunked_loss import (  # noqa: PLC0415
                LigerFusedLinearCPOLoss,
                LigerFusedLinearDPOLoss,
                LigerFusedLinearSimPOLoss,
            )
            from liger_kernel.chunked_loss.fused_linear_preference import (  # noqa: PLC0415
                LigerFusedLinearPreferenceBase,
            )
        except ImportError as exc:
            return f"unavailable: liger-kernel cannot be imported ({exc})"
        why = self.unsupported(objective)
        if why:
            return f"unsupported: {why}"
        compiled = inputs.device.type == "cuda"
        cfg = objective.loss
        try:
            if objective.family == "dpo":
                self.module = LigerFusedLinearDPOLoss(
                    beta=cfg.beta,
                    compute_nll_loss=False,
                    compiled=compiled,
                    use_ref_model=True,
                    average_log_prob=False,
                    loss_type=cfg.loss_type[0],
                    label_smoothing=cfg.label_smoothing,
                    discopop_tau=cfg.discopop_tau,
                )
                name = "LigerFusedLinearDPOLoss"
                extra = " + the reference pass from ref_input / ref_weight"
                self.note = (
                    "fwd and fwd_bwd include its reference pass (it takes the reference model's hidden states and "
                    "head, not reference log-probs; the others are given those, as the logprobs mode computes them)"
                )
            else:
                common = dict(
                    beta=cfg.beta,
                    alpha=cfg.cpo_alpha,
                    label_smoothing=cfg.label_smoothing,
                    compute_nll_loss=cfg.cpo_alpha != 0,
                    compiled=compiled,
                )
                if cfg.loss_type == "simpo":
                    self.module = LigerFusedLinearSimPOLoss(gamma=cfg.simpo_gamma, **common)
                    name = "LigerFusedLinearSimPOLoss"
                else:
                    self.module = LigerFusedLinearCPOLoss(average_log_prob=False, **common)
                    name = "LigerFusedLinearCPOLoss"
                extra = ""
        except ValueError as exc:  # its own checks (e.g. label_smoothing of robust / exo_pair)
            return f"unsupported: {exc}"
        self.chunk_forward = LigerFusedLinearPreferenceBase.chunk_forward
        self.target = inputs.ids.masked_fill(inputs.mask == 0, -100)
        self.description = f"liger_kernel {name}(chunk_size=1, compiled={compiled}){extra}"
        return None

    def loss(self, inputs, objective):
        if objective.family == "dpo":
            loss, _aux = self.module(
                inputs.weight, inputs.hidden, self.target, None, inputs.ref_hidden, inputs.ref_weight
            )
        else:
            loss, _aux = self.module(inputs.weight, inputs.hidden, self.target)
        return loss

    def logprobs(self, inputs, objective):
        """The reference pass as its DPO forward runs it: one pair (chosen row ``i``, rejected row ``B + i``) at a
        time through ``chunk_forward``, without grad."""
        B, chosen, rejected = inputs.num_pairs, [], []
        for i in range(B):
            rows = [i, B + i]
            out = self.chunk_forward(
                inputs.ref_hidden[rows],
                inputs.ref_weight,
                self.target[rows],
                compute_nll_loss=False,
                average_log_prob=False,
            )
            chosen.append(out[0])
            rejected.append(out[1])
        return torch.cat(chosen + rejected)


def build_preference_contenders(names: list[str]) -> list[Contender]:
    makers = {
        "eager": lambda: PreferenceFused("eager"),
        "torch": lambda: PreferenceFused("torch"),
        "triton": lambda: PreferenceFused("triton"),
        "trl": PreferenceTrl,
        "liger": PreferenceLiger,
        "floor": GemmFloor,
    }
    return [makers[name]() for name in names]
