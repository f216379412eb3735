"""ArviZ conversion, plots and the text summary."""

import math
import warnings

import arviz as az
import matplotlib
import numpy as np
import pyro
import pytest

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression

#: these tests touch ArviZ, plotting, the examples or the docs: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def fits():
    pyro.set_rng_seed(0)
    data = make_cp_regression((3, 4), 2, rank=2, num_data=200, noise=0.1, seed=3)
    out = {}
    for max_rank in (2, 5):
        model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=max_rank))
        out[max_rank] = bf.fit(model, data.inputs, data.y, num_steps=1000, progress=False)
    return out, data


def test_inference_data_groups_dims_and_attrs(fits):
    res = fits[0][5]
    idata = bf.to_inference_data(res, num_samples=100)
    for group in ("posterior", "posterior_predictive", "log_likelihood", "observed_data"):
        assert hasattr(idata, group), group
    post = idata.posterior
    assert post["layer.rank_scale"].dims == ("chain", "draw", "layer_rank")
    assert post["layer.factor_0"].dims == ("chain", "draw", "layer.factor_0_row", "layer_rank")
    assert post["layer.relevance_sorted"].shape == (1, 100, 5)
    assert post["layer.effective_rank"].shape == (1, 100)
    assert int(post["layer.effective_rank"].median()) == 2
    assert post.attrs["inference"] == "variational"
    assert "not evidence of convergence" in post.attrs["note"]
    assert idata.log_likelihood["obs"].shape == (1, 100, 200)
    assert idata.posterior_predictive["obs"].shape == (1, 100, 200, 2)
    assert idata.observed_data["obs"].shape == (200, 2)


