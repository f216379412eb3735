"""Bayesian linear regression with standard-normal coefficients: the marginal likelihood and
the conditional of the coefficients, for several outputs sharing one design.

Per output ``o``: ``y_o = A c_o + noise_o`` with the design ``A`` ``(N, k)``, coefficients
``c_o ~ Normal(0, I_k)`` and ``noise_o ~ Normal(0, sigma_o^2 I_N)``, so::

    y_o ~ Normal(0, A A^T + sigma_o^2 I)          (Woodbury: O(N k^2), never N x N)
    c_o | y_o ~ Normal(K_o^-1 A^T y_o, sigma_o^2 K_o^-1),   K_o = A^T A + sigma_o^2 I

A prior ``Normal(0, diag(s^2))`` on the coefficients is the same model with the design
``A * s`` (and ``c * s`` the coefficients). Used by the NUTS potentials that integrate output
sites out (:mod:`.output_marginal`, :mod:`.polya_gamma`). Every function takes optional leading
batch dims on ``design`` and ``noise``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gram_cholesky", "log_marginal_likelihood", "conditional_mean", "conditional_draw"]


def gram_cholesky(design: Tensor, y: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky factor of ``K_o = A^T A + sigma_o^2 I`` and ``A^T y_o``.

    :param design: ``A`` ``(..., N, k)``.
    :param y: targets ``(N, P)``.
    :param noise: ``sigma`` ``(..., P)``.
    :returns: ``L`` ``(..., P, k, k)``, ``A^T y`` ``(..., P, k)``, ``sigma^2`` ``(..., P)``.
        Where ``K_o`` is not numerically positive definite (a wild proposal of a sampler:
        huge designs, a vanishing noise), ``L`` holds NaN: the density there is NaN, which
        samplers reject as a divergence, rather than an exception that stops every chain.
    """
    k = design.shape[-1]
    gram = design.transpose(-1, -2) @ design  # (..., k, k)
    eye = torch.eye(k, dtype=design.dtype, device=design.device)
    var = noise * noise
    chol, failed = torch.linalg.cholesky_ex(gram.unsqueeze(-3) + var[..., None, None] * eye)
    chol = torch.where((failed != 0)[..., None, None], torch.nan, chol)
    aty = (design.transpose(-1, -2) @ y).transpose(-1, -2)
    return chol, aty, var


def log_marginal_likelihood(design: Tensor, y: Tensor, noise: Tensor, yty: Tensor | None = None):
    """``log p(y | A, sigma)`` with the coefficients integrated out, summed over outputs.

    :param design: ``(..., N, k)``. :param y: ``(N, P)``. :param noise: ``(..., P)``.
    :param yty: optional precomputed ``(y * y).sum(0)`` ``(P,)``.
    :returns: tensor of the leading batch shape.
    """
    n, k = design.shape[-2], design.shape[-1]
    yty = (y * y).sum(0) if yty is None else yty
    chol, aty, var = gram_cholesky(design, y, noise)
    v = torch.linalg.solve_triangular(chol, aty.unsqueeze(-1), upper=False).squeeze(-1)
    quad = (yty - (v * v).sum(-1)) / var
    logdet = (n - k) * var.log() + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (quad + logdet + n * math.log(2 * math.pi)).sum(-1)


def conditional_mean(design: Tensor, y: Tensor, noise: Tensor):
    """Mean ``(..., P, k)`` of ``c | y`` and the :func:`gram_cholesky` terms ``L``, ``sigma^2``."""
    chol, aty, var = gram_cholesky(design, y, noise)
    mean = torch.cholesky_solve(aty.unsqueeze(-1), chol).squeeze(-1)
    return mean, chol, var


def conditional_draw(design: Tensor, y: Tensor, noise: Tensor) -> Tensor:
    """One draw of the coefficients ``c | y`` ``(..., P, k)`` per batch entry."""
    mean, chol, var = conditional_mean(design, y, noise)
    eps = torch.randn_like(mean)
    # c = mean + sigma L^-T eps has covariance sigma^2 (L L^T)^-1 = sigma^2 K^-1
    white = torch.linalg.solve_triangular(chol.transpose(-1, -2), eps.unsqueeze(-1), upper=True)
    return mean + var.sqrt().unsqueeze(-1) * white.squeeze(-1)
