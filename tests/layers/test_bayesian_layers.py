import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta, AutoNormal

import bayes_fusion as bf
from bayes_fusion.ops import cp_dense_fusion, cp_to_dense, xox_to_dense

D = torch.float64


def _inputs(sizes, batch=5, dtype=torch.float32):
    return [torch.randn(batch, d, dtype=dtype) for d in sizes]


def test_cpfusion_sites_and_priors():
    layer = bf.CPFusion((3, 4, 2), out_features=2, max_rank=6, eta=0.5)
    tr = poutine.trace(layer).get_trace(_inputs((3, 4, 2)))
    sites = [n for n, s in tr.nodes.items() if s["type"] == "sample"]
    assert sites == ["rank_scale", "factor_0", "factor_1", "factor_2", "out_factor", "bias"]
    lam = tr.nodes["rank_scale"]
    assert isinstance(lam["fn"].base_dist, dist.HalfCauchy)
    assert (lam["fn"].base_dist.scale == 0.5).all()
    assert lam["value"].shape == (6,)
    f0 = tr.nodes["factor_0"]
    assert f0["value"].shape == (4, 6)
    assert isinstance(f0["fn"].base_dist, dist.Normal)
    # column r of every factor has std lambda_r + eps
    expected = (lam["value"] + layer.scale_floor).expand(4, 6)
    torch.testing.assert_close(f0["fn"].base_dist.scale, expected)
    torch.testing.assert_close(f0["fn"].base_dist.loc, torch.zeros(4, 6))
    assert tr.nodes["out_factor"]["value"].shape == (2, 6)
    assert isinstance(tr.nodes["bias"]["fn"].base_dist, dist.Normal)
    assert set(layer.site_names().values()) == set(sites)


def test_site_names_are_prefixed_inside_a_model():
    class Model(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.fusion = bf.CPFusion((2, 3), 1, 3, bias=False)

        def forward(self, xs):
            return self.fusion(xs)

    tr = poutine.trace(Model()).get_trace(_inputs((2, 3)))
    assert [n for n, s in tr.nodes.items() if s["type"] == "sample"] == [
        "fusion.rank_scale",
        "fusion.factor_0",
        "fusion.factor_1",
        "fusion.out_factor",
    ]


def test_log_uniform_prior_option():
    layer = bf.CPFusion((2, 3), 1, 3, rank_prior="log_uniform")
    tr = poutine.trace(layer).get_trace(_inputs((2, 3)))
    lam = tr.nodes["rank_scale"]["value"]
    assert (lam > 0).all()
    assert torch.isfinite(tr.log_prob_sum())


def test_xox_sites_and_priors():
    layer = bf.XOXLinear(7, 5, genes=3)
    tr = poutine.trace(layer).get_trace(torch.randn(4, 7))
    sites = {n: s for n, s in tr.nodes.items() if s["type"] == "sample"}
    assert list(sites) == ["rank_scale", "x_in", "core", "x_out", "bias"]
    assert sites["x_in"]["value"].shape == (7, 3)
    assert sites["core"]["value"].shape == (3, 3)
    assert sites["x_out"]["value"].shape == (5, 3)
    lam = sites["rank_scale"]["value"]
    torch.testing.assert_close(
        sites["x_out"]["fn"].base_dist.scale, (lam + layer.scale_floor).expand(5, 3)
    )
    root = (lam + layer.scale_floor).sqrt()
    torch.testing.assert_close(sites["core"]["fn"].base_dist.scale, root[:, None] * root[None])


@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("sizes", [(3, 4), (2, 3, 4), (2, 2, 3, 2)])
def test_cpfusion_equals_dense_reconstruction(sizes, append_one):
    layer = bf.CPFusion(sizes, 3, 4, append_one=append_one).to(D)
    xs = _inputs(sizes, dtype=D)
    tr = poutine.trace(layer).get_trace(xs)
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    dense = cp_to_dense([v[f"factor_{m}"] for m in range(len(sizes))], v["out_factor"])
    want = cp_dense_fusion(xs, dense, v["bias"], append_one)
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("order", ["factored", "dense", "auto"])
def test_xox_equals_dense_reconstruction(order):
    layer = bf.XOXLinear(6, 4, 3, order=order).to(D)
    x = torch.randn(5, 6, dtype=D)
    tr = poutine.trace(layer).get_trace(x)
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    w = xox_to_dense(v["x_in"], v["core"], v["x_out"], layer.output_scale)
    torch.testing.assert_close(
        tr.nodes["_RETURN"]["value"], x @ w.T + v["bias"], atol=1e-10, rtol=1e-10
    )


def test_particle_dims_under_vectorized_plate_match_per_particle():
    layer = bf.CPFusion((3, 2), 2, 4).to(D)
    xs = _inputs((3, 2), dtype=D)
    with pyro.plate("particles", 7, dim=-2):
        tr = poutine.trace(layer).get_trace(xs)
    out = tr.nodes["_RETURN"]["value"]
    assert out.shape == (7, 5, 2)
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    for s in range(7):
        one = poutine.condition(layer, {k: val[s, 0] for k, val in v.items()})(xs)
        torch.testing.assert_close(out[s], one, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: bf.CPFusion((3, 2), 2, 4),
        lambda: bf.XOXLinear(5, 2, 3),
    ],
)
def test_predictive_parallel_has_leading_sample_dim(make):
    layer = make()
    args = (_inputs((3, 2)),) if isinstance(layer, bf.CPFusion) else (torch.randn(5, 5),)
    out = Predictive(layer, num_samples=9, parallel=True, return_sites=["_RETURN"])(*args)
    assert out["_RETURN"].shape == (9, 5, 2)


