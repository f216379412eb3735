"""bayes_fusion: Bayesian low-rank tensor layers with automatic rank determination on Pyro."""

from .layers import (
    CPFusion,
    DeterministicCPFusion,
    DeterministicXOXLinear,
    RankLayer,
    XOXLinear,
    cp_from_tltorch,
    cp_to_tltorch,
    cpfusion_values_from_tltorch,
    cpfusion_values_to_tltorch,
)
from .priors import HalfCauchyRankPrior, LogUniformRankPrior

__version__ = "0.1.0"

__all__ = [
    "CPFusion",
    "DeterministicCPFusion",
    "DeterministicXOXLinear",
    "HalfCauchyRankPrior",
    "LogUniformRankPrior",
    "RankLayer",
    "XOXLinear",
    "__version__",
    "cp_from_tltorch",
    "cp_to_tltorch",
    "cpfusion_values_from_tltorch",
    "cpfusion_values_to_tltorch",
]
