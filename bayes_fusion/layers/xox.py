"""Bayesian XOX ("genomic bottleneck") linear layer."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor

from .._checks import check_choice, check_finite, check_float_tensor, check_positive_int
from ..ops.xox import (
    ORDERS,
    default_genes,
    xox_compact,
    xox_linear,
    xox_num_parameters,
    xox_singular_values,
)
from .base import RankLayer, to_op_layout, validation_enabled, warn_if_larger_than_dense


class XOXLinear(RankLayer):
    r"""Bayesian XOX linear layer ``y = x W^T + b`` with ``W = s X_out O X_in^T``.

    A drop-in for ``nn.Linear(in_features, out_features)`` whose weight passes through a
    bottleneck of ``G`` "genes" with automatic relevance determination over the genes.

    **Sample sites** (``prefix`` as in :class:`CPFusion`):

    ======================  ================  ===========================================
    site                    shape             prior
    ======================  ================  ===========================================
    ``prefix.rank_scale``   ``(G,)``          ``HalfCauchy(eta)`` (or log-uniform)
    ``prefix.x_in``         ``(in, G)``       column g: ``Normal(0, lam_g + eps)``
    ``prefix.core``         ``(G, G)``        ``Normal(0, sqrt((lam_g + eps)(lam_h + eps)))``
    ``prefix.x_out``        ``(out, G)``      column g: ``Normal(0, lam_g + eps)``
    ``prefix.bias``         ``(out,)``        ``Normal(0, bias_scale)``
    ======================  ================  ===========================================

    **ARD choice.** ``lambda_g`` scales column g of ``X_in`` and ``X_out`` and, through
    ``sqrt(lam_g lam_h)``, row and column g of the core, so when ``lambda_g -> 0`` every term of
    ``W`` that involves gene g vanishes and the gene can be removed. Genes are identified only
    up to invertible re-mixing (``X_in A^{-T}``, ``A O``, ... leave ``W`` unchanged), so the
    *relevance* used for the effective rank is the set of singular values of ``W``
    (:meth:`relevance`): the effective number of genes is the fewest genes that represent ``W``.
    The fixed output scale ``s = 1 / G`` keeps ``std(W_ij)`` of order ``lam^2`` under the prior.

    The evaluation order (``"factored"`` or ``"dense"``) is chosen by FLOP count; see
    :func:`bayes_fusion.ops.xox_linear`.

    :param in_features: input size.
    :param out_features: output size.
    :param genes: number of genes ``G``; ``None``: :func:`~bayes_fusion.ops.default_genes`, the
        most genes whose factors hold at most a quarter of the dense weight's entries. ``W``'s
        rank is at most ``min(G, in, out)`` (:attr:`max_rank`); more factored weights than the
        dense layer has warn (:class:`~bayes_fusion.layers.base.ParameterBudgetWarning`).
    :param eta: rank-prior scale (``> 0``).
    :param rank_prior: ``"half_cauchy"`` or ``"log_uniform"``.
    :param bias: whether to add a bias site.
    :param order: ``"auto"``, ``"factored"`` or ``"dense"``.
    :param scale_floor: ``eps`` above.
    :param bias_scale: prior std of the bias (default 10: weakly informative).
    :param dtype: dtype of the layer's buffers (and so of its sites), as ``nn.Linear``'s.
    :param device: device of the layer's buffers, as ``nn.Linear``'s.

    Example::

        >>> import torch, bayes_fusion as bf
        >>> layer = bf.XOXLinear(in_features=20, out_features=5, genes=4)
        >>> layer(torch.randn(8, 20)).shape
        torch.Size([8, 5])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        genes: int | None = None,
        eta: float = 1.0,
        rank_prior: str = "half_cauchy",
        bias: bool = True,
        order: str = "auto",
        scale_floor: float = 1e-3,
        bias_scale: float = 10.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        if genes is None:
            genes = default_genes(in_features, out_features)
        genes = check_positive_int("genes", genes)
        check_choice("order", order, ORDERS)
        super().__init__(eta, rank_prior, scale_floor, bias_scale)
        self.in_features = in_features
        self.out_features = out_features
        self.genes = genes
        self.use_bias = bool(bias)
        self.order = order
        self.register_buffer("output_scale", torch.tensor(1.0 / genes))
        self.register_buffer("core_scale", torch.tensor(1.0))
        if dtype is not None or device is not None:
            self.to(device=device, dtype=dtype)
        warn_if_larger_than_dense(
            f"XOXLinear({in_features}, {out_features}, genes={genes})",
            xox_num_parameters(in_features, out_features, genes, bias=False),
            in_features * out_features,
        )

    @property
    def rank(self) -> int:
        """Number of genes ``G`` (the length of the scale site)."""
        return self.genes

    @property
    def max_rank(self) -> int:
        """The largest rank ``W`` can have: ``min(G, in, out)``."""
        return min(self.genes, self.in_features, self.out_features)

    def site_shapes(self) -> dict[str, tuple[int, ...]]:
        """Short site name -> event shape, in sampling order."""
        shapes = {
            self.SCALE_SITE: (self.genes,),
            "x_in": (self.in_features, self.genes),
            "core": (self.genes, self.genes),
            "x_out": (self.out_features, self.genes),
        }
        if self.use_bias:
            shapes["bias"] = (self.out_features,)
        return shapes

    def scaled_sites(self) -> tuple[str, ...]:
        """Short names of the factor sites whose columns have prior ``Normal(0, lam + eps)``."""
        return ("x_in", "x_out")

    def output_sites(self) -> tuple[str, ...]:
        """Short names of the sites whose first axis indexes the outputs, i.i.d. a priori along
        it: a shift common to every output moves every output by the same amount."""
        return ("x_out", "bias") if self.use_bias else ("x_out",)

    def forward(self, x: Tensor) -> Tensor:
        """Sample the weights and apply the layer.

        :param x: input of shape ``(..., B, in)``.
        :returns: tensor of shape ``(..., B, out)``.
        """
        self._check_input(x)
        return self.apply(self.sample_sites(x), x)

    def _check_input(self, x: Tensor) -> None:
        """Shape, dtype and device of ``x`` always; its values (NaN/inf) when validating and not
        compiling (:func:`~bayes_fusion.layers.base.validation_enabled`), so that
        ``torch.compile(fullgraph=True)`` traces through."""
        check_float_tensor("x", x, min_dim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected {self.in_features} features (last dim), got shape {tuple(x.shape)}"
            )
        self._check_input_like("x", x)
        if validation_enabled():
            check_finite("x", x)

    def site_priors(self, values: dict[str, Tensor]):
        """Priors in sampling order (see :meth:`RankLayer.site_priors`): ``rank_scale``,
        ``x_in``, ``core``, ``x_out``, ``bias``."""
        yield self.SCALE_SITE, self.rank_prior.distribution(self.genes)
        scales = values[self.SCALE_SITE]
        yield "x_in", self._scaled_prior(scales, self.in_features)
        core_std = self._core_std(scales)
        yield "core", dist.Normal(torch.zeros_like(core_std), core_std).to_event(2)
        yield "x_out", self._scaled_prior(scales, self.out_features)
        if self.use_bias:
            yield "bias", self._bias_prior(self.out_features, scales.dtype)

    def apply(self, values: dict[str, Tensor], x: Tensor) -> Tensor:
        """The layer on a checked ``x`` ``(..., B, in)`` with given weights (short name ->
        value, Pyro's layout); returns ``(..., B, out)``."""
        bias = to_op_layout(values["bias"], 1) if self.use_bias else None
        return xox_linear(
            x,
            to_op_layout(values["x_in"], 2),
            to_op_layout(values["core"], 2),
            to_op_layout(values["x_out"], 2),
            scale=self.output_scale,
            bias=bias,
            order=self.order,
        )

    def _core_std(self, scales: Tensor) -> Tensor:
        """Prior std of the core: ``core_scale * sqrt((lam_g + eps)(lam_h + eps))``."""
        s = (scales + self.scale_floor).sqrt()
        return self.core_scale.to(scales.dtype) * s.unsqueeze(-1) * s.unsqueeze(-2)

    def init_values(self) -> dict[str, Tensor]:
        """Initial values: ``lambda = 1``, ``O ~ randn``, ``X ~ randn * sqrt(std_target)`` so
        that ``std(W)`` equals the Kaiming-normal std ``sqrt(2 / in)``; bias 0."""
        like = self._buffer_like()
        kw = {"dtype": like.dtype, "device": like.device}
        std_x = (2.0 / self.in_features) ** 0.25
        values = {
            self.site_name(self.SCALE_SITE): torch.ones(self.genes, **kw),
            self.site_name("x_in"): torch.randn(self.in_features, self.genes, **kw) * std_x,
            self.site_name("core"): torch.randn(self.genes, self.genes, **kw),
            self.site_name("x_out"): torch.randn(self.out_features, self.genes, **kw) * std_x,
        }
        if self.use_bias:
            values[self.site_name("bias")] = torch.zeros(self.out_features, **kw)
        return values

    def relevance(self, values: dict[str, Tensor]) -> Tensor:
        """Relevance of the bottleneck's components: the singular values of ``W`` (sorted).

        Genes are only identified up to invertible re-mixing (``X_in A^{-T}``, ``A O`` ... give
        the same ``W``), so per-gene norms depend on the gauge; the singular values do not.
        The effective number of genes is the number of non-negligible singular values: the
        fewest genes that represent ``W`` (see :meth:`compact_factors`).

        :param values: short site name -> tensor with leading draw dims.
        :returns: tensor of shape ``(..., min(G, in, out))``.
        """
        sv = xox_singular_values(values["x_in"], values["core"], values["x_out"])
        return sv * self.output_scale.to(sv.dtype)

    def compact_factors(self, values: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
        """Factors of an XOX map with ``rank`` genes closest to ``W`` (truncated SVD), computed
        from QR factorizations of the thin factors and the SVD of a ``G x G`` matrix
        (:func:`~bayes_fusion.ops.xox_compact`): ``O((in + out) G^2)`` time and memory, the dense
        ``W`` is never formed.

        ``W ~ U_k S_k V_k^T`` is written as ``X_out = U_k S_k^{1/2}``, ``O = I_k``,
        ``X_in = V_k S_k^{1/2}`` with output scale 1; exact when ``rank(W) <= rank``.

        :param values: short site name -> tensor (one draw, no leading dims).
        :param rank: genes to keep (at most :attr:`max_rank` are kept).
        :returns: ``{"x_in": (in, k), "core": (k, k), "x_out": (out, k), "scale": 1.0}``.
        """
        x_in, x_out = xox_compact(
            values["x_in"], values["core"], values["x_out"], self.output_scale, rank
        )
        k = x_in.shape[-1]
        return {
            "x_in": x_in,
            "core": torch.eye(k, dtype=x_in.dtype, device=x_in.device),
            "x_out": x_out,
            "scale": 1.0,
        }

    def component_terms(self, values: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        """The components are ``W``'s singular directions (as for :meth:`relevance`): with
        ``W = U S V^T``, direction ``k`` adds ``(x . v_k) s_k u_k``. Scores ``x V S^{1/2}``
        ``(..., N, K)`` and loadings ``U S^{1/2}`` ``(..., out, K)``, ``K = max_rank``, from
        :func:`~bayes_fusion.ops.xox_compact` (``W`` is never formed). See
        :meth:`RankLayer.component_terms`."""
        x_in, x_out = xox_compact(
            values["x_in"], values["core"], values["x_out"], self.output_scale, self.max_rank
        )
        return torch.matmul(x, x_in), x_out

    def component_dof(self) -> int:
        """``in + out - 1``: a singular direction's two unit vectors and its singular value."""
        return self.in_features + self.out_features - 1

    def num_parameters(self, rank: int | None = None) -> int:
        """Number of weights of a deterministic XOX layer with ``rank`` genes."""
        g = self.genes if rank is None else rank
        return xox_num_parameters(self.in_features, self.out_features, g, self.use_bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"genes={self.genes}, bias={self.use_bias}, order={self.order!r}"
        )


__all__ = ["XOXLinear"]
