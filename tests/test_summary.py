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
    results, _ = fits
    a = bf.to_inference_data(results[2], num_samples=100)
    b = bf.to_inference_data(results[5], num_samples=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single pseudo-chain / Pareto-k notes from ArviZ
        summary = az.summary(b, var_names=["layer.relevance_sorted", "layer.effective_rank"])
        assert "mean" in summary.columns
        loo = az.loo(b)
        assert math.isfinite(loo.elpd_loo)
        ranking = az.compare({"max_rank=2": a, "max_rank=5": b})
        assert set(ranking.index) == {"max_rank=2", "max_rank=5"}
        axes = az.plot_forest(b, var_names=["layer.relevance_sorted"])
    assert np.ravel(axes)[0].figure is not None


def test_plots_write_pngs(fits, tmp_path):
    res = fits[0][5]
    paths = {name: tmp_path / f"{name}.png" for name in ("rank", "forest", "elbo")}
    fig, _ = bf.plot_rank_posterior(res, paths["rank"])
    assert fig is not None
    bf.plot_relevance_forest(res, paths["forest"])
    bf.plot_relevance_forest(res, tmp_path / "lam.png", var="rank_scale_sorted")
    bf.plot_elbo(res, paths["elbo"])
    for path in list(paths.values()) + [tmp_path / "lam.png"]:
        assert path.exists() and path.stat().st_size > 1000, path
    with pytest.raises(ValueError, match="var: expected a rank variable"):
        bf.plot_relevance_forest(res, var="nope")


def test_rank_summary_text(fits, capsys):
    text = bf.rank_summary(fits[0][5])
    printed = capsys.readouterr().out
    assert text in printed
    assert "rank  P(rank)" in text and "effective rank: mean" in text
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
