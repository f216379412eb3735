"""The Sphinx documentation builds without warnings."""

import subprocess
import sys
from pathlib import Path

import pytest

#: these tests touch ArviZ, plotting, the examples or the docs: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_warning_free(tmp_path):
    pytest.importorskip("sphinx")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(ROOT / "docs"),
            str(tmp_path / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "html" / "index.html").exists()
