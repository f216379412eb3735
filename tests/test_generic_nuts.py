"""The generic NUTS path (every model but Regressor(CPFusion)): known answers on small
instances, a user model with its own likelihood, the compiled potential, chain layout."""

import os
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression, make_xox_regression
from bayes_fusion.infer.mcmc.chains import defined_in_main
from bayes_fusion.infer.mcmc.potential import ModelPotential
from bayes_fusion.infer.mcmc.starts import centred_components
from bayes_fusion.models import check_data_inputs


class PoissonFusion(pyro.nn.PyroModule):
    """A user model: counts ~ Poisson(exp(CPFusion(inputs))). Importable by chain workers."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, inputs, y=None):
        check_data_inputs(inputs)
        log_rate = self.layer(inputs).squeeze(-1)
        with pyro.plate("data", log_rate.shape[-1]):
            pyro.sample("obs", dist.Poisson(log_rate.exp()), obs=y)
        return log_rate.unsqueeze(-1)


def _nuts(model, *args, **options):
    kw = dict(guide="nuts", num_samples=100, warmup_steps=100, progress=False, seed=0, jit=False)
    kw.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short chains may warn
        return bf.fit(model, *args, **kw)


@pytest.mark.slow
def test_xox_regression_finds_the_true_number_of_genes():
    data = make_xox_regression(6, 3, genes=1, num_data=120, noise=0.1, seed=0)
    train, test = data.split(100)
    res = _nuts(
        bf.Regressor(bf.XOXLinear(6, 3, genes=3)),
        train.inputs,
        train.y,
        num_chains=1,
        jit=True,
        max_tree_depth=6,
    )
    assert res.info["full_mass"] is True
    # a Gaussian regression: x_out and the bias integrated out, drawn from their conditional
    assert res.info["marginalized"] == ["layer.bias", "layer.x_out"]
    assert res.info["compiled_potential"] is True
    assert res.mcmc_samples["layer.x_out"].shape[-2:] == (3, 3)
    rank = bf.rank_posterior(res)["layer"]
    assert float(rank.probs[1]) >= 0.8, rank.table()
    pred = res.predict(test.inputs)["mean"]
    clean = test.y  # noise 0.1 on unit-variance targets
    assert float((pred - clean).pow(2).mean()) < 0.05


@pytest.mark.slow
def test_user_model_with_its_own_likelihood_runs_parallel_chains():
    data = make_cp_regression((3, 2), 1, rank=1, num_data=80, noise=0.01, seed=0)
    counts = torch.poisson((0.7 * data.y[:, 0]).exp(), generator=torch.Generator().manual_seed(0))
    model = PoissonFusion(bf.CPFusion((3, 2), 1, max_rank=2))
    res = _nuts(
        model,
        data.inputs,
        counts,
        num_samples=60,
        warmup_steps=60,
        num_chains=2,
        init_steps=300,
        max_tree_depth=6,
    )
    assert res.info["class_contrasts"] == []
    assert res.info["parallel"] is ((os.cpu_count() or 1) >= 2)
    lam = res.posterior_samples(group_by_chain=True)["layer.rank_scale"]
    assert lam.shape == (2, 60, 2) and not torch.equal(lam[0], lam[1])
    # per chain, potential evaluations per iteration: at least one leapfrog step, at most a
    # full tree of depth 6 (plus the step-size searches of warm-up)
    steps = res.info["steps_per_iteration"]
    assert len(steps) == 2 and all(1 <= s <= 2**6 + 5 for s in steps), steps
    # the posterior mean log rate follows the true one
    log_rate = res.predict(data.inputs)["mean"][:, 0]
    truth = 0.7 * data.y[:, 0]
    assert float(torch.corrcoef(torch.stack([log_rate, truth]))[0, 1]) > 0.9


def test_centred_components_are_per_gene_for_a_narrow_xox_layer():
    layer = bf.XOXLinear(6, 2, genes=4)  # relevance: 2 singular values, scales: 4 genes
    point = {k: v.unsqueeze(0) for k, v in layer.init_values().items()}
    point["rank_scale"] = torch.tensor([[1.0, 1e-6, 0.5, 1e-6]])
    assert centred_components(layer, point).tolist() == [1.0, 0.0, 1.0, 0.0]
    cp = bf.CPFusion((3, 2), 1, max_rank=2)
    point = {k: v.unsqueeze(0) for k, v in cp.init_values().items()}
    point["out_factor"] = torch.tensor([[[1.0, 0.0]]])
    assert centred_components(cp, point).tolist() == [1.0, 0.0]


def test_models_of_main_run_their_chains_in_this_process():
    assert not defined_in_main(PoissonFusion(bf.CPFusion((3, 2), 1, max_rank=2)))
    local = types.new_class("Local", (PoissonFusion,))
    local.__module__ = "__main__"
    assert defined_in_main(local(bf.CPFusion((3, 2), 1, max_rank=2)))


@pytest.mark.parametrize("classes", [2, 3])
def test_compiled_potential_matches_the_eager_one(classes):
    torch.manual_seed(0)
    inputs = [torch.randn(30, 3), torch.randn(30, 2)]
    y = torch.randint(0, classes, (30,))
    model = bf.Classifier(bf.CPFusion((3, 2), classes, max_rank=2))
    eager = ModelPotential(model, (inputs, y), {"layer.rank_scale": torch.tensor([1.0, 0.0])})
    compiled = ModelPotential(
        model, (inputs, y), {"layer.rank_scale": torch.tensor([1.0, 0.0])}, compile=True
    )
    start = eager.to_unconstrained(eager.init_values)
    for k in range(3):
        point = {n: (v + 0.2 * k * torch.randn_like(v)).requires_grad_() for n, v in start.items()}
        want = eager(point)
        want_grad = torch.autograd.grad(want, list(point.values()))
        got = compiled(point)
        got_grad = torch.autograd.grad(got, list(point.values()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for a, b in zip(got_grad, want_grad, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert compiled.report()["compiled_potential"] is True


def test_nuts_reports_the_compiled_potential():
    data = make_xox_regression(4, 2, genes=1, num_data=40, noise=0.1, seed=0)
    res = _nuts(
        bf.Regressor(bf.XOXLinear(4, 2, genes=2)),
        data.inputs,
        data.y,
        num_samples=20,
        warmup_steps=20,
        num_chains=1,
        jit=True,
        init_steps=100,
    )
    assert res.info["compiled_potential"] is True and res.info["compile_seconds"] > 0
    with pytest.raises(ValueError, match="jit: expected one of"):
        _nuts(bf.Regressor(bf.XOXLinear(4, 2, genes=2)), data.inputs, data.y, jit="yes")
