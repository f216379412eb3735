"""Guide presets: a name -> an autoguide factory with an initialisation that keeps ranks alive.

=============  ======================================  =======================================
name           autoguide                               approximates
=============  ======================================  =======================================
``map``        ``AutoDelta``                           a point (the posterior mode)
``meanfield``  ``AutoNormal``                          independent Normals (unconstrained space)
``lowrank``    ``AutoLowRankMultivariateNormal``       Normal with low-rank + diagonal covariance
``full``       ``AutoMultivariateNormal``              Normal with dense covariance
=============  ======================================  =======================================

All presets start from :meth:`RankLayer.init_values` of every rank-bearing layer in the model
(``lambda = 1``, factors ``~ randn / sqrt(fan_in)``) and a small initial guide scale: starting
from prior draws or from small factors lets every ``lambda`` collapse before the likelihood has
pulled any component into use.
"""

from __future__ import annotations

import math

from pyro.infer import autoguide
from pyro.infer.autoguide import init_to_median, init_to_value
from pyro.poutine.util import site_is_subsample

from ..._checks import check_choice
from ...layers.base import layer_init_values
from ..data import inspection_trace

__all__ = ["GUIDES", "FULL_COVARIANCE_MAX_DIM", "make_guide", "latent_dim"]

GUIDES = ("map", "meanfield", "lowrank", "full")

#: above this many latent dimensions ``"full"`` refuses (dense D x D covariance, O(D^3) per
#: step); use ``"lowrank"`` instead.
FULL_COVARIANCE_MAX_DIM = 2000

_CLASSES = {
    "map": autoguide.AutoDelta,
    "meanfield": autoguide.AutoNormal,
    "lowrank": autoguide.AutoLowRankMultivariateNormal,
    "full": autoguide.AutoMultivariateNormal,
}


def latent_dim(model, *args, **kwargs) -> int:
    """Number of unconstrained latent dimensions of ``model`` (one prior trace)."""
    tr = inspection_trace(model, *args, **kwargs)
    return sum(
        site["value"].numel()
        for site in tr.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site_is_subsample(site)
        and not site["infer"].get("is_auxiliary", False)
    )


def make_guide(
    name: str,
    model,
    *args,
    init_scale: float = 0.01,
    lowrank_rank: int | None = None,
    **kwargs,
):
    """Build a preset guide for ``model``.

    :param name: one of ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``.
    :param model: the Pyro model (e.g. :class:`bayes_fusion.Regressor`).
    :param args: model arguments, used to count latent dimensions for ``"full"``.
    :param init_scale: initial std of the Gaussian guides in unconstrained space.
    :param lowrank_rank: rank of the low-rank covariance (default ``ceil(sqrt(D))``, max 20).
    :raises ValueError: for an unknown name, or ``"full"`` above
        :data:`FULL_COVARIANCE_MAX_DIM` latent dimensions.
    """
    check_choice("guide", name, GUIDES + ("nuts",))
    values = layer_init_values(model)
    init_loc_fn = init_to_value(values=values, fallback=init_to_median(num_samples=15))
    if name == "map":
        return autoguide.AutoDelta(model, init_loc_fn=init_loc_fn)
    if name == "meanfield":
        return autoguide.AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=init_scale)
    dim = latent_dim(model, *args, **kwargs)
    if name == "full":
        if dim > FULL_COVARIANCE_MAX_DIM:
            raise ValueError(
                f"guide: 'full' needs a dense {dim} x {dim} covariance (limit "
                f"{FULL_COVARIANCE_MAX_DIM} latent dimensions); use guide='lowrank' instead"
            )
        return autoguide.AutoMultivariateNormal(
            model, init_loc_fn=init_loc_fn, init_scale=init_scale
        )
    if name == "lowrank":
        rank = lowrank_rank or min(20, max(1, math.ceil(math.sqrt(dim))))
        return autoguide.AutoLowRankMultivariateNormal(
            model, init_loc_fn=init_loc_fn, init_scale=init_scale, rank=rank
        )
    raise ValueError("guide: 'nuts' is not a guide; fit(..., guide='nuts') runs MCMC")
