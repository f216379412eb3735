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
    "RANK_PRIORS",
]

RANK_PRIORS = ("half_cauchy", "log_uniform")


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
