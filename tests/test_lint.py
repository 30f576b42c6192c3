"""The sources pass ruff's lint and are formatted by `ruff format` (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command", [["check", "--output-format", "concise"], ["format", "--check"]], ids=["lint", "format"]
)
def test_ruff(command):
    completed = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, (
        f"ruff {' '.join(command)} (fix: ruff check --fix . && ruff format .):\n{completed.stdout[-3000:]}{completed.stderr[-1000:]}"
    )
