"""The benchmark's problem: layouts, random inputs, the reference and the check."""

from __future__ import annotations

import math

import torch

from fused_gspo.bench import problem
from fused_gspo.config import PolicyLossConfig


def test_default_seq_len_divides_tokens():
    assert problem.default_seq_len(8192) == 512
    assert problem.default_seq_len(64) == 16
    assert 300 % problem.default_seq_len(300) == 0


def test_layout_row_lengths_replays_make_inputs():
    shape = problem.Shape(tokens=96, hidden=16, vocab=200, seq_len=12, dtype=torch.float32)
    for seed, frac in ((0, 0.5), (3, 0.25), (1, 1.0)):
        inputs = problem.make_inputs(shape, PolicyLossConfig(), torch.device("cpu"), seed=seed, valid_frac=frac)
        assert problem.layout_row_lengths(shape, seed, frac) == (inputs.row_lengths, True)
        assert sum(inputs.row_lengths) == inputs.valid_tokens


def test_layout_row_lengths_past_the_replay_limit_are_full_rows(monkeypatch):
    monkeypatch.setattr(problem, "REPLAY_MAX_ELEMENTS", 10)
    shape = problem.Shape(tokens=64, hidden=16, vocab=200, seq_len=16, dtype=torch.float32)
    assert problem.layout_row_lengths(shape, 0, 0.5) == ([16] * 4, False)
    assert problem.layout_row_lengths(shape, 0, 1.0) == ([16] * 4, True)


def test_check_outputs_fails_on_nan_and_large_errors():
    ref = problem.Reference("test", torch.tensor(1.0), torch.ones(3), torch.ones(2), torch.ones(4))
    check = problem.check_outputs({"loss": torch.tensor(float("nan"))}, ref, torch.float32)
    assert check["status"] == "FAIL" and math.isinf(check["rel_err"]["loss"])
    check = problem.check_outputs({"dhidden": torch.full((3,), 1.001)}, ref, torch.bfloat16)
    assert check["status"] == "pass" and check["tolerance"] == 2e-2
    check = problem.check_outputs({"dhidden": torch.full((3,), 1.001)}, ref, torch.float32)
    assert check["status"] == "FAIL"
