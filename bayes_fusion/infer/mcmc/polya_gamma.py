"""NUTS for a binary ``Classifier`` with its layer's output sites integrated out, through
Polya-Gamma augmentation (Polson, Scott and Windle 2013).

A binary ``Classifier`` has logits ``(N, 2)``; only their difference ``eta = D d`` matters,
with ``D`` ``(N, K)`` the layer's design at unit rows of its output sites (as in
:mod:`.output_marginal`) and ``d = w_1 - w_0`` the difference of the two classes' rows of the
output sites (output factor, bias, main effects), ``d ~ Normal(0, diag(2 s^2))``. With one
Polya-Gamma variable per row, ``omega_i ~ PG(1, 0)``,

    ``sigmoid(eta)^y (1 - sigmoid(eta))^(1 - y) = 1/2 E_omega[exp(kappa eta - omega eta^2 / 2)]``,
    ``kappa = y - 1/2``,

so given ``omega`` the likelihood is Gaussian in ``d``. With ``A = D * s * sqrt(2)`` and
``d = s sqrt(2) c``, ``c ~ Normal(0, I)``, ``c`` integrates out exactly::

    log p(y | omega, rest) = 1/2 b^T K^-1 b - 1/2 log det K + const,
    K = I + A^T diag(omega) A,   b = A^T kappa,
    c | omega, rest ~ Normal(K^-1 b, K^-1),   omega_i | c, rest ~ PG(1, eta_i).

Each MCMC iteration is one partially collapsed Gibbs sweep: a NUTS step on the rest (the
coordinates of :class:`~.potential.ModelPotential`) under the first density, then ``c`` from
its Gaussian conditional, then ``omega`` from its Polya-Gamma conditional (the ``polyagamma``
package). As for the Gaussian ``Regressor``, the output factor's scale symmetry with the other
factors and its funnel with ``lambda`` leave the NUTS coordinates. The class mean
``(w_0 + w_1) / 2`` does not enter the likelihood; :meth:`PolyaGammaPotential.complete` draws
it from its prior.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from polyagamma import random_polyagamma
from torch import Tensor

from ...layers.base import RankLayer
from ...models import Classifier
from .output_marginal import LinearOutputs

__all__ = ["COEF_SITE", "PolyaGammaPotential", "supports_polya_gamma"]

#: the key under which a chain records its draws of the standardized output coefficients
COEF_SITE = "_polya_gamma_coef"
#: fixed-point sweeps (``omega`` at its conditional mean, ``c`` at its conditional mean) that
#: set ``omega`` for a start point before the first NUTS step
START_SWEEPS = 10


def supports_polya_gamma(model, args: tuple) -> bool:
    """Whether ``model(*args)`` is a full-batch binary ``Classifier`` (its own likelihood)
    around one of the library's rank layers with output sites: the case
    :class:`PolyaGammaPotential` integrates."""
    y = args[1] if len(args) == 2 else None
    return (
        isinstance(model, Classifier)
        and isinstance(model.layer, RankLayer)
        and type(model).log_joint is Classifier.log_joint
        and model.has_log_joint
        and getattr(model.layer, "out_features", None) == 2
        and torch.is_tensor(y)
        and model.num_data in (None, y.shape[0])
        and bool(model.layer.output_sites())
    )


class PolyaGammaPotential(LinearOutputs):
    """Potential of a binary ``Classifier``'s other sites given the Polya-Gamma variables
    ``omega`` ``(N,)`` (held here, redrawn by :meth:`gibbs_update`), the output sites integrated
    out (see the module doc). Picklable; each chain's worker holds its own ``omega``.

    :param model: a model for which :func:`supports_polya_gamma` holds.
    :param args: ``(inputs, y)``: the layer's inputs and integer labels ``(N,)`` in ``{0, 1}``.
    :param centered: as :class:`~.potential.ModelPotential`.
    :param compile: as :class:`~.potential.ModelPotential`.
    :raises ValueError: when the model is not such a classifier (or has sites outside its
        layer); :class:`~.output_marginal.NonConjugateError` when its logits are not linear in
        the output sites.
    """

    #: non-centre every component (``fit_nuts(reparam=True)``): on the benchmark's binary CP
    #: classifier (2 x (500 + 500)), centring the MAP's active components gave 14 divergences
    #: and ESS 66 / 99 / 81 (sorted lambda / relevance / predictive mean), half-centring all
    #: 0 and 115 / 175 / 92, non-centring all 0 and 157 / 241 / 114
    CENTRE_ACTIVE = False

    def __init__(self, model, args: tuple, centered=None, compile: bool = False) -> None:
        if not supports_polya_gamma(model, args):
            raise ValueError(
                "model: Polya-Gamma augmentation needs a full-batch binary Classifier around a "
                f"rank layer with output sites, got {type(model).__name__}"
            )
        super().__init__(model, args, centered, compile)
        layer_sites = {model.layer.site_name(s) for s in model.layer.site_shapes()}
        if set(self.sites) - layer_sites:
            raise ValueError(
                "model: Polya-Gamma augmentation needs a Classifier whose only latent sites are "
                f"its layer's, got also {sorted(set(self.sites) - layer_sites)}"
            )
        labels = Classifier._check_labels(args[1], args[1].shape[0], 2)
        self.kappa = labels.to(self._dtype()) - 0.5
        self.omega = torch.full_like(self.kappa, 0.25)  # the mean of PG(1, 0)
        self._rng = None

    # --- the Gaussian algebra given omega --------------------------------------------------
    def _design(self, values: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``A = D * s * sqrt(2)`` ``(N, K)``, the output entries' prior stds ``s`` ``(K,)``
        and the other sites' log prior (scalar), at one point."""
        design, std, log_prior = self.design(values)
        return design * math.sqrt(2.0), std, log_prior

    def _gram(self, design: Tensor) -> tuple[Tensor, Tensor]:
        """Cholesky factor of ``K = I + A^T diag(omega) A`` ``(K, K)`` and ``b = A^T kappa``."""
        eye = torch.eye(design.shape[-1], dtype=design.dtype, device=design.device)
        gram = design.T @ (self.omega.unsqueeze(-1) * design) + eye
        return torch.linalg.cholesky(gram), design.T @ self.kappa

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy given ``omega`` at one point of the unconstrained coordinates
        (scalar): the other sites' prior and ``log p(y | omega, rest)``, with the Jacobian."""
        values, log_det = self._values_and_log_det(params)
        design, _, log_prior = self._design(values)
        chol, b = self._gram(design)
        v = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False).squeeze(-1)
        log_lik = 0.5 * (v * v).sum() - chol.diagonal().log().sum()
        return -(log_prior + log_lik + log_det)

    def _conditional(self, design: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(K,)`` and Cholesky factor of the precision of ``c | omega, rest``."""
        chol, b = self._gram(design)
        return torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1), chol

    # --- the Gibbs block -------------------------------------------------------------------
    def gibbs_init(self, params: dict[str, Tensor]) -> None:
        """Set ``omega`` for the start ``params`` (unconstrained): :data:`START_SWEEPS`
        fixed-point sweeps of the conditional means (``E[PG(1, e)] = tanh(e/2) / (2 e)``), so
        the first NUTS step sees a likelihood near the start's."""
        with torch.no_grad():
            design = self._design(self.constrain(params))[0]
            for _ in range(START_SWEEPS):
                eta = (design @ self._conditional(design)[0]).abs().clamp(min=1e-6)
                self.omega.copy_(torch.tanh(eta / 2) / (2 * eta))

    def gibbs_update(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """One Gibbs sweep after a NUTS step at ``params``: draw ``c | omega, rest``, then
        ``omega | c, rest`` (in place). :returns: ``{COEF_SITE: c}``, ``c`` ``(K,)``."""
        if self._rng is None:  # seeded from torch's RNG, which each chain seeds
            self._rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        with torch.no_grad():
            design = self._design(self.constrain(params))[0]
            mean, chol = self._conditional(design)
            eps = torch.randn_like(mean).unsqueeze(-1)
            coef = mean + torch.linalg.solve_triangular(chol.T, eps, upper=True).squeeze(-1)
            eta = (design @ coef).cpu().double().numpy()
            omega = random_polyagamma(1.0, eta, random_state=self._rng)
            self.omega.copy_(torch.as_tensor(omega, dtype=self.omega.dtype))
        return {COEF_SITE: coef}

    # --- draws -----------------------------------------------------------------------------
    def constrain(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """As :meth:`ModelPotential.constrain`, keeping a chain's draws of ``c``
        (:data:`COEF_SITE`) for :meth:`complete`."""
        values = super().constrain(params)
        if COEF_SITE in params:
            values[COEF_SITE] = params[COEF_SITE]
        return values

    def complete(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Replace the draws of ``c`` (:data:`COEF_SITE`, ``(..., K)``) by the output sites:
        per draw ``w_1 - w_0 = s sqrt(2) c`` and the class mean ``(w_0 + w_1) / 2`` from its
        prior ``Normal(0, s^2 / 2)``."""
        values = dict(values)
        coef = values.pop(COEF_SITE)
        lead = coef.shape[:-1]
        flat_coef = coef.reshape(-1, coef.shape[-1])
        flat = {k: v.reshape((-1,) + v.shape[len(lead) :]) for k, v in values.items()}
        draws = {name: [] for name in self.marginalized}
        for i in range(flat_coef.shape[0]):
            std = self.output_stds({k: v[i] for k, v in flat.items()})[0]
            half = std * math.sqrt(2.0) * flat_coef[i] / 2
            mean = std * torch.randn_like(std) / math.sqrt(2.0)
            for name, value in self._split(torch.stack([mean - half, mean + half])).items():
                draws[name].append(value)
        for name, (_, shape) in self.marginalized.items():
            values[name] = torch.stack(draws[name]).reshape(lead + tuple(shape))
        return values
