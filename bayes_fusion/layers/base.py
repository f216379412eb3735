"""Machinery shared by the Bayesian rank-bearing layers."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.poutine.messenger import block_messengers
from pyro.poutine.plate_messenger import PlateMessenger
from torch import Tensor

from .._checks import check_positive_float
from ..priors import make_rank_prior


class ParameterBudgetWarning(UserWarning):
    """A factorized layer holds more weights than the dense layer it replaces (e.g. an XOX
    layer whose genes are too many for its sizes): it saves nothing and may fit worse."""


def warn_if_larger_than_dense(layer: str, factored: int, dense: int) -> None:
    """Warn (:class:`ParameterBudgetWarning`) when ``factored > dense`` weights.

    :param layer: what to call the layer in the message, e.g. ``"XOXLinear(128, 10, genes=16)"``.
    """
    if factored > dense:
        warnings.warn(
            f"{layer}: {factored} factored weights, more than the {dense} of the dense layer it "
            "replaces; use fewer genes (or leave genes=None for a default that compresses)",
            ParameterBudgetWarning,
            stacklevel=3,
        )


def is_data_plate(messenger, rows: Tensor | None) -> bool:
    """Whether ``messenger`` is a vectorized ``pyro.plate`` over the rows of ``rows``
    ``(..., B, d)``: the input's dim aligned with the plate's dim (the plate's dims count the
    output's batch dims, which are the input's less its feature dim) holds the plate's
    subsample size. Such a plate indexes data rows; a plate the input does not vary along
    (particles, predictive draws, chains) is not one.

    :param messenger: a Pyro messenger on the stack.
    :param rows: the layer's input, or ``None`` (then no plate is a data plate).
    """
    if rows is None or not isinstance(messenger, PlateMessenger) or messenger.dim is None:
        return False
    position = messenger.dim - 1  # the input's dim for the plate's batch dim
    if rows.dim() < -position:
        return False
    return rows.shape[position] == messenger.subsample_size


def validation_enabled() -> bool:
    """Whether layers check their inputs' values for NaN/inf: when Pyro's validation is on and
    the code is not being traced by ``torch.compile`` (the check reads values, which would break
    a ``fullgraph=True`` graph; shapes, dtypes and devices are checked either way)."""
    return pyro.distributions.is_validation_enabled() and not torch.compiler.is_compiling()


def to_op_layout(value: Tensor, event_dim: int) -> Tensor:
    """Convert a sampled value from Pyro's batch layout to the ops' particle layout.

    Pyro right-aligns a site's batch dims with the data's batch dims. Under a particle plate
    (``vectorize_particles``, ``Predictive(parallel=True)``, NUTS predictive) in a model with a
    data plate at dim -1, a weight sampled outside that plate has batch shape ``(S, 1)``: the
    trailing 1 stands for the data rows. The ops broadcast factor dims against the input's dims
    *left* of the row axis, so that placeholder is dropped here. When the model has no data plate
    (e.g. a bare layer under ``Predictive``), the particle dim is the last batch dim and is kept.

    Layers must therefore be called outside plates over the data rows (their weights are shared
    by all rows), as in :class:`bayes_fusion.Regressor`.
    """
    if value.dim() > event_dim and value.shape[value.dim() - event_dim - 1] == 1:
        return value.squeeze(value.dim() - event_dim - 1)
    return value


class RankLayer(PyroModule):
    """Base of the Bayesian layers whose rank is governed by per-component scales.

    Subclasses define ``rank`` (number of components), ``site_shapes()`` and the forward pass.
    Every site of the layer is named ``"{prefix}.{short}"`` where ``prefix`` is the module's
    Pyro name (its attribute path inside the enclosing ``PyroModule``; empty at top level).

    :param eta: rank-prior scale (``> 0``).
    :param rank_prior: ``"half_cauchy"`` or ``"log_uniform"``.
    :param scale_floor: ``epsilon`` added to ``lambda`` in the factor prior
        ``Normal(0, lambda_r + epsilon)``; keeps the joint density bounded so MAP has an
        optimum (see the docs' "MAP caveat").
    :param bias_scale: std of the ``Normal(0, bias_scale)`` bias prior.
    """

    #: short name of the per-component scale site
    SCALE_SITE = "rank_scale"

    def __init__(
        self,
        eta: float,
        rank_prior: str,
        scale_floor: float,
        bias_scale: float,
    ) -> None:
        super().__init__()
        self.rank_prior = make_rank_prior(rank_prior, eta)
        self.rank_prior_name = rank_prior
        self.register_buffer(
            "scale_floor", torch.tensor(check_positive_float("scale_floor", scale_floor))
        )
        self.register_buffer(
            "bias_scale", torch.tensor(check_positive_float("bias_scale", bias_scale))
        )

    # --- naming -------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """The Pyro name of this module ("" at top level)."""
        return self.__dict__.get("_pyro_name", "")

    def site_name(self, short: str) -> str:
        """Full Pyro site name of one of this layer's sites."""
        return f"{self.prefix}.{short}" if self.prefix else short

    def site_names(self) -> dict[str, str]:
        """Map short site names to full site names, in sampling order."""
        return {short: self.site_name(short) for short in self.site_shapes()}

    def site_shapes(self) -> dict[str, tuple[int, ...]]:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- priors and sampling ------------------------------------------------------------
    def site_priors(self, values: dict[str, Tensor]):  # pragma: no cover - abstract
        """Yield ``(short name, prior distribution)`` for every site, in sampling order.

        A prior may depend on sites before it (the factors on the scales): it reads them from
        ``values`` (short name -> value), which the caller fills in before resuming. This one
        generator serves :meth:`sample_sites` (Pyro sample sites) and :meth:`log_prior` (plain
        torch), so the two cannot disagree.
        """
        raise NotImplementedError

    def sample_sites(self, rows: Tensor | None = None) -> dict[str, Tensor]:
        """Sample every site of the layer as a Pyro sample site: short name -> value.

        The layer's sites are global: enclosing *data* plates -- those the input ``rows``
        varies along (its dim aligned with the plate's holds the plate's (subsample) size) --
        neither batch nor scale them, so a layer called inside a user's (subsampled) data plate
        samples its weights once and returns one row per input row. Every other enclosing plate
        (vectorized particles, ``Predictive(parallel=True)``, many chains) batches them.

        :param rows: the layer's input ``(..., B, d)`` (``None``: every plate batches).
        """
        values: dict[str, Tensor] = {}
        with block_messengers(lambda messenger: is_data_plate(messenger, rows)):
            for short, prior in self.site_priors(values):
                values[short] = pyro.sample(self.site_name(short), prior)
        return values

    def short_values(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """This layer's entries of ``values`` (full site names), keyed by short name."""
        return {short: values[self.site_name(short)] for short in self.site_shapes()}

    def log_prior(self, values: dict[str, Tensor]) -> Tensor:
        """The layer's prior log-density at one draw, without Pyro: exactly what its sample
        sites add to a model's log joint.

        :param values: full site name -> value (one draw: event shape, no particle dims).
        :returns: scalar tensor.
        """
        given: dict[str, Tensor] = {}
        total = 0.0
        for short, prior in self.site_priors(given):
            given[short] = values[self.site_name(short)]
            total = total + prior.log_prob(given[short]).sum()
        return total

    def apply(self, values: dict[str, Tensor], inputs):  # pragma: no cover - abstract
        """The layer's output for given weights (short name -> value), without sampling or
        input checks (``forward`` checks, samples, then applies)."""
        raise NotImplementedError

    def component_terms(self, values: dict[str, Tensor], inputs) -> tuple[Tensor, Tensor]:
        """Each component's contribution to the output as a rank-one product: component ``k``
        adds ``scores[..., n, k] * loadings[..., p, k]`` to output ``p`` of row ``n`` (the
        bias and main effects are not components). The effective rank weighs these terms
        against the noise (:func:`bayes_fusion.rank.component_information`).

        :param values: short site name -> value with leading draw dims ``(..., *event)``.
        :param inputs: the layer's (checked) input rows.
        :returns: ``(scores, loadings)``, shapes ``(..., N, K)`` and ``(..., P, K)``.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def component_dof(self) -> int:
        """Free parameters of one component: the effective rank weighs each component's
        information against twice this (Akaike's price of its parameters)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _scaled_prior(self, scales: Tensor, rows: int) -> dist.TorchDistribution:
        """Prior of a ``(rows, R)`` factor whose column ``r`` is ``Normal(0, lambda_r + eps)``."""
        std = (scales + self.scale_floor).unsqueeze(-2)
        std = std.expand(std.shape[:-2] + (rows, std.shape[-1]))
        return dist.Normal(torch.zeros_like(std), std).to_event(2)

    def _bias_prior(self, size: int, dtype: torch.dtype) -> dist.TorchDistribution:
        """``Normal(0, bias_scale)`` over ``size`` entries, built from the layer's buffers only
        (not from another site's value: the bias does not depend on the scales)."""
        loc = self._buffer_like().new_zeros(size, dtype=dtype)
        return dist.Normal(loc, self.bias_scale.to(dtype).expand(size)).to_event(1)

    # --- init ---------------------------------------------------------------------------
    def init_values(self) -> dict[str, Tensor]:  # pragma: no cover - abstract
        """Good initial values per full site name (used by the guide presets)."""
        raise NotImplementedError

    def _buffer_like(self) -> Tensor:
        return self.scale_floor

    def _check_input_like(self, name: str, x: Tensor) -> None:
        """Refuse inputs whose dtype/device differ from the layer's (clear error, not a
        matmul failure deep inside torch)."""
        like = self.scale_floor
        if x.dtype != like.dtype:
            raise TypeError(
                f"{name}: expected dtype {like.dtype} (the layer's dtype; convert the input or "
                f"call layer.to({x.dtype})), got {x.dtype}"
            )
        if x.device != like.device:
            raise ValueError(
                f"{name}: expected a tensor on {like.device} (the layer's device), got {x.device}"
            )


def rank_layers(model: torch.nn.Module) -> dict[str, RankLayer]:
    """All rank-bearing layers of ``model`` (module path -> layer), found by walking it."""
    if isinstance(model, RankLayer):
        return {"": model}
    if not isinstance(model, torch.nn.Module):
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, RankLayer)}


def layer_init_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Initial values (full site name -> tensor) of every rank-bearing layer in ``model``."""
    values = {}
    for layer in rank_layers(model).values():
        values.update(layer.init_values())
    return values
