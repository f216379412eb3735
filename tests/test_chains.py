"""Running NUTS chains (bayes_fusion.infer.mcmc.chains): Pyro's NUTS sees one flat site, and the
draws come back per site -- exactly the potential of the dict, its gradient, its metric, and
draws from a known posterior."""

import functools
import math

import pytest
import torch

from bayes_fusion.infer.mcmc.chains import run_chain, run_chains
from bayes_fusion.infer.mcmc.potential import FlatPotential, flatten_params

# a correlated Gaussian over two sites of different shapes: a (2, 3) and b (2,), 8 entries
DIM = 8


def _quadratic(mean, precision, params):  # sorted-name order: a's entries, then b's
    x = torch.cat([params["a"].reshape(-1), params["b"]]) - mean
    return 0.5 * x @ precision @ x


def _gaussian():
    gen = torch.Generator().manual_seed(0)
    root = torch.randn(DIM, DIM, generator=gen, dtype=torch.float64) / math.sqrt(DIM)
    cov = root @ root.T + 0.2 * torch.eye(DIM, dtype=torch.float64)
    mean = torch.linspace(-1.0, 2.0, DIM, dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    potential = functools.partial(_quadratic, mean, precision)  # picklable: worker processes
    like = {"b": torch.zeros(2, dtype=torch.float64), "a": torch.zeros(2, 3, dtype=torch.float64)}
    return potential, like, mean, cov


def test_unflatten_keeps_leading_dims():
    params = {"b": torch.arange(2.0), "a": torch.arange(6.0).reshape(2, 3) + 10}
    flat, unflatten = flatten_params(params)
    assert torch.equal(flat, torch.tensor([10.0, 11, 12, 13, 14, 15, 0, 1]))
    draws = torch.stack([flat, 2 * flat, 3 * flat]).reshape(3, 1, DIM)
    back = unflatten(draws)
    assert back["a"].shape == (3, 1, 2, 3) and back["b"].shape == (3, 1, 2)
    assert torch.equal(back["a"][2, 0], 3 * params["a"])
    assert torch.equal(back["b"][1, 0], 2 * params["b"])


def test_flat_potential_is_the_dict_potential_with_the_same_gradient():
    potential, like, _, _ = _gaussian()
    flat = FlatPotential(potential, like)
    point = {k: torch.randn_like(v) for k, v in like.items()}
    z = flatten_params(point)[0].requires_grad_(True)
    value = flat({FlatPotential.SITE: z})
    (grad,) = torch.autograd.grad(value, z)
    leaves = {k: v.clone().requires_grad_(True) for k, v in point.items()}
    expected = potential(leaves)
    grads = torch.autograd.grad(expected, [leaves["a"], leaves["b"]])
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, torch.cat([grads[0].reshape(-1), grads[1]]))
    assert torch.equal(flat.start, torch.zeros(DIM, dtype=torch.float64))


def test_flat_potential_rekeys_the_dense_metric_and_refuses_other_blocks():
    potential, like, _, cov = _gaussian()
    flat = FlatPotential(potential, like)
    assert flat.metric(None) is None
    rekeyed = flat.metric({("a", "b"): cov})
    assert list(rekeyed) == [(FlatPotential.SITE,)] and rekeyed[(FlatPotential.SITE,)] is cov
    with pytest.raises(ValueError, match=r"initial_inverse_mass_matrix: .*\('a', 'b'\)"):
        flat.metric({("a",): cov[:6, :6], ("b",): cov[6:, 6:]})


def test_a_chain_draws_a_known_gaussian_per_site():
    potential, like, mean, cov = _gaussian()
    settings = {"max_tree_depth": 6, "target_accept_prob": 0.8, "full_mass": True}
    samples, divergences, stats, report = run_chain(potential, like, 1500, 300, 0, settings)
    assert report == {} and divergences == []
    assert all(len(v) == 1500 for v in stats.values())
    assert samples["a"].shape == (1500, 2, 3) and samples["b"].shape == (1500, 2)
    flat = torch.cat([samples["a"].reshape(1500, -1), samples["b"]], -1)
    # whitened by the true moments the draws are standard normal: NUTS on a Gaussian gives
    # nearly independent draws, so the sample mean is within ~5 standard errors (1 / sqrt(1500)
    # = 0.026) of 0, and the sample covariance within ~5 of its (0.026-0.037) of I
    white = torch.linalg.solve_triangular(
        torch.linalg.cholesky(cov), (flat - mean).T, upper=False
    ).T
    assert float(white.mean(0).abs().max()) < 0.12, white.mean(0)
    identity = torch.eye(DIM, dtype=torch.float64)
    assert float((torch.cov(white.T) - identity).abs().max()) < 0.2, torch.cov(white.T)


def test_flat_potential_evaluates_many_chains_in_one_batched_call():
    """The potential protocol: value and gradient at (chains, D) points in one call, equal to
    the one-point potential and its autograd gradient at every chain; a potential that cannot
    be batched (Python control flow on values) falls back to a loop and says why."""
    potential, like, _, _ = _gaussian()
    flat = FlatPotential(potential, like)
    z = torch.randn(3, 4, DIM, dtype=torch.float64)  # leading (3, 4) chain dims
    value, grad = flat.value_and_grad(z)
    assert value.shape == (3, 4) and grad.shape == (3, 4, DIM)
    assert flat.batched is True
    for index in [(0, 0), (2, 3), (1, 2)]:
        point = z[index].clone().requires_grad_(True)
        expected = flat({FlatPotential.SITE: point})
        (expected_grad,) = torch.autograd.grad(expected, point)
        torch.testing.assert_close(value[index], expected)
        torch.testing.assert_close(grad[index], expected_grad)

    def branching(params):  # data-dependent Python branch: vmap cannot trace it
        x = params["a"].sum() + params["b"].sum()
        return x**2 if float(x) > 0 else -x

    looped = FlatPotential(branching, like)
    value, grad = looped.value_and_grad(z)
    assert isinstance(looped.batched, str) and value.shape == (3, 4)
    point = z[1, 1]
    torch.testing.assert_close(value[1, 1], branching(looped.unflatten(point)))


def test_chains_in_worker_processes_show_their_iterations(tmp_path, capfd):
    """Each worker keeps its iteration count in a file; the parent's one bar sums them."""
    potential, like, _, _ = _gaussian()
    settings = {"max_tree_depth": 4, "target_accept_prob": 0.8, "full_mass": False}
    count = tmp_path / "count"
    run_chain(potential, like, 30, 20, 0, settings, progress_path=str(count))
    assert count.read_text() == "50"
    run = run_chains(
        potential, [like, like], 30, 20, [0, 1], settings, parallel=True, progress=True
    )
    assert run.samples["a"].shape[:2] == (2, 30)
    err = capfd.readouterr().err
    assert "NUTS chains" in err and "100/100" in err
