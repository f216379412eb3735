"""Rank priors over the per-component scales ``lambda``.

Each prior is an ``nn.Module`` whose parameters are *buffers*, so ``layer.to(device, dtype)``
moves them and the distributions they build live on the right device with the right dtype.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn

from ._checks import check_choice, check_positive_float

__all__ = [
    "HalfCauchyRankPrior",
    "LogUniformRankPrior",
    "make_rank_prior",
    "half_normal_log_density",
    "RANK_PRIORS",
]

RANK_PRIORS = ("half_cauchy", "log_uniform")
_LOG_2_OVER_PI = math.log(2 / math.pi)

_UNCONSTRAINED_DOC = """``lambda = exp(u)`` and ``log p(lambda) + log |d lambda / du|``, summed over
        the last dim: the numbers of :meth:`distribution` with ``biject_to`` of its support,
        in plain tensor ops (no distribution objects, no value-dependent Python branches),
        for potentials evaluated many times (:mod:`bayes_fusion.marginal`).

        :param u: unconstrained scales ``(..., R)``.
        :returns: ``(lambda, log_density)`` of shapes ``(..., R)`` and ``(...)``."""


def half_normal_log_density(scale: torch.Tensor, u: torch.Tensor):
    """``x = exp(u)`` and ``log HalfNormal(x | scale) + u`` summed over the last dim (the noise
    prior in unconstrained coordinates, plain tensor ops).

    :param scale: ``(P,)``; ``u``: ``(..., P)``.
    """
    x = u.exp()
    log_p = 0.5 * _LOG_2_OVER_PI - scale.log() - 0.5 * (x / scale) ** 2
    return x, (log_p + u).sum(-1)


class HalfCauchyRankPrior(nn.Module):
    """``lambda_r ~ HalfCauchy(eta)`` independently for every component.

    Heavy tail (active components can be large) and a pole-free peak at 0 (inactive components
    shrink) -- the horseshoe-style prior of Hawkins, Liu & Zhang (2020).

    :param eta: scale of the half-Cauchy, ``> 0``; smaller means stronger shrinkage.
    """

    def __init__(self, eta: float = 1.0) -> None:
        super().__init__()
        eta = check_positive_float("eta", eta)
        self.register_buffer("eta", torch.tensor(eta))

    def distribution(self, size: int) -> dist.TorchDistribution:
        """Prior over the ``(size,)`` vector of scales (one event of shape ``(size,)``)."""
        return dist.HalfCauchy(self.eta).expand([size]).to_event(1)

    def log_density_unconstrained(self, u: torch.Tensor):
        lam = u.exp()
        eta = self.eta.to(u.dtype)
        log_p = _LOG_2_OVER_PI - eta.log() - torch.log1p((lam / eta) ** 2)
        return lam, (log_p + u).sum(-1)

    log_density_unconstrained.__doc__ = _UNCONSTRAINED_DOC

    def extra_repr(self) -> str:
        return f"eta={float(self.eta):g}"


class LogUniformRankPrior(nn.Module):
    """``log lambda_r ~ Uniform(log low, log high)``: the proper, bounded version of the
    scale-invariant prior ``p(lambda) ~ 1/lambda`` (which is improper on ``(0, inf)``).

    :param low: lower bound of the scales, ``> 0``.
    :param high: upper bound of the scales, ``> low``.
    """

    def __init__(self, low: float = 1e-4, high: float = 1e2) -> None:
        super().__init__()
        low = check_positive_float("low", low)
        high = check_positive_float("high", high)
        if not high > low:
            raise ValueError(f"high: expected a value > low={low}, got {high}")
        self.register_buffer("log_low", torch.tensor(math.log(low)))
        self.register_buffer("log_high", torch.tensor(math.log(high)))

    def distribution(self, size: int) -> dist.TorchDistribution:
        base = dist.Uniform(self.log_low, self.log_high)
        return (
            dist.TransformedDistribution(base, dist.transforms.ExpTransform())
            .expand([size])
            .to_event(1)
        )

    def log_density_unconstrained(self, u: torch.Tensor):
        lo, hi = self.log_low.to(u.dtype), self.log_high.to(u.dtype)
        inside = (lo <= u) & (u < hi)  # Uniform's support: [low, high)
        log_p = torch.where(inside, -torch.log(hi - lo) - u, torch.full_like(u, -math.inf))
        return u.exp(), (log_p + u).sum(-1)

    log_density_unconstrained.__doc__ = _UNCONSTRAINED_DOC

    def extra_repr(self) -> str:
        return f"low={math.exp(float(self.log_low)):g}, high={math.exp(float(self.log_high)):g}"


def make_rank_prior(name: str, eta: float) -> nn.Module:
    """Build a rank prior by name.

    :param name: ``"half_cauchy"`` (``HalfCauchy(eta)``) or ``"log_uniform"`` (bounds
        ``(1e-4 * eta, 1e2 * eta)``: ``eta`` sets where the bounds sit).
    :param eta: prior scale, ``> 0``.
    """
    check_choice("rank_prior", name, RANK_PRIORS)
    eta = check_positive_float("eta", eta)
    if name == "half_cauchy":
        return HalfCauchyRankPrior(eta)
    return LogUniformRankPrior(1e-4 * eta, 1e2 * eta)
