"""MCMC diagnostics on quantities that label switching cannot move.

The components of a rank layer are exchangeable and each factor column can flip sign (in pairs)
or trade scale with the others, so two chains in the same posterior mode can hold it in different
permutations: r-hat of the raw factor sites would then flag converged chains, and chains started
apart (as :func:`~bayes_fusion.fit_nuts` starts them) land in different permutations often.
Diagnosed instead, per rank layer: the scales sorted per draw, the component relevances sorted
per draw (:mod:`bayes_fusion.rank`), the effective rank and ``m_eff``; every site outside the
rank layers as it is; and, given inputs, the posterior predictive mean at those points. The
thresholds are :mod:`~bayes_fusion.infer.mcmc.convergence`'s.
"""

from __future__ import annotations

from torch import Tensor

from ...layers.base import rank_layers
from ...rank import layer_rank_posterior, rank_quantities

__all__ = ["invariant_draws"]


def invariant_draws(
    model, samples: dict[str, Tensor], inputs=None, result=None
) -> dict[str, Tensor]:
    """The diagnosed quantities, each ``(chains, draws, ...)``.

    :param model: the fitted model (its rank layers are found by :func:`rank_layers`).
    :param samples: site -> ``(chains, draws, ...)`` MCMC draws.
    :param inputs: the training inputs: the effective rank then follows the information
        criterion where it applies (:func:`bayes_fusion.rank.rank_posterior`'s default).
    :param result: the fit (the information of a rank layer deeper inside the model).
    :returns: per rank layer ``"<layer>.rank_scale_sorted"``, ``"<layer>.relevance_sorted"``,
        ``"<layer>.effective_rank"`` and (information criterion) ``"<layer>.m_eff"`` -- the
        names of the same quantities in :func:`~bayes_fusion.to_inference_data`'s posterior
        --, and every other site unchanged.
    """
    chains, draws = next(iter(samples.values())).shape[:2]
    flat = {k: v.reshape((chains * draws,) + v.shape[2:]) for k, v in samples.items()}
    out, layer_sites = {}, set()
    for path, layer in rank_layers(model).items():
        layer_sites.update(layer.site_names().values())
        rp = layer_rank_posterior(model, layer, flat, inputs, path=path, result=result)
        for name, value in rank_quantities(layer, rp).items():
            out[name] = value.reshape((chains, draws) + value.shape[1:])
    out.update({k: v for k, v in samples.items() if k not in layer_sites})
    return out
