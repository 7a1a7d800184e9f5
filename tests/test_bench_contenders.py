"""The benchmark's contenders: pytest-benchmark timings of our CPU backends, what is reported when a contender
cannot run, and ``torch_lce`` (PyTorch's ``linear_cross_entropy``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from bench_helpers import results_of, run_main

from fused_gspo import bench, fused_logprobs
from fused_gspo.bench import contenders
from fused_gspo.config import PolicyLossConfig

HAS_LCE = contenders.TorchLinearCrossEntropy.available() is None
needs_lce = pytest.mark.skipif(not HAS_LCE, reason="torch < 2.13: no torch.nn.functional.linear_cross_entropy")


def small_inputs(cfg: PolicyLossConfig, dtype=torch.float32, valid_frac=1.0, seed=1):
    shape = bench.Shape(tokens=128, hidden=64, vocab=1000, seq_len=32, dtype=dtype)
    return bench.make_inputs(shape, cfg, torch.device("cpu"), seed=seed, valid_frac=valid_frac)


# pytest-benchmark timings of fwd+bwd at a tiny shape for the reference and the chunked backend
@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_fwd_bwd_benchmark(benchmark, backend):
    cfg = PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    inputs = small_inputs(cfg)
    run = bench.FusedGspo(backend).step("fwd_bwd", inputs, cfg)
    outputs = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    check = bench.check_outputs(outputs, bench.compute_reference(inputs, cfg), torch.float32)
    assert check["status"] == "pass", check


def test_unavailable_backend_is_reported(tmp_path, monkeypatch):
    def no_triton(backend, device):
        if backend == "triton":
            raise RuntimeError("backend='triton' is not available: no kernels")
        return backend

    monkeypatch.setattr(contenders, "resolve_backend", no_triton)
    results = results_of(run_main(tmp_path, "--contenders", "triton,floor", "--modes", "fwd,logprobs"))
    for mode in ("fwd", "logprobs"):
        assert results["triton", mode]["status"] == "unavailable: backend='triton' is not available: no kernels"
        assert results["triton", mode]["times_ms"] == []
        assert results["floor", mode]["status"] == "ok"


# objectives Liger has no code for are reported as unsupported, not run wrong
@pytest.mark.parametrize(
    "objective, reason",
    [(["--level", "sequence_token"], "sequence_token"), (["--loss-type", "gmpo", "--level", "token"], "gmpo")],
)
def test_objective_liger_cannot_run_is_unsupported(tmp_path, objective, reason):
    results = results_of(run_main(tmp_path, *objective, "--contenders", "liger,torch", "--modes", "fwd"))
    assert results["liger", "fwd"]["status"].startswith("unsupported:")
    assert reason in results["liger", "fwd"]["status"]
    assert results["torch", "fwd"]["check"]["status"] == "pass"


# Liger's luspo is an earlier TRL's (every [B, T] position averaged, padding included): with padded rows and a
# per-token loss (token level, or the KL term) it computes another loss than TRL 1.16's, so it is not timed as if it
# were the same; at sequence level without KL (one term per row) it is TRL 1.16's and passes the check
@pytest.mark.parametrize(
    "objective, runs",
    [
        (["--level", "token"], False),
        (["--level", "sequence", "--beta", "0.04"], False),
        (["--level", "sequence"], True),
    ],
)
def test_liger_luspo_runs_only_where_it_is_trl_1_16s(tmp_path, objective, runs):
    args = ("--loss-type", "luspo", *objective, "--valid-frac", "0.5", "--contenders", "liger", "--modes", "fwd")
    result = results_of(run_main(tmp_path, *args))["liger", "fwd"]
    if runs:
        assert result["check"]["status"] == "pass"
    else:
        assert result["status"].startswith("unsupported: loss_type='luspo'"), result


def test_torch_lce_is_a_default_contender():
    assert "torch_lce" in bench.CONTENDERS
    assert [c.name for c in bench.build_contenders(list(bench.CONTENDERS))] == list(bench.CONTENDERS)


@needs_lce
# objectives torch_lce can compute, in fp32 and bf16
@pytest.mark.parametrize(
    "cfg, dtype",
    [
        (PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence"), torch.float32),
        (PolicyLossConfig(loss_type="dapo", importance_sampling_level="token", beta=0.04), torch.float32),
        (PolicyLossConfig(loss_type="gmpo", importance_sampling_level="token", temperature=0.5), torch.float32),
        (PolicyLossConfig(loss_type="grpo", importance_sampling_level="sequence"), torch.bfloat16),
    ],
    ids=["gspo", "dapo-kl", "gmpo-temperature-0.5", "gspo-bf16"],
)
def test_torch_lce_passes_the_check(cfg, dtype):
    inputs = small_inputs(cfg, dtype, valid_frac=0.5)
    ref = bench.compute_reference(inputs, cfg)
    lce = bench.TorchLinearCrossEntropy()
    assert lce.prepare(inputs, cfg) is None
    assert "chunked path" in lce.description and lce.note in lce.description
    if cfg.temperature != 1.0:
        assert "logit scale 2 folded into x" in lce.note
    for mode in bench.MODES:
        check = bench.check_outputs(lce.step(mode, inputs, cfg)(), ref, dtype)
        assert check["status"] == "pass", (mode, check)


@needs_lce
def test_torch_lce_logprobs_are_minus_the_cross_entropy():
    cfg = PolicyLossConfig()
    inputs = small_inputs(cfg)
    lce = bench.TorchLinearCrossEntropy()
    assert lce.prepare(inputs, cfg) is None
    logps = lce.step("logprobs", inputs, cfg)()["logps"]
    expected = fused_logprobs(inputs.x_valid, inputs.weight.detach(), inputs.ids_valid, backend="eager")
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
    assert (logps <= 0).all()


# what torch_lce lacks (entropy, softcap, a logit scale that is not a power of two) is reported
@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"entropy_coef": 0.01}, "entropy"),
        ({"top_entropy_quantile": 0.2}, "entropy"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"temperature": 0.7}, "exact only for powers of 2"),
        ({"logit_scale": 3.0}, "exact only for powers of 2"),
    ],
)
def test_torch_lce_reports_what_it_cannot_compute(overrides, reason):
    if not HAS_LCE:
        pytest.skip("torch < 2.13")
    cfg = PolicyLossConfig(**overrides)
    status = bench.TorchLinearCrossEntropy().prepare(small_inputs(cfg), cfg)
    assert status is not None and status.startswith("unsupported:") and reason in status


def test_torch_lce_unsupported_objective_in_the_table(tmp_path, capsys):
    results = results_of(run_main(tmp_path, "--softcap", "30", "--contenders", "torch_lce,torch", "--modes", "fwd"))
    status = results["torch_lce", "fwd"]["status"]
    assert status.startswith("unsupported:" if HAS_LCE else "unavailable:")
    assert results["torch", "fwd"]["check"]["status"] == "pass"
    assert "torch_lce  fwd   unsu" in capsys.readouterr().out or not HAS_LCE


def test_torch_lce_unavailable_without_linear_cross_entropy(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    cfg = PolicyLossConfig()
    status = bench.TorchLinearCrossEntropy().prepare(small_inputs(cfg), cfg)
    assert status.startswith("unavailable:") and "torch >= 2.13" in status


@needs_lce
def test_torch_lce_says_when_pytorch_falls_back(monkeypatch):
    real = torch.nn.functional.linear_cross_entropy

    def falls_back(x, w, target, *, options=None, **kwargs):
        if options is not None:
            warnings.warn("linear_cross_entropy: ``options`` ignored; chunked path needs ...", stacklevel=2)
        return real(x, w, target, options=None, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", falls_back)
    cfg = PolicyLossConfig()
    lce = bench.TorchLinearCrossEntropy()
    assert lce.prepare(small_inputs(cfg), cfg) is None
    assert "FALLS BACK to the reference path" in lce.note and "``options`` ignored" in lce.note
    assert lce.note in lce.description
