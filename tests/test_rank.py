"""Rank posterior, relevance, invariances, pruning and modality contributions."""

import pyro
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression, make_xox_regression
from bayes_fusion.rank import relevance_draws

#: these tests touch ArviZ, plotting, the examples or the docs: CI runs them on both ArviZ lines
pytestmark = pytest.mark.arviz


@pytest.fixture(scope="module")
def cp_fit():
    pyro.set_rng_seed(0)
    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=600, noise=0.1, seed=0)
    train, test = data.split(400)
    model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=5))
    res = bf.fit(model, train.inputs, train.y, num_steps=2000, progress=False)
    return res, train, test


def _permute_and_flip(res, samples, gen):
    """Permute components of every draw and flip signs of factor columns in pairs."""
    layer = res.model.layer
    out = dict(samples)
    r = layer.max_rank
    for s in range(next(iter(samples.values())).shape[0]):
        perm = torch.randperm(r, generator=gen)
        flip = torch.ones(r)
        flip[torch.rand(r, generator=gen) < 0.5] = -1.0
        for short, full in layer.site_names().items():
            if short == "bias":
                continue
            v = out[full].clone()
            v[s] = v[s][..., perm]
            if short in ("factor_0", "factor_1"):  # the pair of flipped factors
                v[s] = v[s] * flip
            out[full] = v
    return out


def test_rank_posterior_finds_true_rank_and_is_invariant(cp_fit):
    res, _, _ = cp_fit
    samples = res.posterior_samples(100, seed=1)
    rp = bf.rank_posterior(res, samples=samples)["layer"]
    assert rp.mode == 2 and float(rp.probs[2]) > 0.9
    assert rp.hdi == (2, 2)
    moved = _permute_and_flip(res, samples, torch.Generator().manual_seed(0))
    rp2 = bf.rank_posterior(res, samples=moved)["layer"]
    torch.testing.assert_close(rp2.probs, rp.probs)
    torch.testing.assert_close(rp2.relevance, rp.relevance, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rp2.scales, rp.scales)
    assert "rank  P(rank)" in rp.table()


def test_norm_relevance_separates_better_than_lambda(cp_fit):
    """Separation = smallest active / largest inactive relevance, per draw (median)."""
    res, _, _ = cp_fit
    samples = res.posterior_samples(100, seed=2)
    seps = {}
    for kind in ("norm", "scale"):
        rel = relevance_draws(res.model.layer, samples, kind).sort(-1, descending=True).values
        seps[kind] = float((rel[:, 1] / rel[:, 2]).median())
    assert seps["norm"] > 10 * seps["scale"], seps
    assert seps["scale"] > 1


def test_xox_relevance_is_gauge_invariant():
    layer = bf.XOXLinear(6, 5, genes=4).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = {
        "x_in": torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
        "core": torch.randn(3, 4, 4, generator=g, dtype=torch.float64),
        "x_out": torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
    }
    a = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4)
    b = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4)
    moved = {
        "x_in": draws["x_in"] @ torch.linalg.inv(a).T,
        "core": b @ draws["core"] @ a,
        "x_out": draws["x_out"] @ torch.linalg.inv(b),
    }
    torch.testing.assert_close(layer.relevance(moved), layer.relevance(draws))


