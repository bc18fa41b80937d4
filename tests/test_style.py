"""The house style is part of the suite: ruff's linter and formatter (pyproject.toml, 120 columns)."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_the_tree_passes_ruff(command):
    proc = subprocess.run([str(RUFF), *command], cwd=REPO, capture_output=True, text=True)
    fix = ".venv/bin/ruff check --fix . && .venv/bin/ruff format ."
    assert proc.returncode == 0, f"ruff {' '.join(command)} (fix with `{fix}`):\n{proc.stdout}{proc.stderr}"
