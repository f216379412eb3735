"""The binary classifier's Polya-Gamma path, float64 against a dense reconstruction: the
potential given omega from an N x N Gaussian, the Gibbs block's conditionals, the output sites
rebuilt from the chain's draws, the compiled potential following omega, and NUTS through it
on data with a known answer."""

import math
import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification
from bayes_fusion.infer.mcmc.convergence import r_hat_and_ess
from bayes_fusion.infer.mcmc.polya_gamma import COEF_SITE, PolyaGammaPotential, supports_polya_gamma
from tests.test_output_marginal import _dense_design

N = 40


def _problem(seed=0, main_effects=True, xox=False):
    torch.manual_seed(seed)
    if xox:
        layer = bf.XOXLinear(5, 2, genes=3).double()
        inputs = torch.randn(N, 5, dtype=torch.float64)
    else:
        layer = bf.CPFusion((3, 4), 2, max_rank=3, main_effects=main_effects).double()
        inputs = [torch.randn(N, 3, dtype=torch.float64), torch.randn(N, 4, dtype=torch.float64)]
    model = bf.Classifier(layer)
    y = torch.randint(0, 2, (N,))
    values = {
        k: v.double() + 0.3 * torch.randn_like(v.double()) for k, v in layer.init_values().items()
    }
    values[layer.site_name(layer.SCALE_SITE)] = torch.rand(3, dtype=torch.float64) + 0.2
    return model, inputs, y, values


def test_supports_only_full_batch_binary_classifiers():
    model, inputs, y, _ = _problem()
    assert supports_polya_gamma(model, (inputs, y))
    three = bf.Classifier(bf.CPFusion((3, 4), 3, max_rank=2))
    assert not supports_polya_gamma(three, (inputs, y))
    assert not supports_polya_gamma(
        bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=2)), (inputs, y.double())
    )
    assert not supports_polya_gamma(bf.Classifier(model.layer, num_data=1000), (inputs, y))
    with pytest.raises(ValueError, match="model: Polya-Gamma augmentation needs"):
        PolyaGammaPotential(three, (inputs, y))


@pytest.mark.parametrize("kind", ["cp_main_effects", "cp", "xox"])
def test_potential_given_omega_is_the_dense_gaussian_integral(kind):
    model, inputs, y, values = _problem(main_effects=kind == "cp_main_effects", xox=kind == "xox")
    layer = model.layer
    scale_site = layer.site_name(layer.SCALE_SITE)
    pot = PolyaGammaPotential(model, (inputs, y), {scale_site: torch.tensor([1.0, 0.0, 0.5])})
    pot.omega.copy_(torch.rand(N, dtype=torch.float64) + 0.05)
    params = pot.to_unconstrained(values)
    design, std = _dense_design(layer, values, inputs)
    # int exp(kappa' eta - eta' W eta / 2) N(d; 0, 2 diag s^2) dd, eta = D d, as the Gaussian
    # pseudo-observations z = kappa / omega with noise variance 1 / omega
    omega, kappa = pot.omega, y.double() - 0.5
    z = kappa / omega
    cov = 2 * design @ torch.diag(std**2) @ design.T + torch.diag(1 / omega)
    gauss = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov)
    log_lik = (
        gauss.log_prob(z)
        + 0.5 * (z * z * omega).sum()
        + 0.5 * N * math.log(2 * math.pi)
        - 0.5 * omega.log().sum()
    )
    zeros = {
        layer.site_name(s): torch.zeros(layer.site_shapes()[s], dtype=torch.float64)
        for s in layer.output_sites()
    }
    out_prior = 2 * torch.distributions.Normal(0, std).log_prob(torch.zeros_like(std)).sum()
    log_prior = layer.log_prior({**values, **zeros}) - out_prior
    _, log_det = pot._values_and_log_det(params)
    expected = -(log_prior + log_lik + log_det)
    torch.testing.assert_close(pot.potential(params), expected, rtol=1e-7, atol=1e-7)
    assert set(pot.marginalized) == {layer.site_name(s) for s in layer.output_sites()}
    assert pot.contrasts == {}


