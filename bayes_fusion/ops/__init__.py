"""Pure torch contractions (no Pyro, no state) that broadcast over leading particle dims."""

from .cp import (
    cp_component_norms,
    cp_dense_fusion,
    cp_fusion,
    cp_main_effects,
    cp_project,
    cp_to_dense,
    embed_main_effects,
)
from .xox import (
    DEFAULT_COMPRESSION,
    default_genes,
    xox_choose_order,
    xox_compact,
    xox_flops,
    xox_gene_norms,
    xox_init_scale,
    xox_linear,
    xox_num_parameters,
    xox_singular_values,
    xox_to_dense,
)

__all__ = [
    "DEFAULT_COMPRESSION",
    "cp_component_norms",
    "cp_dense_fusion",
    "cp_fusion",
    "cp_main_effects",
    "cp_project",
    "cp_to_dense",
    "default_genes",
    "embed_main_effects",
    "xox_choose_order",
    "xox_compact",
    "xox_flops",
    "xox_gene_norms",
    "xox_singular_values",
    "xox_init_scale",
    "xox_linear",
    "xox_num_parameters",
    "xox_to_dense",
]