def test_multiple_rank_layers_are_found_and_summarized():
    class TwoLayers(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.fusion = bf.CPFusion((3, 4), 6, max_rank=4)
            self.head = bf.XOXLinear(6, 2, genes=3)

        def forward(self, inputs, y=None):
            pred = self.head(torch.tanh(self.fusion(inputs)))
            with pyro.plate("data", pred.shape[-2]):
                pyro.sample("obs", pyro.distributions.Normal(pred, 0.3).to_event(1), obs=y)
            return pred

    xs = [torch.randn(50, 3), torch.randn(50, 4)]
    res = bf.fit(TwoLayers(), xs, torch.randn(50, 2), num_steps=20, progress=False)
    rps = bf.rank_posterior(res, num_samples=20)
    assert set(rps) == {"fusion", "head"}
    # the head maps 6 -> 2: its W has rank <= 2 whatever its 3 genes
    assert rps["fusion"].max_rank == 4 and rps["head"].max_rank == 2
    pruned = bf.prune(res)
    assert set(pruned.modules) == {"fusion", "head"}


def test_prune_keeps_true_rank_and_predictions(cp_fit):
    res, _, test = cp_fit
    pruned = bf.prune(res)
    info = pruned.layers["layer"]
    assert info["rank"] == 2
    assert info["params_after"] < info["params_before"]
    assert isinstance(pruned.module, bf.DeterministicCPFusion) and pruned.module.rank == 2
    with torch.no_grad():
        full = pyro.poutine.condition(res.model.layer, pruned.values)(test.inputs)
        small = pruned.module(test.inputs)
    rel = float((small - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt())
    assert rel < 0.01, rel


def test_prune_xox_exact_rank():
    data = make_xox_regression(12, 6, genes=2, num_data=600, noise=0.1, seed=0)
    model = bf.Regressor(bf.XOXLinear(12, 6, genes=5))
    res = bf.fit(model, data.inputs, data.y, num_steps=1500, progress=False)
    pruned = bf.prune(res)
    assert pruned.layers["layer"]["rank"] == 2
    with torch.no_grad():
        full = pyro.poutine.condition(res.model.layer, pruned.values)(data.inputs)
        small = pruned.module(data.inputs)
    rel = float((small - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt())
    assert rel < 0.01, rel


def test_contributions_noise_modality_has_no_share():
    g = torch.Generator().manual_seed(0)
    n = 500
    x = [
        torch.randn(n, 3, generator=g),
        torch.randn(n, 4, generator=g),
        torch.randn(n, 2, generator=g),
    ]
    # y depends on modality 0 alone and on the (0, 1) interaction; modality 2 is noise
    y = (
        x[0] @ torch.randn(3, 2, generator=g)
        + (x[0] @ torch.randn(3, 2, generator=g)) * (x[1] @ torch.randn(4, 2, generator=g))
        + 0.1 * torch.randn(n, 2, generator=g)
    )
    res = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4, 2), 2, max_rank=6)), x, y, num_steps=2000, progress=False
    )
    contrib = bf.modality_contributions(res, x, modality_names=["a", "b", "noise"])
    summary = {r["term"]: r["mean"] for r in contrib.summary()}
    assert abs(sum(summary.values()) - 1) < 1e-5
    assert contrib.modality_shares[:, 2].mean() < 0.02
    assert summary["a"] + summary["a x b"] > 0.95
    assert "a x b" in contrib.table()
    fig, _ = contrib.plot()
    assert len(fig.axes[0].patches) == len(contrib.names)


def test_contributions_pairwise_only():
    g = torch.Generator().manual_seed(1)
    n = 500
    x = [torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)]
    y = (x[0] @ torch.randn(3, 1, generator=g)) * (x[1] @ torch.randn(3, 1, generator=g))
    y = y + 0.05 * torch.randn(n, 1, generator=g)
    res = bf.fit(
        bf.Regressor(bf.CPFusion((3, 3), 1, max_rank=4)), x, y, num_steps=2000, progress=False
    )
    shares = {r["term"]: r for r in bf.modality_contributions(res, x).summary()}
    assert shares["m0 x m1"]["mean"] > 0.95
    assert shares["m0 x m1"]["lower"] > 0.9


def test_interaction_terms_add_up_to_the_fusion():
    from bayes_fusion.contributions import interaction_terms
    from bayes_fusion.ops import cp_fusion

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, d, generator=g, dtype=torch.float64) for d in (2, 3, 2)]
    fs = [torch.randn(d + 1, 4, generator=g, dtype=torch.float64) for d in (2, 3, 2)]
    out = torch.randn(3, 4, generator=g, dtype=torch.float64)
    terms = interaction_terms(xs, fs, out)
    const = (fs[0][-1] * fs[1][-1] * fs[2][-1]) @ out.T
    torch.testing.assert_close(sum(terms.values()) + const, cp_fusion(xs, fs, out))


def test_rank_bad_input(cp_fit):
    res, train, _ = cp_fit
    with pytest.raises(ValueError, match=r"threshold: expected .* \(0, 1\) or None, got 0$"):
        bf.rank_posterior(res, threshold=0)
    with pytest.raises(ValueError, match=r"threshold: expected a number in \(0, 1\)"):
        bf.rank_posterior(res, threshold=-0.5)
    empty = {k: v[:0] for k, v in res.posterior_samples(3).items()}
    with pytest.raises(ValueError, match="empty posterior"):
        bf.rank_posterior(res, samples=empty)

    class Plain(pyro.nn.PyroModule):
        def forward(self, x, y=None):
            w = pyro.sample("w", pyro.distributions.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", pyro.distributions.Normal(w * x, 1.0), obs=y)

    plain = bf.fit(Plain(), torch.randn(20), torch.randn(20), num_steps=5, progress=False)
    with pytest.raises(ValueError, match="holds no rank-bearing layer"):
        bf.rank_posterior(plain)
    with pytest.raises(ValueError, match="holds no rank-bearing layer"):
        bf.prune(plain)
    with pytest.raises(ValueError, match="holds no CPFusion"):
        bf.modality_contributions(plain, [torch.randn(3, 2)])
