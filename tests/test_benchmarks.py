"""The benchmark suite runs in quick mode and writes its table (speeds are not asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_quick_writes_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert "| group | case |" in table
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    groups = {r["group"] for r in rows}
    assert any(g.startswith("CP forward (") for g in groups)
    assert any(g.startswith("CP forward memory") for g in groups)
    assert any(g.startswith("XOX forward") for g in groups)
    assert any(g.startswith("SVI step") for g in groups)
    dist_rows = [r for r in rows if r["group"].startswith("distributed SVI step small")]
    assert {r["name"].split(" vs")[0] for r in dist_rows} >= {"2 processes (torchrun, gloo)"}
    # times and memory are >= 0; a log-log slope row holds a (noisy, finite) exponent instead
    slopes = [r for r in rows if r["name"].startswith("log-log slope")]
    assert all(math.isfinite(r["ms"]) for r in slopes)
    assert all(r["ms"] >= 0 for r in rows if r not in slopes)
    # the classification section: held-out scores of every method, in the same results.md
    assert "## Classification" in table
    scored = json.loads((tmp_path / "classification.json").read_text())["rows"]
    methods = {r["method"] for r in scored}
    defaults = "CP fusion, defaults (main effects, MAP)"
    assert {"logistic regression (concatenated)", defaults} <= methods
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["log_loss"] > 0 for r in scored)
    # the calibration section: interval coverage for every guide and NUTS
    assert "## Calibration" in table
    summary = json.loads((tmp_path / "calibration.json").read_text())["summary"]
    assert {s["guide"] for s in summary} == {"map", "meanfield", "lowrank", "full", "nuts"}
    assert all(0.0 <= s["coverage_0.9"] <= 1.0 for s in summary)
    # NUTS on every model: diagnostics per model, from the generic path
    assert "## NUTS on every model" in table
    nuts = json.loads((tmp_path / "nuts_models.json").read_text())["rows"]
    assert nuts and all(r["path"] == "generic" and r["r_hat_pred"] >= 1.0 for r in nuts)
