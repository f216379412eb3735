"""ArviZ for any model: observed data and pointwise log-likelihood of a user model's observed
sites, a seeded bf.loo equal to az.loo on the export, and plain Pyro fits (MCMC, autoguide)
converted with the rank layers' invariant quantities."""

import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import bayes_fusion as bf
from tests.test_pyro_pipeline import PoissonFusion

#: these tests touch ArviZ: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz


def _data():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(60, 3, generator=gen), torch.randn(60, 4, generator=gen)]
    y = torch.poisson((0.5 * xs[0][:, 0] * xs[1][:, 1]).exp(), generator=gen)
    return xs, y


def test_a_user_model_exports_its_observed_site_and_loo_agrees_with_az_loo():
    xs, y = _data()
    res = bf.fit(PoissonFusion(), xs, y, num_steps=200, progress=False)
    data = bf.to_inference_data(res, num_samples=100)
    np.testing.assert_array_equal(np.asarray(data.observed_data["obs"]), y.numpy())
    assert np.asarray(data.log_likelihood["obs"]).shape == (1, 100, 60)
    assert "mixer.relevance_sorted" in data.posterior.data_vars
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few high Pareto k on 60 rows
        ours = bf.loo(res, num_samples=100)
        theirs = az.loo(bf.to_inference_data(res, num_samples=100), pointwise=True)
    elpd = float(theirs.elpd) if hasattr(theirs, "elpd") else float(theirs["elpd_loo"])
    assert ours.elpd == pytest.approx(elpd, rel=1e-12) and np.isfinite(ours.elpd)


def test_plain_pyro_mcmc_and_autoguide_convert_with_the_invariant_quantities():
    xs, y = _data()
    model = PoissonFusion()
    kernel = NUTS(model, max_tree_depth=4)
    mcmc = MCMC(kernel, num_samples=20, warmup_steps=20, num_chains=1, disable_progbar=True)
    mcmc.run(xs, y)
    data = bf.from_pyro(mcmc, model, xs, y)
    assert np.asarray(data.posterior["mixer.rank_scale_sorted"]).shape == (1, 20, 2)
    assert np.asarray(data.log_likelihood["obs"]).shape == (1, 20, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diag = bf.FitResult.from_pyro(mcmc, model, xs, y).diagnostics()
    assert "mixer.rank_scale_sorted" in diag["r_hat"]

    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(30):
        svi.step(xs, y)
    data = bf.from_pyro(guide, model, xs, y, num_samples=50)
    assert np.asarray(data.posterior["mixer.effective_rank"]).shape == (1, 50)
    assert data.posterior.attrs["inference"] == "variational"
    with pytest.raises(TypeError, match="fitted: expected a pyro.infer.MCMC run or a guide"):
        bf.FitResult.from_pyro(3, model, xs, y)


def test_a_model_with_two_observed_sites_names_the_one_loo_scores():
    def two(x, a=None, b=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("a", dist.Normal(mu + x, 1.0), obs=a)
            pyro.sample("b", dist.Normal(mu - x, 1.0), obs=b)

    x = torch.randn(30)
    res = bf.fit(two, x, x + 0.1, -x, num_steps=50, progress=False)
    data = bf.to_inference_data(res, num_samples=40)
    assert set(data.log_likelihood.data_vars) == {"a", "b"}
    with pytest.raises(ValueError, match=r"var_name: the model has several observed sites"):
        bf.loo(res, num_samples=40)
    assert np.isfinite(bf.loo(res, num_samples=40, var_name="a").elpd)


def test_pointwise_log_likelihood_of_a_model_with_plated_latent_sites():
    """Draws of a latent site inside a plate (per-group intercepts) are placed left of its plate
    dim: the vectorized pointwise log-likelihood equals the one computed draw by draw."""
    from pyro import poutine

    from bayes_fusion.summary import pointwise_log_likelihoods

    def grouped(x, group, y=None):
        with pyro.plate("groups", 3):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.HalfNormal(1.0))
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("obs", dist.Normal(x + b[..., group], s), obs=y)

    gen = torch.Generator().manual_seed(0)
    x, group = torch.randn(12, generator=gen), torch.arange(12) % 3
    y = x + torch.tensor([0.5, -0.5, 0.0])[group]
    res = bf.fit(grouped, x, group, y, num_steps=20, progress=False)
    draws = res.get_samples(4, seed=0)
    got = pointwise_log_likelihoods(res, draws)["obs"]
    for i in range(4):
        point = {k: v[i] for k, v in draws.items()}
        trace = poutine.trace(poutine.condition(grouped, point)).get_trace(x, group, y)
        node = trace.nodes["obs"]
        torch.testing.assert_close(got[i], node["fn"].log_prob(node["value"]))
