"""Input validation: every bad input raises TypeError/ValueError naming the argument or the field."""

import pytest
import torch
from conftest import draw_problem

from fused_gspo import fused_logprobs, fused_policy_loss


def _good():
    problem = draw_problem(2, 3, 4, 6, seed=0, with_ref=True)
    return {k: v for k, v in problem.items() if k not in ("ref_logps",)}, problem["ref_logps"]


# one bad input each: wrong shape, dtype or value (a token id out of range, a mask that is not 0/1)
@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda p: p.update(hidden=p["hidden"][0]), ValueError, "hidden"),
        (lambda p: p.update(hidden=p["hidden"][0, 0]), ValueError, "hidden"),
        (lambda p: p.update(weight=p["weight"][:, :3]), ValueError, "hidden size"),
        (lambda p: p.update(completion_ids=p["completion_ids"][:, :2]), ValueError, "completion_ids"),
        (lambda p: p.update(completion_ids=p["completion_ids"].float()), TypeError, "completion_ids"),
        (lambda p: p["completion_ids"].__setitem__((0, 0), 6), ValueError, "completion_ids"),
        (lambda p: p["completion_ids"].__setitem__((0, 0), -1), ValueError, "completion_ids"),
        (lambda p: p["completion_mask"].__setitem__((0, 0), 2), ValueError, "completion_mask"),
        (lambda p: p.update(advantages=p["advantages"][:1]), ValueError, "advantages"),
        (lambda p: p.update(old_logps=p["old_logps"][:, :1]), ValueError, "old_logps"),
        (lambda p: p.update(importance_sampling_ratio=torch.ones(2, 2)), ValueError, "importance_sampling_ratio"),
        (lambda p: p.update(bias=torch.ones(5)), ValueError, "bias"),
        (lambda p: p.update(hidden=p["hidden"].long()), TypeError, "hidden"),
        (lambda p: p.update(num_items_in_batch="many"), TypeError, "num_items_in_batch"),
    ],
)
def test_bad_inputs_name_the_argument(change, error, match):
    problem, _ = _good()
    change(problem)
    with pytest.raises(error, match=match):
        fused_policy_loss(**problem, backend="torch")


def test_unknown_option_and_backend():
    problem, _ = _good()
    with pytest.raises(TypeError, match="no_such_field"):
        fused_policy_loss(**problem, no_such_field=1)
    with pytest.raises(ValueError, match="backend"):
        fused_policy_loss(**problem, backend="cuda")
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        fused_policy_loss(**problem, importance_sampling_ratio=torch.ones(2, 3), loss_type="gmpo", epsilon=0.4)
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(**{**problem, "advantages": torch.ones(2, 3)}, loss_type="rloo")


def test_fused_logprobs_bad_targets():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs(hidden, weight, torch.tensor([0, 5, 2]))
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs(hidden, weight, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="targets"):
        fused_logprobs(hidden, weight, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(hidden, weight, torch.tensor([0, 1, 2]), temperature=-1.0)


# Under torch.compile the packed layout may come as position_ids, whose sequence count S is in the data (issue 23):
# the shapes that do not depend on S are checked while tracing, a per-sequence [S] tensor is any 1-D one but [N]
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(position_ids=torch.zeros(5, dtype=torch.long)), r"position_ids must have shape \(6,\)"),
        (dict(position_ids=torch.zeros(6)), "position_ids must be an integer tensor"),
        (dict(advantages=torch.ones(6, 1)), "advantages must have 1 dimensions"),
        (dict(ref_logps=torch.ones(4)), r"ref_logps must have shape \(6,\)"),
        (dict(importance_sampling_ratio=torch.ones(3, 2)), "importance_sampling_ratio"),
        (dict(loss_type="gmpo", epsilon=0.4), r"advantages must have shape \(S,\) for loss_type='gmpo'"),
    ],
)
def test_packed_shapes_with_position_ids(change, match):
    from fused_gspo.config import PolicyLossConfig  # noqa: PLC0415
    from fused_gspo.validation import validate_policy_inputs  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden=torch.randn(6, 4, generator=g), weight=torch.randn(7, 4, generator=g),
        completion_ids=torch.randint(0, 7, (6,), generator=g), advantages=torch.randn(6, generator=g),
        completion_mask=torch.ones(6), old_logps=None, ref_logps=None, sampling_logps=None,
        importance_sampling_ratio=torch.ones(3), num_items_in_batch=None, bias=None,
        position_ids=torch.tensor([0, 1, 0, 1, 2, 0]),
    )  # fmt: skip
    config = PolicyLossConfig()
    assert validate_policy_inputs(config, **inputs, values=False) is None  # [N] advantages, an [S] ratio: fine
    cfg = {k: change.pop(k) for k in list(change) if k in ("loss_type", "epsilon")}
    with pytest.raises((TypeError, ValueError), match=match):
        validate_policy_inputs(config.replace(**cfg), **{**inputs, **change}, values=False)


# outside torch.compile position_ids become cu_seqlens at once: they are checked first, so the error names them
@pytest.mark.parametrize(
    "position_ids,error,match",
    [
        (torch.tensor([0, 1, 0, 1, 2]), ValueError, r"position_ids must have shape \(6,\)"),  # named cu_seqlens
        (torch.tensor([0.0, 1, 0, 1, 2, 0]), TypeError, "position_ids must be an integer tensor"),  # accepted
        ([0, 1, 0, 1, 2, 0], TypeError, "position_ids must be a torch.Tensor"),  # an AttributeError
    ],
)
def test_position_ids_are_checked_before_use(position_ids, error, match):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 4, generator=g), torch.randn(7, 4, generator=g)
    ids, advantages = torch.randint(0, 7, (6,), generator=g), torch.randn(3, generator=g)
    with pytest.raises(error, match=match):
        fused_policy_loss(hidden, weight, ids, advantages, torch.ones(6), position_ids=position_ids, backend="torch")
