"""The README's custom-training-loop example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_training_loop_example_runs(capsys):
    block = next(b for b in _python_blocks() if "optimizer.step()" in b)
    exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert printed.count("reward") == 3 and "nan" not in printed.lower()


def test_commands_come_first():
    head = README.read_text().split("---")[0]
    assert "fused-gspo-bench" in head and "pytest" in head
