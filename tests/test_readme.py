"""The README's custom-training-loop example runs as written, and its loss step compiles whole."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run_loop_example() -> dict:
    block = next(b for b in _python_blocks() if "optimizer.step()" in b)
    namespace = {"__name__": "readme"}
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_training_loop_example_runs(capsys):
    _run_loop_example()
    printed = capsys.readouterr().out
    assert printed.count("reward") == 3 and "nan" not in printed.lower()


def test_the_loss_step_compiles_with_fullgraph():
    ns = _run_loop_example()
    args = (ns["ids"], ns["completion"], ns["advantages"], ns["mask"])
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ns["loss_step"])(*args)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(ns["loss_step"], fullgraph=True, backend="aot_eager")(*args)
    eager = ns["loss_step"](*args)
    assert torch.allclose(compiled.loss, eager.loss, rtol=1e-6, atol=1e-7)
    grads = [torch.autograd.grad(out.loss, [ns["lm_head"].weight])[0] for out in (compiled, eager)]
    assert torch.allclose(*grads, rtol=1e-5, atol=1e-7)
    torch._dynamo.reset()


def test_commands_come_first():
    head = README.read_text().split("---")[0]
    assert "fused-gspo-bench" in head and "pytest" in head


def test_the_preference_recipes_build_with_the_flag():
    """The paper-index recipes (DPO, AlphaPO) construct as written, flag on. bf16=False only because TRL refuses
    its bf16 default on a machine without a GPU."""
    import pytest

    pytest.importorskip("trl")
    import fused_gspo

    block = next(b for b in _python_blocks() if "alphapo_args = CPOConfig(" in b)
    block = block.replace("use_fused_gspo_loss=True", "use_fused_gspo_loss=True, bf16=False")
    namespace = {"__name__": "readme"}
    try:
        exec(compile(block, str(README), "exec"), namespace)
        dpo, alphapo = namespace["dpo_args"], namespace["alphapo_args"]
        assert dpo.use_fused_gspo_loss and (dpo.loss_type, dpo.beta) == (["sigmoid"], 0.1)
        assert alphapo.use_fused_gspo_loss and (alphapo.loss_type, alphapo.alpha, alphapo.beta) == (
            "simpo",
            0.25,
            2.5,
        )
        assert alphapo.simpo_gamma == 0.1 and alphapo.cpo_alpha == 0.0  # TRL turns alphapo into simpo, no NLL term
    finally:
        fused_gspo.unpatch_trl()


def test_the_printed_plans_are_what_explain_prints():
    """Each plan the README prints is explain's own output, line by line ("..." marks lines left out; a trailing
    " | ..." a line cut short): the reference shape in "The planner", one rank of 8 in "Tensor parallelism" (that
    section once showed the single-GPU plan)."""
    import fused_gspo

    text = README.read_text()
    tp_start = text.index("## Tensor parallelism")
    tp_end = text.index("\n## ", tp_start + 1)
    found = []
    for match in re.finditer(r"```\n(fused_gspo plan \|.*?)```", text, flags=re.S):
        ranks = 8 if tp_start < match.start() < tp_end else 1
        found.append(ranks)
        plan = str(
            fused_gspo.explain(8192, 4096, 151936, device="h100", loss_type="grpo",
                               importance_sampling_level="sequence", tensor_parallel=ranks)
        ).splitlines()  # fmt: skip
        for line in match.group(1).splitlines():
            if line == "...":
                continue
            if line.endswith(" | ..."):
                assert any(p.startswith(line[: -len(" | ...")]) for p in plan), line
            else:
                assert line in plan, line
    assert sorted(found) == [1, 8]
