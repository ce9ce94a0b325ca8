"""Ruff-clean code (pyproject.toml [tool.ruff]); the layout's import rules are kept by test_layout.py."""

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

