"""Chains start apart, and MCMC is diagnosed on quantities label switching cannot move."""

import math
import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification, make_cp_regression
from bayes_fusion.infer.mcmc.chains import laplace_inverse_mass_matrix
from bayes_fusion.infer.mcmc.chees import Whitening
from bayes_fusion.infer.mcmc.convergence import r_hat_and_ess
from bayes_fusion.infer.mcmc.diagnostics import invariant_draws
from bayes_fusion.infer.mcmc.starts import START_JITTER, chain_starts


def test_r_hat_and_ess_of_constant_and_stuck_quantities():
    torch.manual_seed(0)
    mixed = torch.randn(2, 200, 3)
    r_hat, ess = r_hat_and_ess(mixed)
    assert r_hat < 1.05 and ess > 100
    # an effective rank that never changes is converged, not NaN
    assert r_hat_and_ess(torch.full((2, 50), 2.0)) == (1.0, 100.0)
    # two chains stuck at different values: r-hat infinite (flagged), not NaN
    stuck = torch.cat([torch.full((1, 50), 2.0), torch.full((1, 50), 3.0)])
    assert math.isinf(r_hat_and_ess(stuck)[0])


def test_invariant_draws_do_not_see_a_relabelling():
    model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
    torch.manual_seed(0)
    draws = {name: torch.randn(2, 10, *shape) for name, shape in model.layer.site_shapes().items()}
    samples = {f"layer.{k}": v for k, v in draws.items()}
    samples["layer.rank_scale"] = samples["layer.rank_scale"].abs()
    samples["noise"] = torch.rand(2, 10, 2)
    perm = torch.tensor([2, 0, 1])
    relabelled = {
        k: v[..., perm] if k != "noise" and k != "layer.bias" else v for k, v in samples.items()
    }
    relabelled["layer.factor_0"] = -relabelled["layer.factor_0"]  # a sign flip in a pair
    relabelled["layer.out_factor"] = -relabelled["layer.out_factor"]
    a, b = invariant_draws(model, samples), invariant_draws(model, relabelled)
    assert set(a) == {
        "layer.rank_scale_sorted",
        "layer.relevance_sorted",
        "layer.effective_rank",
        "noise",
    }
    for key in a:
        torch.testing.assert_close(a[key], b[key])


class _Quadratic:
    """A potential ``x^T H x / 2`` over one site ``x``."""

    def __init__(self, hessian):
        self.hessian = hessian

    def potential(self, params):
        x = params["x"]
        return 0.5 * x @ self.hessian @ x


def _plain_inverse(hessian):
    evals, evecs = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    inverse = (evecs / evals.clamp(min=1.0)) @ evecs.T
    return 0.5 * (inverse + inverse.T)


@pytest.mark.parametrize("largest", [1e4, 1e10])
def test_laplace_metric_factors_where_curvatures_outrun_float32(largest):
    """Curvatures 1 .. 1e10 in float32: the plain inverse Hessian comes out indefinite by
    rounding (it crashed ``fit(guide="mcmc")`` in the chains' starts); the metric caps the
    largest curvatures until it factors. Curvatures float32 resolves (1 .. 1e4): the plain
    inverse, unchanged."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    curvatures = torch.logspace(0, math.log10(largest), 20, dtype=torch.float64)
    hessian = ((q * curvatures) @ q.T).float()
    plain = _plain_inverse(hessian)
    start = {"x": torch.zeros(20)}
    (cov,) = laplace_inverse_mass_matrix(_Quadratic(hessian), start).values()
    assert torch.linalg.cholesky_ex(cov).info == 0
    if largest < 1e5:
        torch.testing.assert_close(cov, plain)
        return
    assert torch.linalg.cholesky_ex(plain).info > 0  # what failed before
    torch.manual_seed(0)
    assert all(torch.isfinite(s["x"]).all() for s in chain_starts(start, {("x",): cov}, 4))
    assert torch.isfinite(Whitening(torch.zeros(20), cov).scale).all()


def test_chain_starts_are_laplace_draws_around_the_map():
    start = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.ones(2, 2, dtype=torch.float64)}
    cov = torch.diag(torch.tensor([1.0, 4.0, 9.0, 1e-4, 1e-4, 1e-4, 1e-4], dtype=torch.float64))
    torch.manual_seed(0)
    starts = chain_starts(start, {("a", "b"): cov}, 400)
    assert starts[0] is not start and all(torch.equal(starts[0][k], start[k]) for k in start)
    a = torch.stack([s["a"] for s in starts[1:]])
    want = torch.tensor([1.0, 2.0, 3.0], dtype=a.dtype)
    torch.testing.assert_close(a.std(0), want, rtol=0.15, atol=0)
    b = torch.stack([s["b"] for s in starts[1:]])
    assert b.shape == (399, 2, 2) and (b - 1).abs().max() < 0.1
    jittered = chain_starts(start, None, 400)
    spread = torch.stack([s["a"] for s in jittered[1:]]).std()
    assert abs(float(spread) - START_JITTER) < 0.02


@pytest.mark.slow
def test_collapsed_chains_start_apart_and_are_diagnosed_on_held_out_predictions():
    data = make_cp_regression((3, 4), 2, rank=1, num_data=80, noise=0.2, seed=0)
    train, test = data.split(60)
    res = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)),
        train.inputs,
        train.y,
        guide="nuts",
        num_samples=60,
        warmup_steps=60,
        num_chains=2,
        chain_method="sequential",
        init_steps=150,
        max_tree_depth=6,
        progress=False,
    )
    assert "Laplace" in res.info["chain_starts"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short chains
        diag = res.diagnostics(test.inputs)
    for key in (
        "layer.rank_scale_sorted",
        "layer.relevance_sorted",
        "layer.effective_rank",
        "noise",
        "predictive_mean",
    ):
        assert key in diag["r_hat"] and key in diag["ess"], key
    assert not any(k.startswith("layer.factor") for k in diag["r_hat"])
    assert diag["r_hat"]["predictive_mean"] < 1.2


def test_generic_nuts_classifier_reports_its_chain_starts():
    # 3 classes: the softmax path (a binary classifier takes the Polya-Gamma one)
    data = make_cp_classification((3, 2), 3, rank=1, num_data=60, seed=0)
    res = bf.fit(
        bf.Classifier(bf.CPFusion((3, 2), 3, max_rank=2)),
        data.inputs,
        data.y,
        guide="nuts",
        num_samples=10,
        warmup_steps=10,
        num_chains=2,
        chain_method="sequential",
        init_steps=50,
        progress=False,
    )
    assert "Laplace" in res.info["chain_starts"]
    assert res.info["class_contrasts"] == ["layer.bias", "layer.main_effects", "layer.out_factor"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        diag = res.diagnostics(data.inputs)
    assert "predictive_mean" in diag["ess"]
    chains = res.posterior_samples(group_by_chain=True)["layer.rank_scale"]
    assert chains.shape == (2, 10, 2) and not torch.equal(chains[0], chains[1])