def test_arviz_functions_run(fits, tmp_path):
    """ArviZ's own functions take our data as it is, on ArviZ 0.x and 1.x."""
    results, _ = fits
    b = bf.to_inference_data(results[5], num_samples=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single pseudo-chain / Pareto-k notes from ArviZ
        summary = az.summary(b, var_names=["layer.relevance_sorted", "layer.effective_rank"])
        assert "mean" in summary.columns
        assert len(summary) == 6  # 5 sorted relevances + the effective rank
        rhat = az.rhat(b, var_names=["layer.relevance_sorted"])["layer.relevance_sorted"]
        ess = az.ess(b, var_names=["layer.relevance_sorted"])["layer.relevance_sorted"]
    assert rhat.shape == (5,) and ess.shape == (5,)
    assert np.isfinite(ess.values).all()


def test_loo_and_compare_same_fields_on_every_arviz(fits):
    results, data = fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = bf.loo(results[5], num_samples=100)
        from_data = bf.loo(bf.to_inference_data(results[5], num_samples=100))
        ranking = bf.compare({"max_rank=2": results[2], "max_rank=5": results[5]}, num_samples=100)
        best = ranking.index[0]
        best_alone = bf.loo(results[int(best[-1])], num_samples=100)
    assert math.isfinite(est.elpd) and est.se > 0 and 0 < est.p < 50
    assert est.pareto_k.shape == (200,)
    # with noise 0.1 on 2 outputs the per-row elpd is about 2 * log N(0; 0, 0.1) ~ 2.8
    assert 1.5 < est.elpd / 200 < 3.5
    assert math.isfinite(from_data.elpd)
    assert set(ranking.index) == {"max_rank=2", "max_rank=5"}
    for column in bf.arviz_compat.COMPARE_COLUMNS:
        assert column in ranking.columns, column
    assert ranking["weight"].sum() == pytest.approx(1.0, abs=1e-6)
    # ArviZ 1.x's convention on both: this model's elpd minus the best one's, unrounded
    assert ranking["elpd_diff"].iloc[0] == 0 and (ranking["elpd_diff"] <= 0).all()
    assert ranking.loc[best, "elpd"] == pytest.approx(best_alone.elpd, rel=0.05)


def test_loo_and_compare_bad_input(fits):
    results, _ = fits
    with pytest.raises(TypeError, match="expected a FitResult or ArviZ data"):
        bf.loo("nope")
    with pytest.raises(ValueError, match="results: expected a dict of at least two"):
        bf.compare({"only": results[2]})
    no_ll = bf.to_inference_data(results[2], num_samples=20, log_likelihood=False)
    with pytest.raises(ValueError, match="'log_likelihood' group"):
        bf.loo(no_ll)


def test_from_dict_builds_native_data_with_attrs():
    draws = np.random.default_rng(0).normal(size=(2, 30, 3))
    data = bf.arviz_compat.from_dict(
        {"posterior": {"x": draws}},
        coords={"k": np.arange(3)},
        dims={"x": ["k"]},
        attrs={"library": "bayes_fusion"},
    )
    expected = "InferenceData" if bf.arviz_compat.major_version() == 0 else "DataTree"
    assert type(data).__name__ == expected
    assert data.posterior["x"].dims == ("chain", "draw", "k")
    assert data.posterior.attrs["library"] == "bayes_fusion"
    with pytest.raises(ValueError, match="groups: expected a dict with a 'posterior' group"):
        bf.arviz_compat.from_dict({"prior": {"x": draws}})


def test_plots_write_pngs(fits, tmp_path):
    res = fits[0][5]
    paths = {name: tmp_path / f"{name}.png" for name in ("rank", "forest", "elbo")}
    fig, _ = bf.plot_rank_posterior(res, paths["rank"])
    assert fig is not None
    fig, axes = bf.plot_relevance_forest(res, paths["forest"])
    assert isinstance(axes, np.ndarray) and fig is axes[0].figure
    assert axes[0].get_title() == "sorted relevance (90% HDI)"
    assert len(axes[0].lines) + len(axes[0].collections) > 0  # the intervals are on axes[0]
    fig, axes = bf.plot_relevance_forest(res, tmp_path / "lam.png", var="rank_scale_sorted")
    # rows labelled "layer #k" in the label column, no variable names or dim headers left over
    shown = [t.get_text() for ax in axes for t in list(ax.get_yticklabels()) + ax.texts]
    shown += [t.get_text() for ax in axes for t in ax.get_xticklabels()]
    rows = sorted(t for t in shown if t.startswith("layer #"))
    assert rows == [f"layer #{k}" for k in range(1, 6)]
    assert not [t for t in shown if "sorted" in t or t in ("variable", "layer_rank")], shown
    assert axes[0].get_xlabel() == "rank scale lambda (sorted per draw)"
    bf.plot_elbo(res, paths["elbo"])
    for path in list(paths.values()) + [tmp_path / "lam.png"]:
        assert path.exists() and path.stat().st_size > 1000, path
    with pytest.raises(ValueError, match="var: expected a rank variable"):
        bf.plot_relevance_forest(res, var="nope")


def test_rank_summary_text(fits, capsys):
    text = bf.rank_summary(fits[0][5])
    printed = capsys.readouterr().out
    assert text in printed
    assert "rank  P(rank)" in text and "effective rank: mode" in text
    assert "parameters: full" in text and "pruned (rank 2)" in text


@pytest.mark.slow
def test_mcmc_two_chains_rhat_present_and_finite():
    data = make_cp_regression((3, 4), 2, rank=2, num_data=150, noise=0.1, seed=0)
    model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
    res = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="nuts",
        num_samples=60,
        warmup_steps=60,
        num_chains=2,
        max_tree_depth=5,
        init_steps=1000,
        progress=False,
    )
    idata = bf.to_inference_data(res, posterior_predictive=False)
    assert idata.posterior.attrs["inference"] == "mcmc"
    assert idata.posterior.sizes["chain"] == 2
    assert idata.sample_stats["diverging"].shape == (2, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(idata, var_names=["layer.relevance_sorted"])["layer.relevance_sorted"]
    assert np.isfinite(rhat.values).all()
    # the sampler's per-draw statistics: ArviZ's energy diagnostics run on them
    for name in ("energy", "step_size", "n_steps", "lp", "acceptance_rate"):
        assert idata.sample_stats[name].shape == (2, 60), name
    energy_bfmi = bf.arviz_compat.bfmi(idata)
    assert energy_bfmi.shape == (2,) and np.isfinite(energy_bfmi).all()
    az.plot_energy(idata)
    from matplotlib import pyplot

    pyplot.close("all")
    # diagnostics() names its quantities as the export names them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diag = res.diagnostics()
    sorted_names = {k for k in diag["r_hat"] if k.endswith("_sorted") or k.endswith("_rank")}
    assert sorted_names and sorted_names <= set(idata.posterior.data_vars)
