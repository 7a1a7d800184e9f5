"""The repository's layout against the packages installed beside it: Python started in the repository root (as the
README's ``python -m pytest`` and any ``python -c`` there do) must import Hugging Face's ``kernels`` (a dependency of
transformers >= 5.25, imported by transformers and TRL at load time), never this project's top-level ``kernels/``,
which installs only as ``fused_gspo.kernels`` (docs/layout.md)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code: str) -> str:
    """``python -c code`` in the repository root, the way a user starts it there: the root first on ``sys.path``."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"python -c in {ROOT} failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_root_holds_no_regular_kernels_package_or_module():
    # A regular package or module named `kernels` in the root would shadow Hugging Face's: `__init__.py` or any
    # module file (kernels.py, kernels.*.so)
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not list(ROOT.glob("kernels.*"))


def test_importing_kernels_trl_and_the_adapter_from_the_root():
    """The issue's own check: ``import kernels, trl, fused_gspo.trl`` from the root. With Hugging Face's ``kernels``
    installed, ``kernels`` is that package (in site-packages); without it, ``kernels`` from the root is at most an
    empty namespace: no code, no attributes, no distribution metadata, so nothing mistakes it for the real one."""
    code = (
        "import importlib, json, sys\n"
        "import kernels\n"
        "import fused_gspo.kernels.linear_logprob as ours\n"
        "try:\n"
        "    import trl, fused_gspo.trl\n"
        "    trl_ok = True\n"
        "except ImportError:\n"
        "    trl_ok = False\n"
        "print(json.dumps({'file': getattr(kernels, '__file__', None), 'names': [n for n in dir(kernels) if not "
        "n.startswith('__')], 'ours': ours.__file__, 'trl': trl_ok}))"
    )
    found = json.loads(run_in_root(code))
    assert Path(found["ours"]).resolve().parent == (ROOT / "kernels").resolve()  # ours, as fused_gspo.kernels
    if hf_kernels_installed():
        assert found["file"] is not None, "`import kernels` in the root gave a namespace, not Hugging Face's package"
        path = Path(found["file"]).resolve()
        assert ROOT not in path.parents, f"`import kernels` in the root gave {path}, this repository's"
        assert "site-packages" in path.parts or "dist-packages" in path.parts
        assert found["trl"], "trl / fused_gspo.trl failed to import from the repository root"
    else:
        assert found["file"] is None and found["names"] == [], found


def test_pytest_collects_the_trl_tests_from_the_root():
    """``python -m pytest`` in the root: the module that imports TRL and transformers' hub integration collects."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests/test_trl_patch.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error" not in done.stdout.lower().split("collected")[-1]
