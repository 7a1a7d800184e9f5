"""Several processes (``torch.distributed.run``, 2 CPU processes over gloo): TRL's GRPOTrainer trains the same with
the flag off and on, every process ending with the same weights; a custom loop sharded with FSDP2 equals the same loop
in one process. The processes run the scripts in ``tests/workers/``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).parent / "workers"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def torchrun(script: str, *args: str, timeout: int = 300) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKERS / script), *args]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-6000:]


# GSPO off-policy (steps_per_generation=2: the second step's ratios are not 1); DAPO with a KL term (the
# cross-process num_items_in_batch) and the entropy quantile taken over every process's tokens
@pytest.mark.parametrize("case", ["gspo_off_policy", "dapo_kl_entropy_quantile"])
def test_grpo_trainer_on_two_processes_flag_off_equals_on(tmp_path, case):
    sys.path.insert(0, str(Path(__file__).parent))
    from trl_helpers import TIMINGS, assert_same_training

    torchrun("grpo_trainer.py", str(tmp_path), case)
    ranks = [torch.load(tmp_path / f"{case}-{rank}.pt", weights_only=False) for rank in (0, 1)]
    for result in ranks:
        assert result["world"] == 2
        # the logged losses and metrics (reduced over the processes) and the trained weights, flag off against on
        assert_same_training(result["off"], result["on"], initial={})
    first, second = ranks
    for run in ("off", "on"):
        for name, tensor in first[run][1].items():
            assert torch.equal(tensor, second[run][1][name]), (run, name)  # both processes hold the same weights
    # and logged the same (already reduced) metrics
    untimed = [[{k: v for k, v in entry.items() if k not in TIMINGS} for entry in r["on"][0]] for r in ranks]
    assert untimed[0] == untimed[1]


def test_fsdp2_custom_loop_equals_one_process(tmp_path):
    """The LM head passed as a module: FSDP2 unshards it for the fused call and reduce-scatters its gradient."""
    torchrun("fsdp2_loop.py", str(tmp_path), "fsdp")
    subprocess.run([sys.executable, str(WORKERS / "fsdp2_loop.py"), str(tmp_path), "single"], check=True, timeout=300)
    single = torch.load(tmp_path / "single-0.pt")
    sharded = [torch.load(tmp_path / f"fsdp-{rank}.pt") for rank in (0, 1)]
    for name, tensor in single.items():
        for params in sharded:
            torch.testing.assert_close(params[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert all(torch.equal(sharded[0][n], sharded[1][n]) for n in single)
