"""The benchmark suite runs in quick mode and writes its table (speeds are not asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name: str):
    """A module of benchmarks/ (not a package: imported with its folder on the path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_benchmarks_quick_writes_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        # 116 s alone with 2 threads, 340-370 s beside the other xdist worker on a 2-core Intel
        # Xeon: room for a slower machine, still a bound on a hang
        timeout=1500,
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
    assert {s["guide"] for s in summary} == {"map", "meanfield", "lowrank", "full", "nuts", "mcmc"}
    assert all(0.0 <= s["coverage_0.9"] <= 1.0 for s in summary)
    # NUTS on every model: diagnostics per model
    assert "## NUTS on every model" in table
    nuts = json.loads((tmp_path / "nuts_models.json").read_text())["rows"]
    assert nuts
    assert all(isinstance(r["marginalized"], list) and r["r_hat_pred"] >= 1.0 for r in nuts)
    # whole SVI fits with defaults against NumPyro (its rows empty without numpyro)
    assert "## SVI end to end" in table
    e2e = json.loads((tmp_path / "svi_end_to_end.json").read_text())["rows"]
    assert e2e and all(r["ours_s"] > 0 and r["ours_engine"] == "direct" for r in e2e)
    assert all(r["jit_choice"]["chosen"] == "eager" for r in e2e)  # 300 steps, nothing on record
    # many chains in lockstep: diagnostics and ESS/s per fit
    assert "## Many chains in lockstep" in table
    lockstep = json.loads((tmp_path / "many_chains.json").read_text())["rows"]
    assert lockstep and all(r["r_hat_pred"] >= 1.0 and r["ess_per_s"] > 0 for r in lockstep)
    # ... against the number of chains and of training rows
    assert "## Many chains in lockstep: ESS/s against chains" in table
    curves = json.loads((tmp_path / "many_chains_curves.json").read_text())
    assert [r["chains"] for r in curves["chains"]] == [4] and curves["rows"][0]["rows"] == 300
    assert all(r["gradients"] > 0 and r["ess_per_s"] > 0 for r in curves["chains"] + curves["rows"])
    # XOX layers: accuracy against parameter count, nn.Linear / XOX / low-rank rows
    assert "## XOX layers: accuracy against parameter count" in table
    xox = json.loads((tmp_path / "xox_accuracy.json").read_text())["rows"]
    assert {r["layer"] for r in xox} == {"linear", "xox", "lowrank"}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["params"] > 0 for r in xox)
    # simulation-based calibration: ranks of the prior draws' truths, a histogram per quantity
    assert "## Simulation-based calibration" in table
    sbc = json.loads((tmp_path / "sbc.json").read_text())
    assert {(s["guide"], s["quantity"]) for s in sbc["summary"]} == {
        (g, q) for g in ("mcmc", "nuts", "meanfield") for q in ("lambda", "pred")
    }
    for s in sbc["summary"]:
        key = f"ranks_{s['quantity']}"
        ranks = [v for r in sbc["rows"] if r["guide"] == s["guide"] for v in r[key]]
        assert sum(s["counts"]) == len(ranks) and all(0 <= v <= 19 for v in ranks)
    assert (tmp_path / "sbc.png").stat().st_size > 0
    # each replication's rows were kept as they came, and summarize alike on their own
    rows_file = tmp_path / "sbc_rows.jsonl"
    assert [json.loads(line) for line in rows_file.read_text().splitlines()] == sbc["rows"]
    import torch

    threads = str(torch.get_num_threads())  # as this worker has them (main sets them)
    argv = ["--from-rows", str(rows_file), "--threads", threads, "--out", str(tmp_path / "again")]
    assert _benchmark_module("sbc").main(argv) == sbc["summary"]
    # the rank posterior of every guide on the known-rank sets
    assert "## Rank posterior: coverage of the true rank" in table
    coverage = json.loads((tmp_path / "rank_coverage.json").read_text())["rows"]
    sets = [
        f"{task}, {truth}"
        for task in ("regression", "classification")
        for truth in ("no interaction", "rank 2")
    ]
    guides = ("map", "meanfield", "lowrank", "full")
    assert {(r["set"], r["guide"]) for r in coverage} == {(s, g) for s in sets for g in guides}
    assert all(0.0 <= r["coverage"] <= 1.0 and 0.0 <= r["p_true"] <= 1.0 for r in coverage)


