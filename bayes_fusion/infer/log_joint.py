"""A model's log density at given latent values, read off the model as it runs: the one way
every inference path scores a model that has no hand-written ``log_joint`` (the direct ELBO of
:mod:`bayes_fusion.infer.svi.elbo`, the NUTS potential of :mod:`bayes_fusion.infer.mcmc
.potential`), and the bijection onto a site's support that both use."""

from __future__ import annotations

import pyro
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

__all__ = ["LogJoint", "support_bijection"]


class LogJoint(Messenger):
    """Run a model with given latent values and add up its log-density as it goes.

    Every latent sample site takes its value from ``values`` (sites not in it are drawn as
    usual, as under ``poutine.replay``); every sample site's ``log_prob`` is scaled and masked
    exactly as :meth:`pyro.poutine.Trace.compute_log_prob` does and summed into :attr:`total`
    (a scalar tensor). Subsample sites (``pyro.plate(..., subsample=...)``) carry no density.

    :param values: site name -> constrained value.
    """

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        self.values = values
        self.total: Tensor | float = 0.0

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["done"] = True

    def _postprocess_message(self, msg) -> None:
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        log_p = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        log_p = pyro.distributions.util.scale_and_mask(log_p, msg["scale"], msg["mask"])
        self.total = self.total + log_p.sum()


def support_bijection(support):
    """The bijection from unconstrained space onto ``support`` (``biject_to(support)``), or
    ``None`` where that is the identity (nothing to apply). Shared by the direct ELBO and the NUTS
    potential.

    :param support: a ``torch.distributions.constraints.Constraint``.
    """
    transform = biject_to(support)
    if isinstance(transform, ComposeTransform) and not transform.parts:
        return None
    return transform
