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
    moved = [n for n, t in single["run"][1].items() if not torch.allclose(t, single["initial"][n], atol=1e-6)]
    assert "lm_head.weight" in moved and "model.embed_tokens.weight" in moved, moved
    for name, tensor in ranks[0]["run"][1].items():
        assert torch.equal(tensor, ranks[1]["run"][1][name]), name
