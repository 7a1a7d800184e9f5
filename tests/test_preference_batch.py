"""``fused_gspo.preference.batch``: the checks of a preference batch, each bad input refused with an error that names
it; ``values=False`` (under compilation) skips only the checks that read values."""

from __future__ import annotations

import pytest
import torch

from fused_gspo.preference import (
    CPOLossConfig,
    DPOLossConfig,
    PreferenceBatch,
    preference_metrics,
    preference_objective,
)

F64 = torch.float64


def _good_dpo(B=2, T=3):
    logps = -torch.rand(2 * B, T, dtype=F64) - 0.1
    batch = PreferenceBatch(
        mask=torch.ones(2 * B, T, dtype=torch.long),
        ref_chosen_logps=-torch.ones(B, dtype=F64),
        ref_rejected_logps=-torch.ones(B, dtype=F64),
        entropy=torch.ones(2 * B, T, dtype=F64),
        mean_logits=torch.zeros(2 * B, T, dtype=F64),
        is_top1=torch.zeros(2 * B, T, dtype=torch.bool),
    )
    return logps, batch


def _with(batch, **changes):
    return PreferenceBatch(**{**batch.__dict__, **changes})


# one bad DPO input each
@pytest.mark.parametrize(
    "change,match",
    [
        (lambda lp, b: (lp[:3], _with(b, mask=b.mask[:3])), "even"),
        (lambda lp, b: (lp[:0], _with(b, mask=b.mask[:0])), "even, non-zero"),
        (lambda lp, b: (lp[0], b), r"\[2B, T\]"),
        (lambda lp, b: (lp, _with(b, mask=b.mask[:, :2])), "mask must have shape"),
        (lambda lp, b: (lp, _with(b, mask=b.mask * 2)), "0 and 1"),
        (lambda lp, b: (lp, _with(b, ref_chosen_logps=None)), "ref_chosen_logps"),
        (lambda lp, b: (lp, _with(b, ref_rejected_logps=b.ref_rejected_logps[:1])), "ref_rejected_logps must have"),
        (lambda lp, b: (lp, _with(b, ref_chosen_logps=b.ref_chosen_logps[:, None])), r"ref_chosen_logps must have"),
        (lambda lp, b: (lp, _with(b, completion_lengths=torch.ones(4))), "completion_lengths"),
        (lambda lp, b: (lp, _with(b, completion_lengths=torch.full((3,), 3))), "completion_lengths must have"),
        (lambda lp, b: (lp, _with(b, aux_loss=torch.tensor(1.0))), "router_aux_loss_coef is 0"),
    ],
)
def test_bad_dpo_inputs_raise(change, match):
    logps, batch = change(*_good_dpo())
    with pytest.raises(ValueError, match=match):
        preference_objective(logps, batch, DPOLossConfig())


def test_rows_with_nothing_to_score_are_refused_only_where_the_loss_divides_by_them():
    logps, batch = _good_dpo()
    B = batch.mask.shape[0] // 2
    chosen_1 = _with(batch, mask=batch.mask.index_fill(0, torch.tensor([1]), 0))
    no_chosen = _with(batch, mask=batch.mask.index_fill(0, torch.arange(B), 0))
    for config in (DPOLossConfig(), DPOLossConfig(loss_type=["ipo", "sft"]), DPOLossConfig(ld_alpha=0.5)):
        assert torch.isfinite(preference_objective(logps, chosen_1, config).loss)
    with pytest.raises(ValueError, match="sft loss averages over the chosen rows' tokens, and mask has none"):
        preference_objective(logps, no_chosen, DPOLossConfig(loss_type=["sigmoid", "sft"]))
    cpo = _with(batch, ref_chosen_logps=None, ref_rejected_logps=None, completion_lengths=None)
    rejected_0 = _with(cpo, mask=cpo.mask.index_fill(0, torch.tensor([B]), 0))
    assert torch.isfinite(preference_objective(logps, rejected_0, CPOLossConfig(loss_type="hinge")).loss)
    with pytest.raises(ValueError, match="'simpo' averages each row's log-probs.*none in rejected row 0"):
        preference_objective(logps, rejected_0, CPOLossConfig(loss_type="simpo"))
    with pytest.raises(ValueError, match="NLL term"):
        preference_objective(logps, _with(cpo, mask=no_chosen.mask), CPOLossConfig(cpo_alpha=1.0))


def test_bad_inputs_more():
    logps, batch = _good_dpo()
    with pytest.raises(TypeError, match="floating"):
        preference_objective(logps.long(), batch, DPOLossConfig())
    with pytest.raises(ValueError, match="log_sum_sq_probs"):
        preference_objective(logps, batch, DPOLossConfig(use_weighting=True))
    with pytest.raises(ValueError, match="aux_loss"):
        preference_objective(logps, batch, DPOLossConfig(router_aux_loss_coef=0.1))
    with pytest.raises(ValueError, match="no meaning for CPO"):
        preference_objective(logps, batch, CPOLossConfig())
    with pytest.raises(ValueError, match="aux_loss"):
        preference_objective(logps, PreferenceBatch(mask=batch.mask), CPOLossConfig(router_aux_loss_coef=0.1))
    with pytest.raises(TypeError, match="config"):
        preference_objective(logps, batch, object())
    with pytest.raises(TypeError, match="PreferenceBatch"):
        preference_objective(logps, {"mask": batch.mask}, DPOLossConfig())
    terms = preference_objective(logps, batch, DPOLossConfig())
    with pytest.raises(ValueError, match="is_top1"):
        preference_metrics(terms, _with(batch, is_top1=None), DPOLossConfig())
    with pytest.raises(TypeError, match="bool"):
        preference_metrics(terms, _with(batch, is_top1=batch.is_top1.long()), DPOLossConfig())
    with pytest.raises(ValueError, match="mean_logits must have"):
        preference_metrics(terms, _with(batch, mean_logits=batch.mean_logits[:, :1]), DPOLossConfig())
    cpo_batch = PreferenceBatch(mask=batch.mask)
    cpo_terms = preference_objective(logps, cpo_batch, CPOLossConfig())
    with pytest.raises(ValueError, match="position_mean_logits"):
        preference_metrics(cpo_terms, cpo_batch, CPOLossConfig())
    with pytest.raises(ValueError, match="position_mean_logits"):
        preference_metrics(cpo_terms, _with(cpo_batch, position_mean_logits=torch.zeros(3, 4)), CPOLossConfig())
    with pytest.raises(ValueError, match="train_eval"):
        preference_metrics(
            cpo_terms, _with(cpo_batch, position_mean_logits=torch.zeros(4, 4)), CPOLossConfig(), train_eval="test"
        )


def test_values_false_skips_only_data_checks():
    logps, batch = _good_dpo()
    empty_row = _with(batch, mask=batch.mask.index_fill(0, torch.tensor([0]), 0))
    preference_objective(logps, empty_row, DPOLossConfig(), values=False)  # shapes fine: no error
    with pytest.raises(ValueError, match="even"):
        preference_objective(logps[:3], _with(batch, mask=batch.mask[:3]), DPOLossConfig(), values=False)
