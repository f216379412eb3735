"""Small real data shipped with the package and synthetic generators with known answers."""

from .digits import load_digits_views
from .nutrimouse import MultiViewData, load_nutrimouse
from .synthetic import (
    SyntheticData,
    make_cp_classification,
    make_cp_regression,
    make_xox_regression,
)

__all__ = [
    "MultiViewData",
    "SyntheticData",
    "load_digits_views",
    "load_nutrimouse",
    "make_cp_classification",
    "make_cp_regression",
    "make_xox_regression",
]
