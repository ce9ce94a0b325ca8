"""Structure the tests keep: ruff-clean code (pyproject.toml [tool.ruff]), a light `import eval`, no import cycle in purify."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).is_file():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([str(ruff), "check", str(root)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_eval_loads_the_harness_only_and_purify_has_no_cycle():
    code = ("import sys, eval, purify.purifier as p; "
            "heavy = [m for m in ('distill', 'robust_data', 'matplotlib', 'eval.quickstart') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "import inspect; assert 'loading' not in inspect.getsource(p)")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