@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoDelta])
@pytest.mark.parametrize(
    "make",
    [
        lambda: bf.CPFusion((3, 2), 2, 4),
        lambda: bf.XOXLinear(5, 2, 3),
    ],
)
def test_autoguides_build_and_step(guide_cls, make):
    layer = make()
    args = (_inputs((3, 2)),) if isinstance(layer, bf.CPFusion) else (torch.randn(5, 5),)

    def model(*a):
        pred = layer(*a)
        with pyro.plate("data", pred.shape[-2]):
            pyro.sample("obs", dist.Normal(pred, 1.0).to_event(1), obs=torch.zeros(5, 2))

    guide = guide_cls(model)
    svi = pyro.infer.SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.01}),
        pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True),
    )
    losses = [svi.step(*args) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    latent = {n for n in guide(*args)}
    assert latent == set(layer.site_names().values())


def test_layers_move_dtype_with_to():
    layer = bf.CPFusion((2, 3), 1, 3).to(D)
    assert layer.rank_prior.eta.dtype == D and layer.scale_floor.dtype == D
    out = layer(_inputs((2, 3), dtype=D))
    assert out.dtype == D
    xox = bf.XOXLinear(4, 2, 2).to(D)
    assert xox(torch.randn(3, 4, dtype=D)).dtype == D


def test_missing_modality_is_exact_predictive_mean():
    """With append-one, None == E over a standardized independent modality (MC check)."""
    layer = bf.CPFusion((3, 4, 2), 2, 5).to(D)
    x1, x3 = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    tr = poutine.trace(layer).get_trace([x1, torch.zeros(6, 4, dtype=D), x3])
    values = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    fixed = poutine.condition(layer, values)
    got = fixed([x1, None, x3])
    n = 20000
    # independent, standardized (zero-mean, unit-variance, non-Gaussian) second modality
    x2 = (torch.rand(n, 6, 4, dtype=D) - 0.5) * 12**0.5
    outs = fixed([x1.expand(n, 6, 3), x2, x3.expand(n, 6, 2)])
    mc_mean, mc_se = outs.mean(0), outs.std(0) / n**0.5
    assert ((got - mc_mean).abs() < 5 * mc_se + 1e-12).all()
    # and it is not trivially equal to something else: the spread is real
    assert (mc_se > 0).all()
