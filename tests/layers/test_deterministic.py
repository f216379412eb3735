import math

import pyro
import pytest
import torch
from pyro import poutine

import bayes_fusion as bf
from bayes_fusion.ops import cp_dense_fusion

D = torch.float64


def test_deterministic_cp_honours_weights_and_matches_dense():
    layer = bf.DeterministicCPFusion((3, 4, 2), 5, rank=3, dtype=D)
    with torch.no_grad():
        layer.weights.copy_(torch.tensor([2.0, 0.0, -1.0], dtype=D))
    xs = [torch.randn(6, d, dtype=D) for d in (3, 4, 2)]
    want = cp_dense_fusion(xs, layer.to_dense(), layer.bias)
    torch.testing.assert_close(layer(xs), want, atol=1e-10, rtol=1e-10)
    # the weights matter: zeroing a weight changes the output
    before = layer(xs)
    with torch.no_grad():
        layer.weights[0] = 0.0
    assert not torch.allclose(before, layer(xs))


def test_tltorch_round_trip_deterministic():
    layer = bf.DeterministicCPFusion((3, 4), 2, rank=3, dtype=D)
    cp = layer.to_tltorch()
    assert tuple(cp.shape) == (4, 5, 2)
    torch.testing.assert_close(cp.to_tensor(), layer.to_dense(), atol=1e-10, rtol=0)
    back = bf.DeterministicCPFusion.from_tltorch(cp, bias=layer.bias.detach())
    xs = [torch.randn(7, 3, dtype=D), torch.randn(7, 4, dtype=D)]
    torch.testing.assert_close(back(xs), layer(xs), atol=1e-12, rtol=0)


def test_tltorch_round_trip_bayesian_values():
    layer = bf.CPFusion((3, 4), 2, max_rank=3, bias=False).to(D)
    xs = [torch.randn(7, 3, dtype=D), torch.randn(7, 4, dtype=D)]
    tr = poutine.trace(layer).get_trace(xs)
    values = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    cp = bf.cpfusion_values_to_tltorch(layer, values)
    back = bf.cpfusion_values_from_tltorch(layer, cp)
    out = poutine.condition(layer, back)(xs)
    torch.testing.assert_close(out, tr.nodes["_RETURN"]["value"], atol=1e-10, rtol=0)
    # a tltorch tensor with other shapes is refused
    other = bf.DeterministicCPFusion((3, 5), 2, rank=3, dtype=D).to_tltorch()
    with pytest.raises(ValueError, match="cp: expected factor shapes"):
        bf.cpfusion_values_from_tltorch(layer, other)


def test_xox_is_drop_in_for_linear():
    lin = torch.nn.Linear(12, 7)
    xox = bf.DeterministicXOXLinear(12, 7, genes=4)
    x = torch.randn(3, 5, 12)
    assert xox(x).shape == lin(x).shape == (3, 5, 7)
    assert xox.bias.shape == lin.bias.shape
    assert xox.weight.shape == lin.weight.shape
    torch.testing.assert_close(
        xox(x), torch.nn.functional.linear(x, xox.weight, xox.bias), atol=1e-5, rtol=1e-5
    )
    # it trains like one
    opt = torch.optim.SGD(xox.parameters(), lr=0.1)
    loss = xox(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert xox(x).pow(2).mean() < loss


@pytest.mark.parametrize(
    "init,target",
    [
        ("kaiming", lambda i, o: math.sqrt(2 / i)),
        ("xavier", lambda i, o: math.sqrt(2 / (i + o))),
    ],
)
def test_xox_init_scale_matches_target_std(init, target):
    i, o, g = 400, 300, 32
    stds = torch.tensor(
        [
            bf.DeterministicXOXLinear(i, o, g, init=init, dtype=D).weight.std().item()
            for _ in range(20)
        ]
    )
    se = stds.std() / math.sqrt(len(stds))
    assert abs(stds.mean().item() - target(i, o)) < 4 * se.item() + 0.02 * target(i, o)


def test_deterministic_xox_from_factors_equals_bayesian_draw():
    layer = bf.XOXLinear(6, 4, 3).to(D)
    x = torch.randn(5, 6, dtype=D)
    tr = poutine.trace(layer).get_trace(x)
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    det = bf.DeterministicXOXLinear.from_factors(
        v["x_in"], v["core"], v["x_out"], layer.output_scale, v["bias"]
    )
    torch.testing.assert_close(det(x), tr.nodes["_RETURN"]["value"], atol=1e-10, rtol=0)
    assert not any(isinstance(m, pyro.nn.PyroModule) for m in det.modules())


def test_rank_zero_layer_outputs_its_bias_and_refuses_a_cp_export():
    layer = bf.DeterministicCPFusion((3, 5), 2, rank=0, dtype=D)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0], dtype=D))
    out = layer([torch.randn(4, 3, dtype=D), torch.randn(4, 5, dtype=D)])
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0]], dtype=D).expand(4, 2))
    with pytest.raises(ValueError, match="to_tltorch: a rank-0 layer has no CP factors"):
        layer.to_tltorch()
