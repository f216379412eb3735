"""Bad input to the layers gets a ValueError/TypeError naming the argument."""

import pytest
import torch

import bayes_fusion as bf

SIZES = (3, 4)


def _fusion():
    return bf.CPFusion(SIZES, 2, 3)


def _xs(batch=5):
    return [torch.randn(batch, d) for d in SIZES]


CP_FORWARD_CASES = [
    ("one modality", lambda: [torch.randn(5, 3)], ValueError, r"inputs: expected 2 modalities"),
    (
        "three modalities",
        lambda: _xs() + [torch.randn(5, 1)],
        ValueError,
        r"inputs: expected 2 modalities",
    ),
    ("tensor not list", lambda: torch.randn(5, 3), TypeError, r"inputs: expected a list"),
    (
        "wrong feature size",
        lambda: [torch.randn(5, 3), torch.randn(5, 5)],
        ValueError,
        r"inputs\[1\]: expected 4 features",
    ),
    (
        "mismatched batch",
        lambda: [torch.randn(5, 3), torch.randn(6, 4)],
        ValueError,
        r"inputs\[1\]: expected batch shape \(5,\)",
    ),
    (
        "1-D input",
        lambda: [torch.randn(3), torch.randn(4)],
        ValueError,
        r"inputs\[0\]: expected a tensor with >= 2 dims",
    ),
    (
        "integer tensor",
        lambda: [torch.ones(5, 3, dtype=torch.long), torch.randn(5, 4)],
        TypeError,
        r"inputs\[0\]: expected a floating-point tensor",
    ),
    (
        "bool tensor",
        lambda: [torch.randn(5, 3), torch.ones(5, 4, dtype=torch.bool)],
        TypeError,
        r"inputs\[1\]: expected a floating-point tensor",
    ),
    (
        "numpy array",
        lambda: [torch.randn(5, 3).numpy(), torch.randn(5, 4)],
        TypeError,
        r"inputs\[0\]: expected a torch.Tensor, got ndarray",
    ),
    (
        "NaN input",
        lambda: [torch.full((5, 3), float("nan")), torch.randn(5, 4)],
        ValueError,
        r"inputs\[0\]: expected finite values",
    ),
    (
        "inf input",
        lambda: [torch.randn(5, 3), torch.full((5, 4), float("inf"))],
        ValueError,
        r"inputs\[1\]: expected finite values",
    ),
    ("all missing", lambda: [None, None], ValueError, r"inputs: expected at least one"),
    (
        "mixed dtypes",
        lambda: [torch.randn(5, 3), torch.randn(5, 4, dtype=torch.float64)],
        TypeError,
        r"inputs\[1\]: expected dtype torch.float32",
    ),
]


@pytest.mark.parametrize(
    "name,make,exc,match", CP_FORWARD_CASES, ids=[c[0] for c in CP_FORWARD_CASES]
)
def test_cpfusion_forward_bad_input(name, make, exc, match):
    with pytest.raises(exc, match=match):
        _fusion()(make())


CONSTRUCTOR_CASES = [
    (
        "max_rank 0",
        lambda: bf.CPFusion(SIZES, 2, 0),
        ValueError,
        r"max_rank: expected an integer >= 1, got 0",
    ),
    (
        "max_rank float",
        lambda: bf.CPFusion(SIZES, 2, 2.5),
        TypeError,
        r"max_rank: expected an integer",
    ),
    (
        "eta 0",
        lambda: bf.CPFusion(SIZES, 2, 3, eta=0.0),
        ValueError,
        r"eta: expected a finite number > 0, got 0.0",
    ),
    (
        "eta negative",
        lambda: bf.XOXLinear(4, 2, 2, eta=-1),
        ValueError,
        r"eta: expected a finite number > 0",
    ),
    (
        "unknown prior",
        lambda: bf.CPFusion(SIZES, 2, 3, rank_prior="horseshoe"),
        ValueError,
        r"rank_prior: expected one of \('half_cauchy', 'log_uniform'\), got 'horseshoe'",
    ),
    (
        "one modality",
        lambda: bf.CPFusion((3,), 2, 3),
        ValueError,
        r"in_features: expected >= 2 modalities",
    ),
    (
        "int in_features",
        lambda: bf.CPFusion(3, 2, 3),
        TypeError,
        r"in_features: expected a sequence",
    ),
    (
        "zero feature",
        lambda: bf.CPFusion((3, 0), 2, 3),
        ValueError,
        r"in_features\[1\]: expected an integer >= 1",
    ),
    (
        "genes 0",
        lambda: bf.XOXLinear(4, 2, 0),
        ValueError,
        r"genes: expected an integer >= 1, got 0",
    ),
    (
        "xox bad order",
        lambda: bf.XOXLinear(4, 2, 2, order="fast"),
        ValueError,
        r"order: expected one of",
    ),
    (
        "det rank -1",
        lambda: bf.DeterministicCPFusion(SIZES, 2, -1),
        ValueError,
        r"rank: expected an integer >= 0, got -1",
    ),
    (
        "det genes -1",
        lambda: bf.DeterministicXOXLinear(4, 2, -1),
        ValueError,
        r"genes: expected an integer >= 0, got -1",
    ),
    (
        "det xox init",
        lambda: bf.DeterministicXOXLinear(4, 2, 2, init="he"),
        ValueError,
        r"init: expected one of",
    ),
]


@pytest.mark.parametrize(
    "name,make,exc,match", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES]
)
def test_constructor_bad_arguments(name, make, exc, match):
    with pytest.raises(exc, match=match):
        make()


XOX_FORWARD_CASES = [
    ("wrong features", lambda: torch.randn(5, 3), ValueError, r"x: expected 4 features"),
    (
        "integer",
        lambda: torch.ones(5, 4, dtype=torch.int64),
        TypeError,
        r"x: expected a floating-point",
    ),
    ("nan", lambda: torch.full((5, 4), float("nan")), ValueError, r"x: expected finite values"),
    ("list", lambda: [torch.randn(5, 4)], TypeError, r"x: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize(
    "name,make,exc,match", XOX_FORWARD_CASES, ids=[c[0] for c in XOX_FORWARD_CASES]
)
def test_xox_forward_bad_input(name, make, exc, match):
    with pytest.raises(exc, match=match):
        bf.XOXLinear(4, 2, 2)(make())
