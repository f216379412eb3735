"""The generic NUTS path's potential (bayes_fusion.infer.mcmc.potential), float64: its density is
the model's own (Pyro trace) log density times the Jacobian of its coordinates, computed here
independently by autograd; a Classifier's class means integrate out exactly."""

import math

import pytest
import torch
from pyro import poutine

import bayes_fusion as bf
from bayes_fusion.infer.mcmc.potential import ModelPotential, contrast_basis, flatten_params


def _trace_log_joint(model, args, values):
    conditioned = poutine.condition(model, data=values)
    return poutine.trace(conditioned).get_trace(*args).log_prob_sum()


def _random_point(potential, generator):
    start = potential.to_unconstrained(potential.init_values)
    return {
        k: v + 0.3 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in start.items()
    }


def _models():
    torch.manual_seed(0)
    cp_in = [torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)]
    x = torch.randn(12, 4, dtype=torch.float64)
    return {
        "regressor(xox)": (
            bf.Regressor(bf.XOXLinear(4, 2, genes=2)).double(),
            (x, torch.randn(12, 2, dtype=torch.float64)),
        ),
        "regressor(cp)": (
            bf.Regressor(bf.CPFusion((3, 2), 2, max_rank=2)).double(),
            (cp_in, torch.randn(12, 2, dtype=torch.float64)),
        ),
    }


@pytest.mark.parametrize("name", ["regressor(xox)", "regressor(cp)"])
@pytest.mark.parametrize("centered", [0.0, 1.0, 0.5])
def test_potential_is_the_model_density_times_the_jacobian(name, centered):
    model, args = _models()[name]
    scale_site = "layer.rank_scale"
    potential = ModelPotential(model, args, {scale_site: torch.tensor([centered, 1.0])})
    gen = torch.Generator().manual_seed(1)
    params = _random_point(potential, gen)
    flat, unflatten = flatten_params(params)
    names = sorted(potential.sites)

    def constrained(f):
        values = potential.constrain(unflatten(f))
        return torch.cat([values[n].reshape(-1) for n in names])

    jac = torch.autograd.functional.jacobian(constrained, flat)
    log_det = torch.linalg.slogdet(jac)[1]
    values = potential.constrain(params)
    want = _trace_log_joint(model, args, values) + log_det
    torch.testing.assert_close(-potential(params), want)
    # and the coordinates round-trip
    back = potential.to_unconstrained(values)
    for k in params:
        torch.testing.assert_close(back[k], params[k])


@pytest.mark.parametrize("classes", [2, 3])
def test_classifier_class_means_integrate_out_exactly(classes):
    """p(contrasts) = p(contrasts, m) / N(m; 0, std) for any class mean m: the likelihood
    ignores m and the prior splits into independent Gaussians along an orthonormal basis."""
    torch.manual_seed(0)
    inputs = [torch.randn(15, 3, dtype=torch.float64), torch.randn(15, 2, dtype=torch.float64)]
    y = torch.randint(0, classes, (15,))
    model = bf.Classifier(bf.CPFusion((3, 2), classes, max_rank=2)).double()
    potential = ModelPotential(model, (inputs, y), {"layer.rank_scale": torch.tensor([1.0, 0.0])})
    assert set(potential.contrasts) == {"layer.out_factor", "layer.bias", "layer.main_effects"}
    gen = torch.Generator().manual_seed(2)
    params = _random_point(potential, gen)
    flat, unflatten = flatten_params(params)
    sites = sorted(potential.sites)
    mean_shapes = {
        n: potential.init_values[n].select(-potential.contrasts[n], 0).shape
        for n in sorted(potential.contrasts)
    }
    means = {
        n: torch.randn(sh, generator=gen, dtype=torch.float64) for n, sh in mean_shapes.items()
    }
    m_flat = torch.cat([m.reshape(-1) for m in means.values()])

    def split_means(m):
        out, at = {}, 0
        for n, sh in mean_shapes.items():
            out[n] = m[at : at + sh.numel()].reshape(sh)
            at += sh.numel()
        return out

    def full_values(f, m):
        values = potential.constrain(unflatten(f))
        for n, mean in split_means(m).items():
            values[n] = values[n] + mean.unsqueeze(-potential.contrasts[n]) / math.sqrt(classes)
        return values

    def flat_values(both):
        values = full_values(both[: flat.numel()], both[flat.numel() :])
        return torch.cat([values[n].reshape(-1) for n in sites])

    both = torch.cat([flat, m_flat])
    log_det = torch.linalg.slogdet(torch.autograd.functional.jacobian(flat_values, both))[1]
    values = full_values(flat, m_flat)
    stds = potential._class_mean_std(values)
    log_m = sum(
        torch.distributions.Normal(0.0, stds[n].expand(mean_shapes[n])).log_prob(means[n]).sum()
        for n in mean_shapes
    )
    want = _trace_log_joint(model, (inputs, y), values) + log_det - log_m
    torch.testing.assert_close(-potential(params), want)
    # the logits do not see the class means that complete() draws
    done = potential.complete(potential.constrain(params))
    layer = model.layer
    a = layer.apply(layer.short_values(potential.constrain(params)), inputs).softmax(-1)
    b = layer.apply(layer.short_values(done), inputs).softmax(-1)
    torch.testing.assert_close(a, b)


def test_contrast_basis_is_orthonormal_and_sums_to_zero():
    for classes in (2, 3, 5):
        h = contrast_basis(classes, torch.float64)
        assert h.shape == (classes, classes - 1)
        torch.testing.assert_close(h.T @ h, torch.eye(classes - 1, dtype=torch.float64))
        torch.testing.assert_close(h.sum(0), torch.zeros(classes - 1, dtype=torch.float64))
