"""NUTS on Regressor(CPFusion) with the output factor and bias integrated out (the potential
of :class:`~bayes_fusion.infer.mcmc.output_marginal.OutputMarginal`, tested against the dense
marginal in tests/test_output_marginal.py): every site comes back, chains run in worker
processes, the option that turns it off. The ESS of the collapsed path on the inference
issue's instance (~190 leapfrog steps per iteration: two minutes of CI for 250 + 250 draws) is
a benchmark: ``benchmarks/run.py``, section ``nuts``."""

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression


def test_collapsed_nuts_returns_every_site_and_predicts():
    data = make_cp_regression((3, 4, 2), 2, rank=2, num_data=120, noise=0.1, seed=0)
    model = bf.Regressor(bf.CPFusion((3, 4, 2), 2, max_rank=3))
    res = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="nuts",
        num_samples=30,
        warmup_steps=30,
        init_steps=300,
        progress=False,
    )
    assert res.info["marginalized"] == ["layer.bias", "layer.out_factor"]
    draws = res.posterior_samples(group_by_chain=True)
    assert draws["layer.out_factor"].shape == (1, 30, 2, 3)
    assert draws["layer.bias"].shape == (1, 30, 2)
    assert set(draws) == {
        "layer.rank_scale",
        "layer.factor_0",
        "layer.factor_1",
        "layer.factor_2",
        "layer.out_factor",
        "layer.bias",
        "noise",
    }
    pred = res.predict(data.inputs, num_samples=30)
    rmse = float((pred["mean"] - data.y).pow(2).mean().sqrt())
    assert rmse < 0.3  # noise 0.1: the recovered output factor and bias fit the data


def test_collapsed_nuts_parallel_chains_in_worker_processes():
    data = make_cp_regression((3, 4), 1, rank=1, num_data=80, noise=0.1, seed=0)
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=2))
    res = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="nuts",
        num_samples=20,
        warmup_steps=20,
        num_chains=2,
        chain_method="parallel",
        init_steps=200,
        progress=False,
    )
    assert res.info["parallel"] is True
    lam = res.posterior_samples(group_by_chain=True)["layer.rank_scale"]
    assert lam.shape == (2, 20, 2) and not torch.equal(lam[0], lam[1])  # own seeds


def test_marginalize_option():
    data = make_cp_regression((3, 4), 1, rank=1, num_data=50, noise=0.1, seed=0)
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=2))
    res = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="nuts",
        num_samples=5,
        warmup_steps=5,
        marginalize=False,
        init_steps=50,
        progress=False,
    )
    assert res.info["marginalized"] == []
    clf = bf.Classifier(bf.CPFusion((3, 4), 3, max_rank=2))
    labels = torch.zeros(50, dtype=torch.long)
    with pytest.raises(ValueError, match="marginalize: True needs a full-batch Regressor"):
        bf.fit(clf, data.inputs, labels, guide="nuts", marginalize=True)