def test_sbc_ranks_are_uniform_for_an_exact_posterior_and_not_for_an_overconfident_one():
    sbc = _benchmark_module("sbc")
    import torch

    torch.manual_seed(0)
    # theta ~ N(0, 1), y ~ N(theta, 1): the posterior is N(y / 2, 1 / 2)
    theta = torch.randn(600)
    y = theta + torch.randn(600)
    exact, narrow = [], []
    for t, obs in zip(theta, y, strict=True):
        eps = torch.randn(sbc.DRAWS)
        exact += sbc.rank_statistic(obs / 2 + eps * 0.5**0.5, t).tolist()
        narrow += sbc.rank_statistic(obs / 2 + eps * 0.5**0.5 / 3, t).tolist()
    good, bad = sbc.uniformity(exact), sbc.uniformity(narrow)
    assert good["p_value"] > 1e-3 and abs(good["outer_10"] - 0.1) < 0.04
    assert bad["p_value"] < 1e-6 and bad["outer_10"] > 0.4
    assert sum(good["counts"]) == 600 and len(good["counts"]) == sbc.BINS
    chains = torch.arange(2 * 30.0).reshape(2, 30)  # thin: evenly over both chains
    assert sbc.thin(chains, 6).tolist() == [0.0, 14.0, 29.0, 30.0, 44.0, 59.0]


def test_sbc_tests_each_quantity_since_a_replications_ranks_are_correlated():
    sbc = _benchmark_module("sbc")
    import torch

    torch.manual_seed(1)
    # 8 "predictive means" of one exact posterior that share their uncertainty: f_j = theta
    # + c_j, theta | y ~ N(y / 2, 1 / 2); each rank is uniform, the 8 ranks of a replication
    # nearly equal
    exact_rows, narrow_rows = [], []
    for _ in range(100):
        theta, y_noise = torch.randn(()), torch.randn(())
        y = theta + y_noise
        shift = torch.linspace(-1, 1, 8)
        post = y / 2 + torch.randn(sbc.DRAWS, 1) * 0.5**0.5 + 0.01 * torch.randn(sbc.DRAWS, 8)
        exact_rows.append(sbc.rank_statistic(post + shift, theta + shift).tolist())
        narrow = y / 2 + (post - y / 2) / 3
        narrow_rows.append(sbc.rank_statistic(narrow + shift, theta + shift).tolist())
    exact = sbc.per_quantity_uniformity(exact_rows)
    pooled = sbc.uniformity([v for row in exact_rows for v in row])
    assert exact["rank_correlation"] > 0.9 and len(exact["p_each"]) == 8
    # the pooled histogram "rejects" the exact posterior; the per-quantity test does not
    assert pooled["p_value"] < 1e-3 < 0.01 < exact["p_bonferroni"]
    assert sbc.per_quantity_uniformity(narrow_rows)["p_bonferroni"] < 1e-6


def test_binary_calibration_problem_scores_the_true_class_probability():
    calibration = _benchmark_module("calibration")
    import torch

    factory, train, test, truth, pick = calibration.problem("binary", seed=0)
    assert truth.shape == (200, 1) and bool(((truth > 0) & (truth < 1)).all())
    assert train.y.shape == (300,) and factory().layer.out_features == 2
    probs = torch.stack([1 - truth[:, 0], truth[:, 0]], -1)  # draws that are all the truth
    draws = pick(probs.expand(50, -1, -1))
    assert calibration.coverage(draws, truth, 0.5) == 1.0
    assert calibration.coverage(draws + 0.1, truth, 0.9) == 0.0


