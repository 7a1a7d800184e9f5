"""The TRL adapter with a tensor-parallel model (``trl/tensor_parallel.py``): GRPOTrainer with
``use_fused_gspo_loss=True`` on a model loaded with ``tp_plan="auto"`` over 2 CPU processes trains exactly as in one
process, its LM head never gathered, because the adapter seeds the ranks of a tensor-parallel group alike (TRL seeds
them apart); without that seed the vocabulary-parallel call refuses the ranks' different completions by name. The
processes run ``tests/workers/grpo_tensor_parallel.py`` (accelerate's CPU refusal bypassed there)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

WORKER = Path(__file__).parent / "workers" / "grpo_tensor_parallel.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def test_grpo_trainer_tensor_parallel_equals_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path), "tp"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-8000:]
    run = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "single"], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-8000:]
    single = torch.load(tmp_path / "single-0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / f"tp-{rank}.pt", weights_only=False) for rank in (0, 1)]
    for result in ranks:
        assert result["vocab_parallel_calls"] > 0  # the sharded head was scored where it lies
        assert result["without_common_seed"].startswith("ReplicaMismatchError"), result["without_common_seed"]
        assert "the same on every rank" in result["without_common_seed"]
        # the loss, gradient norm and loss metrics of every step, and the trained weights: one process's (TRL's
        # own bookkeeping gathers over every process, the group's copies included: num_tokens doubles and the
        # reward std is taken over duplicated samples, so those two are not compared)
        logs, weights = result["run"]
        assert len(logs) == len(single["run"][0]) == 2
        for entry, reference in zip(logs, single["run"][0], strict=True):
            compared = [k for k in reference if k in ("loss", "grad_norm", "entropy", "reward") or "clip" in k]
            assert len(compared) >= 8, compared
            for key in compared:
                assert entry[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), (key, entry, reference)
        for name, tensor in single["run"][1].items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
        # DAPO with an entropy quantile (TRL's gather would count the group's entropies twice)
        for entry, reference in zip(result["entropy_quantile_logs"], single["entropy_quantile_logs"], strict=True):
            for key in ("loss", "grad_norm", "entropy"):
                assert entry[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), (key, entry, reference)
    moved = [n for n, t in single["run"][1].items() if not torch.allclose(t, single["initial"][n], atol=1e-6)]
    assert "lm_head.weight" in moved and "model.embed_tokens.weight" in moved, moved
    for name, tensor in ranks[0]["run"][1].items():
        assert torch.equal(tensor, ranks[1]["run"][1][name]), name


def test_the_entropy_quantile_counts_each_tensor_parallel_group_once(monkeypatch):
    """TRL's entropy mask takes a quantile over every process's entropies, so the ranks of a tensor-parallel group
    (the same values on every rank) enter it k times; ``torch.quantile`` of k copies interpolates elsewhere. The
    adapter's gather keeps one copy of each, and the mask is one process's (here: 2 groups of 2 ranks, faked)."""
    from types import SimpleNamespace

    import fused_gspo.trl.patch as adapter
    from fused_gspo.objectives import high_entropy_mask

    g = torch.Generator().manual_seed(0)
    mine, theirs = torch.rand(2, 3, 5, generator=g, dtype=torch.float64)  # this data-parallel group's, the other's
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = mask[1, 4] = 0  # 24 valid entropies over both groups

    def gather(values):  # the world's ranks in order: 2 ranks of this group, 2 of the other one
        other = theirs[mask.bool()]
        return torch.cat([values, values, other, other])

    accelerator = SimpleNamespace(gather=gather, pad_across_processes=lambda v, **kw: v, unwrap_model=lambda m: m)
    trainer = SimpleNamespace(accelerator=accelerator, model=object())
    monkeypatch.setattr(adapter, "tensor_parallel_ranks", lambda model: [0, 1])
    got = high_entropy_mask(mine, mask, 0.1, adapter._hooks(trainer).gather_values)
    one_process = high_entropy_mask(mine, mask, 0.1, lambda v: torch.cat([v, theirs[mask.bool()]]))
    duplicated = high_entropy_mask(mine, mask, 0.1, gather)
    assert not torch.equal(duplicated, one_process)  # the draw tells the two quantiles apart
    assert torch.equal(got, one_process)
    accelerator.gather = lambda values: torch.cat([values, theirs[mask.bool()]])  # a gather that counts groups once
    assert torch.equal(high_entropy_mask(mine, mask, 0.1, adapter._hooks(trainer).gather_values), one_process)
    accelerator.gather = gather
    monkeypatch.setattr(adapter, "tensor_parallel_ranks", lambda model: None)  # no tensor parallelism: TRL's gather
    assert torch.equal(high_entropy_mask(mine, mask, 0.1, adapter._hooks(trainer).gather_values), duplicated)
