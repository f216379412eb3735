"""Small real data shipped with the package and synthetic generators with known answers."""

from .synthetic import SyntheticData, make_cp_regression, make_xox_regression

__all__ = ["SyntheticData", "make_cp_regression", "make_xox_regression"]
