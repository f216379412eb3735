"""The layers in a Pyro user's own pipeline: called inside (subsampled) data plates they still
sample their weights once; NUTS runs on user models whose layer attribute has any name and on
plain Pyro functions with no rank layer at all."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule

import bayes_fusion as bf

N, BATCH = 200, 40


def _data(kind: str):
    gen = torch.Generator().manual_seed(0)
    if kind == "cp":
        xs = [torch.randn(N, d, generator=gen) for d in (3, 4)]
    else:
        xs = torch.randn(N, 5, generator=gen)
    y = torch.poisson(torch.full((N,), 2.0), generator=gen)
    return xs, y


def _layer(kind: str):
    if kind == "cp":
        return bf.CPFusion((3, 4), 1, max_rank=3)
    return bf.XOXLinear(5, 1, genes=2)


def _rows(xs, idx):
    return [x[idx] for x in xs] if isinstance(xs, list) else xs[idx]


class Outside(PyroModule):
    """The layer on every row, outside the data plate; the plate subsamples its output."""

    def __init__(self, layer):
        super().__init__()
        self.fusion = layer

    def forward(self, xs, y=None):
        eta = self.fusion(xs).squeeze(-1)
        with pyro.plate("data", N, subsample_size=BATCH) as idx:
            return pyro.sample("obs", dist.Poisson(eta[..., idx].exp()), obs=y[idx])


class Inside(Outside):
    """The common Pyro idiom: the layer called inside the subsampled data plate."""

    def forward(self, xs, y=None):
        with pyro.plate("data", N, subsample_size=BATCH) as idx:
            eta = self.fusion(_rows(xs, idx)).squeeze(-1)
            return pyro.sample("obs", dist.Poisson(eta.exp()), obs=y[idx])


@pytest.mark.parametrize("kind", ["cp", "xox"])
def test_a_layer_inside_a_data_plate_samples_its_weights_once(kind):
    xs, y = _data(kind)
    layer = _layer(kind)
    trace = pyro.poutine.trace(Inside(layer)).get_trace(xs, y)
    scale = trace.nodes["fusion.rank_scale"]
    assert scale["value"].shape == (layer.rank,)  # not (BATCH, R)
    assert scale["scale"] == 1.0 and not scale["cond_indep_stack"]  # not scaled by N / BATCH
    assert trace.nodes["obs"]["value"].shape == (BATCH,)
    assert trace.nodes["obs"]["scale"] == N / BATCH  # the likelihood still is


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("kind", ["cp", "xox"])
def test_the_inside_plate_model_has_the_outside_plate_elbo(kind, elbo_class):
    """At the same guide, the subsampled ELBO estimates of the two models have the same mean
    (each unbiased for the full-data ELBO), within standard errors."""
    xs, y = _data(kind)
    layer = _layer(kind)
    outside, inside = Outside(layer), Inside(layer)
    guide = AutoNormal(outside, init_scale=0.05)
    guide(xs, y)
    elbo = elbo_class()
    draws = 300
    with torch.no_grad():
        a = torch.tensor([elbo.loss(outside, guide, xs, y) for _ in range(draws)])
        b = torch.tensor([elbo.loss(inside, guide, xs, y) for _ in range(draws)])
    sem = math.sqrt(float(a.var() + b.var()) / draws)
    assert abs(float(a.mean() - b.mean())) < 4 * sem, (float(a.mean()), float(b.mean()), sem)
    # a guide built on the inside model has the same global sites
    shapes = {k: v.shape for k, v in AutoNormal(inside)(xs, y).items()}
    assert shapes == {k: v.shape for k, v in guide(xs, y).items()}


def test_parallel_predictive_batches_the_weights_but_not_by_the_data_plate():
    xs, y = _data("cp")
    model = Inside(_layer("cp"))
    guide = AutoNormal(model)
    guide(xs, y)
    out = Predictive(model, guide=guide, num_samples=7, parallel=True)(xs, y)
    assert out["fusion.rank_scale"].shape == (7, 1, 3)
    assert out["obs"].shape == (7, BATCH)


class PoissonFusion(PyroModule):
    """A user model: its rank layer under its own attribute name, its own likelihood."""

    def __init__(self):
        super().__init__()
        self.mixer = bf.CPFusion((3, 4), 1, max_rank=2)

    def forward(self, xs, y=None):
        eta = self.mixer(xs).squeeze(-1)
        with pyro.plate("rows", eta.shape[-1]):
            return pyro.sample("obs", dist.Poisson(eta.exp()), obs=y)


def test_nuts_on_a_user_model_whose_layer_has_another_name():
    xs, _ = _data("cp")
    gen = torch.Generator().manual_seed(1)
    y = torch.poisson((0.5 * xs[0][:, 0] * xs[1][:, 1]).exp(), generator=gen)
    res = bf.fit(
        PoissonFusion(),
        xs,
        y,
        guide="nuts",
        num_samples=30,
        warmup_steps=30,
        init_steps=100,
        max_tree_depth=4,
        progress=False,
    )
    draws = res.get_samples(group_by_chain=True)
    assert draws["mixer.rank_scale"].shape == (1, 30, 2)
    assert res.info["class_contrasts"] == [] and res.info["marginalized"] == []
    assert set(bf.rank_posterior(res)) == {"mixer"}


def eight_schools(sigma, y=None):
    """The non-centred eight schools model (Rubin 1981; the Stan / PyMC reference)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[0]):
        theta_raw = pyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * theta_raw, sigma), obs=y)


