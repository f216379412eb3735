"""The NUTS potential of a Gaussian ``Regressor`` around any rank layer (``CPFusion`` with or
without main effects, ``XOXLinear``), with the layer's output sites integrated out.

The layer's *output sites* (:meth:`output_sites`: ``CPFusion``'s output factor, bias and main
effects, ``XOXLinear``'s ``x_out`` and bias) have independent Normal priors, i.i.d. along their
first (output) axis, and given every other site the prediction is linear in them: with ``w_o``
``(K,)`` the entries of row ``o`` of every output site, ``pred[:, o] = D w_o``, where the design
``D`` ``(N, K)`` is the layer's output when row ``j`` of the output sites is the unit vector
``e_j`` (``K`` made-up outputs). With ``w_o ~ Normal(0, diag(s^2))``, the regression
``y_o = D w_o + noise`` is the one of :mod:`.linear_gaussian` with design
``A = D * s``, so the output sites are integrated out exactly: NUTS samples the rest (the
coordinates of :class:`~.potential.ModelPotential`) under the marginal
likelihood, and :meth:`OutputMarginal.complete` draws the output sites from their exact
conditional afterwards. The output factor's scale symmetry with the other factors and its
funnel with ``lambda`` leave the sampled coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...layers.base import RankLayer
from ...models import Regressor
from . import linear_gaussian
from .potential import ModelPotential

__all__ = ["LinearOutputs", "NonConjugateError", "OutputMarginal", "supports_output_marginal"]


class NonConjugateError(ValueError):
    """The layer's output is not linear in its output sites (a custom layer), so they cannot
    be integrated out; the generic path then samples them (``marginalize="auto"``)."""


def supports_output_marginal(model, args: tuple) -> bool:
    """Whether ``model(*args)`` is a full-batch Gaussian ``Regressor`` (its own likelihood) around
    one of the library's rank layers with output sites: the case :class:`OutputMarginal`
    integrates."""
    return (
        isinstance(model, Regressor)
        and isinstance(model.layer, RankLayer)
        and type(model).log_joint is Regressor.log_joint
        and model.has_log_joint
        and len(args) == 2
        and args[1] is not None
        and model.num_data in (None, _rows(args[1]))
        and bool(model.layer.output_sites())
    )


def _rows(y) -> int:
    return y.shape[0] if torch.is_tensor(y) else -1


class LinearOutputs(ModelPotential):
    """What every potential with the layer's output sites integrated out shares: the sites
    leave the sampled coordinates, the design ``D`` ``(N, K)`` comes from the layer's own output
    at unit rows of them, and linearity is checked once at the start. Subclasses add the
    likelihood (:class:`OutputMarginal`: Gaussian; :class:`~.polya_gamma.PolyaGammaPotential`:
    logistic, through Polya-Gamma variables).

    :param model: a model whose ``layer`` is a rank layer with output sites.
    :param args: ``(inputs, y)``.
    :param centered: as :class:`ModelPotential`.
    :param compile: as :class:`ModelPotential`.
    :raises NonConjugateError: when the prediction is not linear in the output sites.
    """

    #: whether NUTS centres the components the MAP finds active (``reparam=True``); else all
    #: are non-centred
    CENTRE_ACTIVE = True

    def __init__(self, model, args: tuple, centered=None, compile: bool = False) -> None:
        super().__init__(model, args, centered, compile)
        layer = model.layer
        self.layer = layer
        self.inputs = args[0]
        self.outputs = layer.out_features
        shapes = layer.site_shapes()
        # full site name -> (short name, shape)
        self.marginalized = {layer.site_name(s): (s, shapes[s]) for s in layer.output_sites()}
        for name in self.marginalized:
            self.sites.pop(name)
            self.scaled.pop(name, None)
            self.contrasts.pop(name, None)
        self.unit_rows = self._unit_rows()
        self._check_linear()

    def _dtype(self) -> torch.dtype:
        return next(iter(self.init_values.values())).dtype

    def _unit_rows(self) -> dict[str, Tensor]:
        """Short name -> value of every output site with ``K`` rows, row ``j`` of the stacked
        entries being ``e_j`` (so the layer's output is the design ``D``)."""
        size = sum(math.prod(shape[1:]) for _, shape in self.marginalized.values())
        split = self._split(torch.eye(size, dtype=self._dtype()))
        return {short: split[name] for name, (short, _) in self.marginalized.items()}

    def _split(self, flat: Tensor) -> dict[str, Tensor]:
        """Rows of stacked output-site entries ``(R, K)`` -> full site name -> ``(R, ...)``, the
        site's entries in its own shape (``R`` outputs, or ``K`` unit rows)."""
        out, start = {}, 0
        for name, (_, shape) in self.marginalized.items():
            size = math.prod(shape[1:])
            out[name] = flat[:, start : start + size].reshape((flat.shape[0],) + tuple(shape[1:]))
            start += size
        return out

    def _rest(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """The layer's non-output sites, by short name."""
        layer = self.layer
        return {
            short: values[layer.site_name(short)]
            for short in layer.site_shapes()
            if layer.site_name(short) not in self.marginalized
        }

    def design(self, values: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """At one point of the other sites: the standardized design ``A = D * s`` ``(N, K)``,
        the prior stds ``s`` ``(K,)`` of the output-site entries, and the log prior density of
        the layer's other sites (scalar)."""
        std, log_prior = self.output_stds(values)
        design = self.layer.apply({**self._rest(values), **self.unit_rows}, self.inputs)
        return design * std, std, log_prior

    def output_stds(self, values: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """At one point of the other sites: the prior stds ``s`` ``(K,)`` of the output-site
        entries (equal along the output axis) and the log prior of the other sites (scalar)."""
        given = self._rest(values)
        log_prior, stds = 0.0, []
        for short, prior in self.layer.site_priors(given):
            if self.layer.site_name(short) in self.marginalized:
                scale = prior.base_dist.scale.expand(prior.batch_shape + prior.event_shape)
                stds.append(scale[0].reshape(-1))
            else:
                log_prior = log_prior + prior.log_prob(given[short]).sum()
        return torch.cat(stds), log_prior

    def _check_linear(self) -> None:
        """The layer's output at random output-site values equals ``D w`` (else this potential
        would be wrong): checked once, at the start values."""
        values = self.init_values
        design, std, _ = self.design(values)
        shapes = dict(self.marginalized.values())
        weights = {short: torch.randn(shape, dtype=design.dtype) for short, shape in shapes.items()}
        flat = torch.cat([w.reshape(self.outputs, -1) for w in weights.values()], -1)
        with torch.no_grad():
            direct = self.layer.apply({**self._rest(values), **weights}, self.inputs)
            via_design = (design / std) @ flat.T
        if not torch.allclose(direct, via_design, rtol=1e-4, atol=1e-4 * direct.abs().max()):
            raise NonConjugateError(
                f"model: {type(self.layer).__name__}'s output is not linear in its output "
                f"sites {sorted(self.marginalized)}; they cannot be integrated out"
            )


class OutputMarginal(LinearOutputs):
    """Potential of a Gaussian ``Regressor`` with its layer's output sites integrated out (see
    the module doc); the other sites take :class:`ModelPotential`'s coordinates.

    :param model: a model for which :func:`supports_output_marginal` holds.
    :param args: ``(inputs, y)``: the layer's inputs and targets ``(N, P)`` / ``(N,)``.
    :param centered: as :class:`ModelPotential`.
    :param compile: as :class:`ModelPotential`.
    :raises ValueError: when the model is not such a regression; :class:`NonConjugateError`
        (a ``ValueError``) when its prediction is not linear in the output sites.
    """

    def __init__(self, model, args: tuple, centered=None, compile: bool = False) -> None:
        if not supports_output_marginal(model, args):
            raise ValueError(
                "model: integrating the output sites out needs a full-batch Regressor around a "
                f"rank layer with output sites, got {type(model).__name__}"
            )
        super().__init__(model, args, centered, compile)
        self.y = Regressor._check_targets(args[1], _rows(args[1]), self.outputs, self._dtype())
        self.yty = (self.y * self.y).sum(0)

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy at one point of the unconstrained coordinates (scalar): the other
        sites' prior, the noise prior and the marginal likelihood, with the Jacobian."""
        values, log_det = self._values_and_log_det(params)
        design, _, log_prior = self.design(values)
        noise = values["noise"]
        log_p = log_prior + self.model._noise_prior(self.outputs, noise.dtype).log_prob(noise)
        log_lik = linear_gaussian.log_marginal_likelihood(design, self.y, noise, self.yty)
        return -(log_p + log_lik + log_det)

    def complete(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add draws of the output sites from their exact conditional given each draw of the
        rest (``values``: site -> ``(..., site shape)`` with any leading draw dims)."""
        lead = values["noise"].shape[:-1]
        flat = {k: v.reshape((-1,) + v.shape[len(lead) :]) for k, v in values.items()}
        draws = {name: [] for name in self.marginalized}
        for i in range(flat["noise"].shape[0]):
            point = {k: v[i] for k, v in flat.items()}
            design, std, _ = self.design(point)
            coef = linear_gaussian.conditional_draw(design, self.y, point["noise"]) * std
            for name, value in self._split(coef).items():
                draws[name].append(value)
        out = dict(values)
        for name, (_, shape) in self.marginalized.items():
            out[name] = torch.stack(draws[name]).reshape(lead + tuple(shape))
        return out
