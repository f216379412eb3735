"""The Gaussian regression's potential with the output sites integrated out, float64 against a
dense reconstruction: the marginal likelihood from the full covariance, the output sites'
conditional from the Gaussian formula (NUTS through it on a known answer:
tests/test_generic_nuts.py, the XOX regression; tests/test_marginal.py, the CP regression)."""

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.infer.mcmc import linear_gaussian
from bayes_fusion.infer.mcmc.output_marginal import (
    NonConjugateError,
    OutputMarginal,
    supports_output_marginal,
)

N = 30


def _model(kind: str):
    if kind == "xox":
        return bf.Regressor(bf.XOXLinear(5, 3, genes=3)), torch.randn(N, 5, dtype=torch.float64)
    layer = bf.CPFusion((3, 4), 2, max_rank=3, main_effects=kind == "cp_main_effects")
    inputs = [torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 4, dtype=torch.float64)]
    return bf.Regressor(layer), inputs


def _point(model, seed=0):
    """A random point of every site (float64) and targets."""
    torch.manual_seed(seed)
    layer = model.layer.double()
    values = {
        k: v.double() + 0.3 * torch.randn_like(v.double()) for k, v in layer.init_values().items()
    }
    values[layer.site_name(layer.SCALE_SITE)] = torch.rand(layer.rank, dtype=torch.float64) + 0.2
    values["noise"] = torch.rand(layer.out_features, dtype=torch.float64) + 0.3
    return values


def _dense_design(layer, values, inputs):
    """``D`` (N, K) by autograd: the Jacobian of output 0 w.r.t. row 0 of every output site
    (the other rows held at 0), and the prior stds of those entries."""
    shapes = layer.site_shapes()
    outs = layer.output_sites()
    sizes = [torch.Size(shapes[s][1:]).numel() for s in outs]
    rest = {s: v for s, v in layer.short_values(values).items() if s not in outs}

    def first_output(w):
        pieces, start = {}, 0
        for short, size in zip(outs, sizes, strict=True):
            row = w[start : start + size].reshape(shapes[short][1:])
            full = torch.zeros(shapes[short], dtype=w.dtype)
            full[0] = row
            pieces[short] = full
            start += size
        return layer.apply({**rest, **pieces}, inputs)[:, 0]

    design = torch.autograd.functional.jacobian(first_output, torch.zeros(sum(sizes)).double())
    lam = values[layer.site_name(layer.SCALE_SITE)] + layer.scale_floor
    stds = {"out_factor": lam, "x_out": lam, "bias": layer.bias_scale.reshape(1)}
    if "main_effects" in outs:
        stds["main_effects"] = layer.main_effects_scale.expand(sum(layer.in_features))
    return design, torch.cat([stds[s].double() for s in outs])


@pytest.mark.parametrize("kind", ["xox", "cp", "cp_main_effects"])
def test_potential_is_the_dense_marginal(kind):
    model, inputs = _model(kind)
    layer = model.layer.double()
    values = _point(model)
    y = torch.randn(N, layer.out_features, dtype=torch.float64)
    scale_site = layer.site_name(layer.SCALE_SITE)
    centered = {scale_site: torch.tensor([1.0, 0.0, 0.5])}
    pot = OutputMarginal(model, (inputs, y), centered)
    params = pot.to_unconstrained(values)
    design, std = _dense_design(layer, values, inputs)
    cov = design @ torch.diag(std**2) @ design.T
    log_lik = sum(
        torch.distributions.MultivariateNormal(
            torch.zeros(N, dtype=torch.float64), cov + values["noise"][o] ** 2 * torch.eye(N)
        ).log_prob(y[:, o])
        for o in range(layer.out_features)
    )
    # the other sites' prior: the layer's whole prior less the output sites' (at zero)
    zeros = {
        layer.site_name(s): torch.zeros(layer.site_shapes()[s], dtype=torch.float64)
        for s in layer.output_sites()
    }
    rows = layer.out_features
    out_prior = rows * torch.distributions.Normal(0, std).log_prob(torch.zeros_like(std)).sum()
    log_prior = layer.log_prior({**values, **zeros}) - out_prior
    log_prior = log_prior + model._noise_prior(rows, torch.float64).log_prob(values["noise"])
    _, log_det = pot._values_and_log_det(params)
    expected = -(log_prior + log_lik + log_det)
    torch.testing.assert_close(pot.potential(params), expected, rtol=1e-7, atol=1e-7)
    assert set(pot.marginalized) == {layer.site_name(s) for s in layer.output_sites()}
    assert not set(pot.marginalized) & {p.removesuffix("_decentered") for p in params}


