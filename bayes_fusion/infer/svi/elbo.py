"""The one-particle ELBO of the preset guides, computed without recording traces.

Pyro's :class:`~pyro.infer.Trace_ELBO` records two traces per step (the guide's, then the
model's replayed against it), builds a ``Delta`` and an auxiliary ``Normal`` site per latent
variable in the guide, looks every guide parameter up through ``PyroModule`` attribute access
and the parameter store, and scores every site in a second pass. At the sizes of a typical
fusion layer that bookkeeping costs as much as the contraction itself.

:class:`DirectELBO` computes the same quantity,

    loss = -( log p(y, z) - log q(z) ),    z ~ q  (one reparameterized draw),

straight from the guide's unconstrained parameter tensors:

* **guide**: for :class:`~pyro.infer.autoguide.AutoDelta` the values are the parameters
  (``log q = 0``, as in Pyro); for :class:`~pyro.infer.autoguide.AutoNormal` every site is
  ``z = T(loc + scale * eps)`` with ``log q = sum log N(eps) - log scale - log|dT|``; for the
  :class:`~pyro.infer.autoguide.AutoContinuous` guides (``AutoMultivariateNormal``,
  ``AutoLowRankMultivariateNormal``, ``AutoDiagonalNormal``) one joint draw of the packed
  latent vector is unpacked site by site, as the guide does itself. The guide's random numbers
  are drawn in the guide's own order, so a seed gives the same draws as under ``Trace_ELBO``.
* **model**: run once under :class:`LogJoint`, a single messenger that puts the guide's values
  in and adds up every site's scaled, masked log-density as the model runs (no trace kept).

The parameters the optimizer updates are the very tensors the guide holds, so the guide stays
an ordinary Pyro autoguide (``Predictive``, ``guide.median()``, ``state_dict`` all work).

Only what is exactly equivalent is taken: guides whose sites all sit outside subsampled plates,
continuous latent variables, one particle. :func:`DirectELBO.supports` says when; everything
else runs through Pyro's own ELBO.
"""

from __future__ import annotations

import contextlib
import math
import operator

import pyro
import torch
from pyro.infer import autoguide
from torch import Tensor
from torch.distributions import transform_to

from ..log_joint import LogJoint, support_bijection
from ..seams import unpack_latent

