"""Conversion between CP factors (Bayesian or deterministic) and tensorly-torch CP tensors.

tensorly-torch is an interchange format here, not the engine: its classes are ``nn.Module``s
with their own parameters and cannot be Pyro sample sites, so values are copied across.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .cp import CPFusion


def cp_to_tltorch(factors: Sequence[Tensor], out_factor: Tensor, weights: Tensor | None = None):
    """Wrap CP factors as a ``tltorch.CPTensor`` of shape ``(d~_1, ..., d~_M, P)``.

    :param factors: M factors ``(d~_m, R)``; ``out_factor``: ``(P, R)``; ``weights``: ``(R,)``
        (default ones).
    """
    from tltorch.factorized_tensors import CPTensor

    if weights is None:
        weights = out_factor.new_ones(out_factor.shape[-1])
    mats = [f.detach().clone() for f in factors] + [out_factor.detach().clone()]
    return CPTensor(
        torch.nn.Parameter(weights.detach().clone()), [torch.nn.Parameter(m) for m in mats]
    )


def refuse_main_effects(has_main_effects: bool) -> None:
    """A CP tensor holds the fusion factors only: refuse to export a layer with main effects
    (its output would silently change)."""
    if has_main_effects:
        raise ValueError(
            "to_tltorch: a CP tensor holds only the fusion factors; this layer also has main "
            "effects (main_effects=True), which the export would drop"
        )


def cp_from_tltorch(cp) -> tuple[list[Tensor], Tensor, Tensor]:
    """Split a ``tltorch.CPTensor`` whose last mode is the output into
    ``(factors, out_factor, weights)`` (detached copies)."""
    mats = [f.detach().clone() for f in cp.factors]
    if len(mats) < 3:
        raise ValueError(
            f"cp: expected a CP tensor with >= 2 input modes and 1 output mode, got {len(mats)} "
            "modes"
        )
    return mats[:-1], mats[-1], cp.weights.detach().clone()


def cpfusion_values_to_tltorch(layer: CPFusion, values: dict[str, Tensor]):
    """Export one draw (or the posterior mean) of a :class:`CPFusion`'s factors to tltorch.

    :param values: full site name -> tensor without draw dims (e.g. a posterior mean).
    :raises ValueError: the layer has main effects (not part of a CP tensor).
    """
    refuse_main_effects(layer.main_effects)
    factors = [values[layer.site_name(f"factor_{m}")] for m in range(layer.num_modalities)]
    return cp_to_tltorch(factors, values[layer.site_name("out_factor")])


def cpfusion_values_from_tltorch(layer: CPFusion, cp) -> dict[str, Tensor]:
    """Site values for ``layer`` from a tltorch CP tensor (for ``poutine.condition`` or
    ``init_to_value``). The CP weights are folded into the output factor; each ``lambda_r``
    is set to the RMS of component r's entries across all factors.

    :returns: full site name -> tensor.
    """
    factors, out_factor, weights = cp_from_tltorch(cp)
    rows = layer.factor_rows()
    shapes = [tuple(f.shape) for f in factors] + [tuple(out_factor.shape)]
    want = [(r, layer.max_rank) for r in rows] + [(layer.out_features, layer.max_rank)]
    if shapes != want:
        raise ValueError(f"cp: expected factor shapes {want} for this layer, got {shapes}")
    out_factor = out_factor * weights
    mats = factors + [out_factor]
    sq = sum(m.pow(2).sum(0) for m in mats)
    count = sum(m.shape[0] for m in mats)
    values = {layer.site_name(layer.SCALE_SITE): (sq / count).sqrt()}
    for m, f in enumerate(factors):
        values[layer.site_name(f"factor_{m}")] = f
    values[layer.site_name("out_factor")] = out_factor
    return values
