"""MCMC diagnostics on quantities that label switching cannot move.

The components of a rank layer are exchangeable and each factor column can flip sign (in pairs)
or trade scale with the others, so two chains in the same posterior mode can hold it in different
permutations: r-hat of the raw factor sites would then flag converged chains, and chains started
apart (as :func:`~bayes_fusion.fit_nuts` starts them) land in different permutations often.
Diagnosed instead, per rank layer: the scales sorted per draw, the component relevances sorted
per draw (:mod:`bayes_fusion.rank`) and the effective rank; every site outside the rank layers
as it is; and, given inputs, the posterior predictive mean at those points.
"""

from __future__ import annotations

from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

from ...layers.base import rank_layers
from ...rank import effective_rank_draws, relevance_draws

__all__ = ["invariant_draws", "r_hat_and_ess"]


def r_hat_and_ess(draws: Tensor) -> tuple[float, float]:
    """Largest split r-hat and smallest effective sample size over the entries of ``draws``
    ``(chains, draws, ...)``. Entries constant over every draw of every chain (an effective rank
    that never changes) are converged by definition and left out; if all are, r-hat is 1 and
    the ESS the number of draws."""
    flat = draws.double().reshape(draws.shape[0], draws.shape[1], -1)
    varies = (flat != flat[:1, :1]).any(dim=1).any(dim=0)
    if not bool(varies.any()):
        return 1.0, float(flat.shape[0] * flat.shape[1])
    flat = flat[..., varies]
    return float(split_gelman_rubin(flat).max()), float(effective_sample_size(flat).min())


def invariant_draws(model, samples: dict[str, Tensor]) -> dict[str, Tensor]:
    """The diagnosed quantities, each ``(chains, draws, ...)``.

    :param model: the fitted model (its rank layers are found by :func:`rank_layers`).
    :param samples: site -> ``(chains, draws, ...)`` MCMC draws.
    :returns: ``"<layer>.rank_scale_sorted"``, ``"<layer>.relevance_sorted"`` and
        ``"<layer>.effective_rank"`` per rank layer (the names of the same quantities in
        :func:`~bayes_fusion.to_inference_data`'s posterior), and every other site unchanged.
    """
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape((chains * draws,) + v.shape[2:]) for k, v in samples.items()}
    out, layer_sites = {}, set()
    for layer in rank_layers(model).values():
        layer_sites.update(layer.site_names().values())
        scale = layer.site_name(layer.SCALE_SITE)
        out[f"{scale}_sorted"] = samples[scale].sort(dim=-1, descending=True).values
        relevance = relevance_draws(layer, flat).sort(dim=-1, descending=True).values
        out[layer.site_name("relevance_sorted")] = relevance.reshape(chains, draws, -1)
        rank = effective_rank_draws(layer, flat)
        out[layer.site_name("effective_rank")] = rank.reshape(chains, draws).double()
    out.update({k: v for k, v in samples.items() if k not in layer_sites})
    return out
