"""NUTS intervals of the predictive mean cover the known truth at about the nominal rate
(benchmarks/calibration.py measures the same over replications, for every guide)."""

import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression
from bayes_fusion.ops import cp_fusion


def _coverage(draws, truth, level):
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)
    lo, hi = torch.quantile(draws, probs, dim=0)
    return float(((lo <= truth) & (truth <= hi)).double().mean())


@pytest.mark.slow
def test_nuts_predictive_mean_intervals_cover_the_truth():
    data = make_cp_regression((3, 4), 2, rank=1, num_data=350, noise=0.2, seed=3)
    train, test = data.split(200)
    truth = cp_fusion(
        test.inputs, [data.truth["factor_0"], data.truth["factor_1"]], data.truth["out_factor"]
    )
    res = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)),
        train.inputs,
        train.y,
        guide="nuts",
        num_samples=300,
        warmup_steps=300,
        num_chains=2,
        init_steps=200,
        max_tree_depth=6,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short chains: judged below instead
        diag = res.diagnostics(test.inputs)
    assert diag["r_hat"]["predictive_mean"] < 1.05
    draws = res.predict(test.inputs, return_samples=True)["mean_samples"]
    assert draws.shape == (600, 150, 2)
    # 300 held-out entries; they share the posterior's errors, so the bounds are wider than
    # binomial (+-0.03 at 90%); an over-confident posterior falls far below them
    assert 0.8 <= _coverage(draws, truth, 0.9) <= 1.0
    assert 0.3 <= _coverage(draws, truth, 0.5) <= 0.75
