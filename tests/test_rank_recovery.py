"""Known-answer tests: with default arguments every inference path finds the true rank."""

import pytest

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression, make_xox_regression

pytestmark = pytest.mark.slow

SEEDS = range(3)  # three data sets per guide: CI time; each must find the truth


def _fit_and_score(data, layer, guide, seed, **kw):
    """Fit ``Regressor(layer)`` on 2000 rows; return the rank posterior and held-out RMSE."""
    train, test = data.split(2000)
    res = bf.fit(
        bf.Regressor(layer), train.inputs, train.y, guide=guide, seed=seed, progress=False, **kw
    )
    rank = bf.rank_posterior(res, num_samples=200)["layer"]
    pred = res.predict(test.inputs, num_samples=100)["mean"]
    return rank, float((pred - test.y).pow(2).mean().sqrt())


def _cp_fit(guide, seed, **kw):
    data = make_cp_regression((8, 12, 10), 6, rank=3, num_data=2500, noise=0.1, seed=seed)
    return _fit_and_score(data, bf.CPFusion((8, 12, 10), 6, max_rank=12), guide, seed, **kw)


def _assert_every_fit_finds_three(fit, guide, what):
    """``fit(guide, seed)`` on every data set of :data:`SEEDS` finds 3 (``what``: ranks or
    genes) with a held-out RMSE near the noise (0.1)."""
    found, rmses = [], []
    for seed in SEEDS:
        rank, rmse = fit(guide, seed)
        found.append(rank.mode)
        rmses.append(rmse)
    assert found == [3] * len(SEEDS), f"{guide}: {what} found {found}"
    assert max(rmses) < 0.12, f"{guide}: held-out RMSE {rmses} vs noise 0.1"


@pytest.mark.parametrize("guide", ["map", "meanfield", "lowrank"])
def test_cp_default_fit_finds_true_rank(guide):
    _assert_every_fit_finds_three(_cp_fit, guide, "ranks")


def _xox_fit(guide, seed, **kw):
    data = make_xox_regression(20, 10, genes=3, num_data=2500, noise=0.1, seed=seed)
    return _fit_and_score(data, bf.XOXLinear(20, 10, genes=8), guide, seed, **kw)


@pytest.mark.parametrize("guide", ["map", "meanfield", "lowrank"])
def test_xox_default_fit_finds_active_genes(guide):
    _assert_every_fit_finds_three(_xox_fit, guide, "genes")


def test_minibatch_matches_full_batch():
    rank_full, rmse_full = _cp_fit("meanfield", 0)
    rank_mb, rmse_mb = _cp_fit("meanfield", 0, batch_size=200)
    assert rank_mb.mode == rank_full.mode == 3
    assert rmse_mb <= 1.1 * rmse_full


def _coverage(res, test):
    pred = res.predict(test.inputs, num_samples=None if res.is_mcmc else 300, interval=0.9)
    inside = (test.y >= pred["lower"]) & (test.y <= pred["upper"])
    return float(inside.double().mean())


def test_nuts_rank_posterior_and_coverage():
    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=400, noise=0.1, seed=0)
    train, test = data.split(200)
    model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=4))
    res = bf.fit(
        model,
        train.inputs,
        train.y,
        guide="nuts",
        num_samples=150,
        warmup_steps=150,
        num_chains=1,
        max_tree_depth=6,
        progress=False,
    )
    rank = bf.rank_posterior(res)["layer"]
    assert float(rank.probs[2]) >= 0.8, rank.table()
    assert 0.85 <= _coverage(res, test) <= 0.95


def test_full_guide_interval_coverage():
    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=2400, noise=0.1, seed=1)
    train, test = data.split(400)
    model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=4))
    res = bf.fit(model, train.inputs, train.y, guide="full", progress=False)
    assert bf.rank_posterior(res)["layer"].mode == 2
    assert 0.85 <= _coverage(res, test) <= 0.95


def test_true_rank_three_is_the_mode_for_meanfield_and_nuts():
    data = make_cp_regression((4, 5, 3), 2, rank=3, num_data=300, noise=0.1, seed=0)
    modes = {}
    for guide, kw in (
        ("meanfield", {}),
        ("nuts", dict(num_samples=150, warmup_steps=150, max_tree_depth=6)),
    ):
        model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=5))
        res = bf.fit(model, data.inputs, data.y, guide=guide, progress=False, **kw)
        modes[guide] = bf.rank_posterior(res)["layer"].mode
    assert modes == {"meanfield": 3, "nuts": 3}