__all__ = ["DirectELBO"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _mvn_draw(posterior) -> tuple[Tensor, Tensor]:
    """A draw ``z = loc + L eps`` of a dense Gaussian (the draw ``rsample`` makes) and its
    log-density from ``eps``: ``log q(z) = -|eps|^2 / 2 - log|det L| - D log(2 pi) / 2``.

    ``log_prob(z)`` would solve ``L x = z - loc`` for ``x = eps``: the same value and gradients
    in exact arithmetic, but in float32 with an ill-conditioned ``L`` (the guide's scales span
    orders of magnitude) the solve's error made the ELBO jump to 1e30 and the fit to NaN."""
    scale_tril = posterior.scale_tril
    eps = torch.empty_like(posterior.loc).normal_()
    latent = posterior.loc + (scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)
    log_q = -(0.5 * eps.square() + _HALF_LOG_2PI).sum(-1) - log_det
    return latent, log_q


def _lowrank_draw(loc: Tensor, scale: Tensor, cov_factor: Tensor) -> tuple[Tensor, Tensor]:
    """A draw of :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`'s posterior,
    ``N(loc, S (C C^T + I) S)`` with ``S = diag(scale)``, and its log-density, without
    building the distribution.

    The draw is the one ``LowRankMultivariateNormal.rsample`` makes (``eps_W`` of the rank's
    size, then ``eps_D``): ``z = loc + S u`` with ``u = C eps_W + eps_D``. Its log-density
    needs ``u^T (I + C C^T)^{-1} u`` and ``log det(I + C C^T)``, both through the small
    ``rank x rank`` matrix ``K = I + C^T C`` (Woodbury and the matrix determinant lemma):

        log q(z) = -(|u|^2 - |L^{-1} C^T u|^2) / 2 - sum log scale - log det L - D log(2 pi) / 2

    with ``L`` the Cholesky factor of ``K``. The value and gradients equal ``log_prob(z)``'s;
    torch computes it from ``cov_factor / cov_diag`` (two ``rank x D`` divisions forward,
    more backward: most of a low-rank step at these sizes), and ``K``'s eigenvalues are >= 1,
    so no division by a small scale enters at all.

    :param loc: ``(D,)``. :param scale: ``(D,)``, positive. :param cov_factor: ``(D, rank)``.
    :returns: ``(z, log q(z))``: shapes ``(D,)`` and ``()``.
    """
    rank = cov_factor.shape[-1]
    eps_w = loc.new_empty(rank).normal_()
    eps_d = torch.empty_like(loc).normal_()
    u = cov_factor @ eps_w + eps_d
    capacitance = cov_factor.T @ cov_factor
    capacitance = capacitance + torch.eye(rank, dtype=loc.dtype, device=loc.device)
    tril = torch.linalg.cholesky(capacitance)
    projected = torch.linalg.solve_triangular(tril, (u @ cov_factor).unsqueeze(-1), upper=False)
    mahalanobis = u.square().sum() - projected.square().sum()
    log_det = torch.diagonal(tril).log().sum() + scale.log().sum()
    log_q = -0.5 * mahalanobis - log_det - loc.shape[-1] * _HALF_LOG_2PI
    return loc + scale * u, log_q


def _leaf_of(getter, store_leaves: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """Read one guide parameter; return (its unconstrained leaf in the param store, value)."""
    value = getter()
    unconstrained = getattr(value, "unconstrained", None)
    leaf = unconstrained() if unconstrained is not None else None
    if leaf is None or store_leaves.get(id(leaf)) is not leaf:
        raise _Unsupported("a guide parameter is not a leaf of Pyro's parameter store")
    return leaf, value


class _Unsupported(Exception):
    """The guide/model pair is outside what :class:`DirectELBO` computes exactly."""


class DirectELBO:
    """One-particle ELBO of an ``AutoDelta``, ``AutoNormal`` or ``AutoContinuous`` guide.

    Build it after the guide has run once (its parameters exist). Use :meth:`supports` to ask
    whether a guide qualifies, then call :meth:`loss_and_grads` every step.

    :param guide: the autoguide (its ``prototype_trace`` must exist).
    :raises ValueError: if the guide does not qualify (see :meth:`supports`).
    """

    _AUTO_CONTINUOUS = (
        autoguide.AutoMultivariateNormal,
        autoguide.AutoLowRankMultivariateNormal,
        autoguide.AutoDiagonalNormal,
    )

    def __init__(self, guide) -> None:
        reason = self.unsupported_reason(guide)
        if reason:
            raise ValueError(f"guide: DirectELBO cannot compute this guide's ELBO: {reason}")
        self.guide = guide
        self._sites = [
            (name, site["fn"].support)
            for name, site in guide.prototype_trace.iter_stochastic_nodes()
        ]
        try:
            self._setup()
        except _Unsupported as exc:
            raise ValueError(f"guide: DirectELBO cannot compute this guide's ELBO: {exc}") from None

    # --- which guides -------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, guide) -> str:
        """Why ``guide`` cannot use the direct ELBO ('' when it can)."""
        kind = type(guide)
        if kind not in (autoguide.AutoDelta, autoguide.AutoNormal, *cls._AUTO_CONTINUOUS):
            return f"{kind.__name__} is not one of the preset autoguide classes"
        trace = getattr(guide, "prototype_trace", None)
        if trace is None:
            return "the guide has not been run yet (no prototype trace)"
        for name, site in trace.iter_stochastic_nodes():
            if site["fn"].has_enumerate_support and not site["fn"].has_rsample:
                return f"site {name!r} is discrete"
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    return f"site {name!r} lies in the subsampled plate {frame.name!r}"
        return ""

    @classmethod
    def supports(cls, guide) -> bool:
        """Whether the direct ELBO computes exactly what ``Trace_ELBO`` would for ``guide``."""
        if cls.unsupported_reason(guide):
            return False
        try:
            cls(guide)
        except ValueError:
            return False
        return True

    # --- parameters ---------------------------------------------------------------------
    def _setup(self) -> None:
        guide = self.guide
        self._params: list[Tensor] = []
        leaves = {id(p): p for _, p in pyro.get_param_store().named_parameters()}
        if isinstance(guide, autoguide.AutoDelta):
            self._delta = []  # (site name, transform of its parameter), as self._params
            for name, support in self._sites:
                leaf, value = _leaf_of(lambda n=name: operator.attrgetter(n)(guide), leaves)
                transform = transform_to(support)
                self._check_same(name, transform(leaf), value)
                self._delta.append((name, transform))
                self._params.append(leaf)
        elif isinstance(guide, autoguide.AutoNormal):
            self._normal = []  # (site name, bijection), as self._params' (loc, scale) pairs
            scale_transform = transform_to(guide.scale_constraint)
            for name, support in self._sites:
                loc, loc_value = _leaf_of(lambda n=name: operator.attrgetter(n)(guide.locs), leaves)
                raw, scale_value = _leaf_of(
                    lambda n=name: operator.attrgetter(n)(guide.scales), leaves
                )
                self._check_same(name, loc, loc_value)
                self._check_same(name, scale_transform(raw), scale_value)
                self._normal.append((name, support_bijection(support)))
                self._params += [loc, raw]
            self._scale_transform = scale_transform
        else:
            # get_posterior() reads the module's parameters, which must be the store's leaves
            named = list(guide.named_parameters())
            self._params = [p for _, p in named]
            if not self._params or any(leaves.get(id(p)) is not p for p in self._params):
                raise _Unsupported("a guide parameter is not a leaf of Pyro's parameter store")
            self._slots = []  # (submodule, key) holding each parameter
            for name, _ in named:
                path, _, key = name.rpartition(".")
                self._slots.append((guide.get_submodule(path) if path else guide, key))
            self._transforms = {name: support_bijection(support) for name, support in self._sites}
            self._lowrank = None  # indices of (loc, unconstrained scale, cov_factor)
            if isinstance(guide, autoguide.AutoLowRankMultivariateNormal):
                index = {name: i for i, (name, _) in enumerate(named)}
                self._lowrank = [index[n] for n in ("loc", "scale_unconstrained", "cov_factor")]
                self._scale_transform = transform_to(guide.scale_constraint)
                raw = self._params[self._lowrank[1]]
                self._check_same("scale", self._scale_transform(raw), guide.scale)

    @staticmethod
    def _check_same(name: str, computed: Tensor, expected: Tensor) -> None:
        if computed.shape != expected.shape or not torch.equal(
            computed.detach(), expected.detach()
        ):
            raise _Unsupported(f"the parameters of site {name!r} are not stored as expected")

    def params(self) -> list[Tensor]:
        """The unconstrained leaf tensors the optimizer updates (shared with the guide)."""
        return list(self._params)

    # --- the ELBO -----------------------------------------------------------------------
    def sample_guide(self, params=None) -> tuple[dict[str, Tensor], Tensor | float]:
        """One reparameterized draw: (site name -> constrained value, ``log q`` of the draw)."""
        params = self._params if params is None else params
        if isinstance(self.guide, autoguide.AutoDelta):
            return {
                name: transform(p) for (name, transform), p in zip(self._delta, params, strict=True)
            }, 0.0
        if isinstance(self.guide, autoguide.AutoNormal):
            return self._sample_normal(params)
        return self._sample_continuous(params)

    @contextlib.contextmanager
    def _module_parameters(self, params):
        """Let the guide's own ``get_posterior()`` read ``params`` (e.g. compiled inputs)."""
        if params is self._params:
            yield
            return
        saved = [module._parameters[key] for module, key in self._slots]
        try:
            for (module, key), value in zip(self._slots, params, strict=True):
                module._parameters[key] = value
            yield
        finally:
            for (module, key), value in zip(self._slots, saved, strict=True):
                module._parameters[key] = value

    def _sample_normal(self, params):
        values, log_q = {}, 0.0
        for i, (name, transform) in enumerate(self._normal):
            loc, raw = params[2 * i], params[2 * i + 1]
            scale = self._scale_transform(raw)
            eps = torch.empty_like(loc).normal_()  # the draw Normal.rsample makes
            z = loc + eps * scale
            # log N(z | loc, scale): the (z - loc) / scale term is eps, a constant of the draw
            log_q = log_q - (0.5 * eps.square() + _HALF_LOG_2PI).sum() - scale.log().sum()
            if transform is not None:
                value = transform(z)
                log_q = log_q - transform.log_abs_det_jacobian(z, value).sum()
                z = value
            values[name] = z
        return values, log_q

    def _sample_continuous(self, params):
        if self._lowrank is not None:
            loc, raw_scale, cov_factor = (params[i] for i in self._lowrank)
            latent, log_q = _lowrank_draw(loc, self._scale_transform(raw_scale), cov_factor)
        else:
            with self._module_parameters(params):
                posterior = self.guide.get_posterior()
            if isinstance(posterior, torch.distributions.MultivariateNormal):
                latent, log_q = _mvn_draw(posterior)
            else:
                latent = posterior.rsample()
                log_q = posterior.log_prob(latent)
        values = {}
        for site, unconstrained in unpack_latent(self.guide, latent):
            transform = self._transforms[site["name"]]
            if transform is None:
                values[site["name"]] = unconstrained
                continue
            value = transform(unconstrained)
            log_q = log_q - transform.log_abs_det_jacobian(unconstrained, value).sum()
            values[site["name"]] = value
        return values, log_q

    def differentiable_loss(self, model, args, kwargs=None, guide_scale=1.0, params=None) -> Tensor:
        """``-(log p(data, z) - guide_scale * log q(z))`` for one draw ``z ~ q`` (a scalar).

        :param model: the model (wrapped in any messengers that scale its sites).
        :param args: model arguments. :param kwargs: model keyword arguments.
        :param guide_scale: weight of ``log q`` (the KL warm-up weight; the model's latent
            sites are weighted by the messengers around ``model``).
        :param params: tensors to use in place of :meth:`params` (same order and shapes),
            e.g. the inputs of a compiled function; ``None``: the guide's own.
        """
        values, log_q = self.sample_guide(params)
        with LogJoint(values) as joint:
            model(*args, **(kwargs or {}))
        return -(joint.total - guide_scale * log_q)

    def loss_and_grads(self, model, args, kwargs=None, guide_scale=1.0) -> float:
        """:meth:`differentiable_loss`, backpropagated into the guide parameters' ``.grad``."""
        loss = self.differentiable_loss(model, args, kwargs, guide_scale)
        loss.backward()
        return float(loss.detach())