def test_complete_draws_the_output_sites_from_their_conditional():
    model, inputs = _model("xox")
    layer = model.layer.double()
    values = _point(model, seed=1)
    y = torch.randn(N, layer.out_features, dtype=torch.float64)
    pot = OutputMarginal(model, (inputs, y))
    rest = {k: v for k, v in values.items() if k not in pot.marginalized}
    draws = 3000
    batch = {k: v.expand((draws,) + v.shape) for k, v in rest.items()}
    torch.manual_seed(0)
    out = pot.complete(batch)
    design, std = _dense_design(layer, values, inputs)
    mean, chol, var = linear_gaussian.conditional_mean(design * std, y, values["noise"])
    coef = torch.cat([out["layer.x_out"], out["layer.bias"].unsqueeze(-1)], -1) / std
    sem = (var.sqrt().unsqueeze(-1) * torch.linalg.inv(chol).norm(dim=-2)) / draws**0.5
    assert ((coef.mean(0) - mean).abs() <= 5 * sem).all()
    cov = torch.cholesky_inverse(chol) * var[:, None, None]
    emp = torch.stack([torch.cov(coef[:, o].T) for o in range(layer.out_features)])
    torch.testing.assert_close(emp, cov, rtol=0.15, atol=0.1 * float(cov.abs().max()))
    assert out["layer.x_out"].shape == (draws, 3, 3)


def test_linear_gaussian_marginal_matches_the_dense_normal():
    torch.manual_seed(2)
    a = torch.randn(3, N, 4, dtype=torch.float64)  # batch of 3 designs
    y = torch.randn(N, 2, dtype=torch.float64)
    noise = torch.rand(3, 2, dtype=torch.float64) + 0.1
    got = linear_gaussian.log_marginal_likelihood(a, y, noise)
    for b in range(3):
        want = sum(
            torch.distributions.MultivariateNormal(
                torch.zeros(N, dtype=torch.float64),
                a[b] @ a[b].T + noise[b, o] ** 2 * torch.eye(N, dtype=torch.float64),
            ).log_prob(y[:, o])
            for o in range(2)
        )
        torch.testing.assert_close(got[b], want)


class _TanhXOX(bf.XOXLinear):
    """A custom layer whose output is not linear in its output sites."""

    def forward(self, x):
        return super().forward(x)

    def apply(self, values, x):
        return torch.tanh(super().apply(values, x))

    def site_priors(self, values):
        return super().site_priors(values)


def test_nonlinear_layers_keep_their_output_sites():
    model = bf.Regressor(_TanhXOX(4, 2, genes=2))
    x, y = torch.randn(20, 4), torch.randn(20, 2)
    assert supports_output_marginal(model, (x, y))
    with pytest.raises(NonConjugateError, match="not linear in its output sites"):
        OutputMarginal(model, (x, y))
    res = bf.fit(
        model,
        x,
        y,
        guide="nuts",
        num_samples=3,
        warmup_steps=3,
        init_steps=20,
        progress=False,
        chain_method="sequential",
    )
    assert res.info["marginalized"] == []
    with pytest.raises(NonConjugateError):
        bf.fit(
            model,
            x,
            y,
            guide="nuts",
            num_samples=3,
            warmup_steps=3,
            init_steps=20,
            progress=False,
            marginalize=True,
        )
    assert not supports_output_marginal(bf.Classifier(bf.XOXLinear(4, 2, genes=2)), (x, y))
    assert not supports_output_marginal(bf.Regressor(bf.XOXLinear(4, 2, genes=2), 40), (x, y))


def test_cp_regression_is_supported_on_full_batches_only():
    x = [torch.randn(N, 3), torch.randn(N, 4)]
    y = torch.randn(N, 2)
    assert supports_output_marginal(bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=2)), (x, y))
    minibatched = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=2), num_data=10 * N)
    assert not supports_output_marginal(minibatched, (x, y))
