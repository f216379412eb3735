import pyro
import pytest
import torch
from pyro import poutine

import bayes_fusion as bf


def _cp_model(out=2):
    return bf.Regressor(bf.CPFusion((3, 4), out, max_rank=4))


def _xs(n=6):
    return [torch.randn(n, 3), torch.randn(n, 4)]


def test_regressor_sites_and_shapes():
    model = _cp_model()
    y = torch.randn(6, 2)
    tr = poutine.trace(model).get_trace(_xs(), y)
    names = [n for n, s in tr.nodes.items() if s["type"] == "sample"]
    assert names[:2] == ["layer.rank_scale", "layer.factor_0"]
    assert "noise" in names and "obs" in names
    assert tr.nodes["obs"]["value"].shape == (6, 2)
    assert tr.nodes["noise"]["value"].shape == (2,)
    assert tr.nodes["_RETURN"]["value"].shape == (6, 2)


def test_minibatch_plate_scales_likelihood():
    model = _cp_model()
    model.num_data = 60
    xs, y = _xs(6), torch.randn(6, 2)
    tr = poutine.trace(model).get_trace(xs, y)
    assert tr.nodes["obs"]["scale"] == pytest.approx(10.0)
    model.num_data = None
    tr = poutine.trace(model).get_trace(xs, y)
    assert tr.nodes["obs"]["scale"] == 1.0


def test_classifier_sites_and_labels():
    model = bf.Classifier(bf.CPFusion((3, 4), 5, max_rank=3))
    y = torch.tensor([0, 1, 4, 2, 3, 0])
    tr = poutine.trace(model).get_trace(_xs(), y)
    assert tr.nodes["obs"]["value"].shape == (6,)
    assert torch.isfinite(tr.log_prob_sum())


def test_regressor_under_vectorized_particles():
    model = _cp_model()
    with pyro.plate("particles", 4, dim=-2):
        tr = poutine.trace(model).get_trace(_xs(), torch.randn(6, 2))
    assert tr.nodes["_RETURN"]["value"].shape == (4, 6, 2)
    tr.compute_log_prob()
    assert tr.nodes["obs"]["log_prob"].shape == (4, 6)


MODEL_CASES = [
    (
        "y wrong shape",
        lambda m: m(_xs(), torch.randn(6, 3)),
        ValueError,
        r"y: expected shape \(6, 2\)",
    ),
    (
        "y integer",
        lambda m: m(_xs(), torch.ones(6, 2, dtype=torch.long)),
        TypeError,
        r"y: expected a floating-point tensor",
    ),
    (
        "y nan",
        lambda m: m(_xs(), torch.full((6, 2), float("nan"))),
        ValueError,
        r"y: expected finite values",
    ),
    (
        "y numpy",
        lambda m: m(_xs(), torch.randn(6, 2).numpy()),
        TypeError,
        r"y: expected a torch.Tensor",
    ),
    (
        "3-D input",
        lambda m: m([torch.randn(2, 6, 3), torch.randn(2, 6, 4)]),
        ValueError,
        r"inputs\[0\]: expected a 2-D tensor",
    ),
    (
        "1-D input",
        lambda m: m([torch.randn(3), torch.randn(4)]),
        ValueError,
        r"inputs\[0\]: expected a 2-D tensor",
    ),
    (
        "empty batch",
        lambda m: m([torch.randn(0, 3), torch.randn(0, 4)]),
        ValueError,
        r"inputs\[0\]: expected at least one row",
    ),
    (
        "numpy input",
        lambda m: m([torch.randn(6, 3).numpy(), torch.randn(6, 4)]),
        TypeError,
        r"inputs\[0\]: expected a torch.Tensor",
    ),
]


@pytest.mark.parametrize("name,call,exc,match", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_regressor_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(_cp_model())


@pytest.mark.parametrize(
    "y,exc,match",
    [
        (
            torch.tensor([0, 1, 5, 2, 3, 0]),
            ValueError,
            r"y: expected labels in \[0, 4\], got values in \[0, 5\]",
        ),
        (torch.tensor([0, -1, 1, 2, 3, 0]), ValueError, r"y: expected labels in \[0, 4\]"),
        (torch.zeros(6), TypeError, r"y: expected integer class labels, got dtype torch.float32"),
        (torch.zeros(6, dtype=torch.bool), TypeError, r"y: expected integer class labels"),
        (torch.zeros(5, dtype=torch.long), ValueError, r"y: expected shape \(6,\)"),
    ],
)
def test_classifier_bad_labels(y, exc, match):
    model = bf.Classifier(bf.CPFusion((3, 4), 5, max_rank=3))
    with pytest.raises(exc, match=match):
        model(_xs(), y)


def test_model_rejects_non_module_layer():
    with pytest.raises(TypeError, match="layer: expected a torch.nn.Module"):
        bf.Regressor(lambda x: x)