def _twin_case(model_name: str):
    """``(our model, inputs, y, twin options, twin output size)`` of a small float64 instance."""
    import torch

    import bayes_fusion as bf
    from bayes_fusion.datasets import make_cp_classification, make_cp_regression

    sizes, rank = (3, 2), 3
    x = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 3
    cp = make_cp_regression(sizes, 2, rank=2, num_data=40, seed=0)
    views = [v.double() for v in cp.inputs]
    if model_name == "cp-categorical":
        data = make_cp_classification(sizes, 3, rank=2, num_data=40, seed=0)
        model = bf.Classifier(bf.CPFusion(sizes, 3, max_rank=rank))
        return model, [v.double() for v in data.inputs], data.y, {"likelihood": "categorical"}, 3
    if model_name == "cp-normal":
        model = bf.Regressor(bf.CPFusion(sizes, 2, max_rank=rank))
        return model, views, cp.y.double(), {"likelihood": "normal"}, 2
    if model_name == "cp-poisson":
        model = _benchmark_module("nuts_models").PoissonFusion(bf.CPFusion(sizes, 1, max_rank=rank))
        counts = (labels + 1).double()
        return model, views, counts, {"likelihood": "poisson"}, 1
    if model_name == "xox-normal":
        model = bf.Regressor(bf.XOXLinear(5, 2, genes=rank))
        return model, x, x[:, :2] * 2.0, {"layer": "xox", "likelihood": "normal"}, 2
    model = bf.Classifier(bf.XOXLinear(5, 3, genes=rank))
    return model, x, labels, {"layer": "xox", "likelihood": "categorical"}, 3


@pytest.mark.parametrize(
    "model_name", ["cp-categorical", "cp-normal", "cp-poisson", "xox-normal", "xox-categorical"]
)
def test_numpyro_twin_has_the_log_density_of_our_model(model_name):
    """Each NumPyro twin of benchmarks/numpyro_nuts.py (the ESS/s references) is the model it
    stands for: at a random point its log density (non-centred factors z) equals ours (factors
    f = (lambda + eps) z, the XOX core O = sqrt(lambda + eps) z sqrt(lambda + eps)^T) minus the
    Jacobian of the map to z."""
    pytest.importorskip("numpyro")
    import jax
    import numpy as np
    import pyro
    import torch
    from numpyro.infer.util import log_density
    from pyro.poutine.util import site_is_subsample

    numpyro_nuts = _benchmark_module("numpyro_nuts")
    jax.config.update("jax_enable_x64", True)
    model, inputs, y, options, out = _twin_case(model_name)
    model = model.double()
    trace = pyro.poutine.trace(model).get_trace(inputs, y)
    gen = torch.Generator().manual_seed(1)
    point = {  # moderate values: a prior draw's heavy-tailed scales overflow the Poisson rates
        name: 0.5 * torch.randn(site["value"].shape, dtype=torch.float64, generator=gen)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
    rank = model.layer.rank
    point["layer.rank_scale"] = torch.rand(rank, dtype=torch.float64, generator=gen) + 0.5
    if "noise" in point:
        point["noise"] = point["noise"].abs() + 0.1
    ours = pyro.poutine.trace(pyro.poutine.condition(model, data=point)).get_trace(inputs, y)
    std = point["layer.rank_scale"] + 1e-3
    values = {"lam": point["layer.rank_scale"], "bias": point["layer.bias"]}
    if options.get("layer") == "xox":
        root = std.sqrt()
        values["z_in"] = point["layer.x_in"] / std
        values["z_core"] = point["layer.core"] / (root[:, None] * root[None, :])
        values["z_out"] = point["layer.x_out"] / std
        scaled_rows = values["z_in"].shape[0] + out + rank  # the core: rank x sqrt(std) twice
    else:
        factors = [point[f"layer.factor_{m}"] for m in range(len(inputs))]
        values.update({f"z_{m}": f / std for m, f in enumerate(factors)})
        values["z_out"] = point["layer.out_factor"] / std
        scaled_rows = sum(f.shape[0] for f in factors) + out
    if "layer.main_effects" in point:
        values["main"] = point["layer.main_effects"]
    if "noise" in point:
        values["noise"] = point["noise"]
    assert len(values) == len(point), sorted(point)  # every site of ours has its twin's
    twin, _ = numpyro_nuts.twin_model(options.get("layer", "cp"), options["likelihood"], rank, out)
    xs = [np.asarray(v.numpy()) for v in ([inputs] if torch.is_tensor(inputs) else inputs)]
    theirs, _ = log_density(
        twin, (xs, np.asarray(y.numpy())), {}, {k: np.asarray(v) for k, v in values.items()}
    )
    expected = float(ours.log_prob_sum()) + float(std.log().sum() * scaled_rows)
    assert abs(float(theirs) - expected) < 1e-8 * max(1.0, abs(expected))
