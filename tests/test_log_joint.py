"""The models' Pyro-free ``log_joint`` equals Pyro's scoring of their ``forward`` (float64)."""

import pyro
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.infer.log_joint import LogJoint
from bayes_fusion.infer.svi.step import PriorAnneal


def _problem(kind, classify, num_data):
    torch.manual_seed(1)
    rows = 7
    if kind == "cp":
        layer = bf.CPFusion((3, 4, 2), 3, max_rank=4).double()
        inputs = [torch.randn(rows, d, dtype=torch.float64) for d in (3, 4, 2)]
    else:
        layer = bf.XOXLinear(5, 3, genes=4).double()
        inputs = torch.randn(rows, 5, dtype=torch.float64)
    if classify:
        model, y = bf.Classifier(layer, num_data=num_data), torch.randint(0, 3, (rows,))
    else:
        model = bf.Regressor(layer, num_data=num_data).double()
        y = torch.randn(rows, 3, dtype=torch.float64)
    return model, inputs, y


def _draw(model, inputs, y):
    """Latent values drawn from the prior predictive (so scales and factors are generic)."""
    with torch.no_grad(), pyro.poutine.block():
        trace = pyro.poutine.trace(model).get_trace(inputs, y)
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name != "data"
    }


@pytest.mark.parametrize("kind", ["cp", "xox"])
@pytest.mark.parametrize("classify", [False, True])
@pytest.mark.parametrize("num_data", [None, 20])
def test_log_joint_matches_pyro(kind, classify, num_data):
    model, inputs, y = _problem(kind, classify, num_data)
    values = _draw(model, inputs, y)
    anneal = PriorAnneal()
    anneal.beta, anneal.obs_scale = 0.3, 1.7
    with LogJoint(values) as joint:
        anneal(model)(inputs, y)
    pure = model.log_joint(values, inputs, y, latent_scale=0.3, obs_scale=1.7)
    assert model.has_log_joint
    assert torch.allclose(pure, joint.total, rtol=1e-12, atol=1e-10), (pure, joint.total)
    # and the gradients agree as well
    leaves = {k: v.clone().requires_grad_(True) for k, v in values.items()}
    with LogJoint(leaves) as joint:
        anneal(model)(inputs, y)
    g_pyro = torch.autograd.grad(joint.total, list(leaves.values()))
    g_pure = torch.autograd.grad(
        model.log_joint(leaves, inputs, y, 0.3, 1.7), list(leaves.values())
    )
    for a, b in zip(g_pyro, g_pure, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


def test_log_joint_sees_a_change_in_the_data():
    model, inputs, y = _problem("cp", False, None)
    values = _draw(model, inputs, y)
    base = model.log_joint(values, inputs, y)
    assert base != model.log_joint(values, inputs, y + 1.0)
    assert base != model.log_joint(values, inputs, y, latent_scale=0.5)


def test_user_layer_has_no_log_joint():
    model = bf.Regressor(torch.nn.Linear(3, 2))
    assert not model.has_log_joint


def test_a_subclass_that_overrides_forward_alone_has_no_log_joint():
    class Shifted(bf.Regressor):
        def forward(self, inputs, y=None):
            return super().forward(inputs, y) + 1.0

    class Doubled(bf.CPFusion):
        def forward(self, inputs):
            return 2 * super().forward(inputs)

    assert not Shifted(bf.CPFusion((3, 4), 2, max_rank=2)).has_log_joint
    assert not bf.Regressor(Doubled((3, 4), 2, max_rank=2)).has_log_joint
    assert bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=2)).has_log_joint
