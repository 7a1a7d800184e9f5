"""Vocabulary parallelism end to end: the head's weight a ``Shard(0)`` DTensor over 2, 3 and 4 CPU processes (gloo)
equals the single-process call, for every objective class, through the module path and a transformers
``tp_plan="auto"`` model, and refused layouts raise their named errors. The processes run
``tests/workers/vocab_parallel.py``; each rank reports the checks it passed, read back here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "vocab_parallel.py"

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def launch(tmp_path, ranks: int, parts: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               str(WORKER), str(tmp_path), *parts]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-8000:]
    reports = {}
    for part in parts:
        reports[part] = [json.loads((tmp_path / f"{part}-{rank}.json").read_text()) for rank in range(ranks)]
        for report in reports[part]:
            assert report["world"] == ranks
        assert all(r["checks"].keys() == reports[part][0]["checks"].keys() for r in reports[part])
    return reports


def names(report: dict) -> str:
    return "\n".join(report["checks"])


def assert_objectives_checked(report: dict, ranks: int) -> None:
    text = names(report)
    # as the worker's vocabularies(): divisible by the mesh size, and not
    vocabularies = (27 if ranks == 3 else 8 * ranks, 8 * ranks + 5)
    for V in vocabularies:
        for case in ("dapo_kl", "gspo", "gspo_token", "gmpo", "entropy_mask_bonus", "rloo_transform",
                     "on_policy_dr_grpo", "packed_gspo"):  # fmt: skip
            for what in ("loss", "logps", "entropy", "dhidden", "dweight", "identical on every rank"):
                assert f"{case} V={V} torch float64: {what}" in text, (case, V, what)
        assert f"entropy_mask_bonus V={V} torch float64: entropy_mask" in text
        assert f"entropy_mask_bonus V={V} torch float64: metric entropy" in text
        assert f"dapo_kl V={V} torch float64: dbias" in text
        for case in ("dpo_wpo", "dpo_sft_softcap_bias", "dpo_aot_two_phases", "cpo_simpo_nll", "cpo_alphapo_softcap"):
            for what in ("loss", "chosen", "rejected", "dhidden", "dweight"):
                assert f"{case} V={V} torch float64: {what}" in text, (case, V, what)
        for metric in ("mean_token_accuracy", "logits/chosen", "rewards/margins"):
            assert f"dpo_wpo V={V} torch float64: metric {metric}" in text
        assert f"cpo_simpo_nll V={V} torch float64: metric nll_loss" in text
        assert f"fused_logprobs V={V} torch float64: dweight" in text
        assert f"fused_logprobs no-grad V={V} torch" in text
    V = vocabularies[1]
    assert f"gspo V={V} torch float64 hidden Shard(dim=1): dhidden" in text
    assert f"packed_gspo V={V} torch float64 hidden Shard(dim=0): dhidden" in text
    assert f"gspo V={V} torch float64 hidden Replicate(): dhidden" in text
    for placement in ("None", "Shard(dim=1)", "Replicate()"):
        assert f"preference_reference_logps V={V} hidden {placement}: rejected" in text
    assert f"dapo_kl V={V} triton float32: dweight" in text
    assert f"dpo_wpo V={V} triton float32: metric mean_token_accuracy" in text


# One launch per mesh size, each running many checks: process start-up dominates at these shapes
def test_two_ranks(tmp_path):
    reports = launch(tmp_path, 2, ["functional", "training", "refusals", "transformers"])
    assert_objectives_checked(reports["functional"][0], 2)
    training = names(reports["training"][0])
    assert "training step 3: loss" in training and "training after 4 AdamW steps: lm_head.weight" in training
    assert "training after 4 AdamW steps: embed.weight" in training  # the hidden gradient, summed over the ranks
    hf = names(reports["transformers"][0])
    assert "transformers tp_plan after 2 SGD steps: lm_head.weight" in hf
    assert "transformers tp_plan after 2 SGD steps: model.embed_tokens.weight" in hf
    refused = names(reports["refusals"][0])
    for what in ("weight Shard(1)", "weight Replicate()", "plain bias with a sharded weight", "bias Replicate()",
                 "hidden sharded on its hidden dimension", "a DTensor advantages", "backend='eager'",
                 "ranks holding different tokens", "ranks holding different shapes",
                 "advantages of another shape on one rank", "ref_logps missing on one rank",
                 "hidden of another dtype on one rank", "hidden wanting a gradient on one rank only",
                 "a Shard(1) hidden beside a plain weight", "a sharded bias beside a plain weight",
                 "fused_logprobs: a Replicate() hidden beside a plain weight",
                 "CPO: a position_hidden DTensor beside a plain weight",
                 "preference_reference_logps: a DTensor hidden beside a plain weight"):  # fmt: skip
        assert f"refused: {what}" in refused, what


def test_three_ranks(tmp_path):
    """An odd mesh: V = 29 cut 10, 10, 9 and V = 27 cut evenly."""
    reports = launch(tmp_path, 3, ["functional"])
    assert_objectives_checked(reports["functional"][0], 3)


def test_four_ranks(tmp_path):
    reports = launch(tmp_path, 4, ["functional", "training", "refusals"])
    assert_objectives_checked(reports["functional"][0], 4)
    text = names(reports["functional"][0])
    assert "gspo V=3 torch float64: dweight" in text  # 3 rows over 4 ranks (1, 1, 1, 0): the last shard is empty
    assert "dpo_sft_softcap_bias V=5 torch float64: metric mean_token_accuracy" in text  # 2, 2, 1, 0
    assert "refused: a 2-D mesh" in names(reports["refusals"][0])
    assert "training after 4 AdamW steps: lm_head.bias" in names(reports["training"][0])