def test_nuts_on_a_plain_pyro_function_without_a_rank_layer():
    """Posterior moments of mu and tau against the published reference (mu: mean 4.4, sd 3.3;
    tau: mean 3.6), within about three Monte Carlo standard errors of a short chain."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    res = bf.fit(
        eight_schools,
        sigma,
        y,
        guide="nuts",
        num_samples=400,
        warmup_steps=300,
        init_steps=300,
        progress=False,
    )
    draws = res.get_samples()
    assert draws["theta_raw"].shape == (400, 8)
    mu, tau = draws["mu"], draws["tau"]
    assert abs(float(mu.mean()) - 4.4) < 1.5 and 2.0 < float(mu.std()) < 4.5
    assert 1.5 < float(tau.mean()) < 6.0
    assert sum(res.info["divergences"]) <= 8  # non-centred: few, if any


class RowsPoisson(PyroModule):
    """A user model over whatever rows it is given (a plain plate), with a group-level tensor
    argument that is not row-aligned."""

    def __init__(self):
        super().__init__()
        self.mixer = bf.CPFusion((3, 4), 1, max_rank=2)

    def forward(self, xs, offsets, y=None):
        eta = self.mixer(xs).squeeze(-1) + offsets.sum()
        with pyro.plate("rows", eta.shape[-1]):
            return pyro.sample("obs", dist.Poisson(eta.exp()), obs=y)


def test_fit_minibatches_a_user_model_with_the_full_data_expected_elbo():
    """fit(batch_size=B) slices the row-aligned arguments (not the 3 offsets) and weights the
    observed site by N / B: over many minibatches the mean loss at a fixed guide is the
    full-batch loss, within standard errors."""
    from bayes_fusion.infer.svi.batches import BatchStream, prototype_args
    from bayes_fusion.infer.svi.step import PriorAnneal

    xs, y = _data("cp")
    offsets = torch.tensor([0.1, -0.2, 0.05])
    model = RowsPoisson()
    res = bf.fit(model, xs, offsets, y, batch_size=50, num_steps=300, progress=False)
    assert sum(res.losses[-20:]) < sum(res.losses[:20])
    assert not hasattr(model, "num_data")  # the fit wrote no attribute of the model
    args = (xs, offsets, y)
    anneal = PriorAnneal()
    proto = prototype_args(args, 50, N, None)
    assert proto[1] is offsets and proto[0][0].shape == (50, 3)
    gen = torch.Generator().manual_seed(0)
    stream = iter(BatchStream(args, N, 50, gen, None, anneal, proto, model))
    elbo = Trace_ELBO()
    with res.param_scope(), torch.no_grad():
        full = torch.tensor([elbo.loss(model, res.guide, *args) for _ in range(200)])
        mini = torch.tensor(
            [elbo.loss(anneal(model), res.guide, *next(stream)) for _ in range(400)]
        )
    assert anneal.obs_scale == N / 50
    sem = math.sqrt(float(full.var()) / 200 + float(mini.var()) / 400)
    assert abs(float(mini.mean() - full.mean())) < 4 * sem, (float(mini.mean()), float(full.mean()))


def test_fit_refuses_to_minibatch_a_model_that_subsamples_itself():
    xs, y = _data("cp")
    with pytest.raises(ValueError, match="batch_size: the model subsamples its rows itself"):
        bf.fit(Inside(_layer("cp")), xs, y, batch_size=20, num_steps=2, progress=False)


def test_the_bias_prior_depends_on_no_other_site():
    """pyro.render_model / get_dependencies draw no edge from the scales to the bias."""
    xs, y = _data("cp")
    deps = pyro.infer.inspect.get_dependencies(PoissonFusion(), (xs, y))["prior_dependencies"]
    assert set(deps["mixer.bias"]) == {"mixer.bias"}
    assert "mixer.rank_scale" in deps["mixer.factor_0"]  # the factors' prior does use them


class UserLikelihood(PyroModule):
    """A user model around an XOX layer named ``encoder``, with a likelihood of the user's."""

    def __init__(self, likelihood: str):
        super().__init__()
        self.encoder = bf.XOXLinear(5, 1, genes=2)
        self.likelihood = likelihood

    def forward(self, x, y=None):
        eta = self.encoder(x).squeeze(-1)
        with pyro.plate("rows", eta.shape[-1]):
            if self.likelihood == "poisson":
                return pyro.sample("obs", dist.Poisson(eta.exp()), obs=y)
            if self.likelihood == "studentt":
                return pyro.sample("obs", dist.StudentT(4.0, eta, 0.5), obs=y)
            return pyro.sample("obs", dist.Bernoulli(logits=eta), obs=y)


