"""Bayesian CP (low-rank multimodal) fusion layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import Tensor

from .._checks import check_finite, check_float_tensor, check_positive_float, check_positive_int
from ..ops.cp import cp_component_norms, cp_fusion, cp_main_effects, cp_scores
from .base import RankLayer, to_op_layout, validation_enabled


def check_modalities(
    inputs,
    in_features: Sequence[int],
    layer: str = "inputs",
    min_dim: int = 2,
    max_dim: int | None = None,
    check_values: bool | None = None,
) -> list[Tensor | None]:
    """Validate a list of modality tensors against the expected feature sizes.

    :param check_values: also refuse NaN/inf (one device sync per modality); default: when
        Pyro validation is enabled.

    :returns: the inputs as a list.
    """
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(
            f"{layer}: expected a list of {len(in_features)} tensors (one per modality), "
            f"got {type(inputs).__name__}"
        )
    if len(inputs) != len(in_features):
        raise ValueError(
            f"{layer}: expected {len(in_features)} modalities with feature sizes "
            f"{tuple(in_features)}, got {len(inputs)}"
        )
    batch_shape = None
    dtype = None
    for m, (x, d) in enumerate(zip(inputs, in_features, strict=False)):
        if x is None:
            continue
        check_float_tensor(f"{layer}[{m}]", x, min_dim=min_dim, max_dim=max_dim)
        if x.shape[-1] != d:
            raise ValueError(
                f"{layer}[{m}]: expected {d} features (last dim), got shape {tuple(x.shape)}"
            )
        if batch_shape is None:
            batch_shape, dtype = x.shape[:-1], x.dtype
        elif x.shape[:-1] != batch_shape:
            raise ValueError(
                f"{layer}[{m}]: expected batch shape {tuple(batch_shape)} like the first "
                f"modality, got {tuple(x.shape[:-1])}"
            )
        elif x.dtype != dtype:
            raise TypeError(
                f"{layer}[{m}]: expected dtype {dtype} like the first modality, got {x.dtype}"
            )
        if validation_enabled() if check_values is None else check_values:
            check_finite(f"{layer}[{m}]", x)
    if batch_shape is None:
        raise ValueError(f"{layer}: expected at least one modality that is not None, got none")
    return list(inputs)


class CPFusion(RankLayer):
    r"""Bayesian low-rank (CP) multimodal fusion with automatic rank determination.

    Fuses M >= 2 modality vectors ``x_m`` (shape ``(..., B, d_m)``) into one output of shape
    ``(..., B, P)``::

        y = (prod_m x~_m U_m) U_out^T + b  [+ sum_m x_m V_m^T],   x~_m = [x_m, 1] if append_one

    without ever building the dense ``(d~_1, ..., d~_M, P)`` weight tensor.

    **Sample sites** (``prefix`` is the module's Pyro name, e.g. ``"layer"`` inside
    :class:`bayes_fusion.Regressor`; no prefix at top level):

    ==========================  =======================  ==============================
    site                        shape                    prior
    ==========================  =======================  ==============================
    ``prefix.rank_scale``       ``(R,)``                 ``HalfCauchy(eta)`` (or log-uniform)
    ``prefix.factor_{m}``       ``(d~_m, R)``            column r: ``Normal(0, lam_r + eps)``
    ``prefix.out_factor``       ``(P, R)``               column r: ``Normal(0, lam_r + eps)``
    ``prefix.bias``             ``(P,)``                 ``Normal(0, bias_scale)``
    ``prefix.main_effects``     ``(P, sum_m d_m)``       ``Normal(0, main_effects_scale)``
    ==========================  =======================  ==============================

    ``R = max_rank``; ``eps = scale_floor``. Component r is switched off when ``lam_r`` (and
    with it every column r) shrinks to ~0; the effective rank is the number of components on
    (see :mod:`bayes_fusion.rank`).

    **Main effects** (``main_effects=True``): a linear term ``V`` on the concatenated inputs
    with its own fixed-scale prior, outside the rank prior. With append-one alone, a main
    effect of one modality needs a whole component (the constant rows of the other modalities'
    factors), and the rank prior shrinks it as much as a full M-way interaction; small data
    sets then lose to a plain linear model. With the term, the components only have to carry
    what the linear model misses, and a collapsed rank means "linear is enough". A
    :class:`~bayes_fusion.Classifier` switches them on unless ``main_effects=False`` was given
    (see ``docs/howto.rst``).

    **Missing modality.** An entry ``None`` is replaced by the modality's mean input. With
    ``append_one`` that is ``[0, ..., 0, 1]``, i.e. ``x~_m U_m`` becomes the constant row of
    ``U_m``. Because ``y`` is multilinear in the modalities, this is the *exact* predictive
    mean over the missing modality whenever that modality is standardized (zero mean) and
    independent of the others: ``E[y | others] = (prod_{k != m} x~_k U_k) (E[x~_m] U_m) U_out^T``.

    :param in_features: feature sizes ``(d_1, ..., d_M)``, ``M >= 2``.
    :param out_features: output size ``P``.
    :param max_rank: number of CP components ``R`` (an upper bound on the rank).
    :param eta: rank-prior scale (``> 0``).
    :param rank_prior: ``"half_cauchy"`` or ``"log_uniform"``.
    :param append_one: append the constant 1 to every modality (all lower-order interactions
        representable).
    :param bias: whether to add a bias site.
    :param scale_floor: ``eps`` above, ``> 0``.
    :param bias_scale: prior std of the bias (default 10: weakly informative, like the
        unpenalized intercept of a logistic regression; the bias is learned from the data).
    :param main_effects: add the linear main-effects site ``main_effects``. ``None`` (default):
        on when the layer is wrapped by :class:`~bayes_fusion.Classifier`, off otherwise (a bare
        layer, a :class:`~bayes_fusion.Regressor`, a user model).
    :param main_effects_scale: prior std of every main-effect weight (``> 0``; ``1`` is the
        Gaussian prior behind an L2-penalized logistic regression with ``C = 1``).

    Example::

        >>> import torch, bayes_fusion as bf
        >>> fusion = bf.CPFusion(in_features=(3, 4), out_features=2, max_rank=5)
        >>> fusion([torch.randn(10, 3), torch.randn(10, 4)]).shape
        torch.Size([10, 2])
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        max_rank: int,
        eta: float = 1.0,
        rank_prior: str = "half_cauchy",
        append_one: bool = True,
        bias: bool = True,
        scale_floor: float = 1e-3,
        bias_scale: float = 10.0,
        main_effects: bool | None = None,
        main_effects_scale: float = 1.0,
    ) -> None:
        if isinstance(in_features, int) or not isinstance(in_features, (list, tuple)):
            raise TypeError(f"in_features: expected a sequence of >= 2 ints, got {in_features!r}")
        if len(in_features) < 2:
            raise ValueError(f"in_features: expected >= 2 modalities, got {tuple(in_features)}")
        in_features = tuple(
            check_positive_int(f"in_features[{m}]", d) for m, d in enumerate(in_features)
        )
        out_features = check_positive_int("out_features", out_features)
        max_rank = check_positive_int("max_rank", max_rank)
        super().__init__(eta, rank_prior, scale_floor, bias_scale)
        self.in_features = in_features
        self.out_features = out_features
        self.max_rank = max_rank
        self.append_one = bool(append_one)
        self.use_bias = bool(bias)
        #: ``main_effects=None`` leaves the choice to the model that wraps the layer
        self.main_effects_auto = main_effects is None
        self.main_effects = bool(main_effects)
        self.register_buffer(
            "main_effects_scale",
            torch.tensor(check_positive_float("main_effects_scale", main_effects_scale)),
        )

    @property
    def rank(self) -> int:
        """Number of components (``max_rank``)."""
        return self.max_rank

    @property
    def num_modalities(self) -> int:
        return len(self.in_features)

    def factor_rows(self) -> tuple[int, ...]:
        """Rows ``d~_m`` of every input factor."""
        return tuple(d + int(self.append_one) for d in self.in_features)

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Short site name -> event shape, in sampling order."""
        shapes = {self.SCALE_SITE: (self.max_rank,)}
        for m, rows in enumerate(self.factor_rows()):
            shapes[f"factor_{m}"] = (rows, self.max_rank)
        shapes["out_factor"] = (self.out_features, self.max_rank)
        if self.use_bias:
            shapes["bias"] = (self.out_features,)
        if self.main_effects:
            shapes["main_effects"] = (self.out_features, sum(self.in_features))
        return shapes

    def scaled_sites(self) -> tuple[str, ...]:
        """Short names of the factor sites whose columns have prior ``Normal(0, lam + eps)``."""
        return tuple(f"factor_{m}" for m in range(self.num_modalities)) + ("out_factor",)

    def output_sites(self) -> tuple[str, ...]:
        """Short names of the sites whose first axis indexes the outputs, i.i.d. a priori along
        it: a shift common to every output moves every output by the same amount."""
        sites = ("out_factor",) + (("bias",) if self.use_bias else ())
        return sites + (("main_effects",) if self.main_effects else ())

    def forward(self, inputs: Sequence[Tensor | None]) -> Tensor:
        """Sample the weights and fuse the modalities.

        :param inputs: list of M tensors of shape ``(..., B, d_m)`` or ``None`` (missing).
        :returns: tensor of shape ``(..., B, P)``; under a particle plate the particle dims of
            the weights lead.
        """
        inputs = check_modalities(inputs, self.in_features)
        first = next(m for m, x in enumerate(inputs) if x is not None)
        self._check_input_like(f"inputs[{first}]", inputs[first])
        return self.apply(self.sample_sites(inputs[first]), inputs)

    def site_priors(self, values: dict[str, Tensor]):
        """Priors in sampling order (see :meth:`RankLayer.site_priors`): ``rank_scale``, every
        ``factor_m`` and ``out_factor`` (columns ``Normal(0, lambda + eps)``), ``bias``,
        ``main_effects``."""
        yield self.SCALE_SITE, self.rank_prior.distribution(self.max_rank)
        scales = values[self.SCALE_SITE]
        for m, rows in enumerate(self.factor_rows()):
            yield f"factor_{m}", self._scaled_prior(scales, rows)
        yield "out_factor", self._scaled_prior(scales, self.out_features)
        if self.use_bias:
            yield "bias", self._bias_prior(self.out_features, scales.dtype)
        if self.main_effects:
            shape = (self.out_features, sum(self.in_features))
            std = self.main_effects_scale.to(scales.dtype).expand(shape)
            yield "main_effects", dist.Normal(torch.zeros_like(std), std).to_event(2)

    def apply(self, values: dict[str, Tensor], inputs: Sequence[Tensor | None]) -> Tensor:
        """Fuse checked ``inputs`` with given weights (short name -> value, Pyro's layout).

        :returns: tensor of shape ``(..., B, P)``.
        """
        factors = [to_op_layout(values[f"factor_{m}"], 2) for m in range(self.num_modalities)]
        out_factor = to_op_layout(values["out_factor"], 2)
        bias = to_op_layout(values["bias"], 1) if self.use_bias else None
        out = cp_fusion(inputs, factors, out_factor, bias=bias, append_one=self.append_one)
        if self.main_effects:
            weight = to_op_layout(values["main_effects"], 2)
            out = out + cp_main_effects(inputs, weight, self.in_features)
        return out

    def init_values(self) -> dict[str, Tensor]:
        """Initial values that keep every component alive at the start of training.

        ``lambda = 1``; ``U_m ~ randn / sqrt(d~_m)`` so each projection ``x~_m U_m`` is O(1)
        for standardized inputs; ``U_out ~ randn / sqrt(R)``; bias 0. (Initialising from the
        prior or with small factors lets every lambda collapse before the data are fit.)
        """
        like = self._buffer_like()
        kw = {"dtype": like.dtype, "device": like.device}
        values = {self.site_name(self.SCALE_SITE): torch.ones(self.max_rank, **kw)}
        for m, rows in enumerate(self.factor_rows()):
            values[self.site_name(f"factor_{m}")] = torch.randn(
                rows, self.max_rank, **kw
            ) / math.sqrt(rows)
        values[self.site_name("out_factor")] = torch.randn(
            self.out_features, self.max_rank, **kw
        ) / math.sqrt(self.max_rank)
        if self.use_bias:
            values[self.site_name("bias")] = torch.zeros(self.out_features, **kw)
        if self.main_effects:
            shape = (self.out_features, sum(self.in_features))
            values[self.site_name("main_effects")] = torch.zeros(shape, **kw)
        return values

    def relevance(self, values: dict[str, Tensor]) -> Tensor:
        """Relevance of each component: the Frobenius norm of its rank-one term.

        :param values: short site name -> tensor with leading draw dims, e.g. ``(S, d~_m, R)``.
        :returns: tensor of shape ``(..., R)``.
        """
        factors = [values[f"factor_{m}"] for m in range(self.num_modalities)]
        return cp_component_norms(factors, values["out_factor"])

    def component_terms(
        self, values: dict[str, Tensor], inputs: Sequence[Tensor | None]
    ) -> tuple[Tensor, Tensor]:
        """Component ``r``'s term is ``prod_m (x~_m U_m)[n, r] * U_out[p, r]``: scores
        ``(..., N, R)`` (the product of the modality projections; a missing modality gives one
        row) and loadings ``U_out`` ``(..., P, R)``. See :meth:`RankLayer.component_terms`."""
        factors = [values[f"factor_{m}"] for m in range(self.num_modalities)]
        return cp_scores(inputs, factors, self.append_one), values["out_factor"]

    def component_dof(self) -> int:
        """``sum_m d~_m + P - M``: the free parameters of one component (its factor columns'
        entries less the ``M`` scale trades between its ``M + 1`` factors)."""
        return sum(self.factor_rows()) + self.out_features - self.num_modalities

    def num_parameters(self, rank: int | None = None) -> int:
        """Number of weights of a deterministic layer at ``rank`` (default ``max_rank``)."""
        rank = self.max_rank if rank is None else rank
        return (
            rank * (sum(self.factor_rows()) + self.out_features)
            + (self.out_features if self.use_bias else 0)
            + (self.out_features * sum(self.in_features) if self.main_effects else 0)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"max_rank={self.max_rank}, append_one={self.append_one}, bias={self.use_bias}"
            + (", main_effects=True" if self.main_effects else "")
        )
