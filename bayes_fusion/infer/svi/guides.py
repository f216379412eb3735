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

__all__ = [
    "GUIDES",
    "FULL_COVARIANCE_MAX_DIM",
    "DEFAULT_NUM_STEPS",
    "default_num_steps",
    "make_guide",
    "latent_dim",
]

GUIDES = ("map", "meanfield", "lowrank", "full")

#: above this many latent dimensions ``"full"`` refuses (dense D x D covariance, O(D^3) per
#: step); use ``"lowrank"`` instead.
FULL_COVARIANCE_MAX_DIM = 2000

#: SVI steps of a fit that names no ``num_steps``, by preset (any other guide: ``"meanfield"``'s).
#: The low-rank guide adds ``D x rank`` covariance factors and needs more: on the XOX
#: known-answer data (``tests/test_rank_recovery.py``, 10 data sets, one thread) the
#: inactive genes' ``1 - kappa`` still straddles the counting threshold after 3,000 steps
#: (P(3 genes) 0.78-0.995; one data set gives 0.43, i.e. 4 genes, with another rounding) and
#: has settled after 4,000 (0.93-1.0 on all ten).
DEFAULT_NUM_STEPS = {"map": 3000, "meanfield": 3000, "lowrank": 4000, "full": 3000}


#: each preset's autoguide class: a guide of that class (or a subclass) takes its preset's
#: default steps
_CLASSES = {
    "map": autoguide.AutoDelta,
    "meanfield": autoguide.AutoNormal,
    "lowrank": autoguide.AutoLowRankMultivariateNormal,
    "full": autoguide.AutoMultivariateNormal,
}


def default_num_steps(guide) -> int:
    """SVI steps of a fit with ``guide`` by default: a preset name's, or the preset's whose
    autoguide class ``guide`` is (a class or an instance, subclasses included); any other
    guide ``"meanfield"``'s."""
    if isinstance(guide, str) and guide in DEFAULT_NUM_STEPS:
        return DEFAULT_NUM_STEPS[guide]
    for name, cls in _CLASSES.items():
        if isinstance(guide, cls) or (isinstance(guide, type) and issubclass(guide, cls)):
            return DEFAULT_NUM_STEPS[name]
    return DEFAULT_NUM_STEPS["meanfield"]


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