def test_gibbs_block_draws_its_gaussian_and_polya_gamma_conditionals():
    model, inputs, y, values = _problem(seed=1)
    pot = PolyaGammaPotential(model, (inputs, y))
    params = pot.to_unconstrained(values)
    omega = torch.rand(N, dtype=torch.float64) + 0.1
    design, std = _dense_design(model.layer, values, inputs)
    a = design * std * math.sqrt(2)
    prec = torch.eye(a.shape[1], dtype=torch.float64) + a.T @ (omega[:, None] * a)
    cov = torch.linalg.inv(prec)
    mean = cov @ a.T @ (y.double() - 0.5)
    draws, omegas = [], []
    torch.manual_seed(0)
    for _ in range(3000):
        pot.omega.copy_(omega)
        draws.append(pot.gibbs_update(params)[COEF_SITE])
        omegas.append((pot.omega.clone(), a @ draws[-1]))
    coef = torch.stack(draws)
    sem = cov.diagonal().sqrt() / len(draws) ** 0.5
    assert ((coef.mean(0) - mean).abs() <= 5 * sem).all()
    torch.testing.assert_close(torch.cov(coef.T), cov, rtol=0.15, atol=0.1 * float(cov.max()))
    # omega | eta ~ PG(1, eta): E[omega] = tanh(eta / 2) / (2 eta), given each draw's eta
    new, eta = (torch.stack(t) for t in zip(*omegas, strict=True))
    expected = torch.tanh(eta.abs() / 2) / (2 * eta.abs())
    resid = (new - expected).mean()
    assert abs(float(resid)) < 5 * float((new - expected).std()) / new.numel() ** 0.5


def test_start_sets_omega_at_the_fixed_point():
    model, inputs, y, values = _problem(seed=2)
    pot = PolyaGammaPotential(model, (inputs, y))
    params = pot.to_unconstrained(values)
    pot.gibbs_init(params)
    design = pot._design(pot.constrain(params))[0]
    eta = (design @ pot._conditional(design)[0]).abs()
    torch.testing.assert_close(pot.omega, torch.tanh(eta / 2) / (2 * eta), rtol=1e-3, atol=1e-4)


def test_complete_rebuilds_both_classes_rows():
    model, inputs, y, values = _problem(seed=3)
    pot = PolyaGammaPotential(model, (inputs, y))
    rest = {k: v for k, v in values.items() if k not in pot.marginalized}
    draws = 4000
    coef = torch.randn(pot.unit_rows["bias"].shape[0], dtype=torch.float64)
    batch = {k: v.expand((draws,) + v.shape) for k, v in rest.items()}
    torch.manual_seed(0)
    out = pot.complete({**batch, COEF_SITE: coef.expand(draws, -1)})
    assert COEF_SITE not in out
    std = pot.output_stds(values)[0]
    flat = torch.cat([out[name].reshape(draws, 2, -1) for name in pot.marginalized], -1)
    torch.testing.assert_close(
        flat[:, 1] - flat[:, 0], (std * math.sqrt(2) * coef).expand(draws, -1)
    )
    half_sum = (flat[:, 1] + flat[:, 0]) / 2  # the class mean: its prior N(0, s^2 / 2)
    torch.testing.assert_close(half_sum.std(0), std / math.sqrt(2), rtol=0.1, atol=0.0)


def test_compiled_potential_follows_omega():
    model, inputs, y, values = _problem(seed=4)
    eager = PolyaGammaPotential(model, (inputs, y))
    compiled = PolyaGammaPotential(model, (inputs, y), compile=True)
    params = {k: v.requires_grad_() for k, v in eager.to_unconstrained(values).items()}
    for k in range(3):
        omega = torch.rand(N, dtype=torch.float64) + 0.1 * (k + 1)
        eager.omega.copy_(omega)
        compiled.omega.copy_(omega)
        want, got = eager(params), compiled(params)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        grads = [torch.autograd.grad(f, list(params.values())) for f in (got, want)]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert compiled.report()["compiled_potential"] is True


