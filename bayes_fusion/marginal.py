"""NUTS for Gaussian CP-fusion regression with the output factor and bias integrated out.

For ``Regressor(CPFusion(...))`` the targets are linear in the output factor ``U_out`` and the
bias given everything else, and both have Gaussian priors, so they can be integrated out
exactly. Write ``s_r = lambda_r + eps`` and ``Phi = prod_m (x~_m U_m)`` ``(N, R)``; with
``c_o ~ Normal(0, I)`` and the design ``A = [Phi * s, bias_scale * 1]`` ``(N, k)``::

    y_o = A c_o + noise_o,   noise_o ~ Normal(0, sigma_o^2 I)
    =>  y_o ~ Normal(0, A A^T + sigma_o^2 I)          (k = R + 1 columns, Woodbury: O(N k^2))
    c_o | y, rest ~ Normal(K_o^-1 A^T y_o, sigma_o^2 K_o^-1),   K_o = A^T A + sigma_o^2 I

and ``U_out[o, r] = s_r c_o[r]``, ``bias[o] = bias_scale c_o[R]``. NUTS then explores only the
scales, the (non-centred) input factors and the noise: the output factor's scale symmetry with
the input factors and its funnel with ``lambda`` are gone, and the output factor and bias are
drawn from their exact conditional after sampling, so the returned draws are draws of the full
posterior of the original model.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor

from . import linear_gaussian
from .layers.cp import CPFusion
from .models import Regressor
from .priors import half_normal_log_density


def supports_marginal(model) -> bool:
    """Whether ``model`` is a full-batch ``Regressor`` around a ``CPFusion`` layer without
    main effects (those take the generic path)."""
    return (
        type(model) is Regressor
        and type(model.layer) is CPFusion
        and not model.layer.main_effects
        and getattr(model, "num_data", None) is None
    )


class CPRegressionMarginal:
    """Potential energy and conditional draws for ``Regressor(CPFusion)`` (see module doc).

    The unconstrained coordinates are named after the model's sites: the scale site (through
    the bijection to its prior's support), ``<factor site>_decentered`` (``U_m / s``) for every
    input factor, and the noise site. Instances are picklable (parallel chains).

    :param model: a ``Regressor`` whose layer is a ``CPFusion``.
    :param inputs: list of ``M`` tensors ``(N, d_m)``.
    :param y: targets ``(N, P)`` (or ``(N,)`` when ``P == 1``).
    :param centered: ``(R,)`` in ``[0, 1]``: per component, ``1`` samples the input factors'
        columns as they are (``U = z``, ``z ~ Normal(0, s)``), ``0`` non-centred (``U = s z``,
        ``z ~ Normal(0, 1)``). Components the data determine well mix better centred, weak
        ones non-centred. Default all ``0``.
    """

    def __init__(self, model: Regressor, inputs, y: Tensor, centered: Tensor | None = None) -> None:
        if not supports_marginal(model):
            raise ValueError(
                "model: the marginal NUTS path needs a full-batch Regressor(CPFusion(...)), "
                f"got {type(model).__name__}"
            )
        layer: CPFusion = model.layer
        with torch.no_grad():
            pred = model(inputs)  # validates inputs
        y = Regressor._check_targets(y, pred.shape[-2], pred.shape[-1], pred.dtype)
        ones = [torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device) for x in inputs]
        self.xs = [
            torch.cat([x, one], -1) if layer.append_one else x
            for x, one in zip(inputs, ones, strict=True)
        ]
        self.y = y.detach()
        self.yty = (self.y * self.y).sum(0)
        self.rank = layer.max_rank
        self.eps = layer.scale_floor.detach().clone()
        self.bias_scale = layer.bias_scale.detach().clone() if layer.use_bias else None
        # the scales and the noise are sampled as their logs (the potential's densities
        # include the exp Jacobian: see log_density_unconstrained)
        self.rank_prior = layer.rank_prior
        self.noise_scale = model.noise_prior_scale.to(y.dtype).expand(y.shape[-1]).clone()
        self.scale_site = layer.site_name(layer.SCALE_SITE)
        self.factor_sites = [layer.site_name(f"factor_{m}") for m in range(len(inputs))]
        self.out_site = layer.site_name("out_factor")
        self.bias_site = layer.site_name("bias") if layer.use_bias else None
        self.noise_site = "noise"
        like = self.y
        self.centered = (
            torch.zeros(self.rank, dtype=like.dtype, device=like.device)
            if centered is None
            else torch.as_tensor(centered, dtype=like.dtype, device=like.device)
        )
        entries = sum(x.shape[-1] for x in self.xs) * self.rank
        self._z_const = -0.5 * math.log(2 * math.pi) * entries  # standard-normal constants

    # --- coordinates ---------------------------------------------------------------------
    def to_unconstrained(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Site values (one point) -> unconstrained NUTS coordinates."""
        lam = values[self.scale_site]
        out = {
            self.scale_site: lam.log(),
            self.noise_site: values[self.noise_site].log(),
        }
        for site in self.factor_sites:
            out[f"{site}_decentered"] = values[site] / (lam + self.eps) ** (1 - self.centered)
        return {k: v.detach().clone() for k, v in out.items()}

    def constrain(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconstrained coordinates (any leading draw dims) -> site values."""
        lam = params[self.scale_site].exp()
        values = {self.scale_site: lam, self.noise_site: params[self.noise_site].exp()}
        s = ((lam + self.eps) ** (1 - self.centered)).unsqueeze(-2)
        for site in self.factor_sites:
            values[site] = params[f"{site}_decentered"] * s
        return values

    # --- densities -----------------------------------------------------------------------
    def _design(self, values: dict[str, Tensor]) -> Tensor:
        """``A = [Phi * s, bias_scale * 1]`` ``(..., N, k)`` at site values (any leading dims)."""
        lam = values[self.scale_site]
        phi = None
        for x, u in zip(self.xs, [values[s] for s in self.factor_sites], strict=True):
            proj = x @ u
            phi = proj if phi is None else phi * proj
        design = phi * (lam + self.eps).unsqueeze(-2)
        if self.bias_scale is not None:
            col = self.bias_scale.expand(design.shape[:-1] + (1,)).to(design.dtype)
            design = torch.cat([design, col], -1)
        return design

    def log_marginal_likelihood(self, values: dict[str, Tensor]) -> Tensor:
        """``log p(y | lambda, U_1..U_M, sigma)`` with ``U_out`` and the bias integrated out.

        :param values: site values with optional leading draw dims.
        :returns: tensor of the leading draw shape.
        """
        return linear_gaussian.log_marginal_likelihood(
            self._design(values), self.y, values[self.noise_site], self.yty
        )

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy (negative log joint density in unconstrained coordinates); see
        :meth:`potential`."""
        return self.potential(params)

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy at one point of the unconstrained coordinates.

        Plain tensor ops throughout (the priors' densities and Jacobians written out, see
        ``log_density_unconstrained`` of the rank priors), so eager autograd is fast without
        ``torch.jit``.
        """
        lam, log_p = self.rank_prior.log_density_unconstrained(params[self.scale_site])
        noise, log_p_noise = half_normal_log_density(self.noise_scale, params[self.noise_site])
        log_p = log_p + log_p_noise + self._z_const
        s = lam + self.eps
        # z ~ Normal(0, s^c) and U = z s^(1-c): c = 0 non-centred, c = 1 centred
        z_scale, u_scale = s**self.centered, (s ** (1 - self.centered)).unsqueeze(-2)
        log_z_scale = self.centered * s.log()
        factors = []
        for site in self.factor_sites:
            z = params[f"{site}_decentered"]
            log_p = log_p - 0.5 * ((z / z_scale) ** 2).sum() - z.shape[-2] * log_z_scale.sum()
            factors.append(z * u_scale)
        values = {self.scale_site: lam, self.noise_site: noise}
        values.update(zip(self.factor_sites, factors, strict=True))
        return -(log_p + self.log_marginal_likelihood(values))

    # --- the integrated-out sites ---------------------------------------------------------
    def _conditional(self, values):
        return linear_gaussian.conditional_mean(
            self._design(values), self.y, values[self.noise_site]
        )

    def _split(self, coef: Tensor, lam: Tensor) -> dict[str, Tensor]:
        """Standardized coefficients ``(..., P, k)`` -> output factor and bias values."""
        out = {self.out_site: coef[..., : self.rank] * (lam + self.eps).unsqueeze(-2)}
        if self.bias_site is not None:
            out[self.bias_site] = coef[..., self.rank] * self.bias_scale.to(coef.dtype)
        return out

    def sample_conditional(self, values: dict[str, Tensor], chunk: int = 256) -> dict[str, Tensor]:
        """Draw ``U_out`` ``(S, P, R)`` and the bias ``(S, P)`` given ``S`` draws of the rest.

        :param values: site values with one leading draw dim ``S``.
        :param chunk: draws processed at once (memory ``chunk * N * k``).
        """
        pieces = []
        total = values[self.scale_site].shape[0]
        for start in range(0, total, chunk):
            part = {k: v[start : start + chunk] for k, v in values.items()}
            coef = linear_gaussian.conditional_draw(
                self._design(part), self.y, part[self.noise_site]
            )
            pieces.append(self._split(coef, part[self.scale_site]))
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    def conditional_log_prob(self, values: dict[str, Tensor], coef_values: dict[str, Tensor]):
        """``log p(U_out, bias | y, rest)`` of given output-factor/bias values (one point)."""
        lam = values[self.scale_site]
        mean, chol, var = self._conditional(values)
        coef = coef_values[self.out_site] / (lam + self.eps)
        if self.bias_site is not None:
            bias = coef_values[self.bias_site] / self.bias_scale.to(coef.dtype)
            coef = torch.cat([coef, bias.unsqueeze(-1)], -1)
        precision = (chol @ chol.transpose(-1, -2)) / var[..., None, None]
        # coefficient density, then the change of variables to U_out = s * c, bias = b_s * c
        log_p = dist.MultivariateNormal(mean, precision_matrix=precision).log_prob(coef).sum(-1)
        jac = (lam + self.eps).log().sum() * coef.shape[-2]
        if self.bias_site is not None:
            jac = jac + self.bias_scale.to(coef.dtype).log() * coef.shape[-2]
        return log_p - jac
