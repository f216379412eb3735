"""fit() / FitResult on small problems (fast); the known-answer tests live in
test_rank_recovery.py."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression
from bayes_fusion.infer.svi import guides as svi_guides

GUIDES = ["map", "meanfield", "lowrank", "full"]


@pytest.fixture
def small():
    data = make_cp_regression((3, 4), 2, rank=2, num_data=120, noise=0.1, seed=1)
    return data


def _model(max_rank=4):
    return bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=max_rank))


@pytest.mark.parametrize("guide", GUIDES)
def test_fit_every_guide_reduces_loss(small, guide):
    res = bf.fit(_model(), small.inputs, small.y, guide=guide, num_steps=150, progress=False)
    assert len(res.losses) == 150
    assert all(math.isfinite(v) for v in res.losses)
    assert sum(res.losses[-10:]) < sum(res.losses[:10])
    draws = res.posterior_samples(num_samples=7)
    assert draws["layer.factor_0"].shape == (7, 4, 4)
    assert draws["layer.rank_scale"].shape == (7, 4)
    pred = res.predict(small.inputs, num_samples=20)
    assert pred["mean"].shape == pred["std"].shape == pred["lower"].shape == (120, 2)
    assert (pred["lower"] <= pred["upper"]).all()


def test_same_seed_same_result_different_seed_different(small):
    a = bf.fit(_model(), small.inputs, small.y, num_steps=50, seed=3, progress=False)
    b = bf.fit(_model(), small.inputs, small.y, num_steps=50, seed=3, progress=False)
    c = bf.fit(_model(), small.inputs, small.y, num_steps=50, seed=4, progress=False)
    assert a.losses == b.losses
    assert a.losses != c.losses


def test_vectorized_particles_average_the_single_particle_elbo(small):
    """The vectorized 4-particle ELBO of a fixed guide is the mean of single-particle
    estimates: over many evaluations, its mean agrees with theirs within standard errors, and
    its spread is about half theirs (the standard error of a mean of 4)."""
    res = bf.fit(_model(), small.inputs, small.y, num_steps=30, num_particles=4, progress=False)
    assert all(math.isfinite(v) for v in res.losses)
    model, guide, args = res.model, res.guide, (small.inputs, small.y)
    one = pyro.infer.Trace_ELBO(num_particles=1)
    four = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    with res.param_scope(), torch.no_grad():
        singles = torch.tensor([one.loss(model, guide, *args) for _ in range(400)])
        vectorized = torch.tensor([four.loss(model, guide, *args) for _ in range(200)])
    sem = (singles.var() / 400 + vectorized.var() / 200).sqrt()
    assert abs(float(vectorized.mean() - singles.mean())) < 4 * float(sem)
    ratio = float(vectorized.std() / singles.std())
    assert 0.35 < ratio < 0.7, ratio


@pytest.mark.slow
def test_compiled_loss_follows_the_eager_one_and_the_kl_warmup(small):
    # the loss is compiled once: the KL weight (an input of the graph) must still change
    kw = dict(guide="meanfield", num_steps=8, kl_warmup=0.5, progress=False)
    plain = bf.fit(_model(), small.inputs, small.y, jit=False, direct_elbo=False, **kw)
    compiled = bf.fit(_model(), small.inputs, small.y, jit=True, **kw)
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-4)


def test_jit_where_it_cannot_compile_warns_and_runs_eagerly(small):
    kw = dict(guide="map", num_steps=8, progress=False)
    plain = bf.fit(_model(), small.inputs, small.y, jit=False, direct_elbo=False, **kw)
    with pytest.warns(RuntimeWarning, match="jit=True compiles the library's own models"):
        res = bf.fit(_model(), small.inputs, small.y, jit=True, direct_elbo=False, **kw)
    assert res.losses == plain.losses
    with pytest.warns(RuntimeWarning, match="one particle and a preset guide; this fit runs"):
        bf.fit(_model(), small.inputs, small.y, jit=True, num_particles=2, **kw)


def test_minibatch_scales_to_num_data_during_the_fit(small):
    model = _model()
    seen = []
    res = bf.fit(
        model,
        small.inputs,
        small.y,
        num_steps=20,
        batch_size=40,
        progress=False,
        callback=lambda step, loss: seen.append(model.num_data),
    )
    assert set(seen) == {120} and len(res.losses) == 20  # the likelihood scaled to 120 rows
    assert model.num_data is None  # and the model left as it was


def test_early_stopping_and_callback(small):
    seen = []
    res = bf.fit(
        _model(),
        small.inputs,
        small.y,
        num_steps=5000,
        early_stopping=20,
        early_stopping_tol=0.05,
        progress=False,
    )
    assert len(res.losses) < 5000
    res = bf.fit(
        _model(),
        small.inputs,
        small.y,
        num_steps=100,
        progress=False,
        callback=lambda step, loss: seen.append(step) or step == 9,
    )
    assert seen == list(range(10)) and len(res.losses) == 10


def test_user_guide_class_and_instance(small):
    res = bf.fit(_model(), small.inputs, small.y, guide=AutoNormal, num_steps=20, progress=False)
    assert res.method == "custom"
    model = _model()
    res = bf.fit(
        model, small.inputs, small.y, guide=AutoNormal(model), num_steps=20, progress=False
    )
    assert len(res.losses) == 20


def test_nan_loss_stops_with_step_and_site(small):
    def poison(step, loss):
        if step == 4:
            store = pyro.get_param_store()
            for name in store.keys():
                if "factor_0" in name and "loc" in name:
                    store[name].data.fill_(float("nan"))

    with pytest.raises(bf.NonFiniteLossError, match=r"step 5.*factor_0"):
        bf.fit(_model(), small.inputs, small.y, num_steps=50, callback=poison, progress=False)


def test_full_guide_refuses_large_models(monkeypatch, small):
    monkeypatch.setattr(svi_guides, "FULL_COVARIANCE_MAX_DIM", 10)
    with pytest.raises(ValueError, match="guide: 'full' needs a dense .* use guide='lowrank'"):
        bf.fit(_model(), small.inputs, small.y, guide="full", num_steps=2, progress=False)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(guide="laplace"), ValueError, r"guide: expected one of .*got 'laplace'"),
        (dict(num_steps=0), ValueError, r"num_steps: expected an integer >= 1, got 0"),
        (dict(lr=-0.1), ValueError, r"lr: expected a finite number > 0, got -0.1"),
        (dict(lr=0), ValueError, r"lr: expected a finite number > 0"),
        (dict(num_particles=0), ValueError, r"num_particles: expected an integer >= 1"),
        (dict(batch_size=0), ValueError, r"batch_size: expected an integer >= 1"),
        (dict(seed="a"), TypeError, r"seed: expected an int or None"),
        (dict(guide=3), TypeError, r"guide: expected a name"),
        (dict(foo=1), TypeError, r"fit: unexpected keyword arguments \['foo'\]"),
        (dict(num_threads=0), ValueError, r"num_threads: expected an integer >= 1, got 0"),
        (dict(guide="nuts", num_samples=0), ValueError, r"num_samples: expected an integer >= 1"),
        (dict(guide="nuts", num_chains=0), ValueError, r"num_chains: expected an integer >= 1"),
    ],
)
def test_fit_bad_arguments(small, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bf.fit(_model(), small.inputs, small.y, progress=False, **kwargs)


def test_fit_refuses_nan_data(small):
    y = small.y.clone()
    y[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"y: expected finite values, got 1 NaN"):
        bf.fit(_model(), small.inputs, y, num_steps=2, progress=False)


@pytest.mark.parametrize("guide", GUIDES)
def test_save_load_predict_identical(tmp_path, small, guide):
    res = bf.fit(_model(), small.inputs, small.y, guide=guide, num_steps=30, progress=False)
    path = tmp_path / "fit.pt"
    res.save(path)
    pyro.clear_param_store()
    loaded = bf.load(path, _model())
    a = res.predict(small.inputs, num_samples=10, seed=1)
    b = loaded.predict(small.inputs, num_samples=10, seed=1)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert loaded.losses == res.losses


def test_resume_continues_loss_curve(tmp_path, small):
    full = bf.fit(_model(), small.inputs, small.y, num_steps=60, seed=2, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    part = bf.fit(
        _model(),
        small.inputs,
        small.y,
        num_steps=60,
        seed=2,
        progress=False,
        checkpoint_path=ckpt,
        checkpoint_every=30,
        callback=lambda step, loss: step == 29,
    )
    assert len(part.losses) == 30
    resumed = bf.fit(
        _model(), small.inputs, small.y, num_steps=60, seed=2, progress=False, resume=ckpt
    )
    assert len(resumed.losses) == 60
    assert resumed.losses[:30] == full.losses[:30]
    assert resumed.losses[30:] == pytest.approx(full.losses[30:], rel=1e-5)


def test_load_errors(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        bf.load(tmp_path / "missing.pt", _model())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable bayes_fusion checkpoint"):
        bf.load(bad, _model())
    res = bf.fit(_model(), small.inputs, small.y, num_steps=5, progress=False)
    good = tmp_path / "good.pt"
    res.save(good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        bf.load(truncated, _model())
    with pytest.raises(ValueError, match="model: "):
        bf.load(good, _model(max_rank=5))


def test_user_model_with_hierarchical_intercept_fit_and_plain_svi(small):
    groups = torch.arange(120) % 3

    class GroupModel(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.fusion = bf.CPFusion((3, 4), 2, max_rank=4)

        def forward(self, inputs, group, y=None):
            tau = pyro.sample("tau", dist.HalfNormal(1.0))
            with pyro.plate("groups", 3):
                b = pyro.sample("intercept", dist.Normal(0.0, tau))
            pred = self.fusion(inputs) + b[..., group].unsqueeze(-1)
            with pyro.plate("data", group.shape[0]):
                pyro.sample("obs", dist.Normal(pred, 0.1).to_event(1), obs=y)
            return pred

    y = small.y + torch.tensor([-1.0, 0.0, 1.0])[groups].unsqueeze(-1)
    res = bf.fit(GroupModel(), small.inputs, groups, y, num_steps=300, progress=False)
    draws = res.posterior_samples(50)
    assert draws["intercept"].shape == (50, 3)
    b = draws["intercept"].mean(0)
    assert b[2] - b[0] == pytest.approx(2.0, abs=0.5)
    assert bf.rank_posterior(res, num_samples=50)["fusion"].max_rank == 4

    pyro.clear_param_store()
    model = GroupModel()
    guide = bf.make_guide("meanfield", model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), pyro.infer.Trace_ELBO())
    losses = [svi.step(small.inputs, groups, y) for _ in range(200)]
    assert losses[-1] < losses[0]


def test_nuts_small_runs_and_diagnoses(small):
    res = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)),
        small.inputs,
        small.y,
        guide="nuts",
        num_samples=30,
        warmup_steps=30,
        num_chains=1,
        init_steps=100,
        progress=False,
    )
    draws = res.posterior_samples()
    assert draws["layer.factor_0"].shape == (30, 4, 3)
    assert res.posterior_samples(group_by_chain=True)["layer.rank_scale"].shape == (1, 30, 3)
    # get_samples as NumPyro's: every draw, or num_samples evenly spaced ones; never more
    grouped = res.get_samples(group_by_chain=True)["layer.rank_scale"]
    thinned = res.get_samples(10)["layer.rank_scale"]
    assert thinned.shape == (10, 3)
    assert torch.equal(thinned[0], grouped[0, 0]) and torch.equal(thinned[-1], grouped[0, -1])
    with pytest.raises(ValueError, match="num_samples: expected at most the fit's 30 draws"):
        res.get_samples(31)
    # the per-draw NUTS statistics, one per draw after warm-up
    stats = res.sample_stats
    assert {"diverging", "energy", "step_size", "n_steps", "lp", "acceptance_rate"} <= set(stats)
    assert all(v.shape == (1, 30) for v in stats.values())
    assert bool((stats["n_steps"] >= 1).all()) and bool((stats["step_size"] > 0).all())
    assert bool(((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1 + 1e-9)).all())
    assert bool(torch.isfinite(stats["energy"]).all())
    # posterior predictive site draws, as pyro.infer.Predictive gives them
    sites = res.predictive(small.inputs, num_samples=12, seed=0)
    assert sites["obs"].shape == (12, 120, 2) and sites["_RETURN"].shape == (12, 120, 2)
    with warnings.catch_warnings():  # a 30-step warm-up is too short to be healthy
        warnings.simplefilter("ignore", RuntimeWarning)
        diag = res.diagnostics()
    assert "layer.rank_scale_sorted" in diag["r_hat"]
    pred = res.predict(small.inputs)
    assert pred["mean"].shape == (120, 2)
    with pytest.raises(ValueError, match="diagnostics: expected an MCMC"):
        bf.fit(_model(), small.inputs, small.y, num_steps=2, progress=False).diagnostics()


def test_full_batch_fit_ignores_a_stale_num_data_and_leaves_it(small):
    fresh = bf.fit(_model(), small.inputs, small.y, num_steps=3, progress=False)
    model = _model()
    model.num_data = 10_000  # left over from a minibatch fit on a larger data set
    stale = bf.fit(model, small.inputs, small.y, num_steps=3, progress=False)
    assert stale.losses == fresh.losses  # the likelihood was not scaled to 10,000 rows
    assert model.num_data == 10_000


def test_fit_forwards_options_and_names_the_method_that_takes_them(small):
    with pytest.raises(
        TypeError,
        match=r"\['num_samples'\] for guide='map' \(fit_svi takes .*"
        r"\['num_samples'\] are options of fit_nuts",
    ):
        bf.fit(_model(), small.inputs, small.y, guide="map", num_samples=10)
    with pytest.raises(TypeError, match=r"for guide='nuts' \(fit_nuts takes .*'warmup_steps'"):
        bf.fit(_model(), small.inputs, small.y, guide="nuts", lr=0.1)
    with pytest.raises(ValueError, match=r"guide: expected one of .*got 'nuts'"):
        bf.fit_svi(_model(), small.inputs, small.y, guide="nuts")


def test_fit_is_fit_svi_with_the_same_options(small):
    kw = dict(guide="meanfield", num_steps=30, seed=3, progress=False)
    a = bf.fit(_model(), small.inputs, small.y, **kw)
    b = bf.fit_svi(_model(), small.inputs, small.y, **kw)
    assert a.losses == b.losses


def test_fit_without_num_steps_takes_its_guides_default(monkeypatch, small):
    """``num_steps=None`` resolves per guide (the real defaults, 3,000 / 4,000, shrunk here)."""
    assert svi_guides.default_num_steps("lowrank") > svi_guides.default_num_steps("map")
    monkeypatch.setitem(svi_guides.DEFAULT_NUM_STEPS, "meanfield", 6)
    monkeypatch.setitem(svi_guides.DEFAULT_NUM_STEPS, "lowrank", 9)
    for guide, steps in [("lowrank", 9), ("meanfield", 6), (AutoNormal, 6)]:
        res = bf.fit(_model(), small.inputs, small.y, guide=guide, progress=False)
        assert len(res.losses) == steps, guide
    # a preset's autoguide class or instance takes the preset's; any other guide meanfield's
    model = _model()
    lowrank = AutoLowRankMultivariateNormal(model)
    assert svi_guides.default_num_steps(AutoLowRankMultivariateNormal) == 9
    assert svi_guides.default_num_steps(lowrank) == 9
    assert svi_guides.default_num_steps(AutoDiagonalNormal(model)) == 6


def test_num_threads_is_set_for_the_fit_and_restored(small):
    before = torch.get_num_threads()
    seen = []
    res = bf.fit(
        _model(),
        small.inputs,
        small.y,
        num_steps=5,
        num_threads=1,
        callback=lambda step, loss: seen.append(torch.get_num_threads()),
        progress=False,
    )
    assert seen == [1] * 5 and torch.get_num_threads() == before
    assert res.info["compile_seconds"] is None  # a short fit runs eagerly


def test_fit_leaves_the_callers_random_streams_alone(small):
    """fit(seed=...) draws from its own streams: the caller's random, NumPy and torch states are
    where they were, so a bootstrap loop around fit gets new resamples every iteration."""
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    a = bf.fit(_model(), small.inputs, small.y, num_steps=5, seed=0, progress=False)
    a.posterior_samples(3, seed=1)
    a.predict(small.inputs, num_samples=3, seed=2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    b = bf.fit(_model(), small.inputs, small.y, num_steps=5, seed=0, progress=False)
    assert a.losses == b.losses  # its own streams are seeded


def test_minibatch_fit_leaves_num_data_as_it_was(small):
    model = _model()
    assert model.num_data is None
    bf.fit(model, small.inputs, small.y, num_steps=3, batch_size=40, progress=False)
    assert model.num_data is None
    model.num_data = 120
    bf.fit(model, small.inputs, small.y, num_steps=3, batch_size=40, progress=False)
    assert model.num_data == 120


def test_one_loss_engine_per_fit(small):
    direct = bf.fit(_model(), small.inputs, small.y, num_steps=3, progress=False)
    assert direct.info["loss_engine"] == "direct"
    traced = bf.fit(_model(), small.inputs, small.y, num_steps=3, direct_elbo=False, progress=False)
    assert traced.info["loss_engine"] == "Trace_ELBO"
