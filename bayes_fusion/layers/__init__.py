"""PyroModule layers with rank priors and their deterministic twins."""

from .base import ParameterBudgetWarning, RankLayer, layer_init_values, rank_layers
from .cp import CPFusion
from .deterministic import DeterministicCPFusion, DeterministicXOXLinear
from .interop import (
    cp_from_tltorch,
    cp_to_tltorch,
    cpfusion_values_from_tltorch,
    cpfusion_values_to_tltorch,
)
from .xox import XOXLinear

__all__ = [
    "ParameterBudgetWarning",
    "CPFusion",
    "DeterministicCPFusion",
    "DeterministicXOXLinear",
    "RankLayer",
    "XOXLinear",
    "cp_from_tltorch",
    "cp_to_tltorch",
    "cpfusion_values_from_tltorch",
    "cpfusion_values_to_tltorch",
    "layer_init_values",
    "rank_layers",
]