@pytest.mark.slow
def test_nuts_on_a_binary_classifier_recovers_the_labels_and_the_rank():
    data = make_cp_classification((4, 3), 2, rank=2, num_data=400, seed=0)
    train, test = data.split(300)
    model = bf.Classifier(bf.CPFusion((4, 3), 2, max_rank=3))
    options = dict(num_samples=80, warmup_steps=80, init_steps=500, max_tree_depth=6)
    res = bf.fit(
        model, train.inputs, train.y, guide="nuts", num_chains=2, progress=False, seed=0, **options
    )
    assert res.info["polya_gamma"] is True
    assert res.info["marginalized"] == ["layer.bias", "layer.main_effects", "layer.out_factor"]
    assert res.mcmc_samples["layer.out_factor"].shape == (2, 80, 2, 3)
    probs = res.predict(test.inputs)["mean"]
    accuracy = float((probs.argmax(-1) == test.y).double().mean())
    assert accuracy >= 0.8
    rank = bf.rank_posterior(res)["layer"]
    assert float(rank.probs[2:].sum()) >= 0.8, rank.table()  # the true rank 2, or 3


def test_marginalize_option_switches_the_augmentation():
    data = make_cp_classification((3, 2), 2, rank=1, num_data=50, seed=1)
    model = bf.Classifier(bf.CPFusion((3, 2), 2, max_rank=2))
    runs = {}
    for option in (True, False):
        runs[option] = bf.fit(
            model,
            data.inputs,
            data.y,
            guide="nuts",
            num_samples=3,
            warmup_steps=3,
            init_steps=30,
            marginalize=option,
            progress=False,
        )
    assert runs[True].info["polya_gamma"] is True and runs[True].info["class_contrasts"] == []
    assert runs[False].info["polya_gamma"] is False and runs[False].info["marginalized"] == []
    assert runs[False].info["class_contrasts"] == [
        "layer.bias",
        "layer.main_effects",
        "layer.out_factor",
    ]
    assert runs[True].mcmc_samples["layer.out_factor"].shape == (1, 3, 2, 2)


@pytest.mark.slow
def test_gibbs_chain_and_plain_nuts_agree_on_a_small_posterior():
    # the Polya-Gamma sweep must leave the model's own posterior invariant: on a problem small
    # enough for NUTS on every site to mix, both give the same predictive probabilities, up to
    # Monte Carlo error (standard errors from each point's ESS)
    data = make_cp_classification((2, 3), 2, rank=1, num_data=80, seed=3)
    train, test = data.split(60)
    means, errors = {}, {}
    for option in (True, False):
        model = bf.Classifier(bf.CPFusion((2, 3), 2, max_rank=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # short chains may warn
            res = bf.fit(
                model,
                train.inputs,
                train.y,
                guide="nuts",
                num_samples=200,
                warmup_steps=150,
                num_chains=2,
                progress=False,
                seed=1,
                init_steps=300,
                marginalize=option,
                max_tree_depth=6,
            )
        assert res.info["polya_gamma"] is option
        draws = res.predict(test.inputs, return_samples=True)["mean_samples"][..., 1]
        chains = draws.reshape(2, 200, -1)
        ess = torch.tensor([r_hat_and_ess(chains[..., j])[1] for j in range(draws.shape[-1])])
        means[option], errors[option] = draws.mean(0), draws.std(0) / ess.sqrt()
    z = (means[True] - means[False]) / (errors[True] ** 2 + errors[False] ** 2).sqrt()
    assert float(z.abs().max()) < 4.5, z
    assert float((means[True] - means[False]).abs().mean()) < 0.02


def test_polya_gamma_path_non_centres_every_component_unless_asked_not_to():
    data = make_cp_classification((3, 2), 2, rank=1, num_data=50, seed=2)
    for reparam, expected in ((True, [0.0, 0.0]), (False, [1.0, 1.0])):
        model = bf.Classifier(bf.CPFusion((3, 2), 2, max_rank=2))
        res = bf.fit(
            model,
            data.inputs,
            data.y,
            guide="nuts",
            num_samples=3,
            warmup_steps=3,
            init_steps=30,
            reparam=reparam,
            progress=False,
        )
        assert res.info["polya_gamma"] is True
        assert res.info["centered_components"] == {"layer.rank_scale": expected}
