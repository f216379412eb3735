"""The code base passes ruff (lint and format), as configured in pyproject.toml."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = [p for p in ("bayes_fusion", "tests", "examples", "benchmarks") if (ROOT / p).exists()]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (test extra)")
@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff(args):
    proc = subprocess.run(["ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
