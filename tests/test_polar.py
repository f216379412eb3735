"""Factor columns in polar coordinates (log norm, unnormalized direction) on the generic NUTS
path: an exact change of variables, checked in float64."""

import math

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification
from bayes_fusion.infer.potential import (
    DECENTERED,
    DIRECTION,
    LOG_NORM,
    ModelPotential,
    _from_polar,
)


class PolarPotential(ModelPotential):
    POLAR = True


def _classifier_point(classes):
    data = make_cp_classification((3, 2), classes, rank=1, num_data=40, seed=0)
    model = bf.Classifier(bf.CPFusion((3, 2), classes, max_rank=2)).double()
    inputs = [x.double() for x in data.inputs]
    torch.manual_seed(0)
    start = ModelPotential(model, (inputs, data.y)).init_values
    values = {k: torch.randn_like(v) if "factor" in k else v for k, v in start.items()}
    values["layer.rank_scale"] = torch.tensor([1.3, 0.2], dtype=torch.float64)
    return model, (inputs, data.y), values


@pytest.mark.parametrize("classes", [2, 3])
def test_polar_potential_is_the_potential_plus_the_change_of_variables(classes):
    model, args, values = _classifier_point(classes)
    centered = {"layer.rank_scale": torch.tensor([1.0, 0.0])}
    plain, polar = ModelPotential(model, args, centered), PolarPotential(model, args, centered)
    z, u = plain.to_unconstrained(values), polar.to_unconstrained(values)
    # every factor column with 2+ rows in polar coordinates; a one-row contrast (the binary
    # output factor: a sign, no direction) keeps its plain coordinate
    polar_sites = {n for n in polar.scaled if z[n + DECENTERED].shape[-2] >= 2}
    assert {n for n in polar.scaled if n + LOG_NORM in u} == polar_sites
    assert ("layer.out_factor" in polar_sites) is (classes > 2)
    # the same point: the same values, and the potential differs by -d log|z| + |v|^2 / 2
    for name, value in polar.constrain(u).items():
        torch.testing.assert_close(value, plain.constrain(z)[name])
    change = sum(
        -u[n + DIRECTION].shape[-2] * u[n + LOG_NORM].sum() + 0.5 * u[n + DIRECTION].pow(2).sum()
        for n in polar_sites
    )
    torch.testing.assert_close(polar(u), plain(z) + change)
    # away from the start too: a random point of the polar coordinates
    moved = {k: v + 0.3 * torch.randn_like(v) for k, v in u.items()}
    back = {}
    for name, value in moved.items():
        site = name.removesuffix(LOG_NORM).removesuffix(DIRECTION)
        if name.endswith(LOG_NORM):
            back[site + DECENTERED] = _from_polar(value, moved[site + DIRECTION])[0]
        elif not name.endswith(DIRECTION):
            back[name] = value
    change = sum(_from_polar(moved[n + LOG_NORM], moved[n + DIRECTION])[1] for n in polar_sites)
    torch.testing.assert_close(polar(moved), plain(back) - change)


@pytest.mark.parametrize("rows", [2, 3, 6])
def test_polar_coordinates_carry_the_standard_normal_exactly(rows):
    """z ~ Normal(0, I_d) in polar coordinates: for any direction v, exp(log N(z) + the change
    of variables without v's own density) integrated over the log norm, times the sphere's area
    (the direction's uniform share), is 1 -- the log norm carries |z|'s chi_d law exactly."""
    v = torch.randn(rows, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    grid = torch.linspace(-12.0, 4.0, 20001, dtype=torch.float64)
    log_norm = grid.unsqueeze(-1)  # (G, R=1)
    z, log_det = _from_polar(log_norm, v.expand(grid.shape[0], rows, 1))
    log_n = -0.5 * z.pow(2).sum((-2, -1)) - 0.5 * rows * math.log(2 * math.pi)
    # the change of variables without v's own (unnormalized) density exp(-|v|^2 / 2)
    density = (log_n + log_det + 0.5 * v.pow(2).sum()).exp()
    sphere = 2 * math.pi ** (rows / 2) / math.gamma(rows / 2)
    total = torch.trapezoid(density, grid) * sphere
    assert abs(float(total) - 1.0) < 1e-6
