"""Deterministic twins (plain ``nn.Module``, no Pyro) of the Bayesian layers.

They are what :func:`bayes_fusion.prune` exports, and the fixed versions of the seed layers:
:class:`DeterministicCPFusion` honours the CP weights (the seed's forward ignored them), and
:class:`DeterministicXOXLinear` is a true drop-in for ``nn.Linear`` with a bias and a
closed-form init scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_float_tensor, check_positive_int
from ..ops.cp import cp_fusion, cp_main_effects, cp_to_dense, embed_main_effects
from ..ops.xox import (
    INIT_TARGETS,
    ORDERS,
    default_genes,
    xox_init_scale,
    xox_linear,
    xox_num_parameters,
    xox_to_dense,
)
from .base import warn_if_larger_than_dense
from .cp import check_modalities


class DeterministicCPFusion(nn.Module):
    """CP fusion ``y = ((prod_m x~_m U_m) * w) U_out^T + b [+ sum_m x_m V_m^T]`` with learnable
    parameters.

    :param in_features: feature sizes ``(d_1, ..., d_M)``.
    :param out_features: output size ``P``.
    :param rank: number of CP components ``R`` (``0``: main effects and bias alone, what
        pruning a layer whose posterior has no component gives).
    :param append_one: append the constant 1 to every modality.
    :param bias: whether to learn a bias.
    :param main_effects: whether to learn linear main effects ``V`` (initialised at 0).
    :param dtype: parameter dtype; ``device``: parameter device.

    Parameters: ``factors[m]`` ``(d~_m, R)``, ``out_factor`` ``(P, R)``, ``weights`` ``(R,)``,
    ``bias`` ``(P,)``, ``main_effects`` ``(P, sum_m d_m)``.
    """

    def __init__(
        self,
        in_features: Sequence[int],
        out_features: int,
        rank: int,
        append_one: bool = True,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        main_effects: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(in_features, int) or len(in_features) < 2:
            raise ValueError(f"in_features: expected >= 2 modality sizes, got {in_features!r}")
        self.in_features = tuple(
            check_positive_int(f"in_features[{m}]", d) for m, d in enumerate(in_features)
        )
        self.out_features = check_positive_int("out_features", out_features)
        self.rank = check_positive_int("rank", rank, minimum=0)
        self.append_one = bool(append_one)
        kw = {"dtype": dtype, "device": device}
        rows = [d + int(self.append_one) for d in self.in_features]
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(r, self.rank, **kw) / math.sqrt(r)) for r in rows]
        )
        self.out_factor = nn.Parameter(
            torch.randn(self.out_features, self.rank, **kw) / math.sqrt(max(self.rank, 1))
        )
        self.weights = nn.Parameter(torch.ones(self.rank, **kw))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None
        main_shape = (self.out_features, sum(self.in_features))
        self.main_effects = nn.Parameter(torch.zeros(main_shape, **kw)) if main_effects else None

    def forward(self, inputs: Sequence[Tensor | None]) -> Tensor:
        """Fuse the modalities.

        :param inputs: list of M tensors ``(..., B, d_m)`` or ``None``.
        :returns: ``(..., B, P)``.
        """
        inputs = check_modalities(inputs, self.in_features, check_values=False)
        out = cp_fusion(
            inputs, list(self.factors), self.out_factor, self.weights, self.bias, self.append_one
        )
        if self.main_effects is not None:
            out = out + cp_main_effects(inputs, self.main_effects, self.in_features)
        return out

    def to_dense(self) -> Tensor:
        """Dense weight tensor of shape ``(d~_1, ..., d~_M, P)`` (tests/export only), main
        effects included (they need ``append_one``)."""
        dense = cp_to_dense(list(self.factors), self.out_factor, self.weights)
        if self.main_effects is None:
            return dense
        if not self.append_one:
            raise ValueError(
                "to_dense: main effects sit on the constant rows of a dense fusion tensor, "
                "which needs append_one=True, got append_one=False"
            )
        return embed_main_effects(dense, self.main_effects, self.in_features)

    def to_tltorch(self):
        """Export the weight as a ``tltorch.CPTensor`` of shape ``(d~_1, ..., d~_M, P)``
        (refused with main effects, which a CP tensor does not hold, and at rank 0, which has no
        CP factors)."""
        from .interop import cp_to_tltorch, refuse_main_effects

        refuse_main_effects(self.main_effects is not None)
        if self.rank == 0:
            raise ValueError(
                "to_tltorch: a rank-0 layer has no CP factors to export (its output is its bias "
                "alone), got rank=0"
            )
        return cp_to_tltorch(
            [f.detach() for f in self.factors], self.out_factor.detach(), self.weights.detach()
        )

    @classmethod
    def from_tltorch(
        cls, cp, append_one: bool = True, bias: Tensor | None = None
    ) -> DeterministicCPFusion:
        """Build the layer from a ``tltorch.CPTensor`` of shape ``(d~_1, ..., d~_M, P)``.

        :param cp: the CP tensor; its last mode is the output.
        :param append_one: whether the input modes include the constant row.
        :param bias: optional bias of shape ``(P,)``.
        """
        from .interop import cp_from_tltorch

        factors, out_factor, weights = cp_from_tltorch(cp)
        return cls.from_factors(factors, out_factor, weights, bias, append_one)

    @classmethod
    def from_factors(
        cls,
        factors: Sequence[Tensor],
        out_factor: Tensor,
        weights: Tensor | None = None,
        bias: Tensor | None = None,
        append_one: bool = True,
        main_effects: Tensor | None = None,
    ) -> DeterministicCPFusion:
        """Build the layer holding copies of the given factors (shapes as in the class doc)."""
        rank = out_factor.shape[-1]
        sizes = [f.shape[0] - int(append_one) for f in factors]
        layer = cls(
            sizes,
            out_factor.shape[0],
            rank,
            append_one,
            bias is not None,
            dtype=out_factor.dtype,
            device=out_factor.device,
            main_effects=main_effects is not None,
        )
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=False):
                p.copy_(f)
            layer.out_factor.copy_(out_factor)
            layer.weights.copy_(weights if weights is not None else torch.ones_like(layer.weights))
            if bias is not None:
                layer.bias.copy_(bias)
            if main_effects is not None:
                layer.main_effects.copy_(main_effects)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, append_one={self.append_one}, bias={self.bias is not None}"
            + (", main_effects=True" if self.main_effects is not None else "")
        )


class DeterministicXOXLinear(nn.Module):
    """XOX linear layer, a drop-in for ``nn.Linear``: ``(..., in) -> (..., out)``.

    ``W = s X_out O X_in^T``, never formed by ``forward`` when the factored order is cheaper.
    Factors start at the seed's stds (``X ~ N(0, 1/(3G))``, ``O ~ N(0, 1/G^2)``) and the scale
    ``s`` is set in closed form (:func:`bayes_fusion.ops.xox_init_scale`) so that ``std(W)``
    equals the target -- no random reference draw.

    Differences from ``nn.Linear``: there is no ``weight`` parameter. :attr:`weight` (read-only)
    and :meth:`dense_weight` materialize ``W`` (``out x in``) from the factors on every call:
    changing the tensor they return changes nothing, and assigning ``layer.weight`` raises;
    ``nn.init`` functions apply to ``x_in``, ``core`` and ``x_out``.

    :param in_features: input size.
    :param out_features: output size.
    :param genes: bottleneck size ``G``; ``None``: :func:`bayes_fusion.ops.default_genes`, the
        most genes whose factors hold at most a quarter of the dense weight's entries. More
        factored weights than the dense layer has warn
        (:class:`~bayes_fusion.layers.base.ParameterBudgetWarning`). ``0``: ``W = 0``, the layer
        outputs its bias (what pruning a layer whose posterior has no gene gives).
    :param bias: whether to learn a bias (initialised like ``nn.Linear``'s).
    :param init: target std of ``W``: ``"kaiming"`` (normal, fan-in, gain sqrt(2): ``sqrt(2 /
        in)``), ``"xavier"`` (normal, gain 1) or ``"linear"`` (``1 / sqrt(3 in)``, the std of
        ``nn.Linear``'s default uniform init).
    :param order: evaluation order, ``"auto"`` (by FLOPs), ``"factored"`` or ``"dense"``.
    :param learn_scale: make ``s`` a parameter (the seed did) rather than a buffer.
    :param dtype: dtype of the parameters, as ``nn.Linear``'s.
    :param device: device of the parameters, as ``nn.Linear``'s.

    Example::

        >>> import torch, bayes_fusion as bf
        >>> layer = bf.DeterministicXOXLinear(64, 128)  # genes from the parameter budget
        >>> layer.genes, layer(torch.randn(5, 64)).shape
        (10, torch.Size([5, 128]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        genes: int | None = None,
        bias: bool = True,
        init: str = "kaiming",
        order: str = "auto",
        learn_scale: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        if genes is None:
            genes = default_genes(self.in_features, self.out_features)
        self.genes = check_positive_int("genes", genes, minimum=0)
        self.order = check_choice("order", order, ORDERS)
        check_choice("init", init, INIT_TARGETS)
        warn_if_larger_than_dense(
            f"DeterministicXOXLinear({in_features}, {out_features}, genes={genes})",
            xox_num_parameters(in_features, out_features, genes, bias=False),
            in_features * out_features,
        )
        kw = {"dtype": dtype, "device": device}
        std_x = 1.0 / math.sqrt(3 * max(genes, 1))
        std_core = 1.0 / max(genes, 1)
        self.x_in = nn.Parameter(torch.randn(in_features, genes, **kw) * std_x)
        self.core = nn.Parameter(torch.randn(genes, genes, **kw) * std_core)
        self.x_out = nn.Parameter(torch.randn(out_features, genes, **kw) * std_x)
        scale = torch.tensor(
            xox_init_scale(in_features, out_features, max(genes, 1), std_x, std_core, std_x, init),
            **kw,
        )
        if learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, **kw).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:
        """The dense weight ``(out, in)``, materialized from the factors on every access (read
        only: see :meth:`dense_weight`)."""
        return self.dense_weight()

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":
            raise AttributeError(
                "weight: DeterministicXOXLinear has no weight parameter to assign; W = s X_out "
                "O X_in^T is materialized from the factors (set x_in, core, x_out, or build the "
                "layer with DeterministicXOXLinear.from_factors)"
            )
        super().__setattr__(name, value)

    def dense_weight(self) -> Tensor:
        """The dense weight ``W = s X_out O X_in^T`` ``(out, in)``, built from the factors
        (differentiable; ``out x in`` memory: ``forward`` does not need it)."""
        return xox_to_dense(self.x_in, self.core, self.x_out, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer.

        :param x: ``(..., in)``, in the layer's dtype and on its device.
        :returns: ``(..., out)``.
        """
        check_float_tensor("x", x, min_dim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x: expected {self.in_features} features (last dim), got shape {tuple(x.shape)}"
            )
        if x.dtype != self.x_in.dtype:
            raise TypeError(
                f"x: expected dtype {self.x_in.dtype} (the layer's dtype; convert the input or "
                f"call layer.to({x.dtype})), got {x.dtype}"
            )
        if x.device != self.x_in.device:
            raise ValueError(
                f"x: expected a tensor on {self.x_in.device} (the layer's device), got {x.device}"
            )
        return xox_linear(x, self.x_in, self.core, self.x_out, self.scale, self.bias, self.order)

    @classmethod
    def from_factors(
        cls,
        x_in: Tensor,
        core: Tensor,
        x_out: Tensor,
        scale: float | Tensor = 1.0,
        bias: Tensor | None = None,
        order: str = "auto",
    ) -> DeterministicXOXLinear:
        """Build the layer holding copies of given factors ``(in, G)``, ``(G, G)``, ``(out, G)``."""
        layer = cls(
            x_in.shape[0],
            x_out.shape[0],
            x_in.shape[1],
            bias is not None,
            order=order,
            dtype=x_in.dtype,
            device=x_in.device,
        )
        with torch.no_grad():
            layer.x_in.copy_(x_in)
            layer.core.copy_(core)
            layer.x_out.copy_(x_out)
            layer.scale.copy_(torch.as_tensor(scale, dtype=x_in.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"genes={self.genes}, bias={self.bias is not None}, order={self.order!r}"
        )