@pytest.mark.parametrize("guide", ["map", "meanfield", "lowrank", "nuts"])
@pytest.mark.parametrize("likelihood", ["poisson", "studentt", "bernoulli"])
def test_every_guide_on_user_models_with_their_own_likelihood(likelihood, guide):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 5, generator=gen)
    signal = x[:, 0] - 0.5 * x[:, 1]
    y = {
        "poisson": torch.poisson(signal.exp(), generator=gen),
        "studentt": signal + 0.5 * torch.randn(N, generator=gen),
        "bernoulli": torch.bernoulli(torch.sigmoid(2 * signal), generator=gen),
    }[likelihood]
    truth = {"poisson": signal.exp(), "studentt": signal, "bernoulli": torch.sigmoid(2 * signal)}
    options = (
        {"num_samples": 15, "warmup_steps": 15, "init_steps": 150, "max_tree_depth": 3}
        if guide == "nuts"
        else {"num_steps": 300}
    )
    res = bf.fit(UserLikelihood(likelihood), x, y, guide=guide, progress=False, **options)
    draws = 15 if guide == "nuts" else 50
    pred = res.predictive(x, num_samples=draws, seed=0)["obs"]
    assert pred.shape == (draws, N)
    # the posterior predictive mean follows the generating mean (a known answer)
    corr = torch.corrcoef(torch.stack([pred.float().mean(0), truth[likelihood]]))[0, 1]
    assert float(corr) > 0.6, float(corr)
    assert set(bf.rank_posterior(res)) == {"encoder"}


def test_nuts_refuses_a_discrete_latent_site_before_any_fit():
    def mixture(y=None):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(3.0 * z, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"model: NUTS samples continuous latent sites only; "):
        bf.fit(mixture, torch.tensor(2.0), guide="nuts", progress=False)
