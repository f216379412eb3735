"""Every example runs with --smoke and prints sane results."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

#: these tests touch ArviZ, plotting, the examples or the docs: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz

ROOT = Path(__file__).resolve().parents[1]


def run_example(name, tmp_path, *extra, smoke=True):
    flags = ["--smoke"] if smoke else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *flags, "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart_smoke(tmp_path):
    out = run_example("quickstart.py", tmp_path, "--no-progress")
    assert "rank  P(rank)" in out and "effective rank: mode" in out
    assert "parameters: full" in out
    acc = float(out.split("held-out accuracy: ")[1].split()[0])
    assert acc >= 0.5  # chance is 0.2 (5 diets); 0.8 with the smoke settings here
    for name in ("rank_posterior.png", "lambda_forest.png", "elbo.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 1000, name
    assert str(tmp_path.resolve()) in out


def _docs_quickstart_block() -> list[str]:
    """The "typical output" lines of ``docs/quickstart.rst``."""
    text = (ROOT / "docs" / "quickstart.rst").read_text()
    block = text.split("Typical output")[1].split("::\n\n", 1)[1]
    return [line.strip() for line in block.split("\n\n")[0].splitlines()]


NUMBER = r"-?\d+(?:\.\d+)?"
TABLE_ROW = r"(\d+)\s+(\d\.\d+)"


def _same_up_to_rounding(want: str, got: str) -> bool:
    """Same text and integers; decimals within 0.1 and interval bounds ``[a, b]`` within 1
    (other torch versions and CPUs draw a little differently)."""
    if re.sub(NUMBER, "#", want) != re.sub(NUMBER, "#", got):
        return False
    bounds = {m.start(i) for m in re.finditer(r"\[(\d+), (\d+)\]", want) for i in (1, 2)}
    for w, g in zip(re.finditer(NUMBER, want), re.finditer(NUMBER, got), strict=True):
        a, b = w.group(), g.group()
        tolerance = 0.1 if "." in a else (1 if w.start() in bounds else 0)
        if abs(float(a) - float(b)) > tolerance:
            return False
    return True


def _split_table(lines: list[str]) -> tuple[list[str], dict[int, float]]:
    """The lines without the ``P(rank)`` table rows, and those rows as rank -> probability."""
    rows = {int(m[1]): float(m[2]) for line in lines if (m := re.fullmatch(TABLE_ROW, line))}
    return [line for line in lines if not re.fullmatch(TABLE_ROW, line)], rows


@pytest.mark.slow
def test_quickstart_prints_what_the_docs_show(tmp_path):
    """The quickstart at its defaults prints the docs' "typical output": the same lines, ranks
    and parameter counts; probabilities and scores within 0.1, HDI bounds within one."""
    out = run_example("quickstart.py", tmp_path, "--no-progress", smoke=False)
    printed = [line.strip() for line in out.splitlines()]
    start = next(i for i, line in enumerate(printed) if line.startswith("== layer"))
    end = next(i for i, line in enumerate(printed) if line.startswith("held-out accuracy"))
    docs, docs_table = _split_table(_docs_quickstart_block())
    got, got_table = _split_table(printed[start : end + 1])
    assert len(got) == len(docs), got
    for want, line in zip(docs, got, strict=True):
        assert _same_up_to_rounding(want, line), f"docs: {want!r}\nprinted: {line!r}"
    for rank in set(docs_table) | set(got_table):
        assert abs(docs_table.get(rank, 0.0) - got_table.get(rank, 0.0)) <= 0.1, (rank, got_table)


def test_pyro_pipeline_smoke(tmp_path):
    out = run_example("pyro_pipeline.py", tmp_path)
    assert "intercepts: true" in out and "fusion layer rank posterior" in out
    assert math.isfinite(float(out.split("PSIS-LOO elpd ")[1].split()[0]))
    # the inside-plate, minibatched and NUTS fits recover the group ordering too
    for label in ("inside-plate fit: intercepts", "bf.fit minibatches: intercepts", "intercepts"):
        line = [ln for ln in out.splitlines() if label in ln][-1]
        values = [float(v) for v in line.split("[")[-1].split("]")[0].split(",")]
        assert values == sorted(values), line
    est = out.split("posterior mean [")[1].split("]")[0]
    values = [float(v) for v in est.split(",")]
    assert values == sorted(values)  # the group ordering of the true intercepts is recovered
    assert (tmp_path / "rank_posterior.png").stat().st_size > 1000


def test_nutrimouse_smoke(tmp_path):
    out = run_example("nutrimouse.py", tmp_path)
    assert "meanfield" in out and "nuts" in out
    for method in ("meanfield", "nuts"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{method}:"))
        acc = float(line.split("held-out accuracy ")[1].split(",")[0])
        # chance is 0.2 (5 diets, 10 held-out mice); 0.4 / 0.6 with the smoke settings here
        assert acc >= 0.3, (method, acc)
    assert (tmp_path / "rank_posteriors.png").stat().st_size > 1000


def test_multimodal_digits_smoke(tmp_path):
    out = run_example("multimodal_digits.py", tmp_path)
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 2)
        if len(parts) == 3 and parts[1].replace(".", "").isdigit():
            rows[parts[0].strip()] = float(parts[1])
    assert rows and all(acc > 0.3 for acc in rows.values())  # chance is 0.1
    frac = float(out.split("dense tensor-fusion parameters: ")[1].split("%")[0])
    assert frac < 10.0
    assert (tmp_path / "rank_posterior.png").stat().st_size > 1000


def test_xox_mlp_smoke(tmp_path):
    out = run_example("xox_mlp.py", tmp_path)
    acc = float(out.split("XOX MLP        : accuracy ")[1].split(",")[0])
    assert acc > 0.3  # chance 0.1
    ratio = float(out.split("(compression ")[1].split("x")[0])
    assert ratio > 1.0
    assert "genes surviving" in out
    for line in (ln for ln in out.splitlines() if "genes surviving" in ln):
        # the pruned rank is the posterior's mode, inside its HDI, weighed by the likelihood
        mode = int(line.split("mode ")[1].split()[0])
        lo, hi = (int(v) for v in line.split("HDI [")[1].split("]")[0].split(","))
        assert int(line.split("pruned to ")[1].split()[0]) == mode and lo <= mode <= hi, line
        assert "(information criterion)" in line
    assert (tmp_path / "genes_posterior.png").stat().st_size > 1000


def test_guides_compared_smoke(tmp_path):
    out = run_example("guides_compared.py", tmp_path)
    lines = [ln.split() for ln in out.splitlines()]
    methods = {
        ln[0] for ln in lines if ln and ln[0] in {"map", "meanfield", "lowrank", "full", "nuts"}
    }
    assert methods == {"map", "meanfield", "lowrank", "full", "nuts"}
    for ln in lines:
        if ln and ln[0] in methods:
            p_true, lpd = float(ln[1]), float(ln[3])
            assert 0.0 <= p_true <= 1.0 and lpd == lpd  # a probability; lpd is not NaN


def test_distributed_fit_smoke_under_torchrun(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "examples" / "distributed_fit.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("processes: 2") == 1  # rank 0 reports, rank 1 stays quiet
    rmse = float(out.split("RMSE ")[1].split()[0])
    assert rmse < 0.2  # noise 0.1
    assert (tmp_path / "fit.pt").exists() and (tmp_path / "rank_posterior.png").exists()


def test_distributed_fit_runs_without_torchrun(tmp_path):
    out = run_example("distributed_fit.py", tmp_path, "--steps", "100")
    assert "processes: 1" in out
