import math

import pytest
import torch

from bayes_fusion.ops import (
    xox_choose_order,
    xox_flops,
    xox_gene_norms,
    xox_init_scale,
    xox_linear,
    xox_to_dense,
)

D = torch.float64


def _factors(i, o, g, lead=()):
    return (
        torch.randn(*lead, i, g, dtype=D),
        torch.randn(*lead, g, g, dtype=D),
        torch.randn(*lead, o, g, dtype=D),
    )


@pytest.mark.parametrize("order", ["factored", "dense", "auto"])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_xox_matches_dense(order, lead):
    x_in, core, x_out = _factors(7, 5, 3, lead)
    bias = torch.randn(*lead, 5, dtype=D)
    x = torch.randn(6, 7, dtype=D)
    got = xox_linear(x, x_in, core, x_out, 0.7, bias, order)
    weight = xox_to_dense(x_in, core, x_out, 0.7)
    want = torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(-2)
    assert got.shape == (*lead, 6, 5)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_orders_agree_and_auto_picks_cheaper():
    x_in, core, x_out = _factors(64, 64, 4)
    x = torch.randn(10, 64, dtype=D)
    a = xox_linear(x, x_in, core, x_out, order="factored")
    b = xox_linear(x, x_in, core, x_out, order="dense")
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # thin bottleneck, many rows: factored; wide bottleneck, few rows, many particles: dense
    assert xox_choose_order(256, 1024, 1024, 64) == "factored"
    assert xox_choose_order(4096, 32, 32, 32) == "dense"
    flops = xox_flops(4096, 32, 32, 32)
    assert flops["dense"] < flops["factored"]


def test_gene_norms_equal_norm_of_removed_part():
    x_in, core, x_out = _factors(6, 5, 4)
    norms = xox_gene_norms(x_in, core, x_out)
    full = xox_to_dense(x_in, core, x_out)
    for g in range(4):
        keep = torch.ones(4, dtype=D)
        keep[g] = 0
        without = xox_to_dense(x_in * keep, core, x_out * keep)
        torch.testing.assert_close(norms[g], (full - without).norm(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("target", ["kaiming", "xavier"])
def test_init_scale_closed_form_hits_target_std(target):
    i, o, g = 300, 200, 32
    std_x, std_o = 1 / math.sqrt(3 * g), 1 / g
    s = xox_init_scale(i, o, g, std_x, std_o, std_x, target)
    want = math.sqrt(2 / i) if target == "kaiming" else math.sqrt(2 / (i + o))
    gen = torch.Generator().manual_seed(1)
    stds = []
    for _ in range(20):
        w = s * xox_to_dense(
            torch.randn(i, g, generator=gen, dtype=D) * std_x,
            torch.randn(g, g, generator=gen, dtype=D) * std_o,
            torch.randn(o, g, generator=gen, dtype=D) * std_x,
        )
        stds.append(w.std().item())
    stds = torch.tensor(stds)
    # entries of one draw are correlated (shared factors), so compare the mean over draws with
    # its standard error rather than iid-entry sampling error
    se = stds.std() / math.sqrt(len(stds))
    assert abs(stds.mean().item() - want) < 4 * se.item() + 0.02 * want


def test_bad_order_and_target():
    x_in, core, x_out = _factors(3, 3, 2)
    with pytest.raises(ValueError, match="order: expected one of"):
        xox_linear(torch.randn(2, 3, dtype=D), x_in, core, x_out, order="fast")
    with pytest.raises(ValueError, match="target: expected"):
        xox_init_scale(3, 3, 2, 1, 1, 1, target="he")
