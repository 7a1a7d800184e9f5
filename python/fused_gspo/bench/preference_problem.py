"""The preference problem (``--objective dpo|cpo``): the objective, the random pairs, the reference and the layout.

TRL's concatenated layout: ``2B`` rows of ``T`` positions, rows ``[0, B)`` the chosen completions and ``[B, 2B)`` the
rejected ones (pair ``i`` is rows ``i`` and ``B + i``), ``hidden[:, t]`` predicting ``ids[:, t]``. ``--tokens`` is
``N = 2B * T``, the total over both halves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..api import fused_logprobs, fused_preference_loss
from ..preference import CPOLossConfig, DPOLossConfig
from ..preference.dpo import reference_logps
from .problem import Reference, Shape, _lengths, reference_precision

PREFERENCE_FAMILIES = ("dpo", "cpo")
# The reference model of the DPO inputs: its hidden states are the policy's plus N(0, REF_HIDDEN_NOISE^2) noise and its
# head the policy's with each vocabulary row scaled by 1 + N(0, REF_WEIGHT_NOISE^2): per-token log-probs ~0.05 apart
REF_HIDDEN_NOISE = 0.02
REF_WEIGHT_NOISE = 0.02


@dataclass
class PreferenceObjective:
    """What the preference contenders are given: the loss config and the head transform. The trainers score at
    temperature 1 with ``logit_scale`` 1 (``DPOTrainer`` adds its fused head with the defaults, ``CPOTrainer`` takes
    the model's logits); ``final_logit_softcapping`` is the model's."""

    loss: DPOLossConfig | CPOLossConfig
    final_logit_softcapping: float | None = None
    workspace_bytes: int | str = "auto"

    @property
    def family(self) -> str:
        return "dpo" if isinstance(self.loss, DPOLossConfig) else "cpo"

    @property
    def head_kwargs(self) -> dict:
        return {"final_logit_softcapping": self.final_logit_softcapping}

    def describe(self) -> str:
        cfg = self.loss
        if isinstance(cfg, DPOLossConfig):
            text = f"DPO loss_type={','.join(cfg.loss_type)} beta={cfg.beta}"
            if cfg.loss_weights:
                text += f" loss_weights={','.join(f'{w:g}' for w in cfg.loss_weights)}"
            if cfg.label_smoothing:
                text += f" label_smoothing={cfg.label_smoothing}"
            if cfg.f_divergence_type != "reverse_kl":
                text += f" f_divergence={cfg.f_divergence_type}"
                if cfg.f_divergence_type == "alpha_divergence":
                    text += f"({cfg.f_alpha_divergence_coef})"
            if cfg.ld_alpha is not None:
                text += f" ld_alpha={cfg.ld_alpha}"
            if cfg.use_weighting:
                text += " use_weighting"
            if "discopop" in cfg.loss_type:
                text += f" discopop_tau={cfg.discopop_tau}"
        else:
            text = f"CPO loss_type={cfg.loss_type} beta={cfg.beta} cpo_alpha={cfg.cpo_alpha}"
            if cfg.loss_type == "simpo":
                text += f" simpo_gamma={cfg.simpo_gamma}"
            if cfg.alpha:
                text += f" alpha={cfg.alpha}"
            if cfg.label_smoothing:
                text += f" label_smoothing={cfg.label_smoothing}"
        return text + head_options_text(self.final_logit_softcapping, self.workspace_bytes)


def head_options_text(softcap: float | None, workspace_bytes: int | str) -> str:
    """The head options a run's description ends with (policy and preference objectives alike)."""
    text = "" if softcap is None else f" softcap={softcap}"
    return text if workspace_bytes == "auto" else f"{text} workspace_bytes={workspace_bytes}"


def preference_seq_len(tokens: int) -> int | None:
    """``T`` for ``N`` tokens: ``min(512, N/4)`` or the next divisor of ``N`` below it that leaves an even number of
    rows (``2B``); None when there is none (odd ``N``)."""
    for seq_len in range(max(1, min(512, tokens // 4)), 0, -1):
        if tokens % seq_len == 0 and (tokens // seq_len) % 2 == 0:
            return seq_len
    return None


@dataclass
class PreferenceInputs:
    """One random batch of pairs, shared by every contender. ``hidden`` and ``weight`` are leaves that require grad.
    The attribute names the timing and the floor read (``hidden``, ``weight``, ``x_valid``, ...) are those of
    :class:`fused_gspo.bench.problem.Inputs`."""

    hidden: torch.Tensor  # [2B, T, H]
    weight: torch.Tensor  # [V, H]
    ids: torch.Tensor  # [2B, T] int64, valid ids everywhere (Liger scores masked positions too)
    mask: torch.Tensor  # [2B, T] float32 0/1, a valid token in every row
    x_valid: torch.Tensor  # [n, H] the valid tokens' hidden states (detached): the floor's shape
    ids_valid: torch.Tensor  # [n]
    # DPO: the reference model (hidden states and head near the policy's) and its sequence log-probs [B], float32
    ref_hidden: torch.Tensor | None = None
    ref_weight: torch.Tensor | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def valid_tokens(self) -> int:
        return self.x_valid.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.ids.shape[0] // 2

    @property
    def row_lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(-1).tolist()]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.ref_hidden, self.ref_weight) if t is not None]


def make_preference_inputs(
    shape: Shape, objective: PreferenceObjective, device: torch.device, seed: int = 0, valid_frac: float = 1.0
) -> PreferenceInputs:
    """Random pairs (never zeros): unit-scale hidden states, logits of standard deviation ~2, chosen and rejected
    lengths drawn alike in ``[valid_frac * T, T]``. For DPO a reference model near the policy (hidden states plus
    N(0, 0.02^2) noise, each head row scaled by 1 + N(0, 0.02^2)) and its sequence log-probs, from a float32 no-grad
    pass of our torch backend reduced as ``DPOTrainer.compute_ref_log_probs`` reduces them (``ld_alpha`` included):
    what the fused and TRL contenders are given, as with ``precompute_ref_log_probs``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows, T, H, V = shape.batch, shape.seq_len, shape.hidden, shape.vocab

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=gen) * std

    hidden_cpu = randn(rows, T, H)
    weight_cpu = randn(V, H, std=2.0 / math.sqrt(H))
    hidden = hidden_cpu.to(device, shape.dtype).requires_grad_()
    weight = weight_cpu.to(device, shape.dtype).requires_grad_()
    ids = torch.randint(0, V, (rows, T), generator=gen).to(device)
    lengths = _lengths(gen, rows, T, valid_frac)  # chosen and rejected rows alike, at least one token each
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float().to(device)
    valid = mask.bool()
    inputs = PreferenceInputs(hidden, weight, ids, mask, hidden.detach()[valid], ids[valid])
    if objective.family == "dpo":
        # (detached: on CPU in the input dtype, `.to` returned the very tensors that were made to require grad)
        ref_hidden = (hidden_cpu.detach() + randn(rows, T, H, std=REF_HIDDEN_NOISE)).to(device, shape.dtype)
        ref_weight = (weight_cpu.detach() * (1 + randn(V, 1, std=REF_WEIGHT_NOISE))).to(device, shape.dtype)
        with torch.no_grad():
            logp = fused_logprobs(
                ref_hidden[valid].float(), ref_weight.float(), ids[valid], backend="torch", **objective.head_kwargs
            )
            per_token = logp.new_zeros(valid.shape).masked_scatter(valid, logp)
            chosen, rejected = reference_logps(per_token, mask, objective.loss.ld_alpha)
        inputs.ref_hidden, inputs.ref_weight = ref_hidden, ref_weight
        inputs.ref_chosen_logps, inputs.ref_rejected_logps = chosen, rejected
    return inputs


def compute_preference_reference(inputs: PreferenceInputs, objective: PreferenceObjective) -> Reference:
    """Loss and gradients from ``fused_preference_loss`` in float64 on the eager path (small shapes) or in float32
    on our torch backend; ``logps`` (DPO): the reference pass's ``[2B]`` sequence log-probs (chosen, then
    rejected) from the reference model's hidden states and head, the same way."""
    dtype, backend, kind = reference_precision(inputs.valid_tokens, inputs.weight.shape[0])
    hidden = inputs.hidden.detach().to(dtype).requires_grad_()
    weight = inputs.weight.detach().to(dtype).requires_grad_()
    out = fused_preference_loss(
        hidden,
        weight,
        inputs.ids,
        inputs.mask,
        ref_chosen_logps=inputs.ref_chosen_logps,
        ref_rejected_logps=inputs.ref_rejected_logps,
        config=objective.loss,
        backend=backend,
        **objective.head_kwargs,
    )
    dhidden, dweight = torch.autograd.grad(out.loss, (hidden, weight))
    logps = torch.empty(0, dtype=dtype)
    if inputs.ref_hidden is not None:
        valid = inputs.mask.bool()
        with torch.no_grad():
            logp = fused_logprobs(
                inputs.ref_hidden[valid].to(dtype),
                inputs.ref_weight.to(dtype),
                inputs.ids[valid],
                backend=backend,
                **objective.head_kwargs,
            )
            per_token = logp.new_zeros(valid.shape).masked_scatter(valid, logp)
            logps = torch.cat(reference_logps(per_token, inputs.mask, objective.loss.ld_alpha))
    return Reference(kind, out.loss.detach(), dhidden, dweight, logps)
