"""Synthetic data with a known answer: a CP fusion of known rank, an XOX map with known genes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._checks import check_positive_float, check_positive_int
from ..ops.cp import cp_fusion
from ..ops.xox import xox_linear


@dataclass
class SyntheticData:
    """Inputs, targets and the ground truth that generated them.

    :ivar inputs: list of ``(N, d_m)`` tensors (CP) or one ``(N, in)`` tensor (XOX).
    :ivar y: targets ``(N, P)``.
    :ivar true_rank: the number of components (CP) or active genes (XOX).
    :ivar noise: the noise std.
    :ivar truth: the generating factors.
    """

    inputs: list[Tensor] | Tensor
    y: Tensor
    true_rank: int
    noise: float
    truth: dict[str, Tensor] = field(default_factory=dict)

    def split(self, num_train: int) -> tuple[SyntheticData, SyntheticData]:
        """Split rows into ``(train, test)`` at ``num_train``."""

        def take(sl):
            inputs = (
                [x[sl] for x in self.inputs] if isinstance(self.inputs, list) else self.inputs[sl]
            )
            return SyntheticData(inputs, self.y[sl], self.true_rank, self.noise, self.truth)

        return take(slice(0, num_train)), take(slice(num_train, None))


def _cp_truth(in_features, out_features, rank, num_data, append_one, gen):
    """Inputs ``x_m ~ N(0, I)``, factors ``U_m ~ N(0, 1/d~_m)``, ``U_out ~ N(0, 1/R)`` rescaled so
    that the fusion output has unit std: ``(inputs, truth, clean)`` in float64. ``rank = 0``:
    no interaction, a linear map of the concatenated views (``truth["main_effects"]``
    ``(P, sum_m d_m)``) scaled to unit std."""
    kw = {"generator": gen, "dtype": torch.float64}
    if rank == 0:
        inputs = [torch.randn(num_data, d, **kw) for d in in_features]
        weight = torch.randn(out_features, sum(in_features), **kw)
        clean = torch.cat(inputs, -1) @ weight.T
        scale = clean.std()
        return inputs, {"main_effects": weight / scale}, clean / scale
    rows = [d + int(append_one) for d in in_features]
    factors = [torch.randn(r, rank, **kw) / math.sqrt(r) for r in rows]
    out_factor = torch.randn(out_features, rank, **kw) / math.sqrt(rank)
    inputs = [torch.randn(num_data, d, **kw) for d in in_features]
    clean = cp_fusion(inputs, factors, out_factor, append_one=append_one)
    scale = clean.std()
    truth = {f"factor_{m}": f for m, f in enumerate(factors)}
    truth["out_factor"] = out_factor / scale
    return inputs, truth, clean / scale


def make_cp_regression(
    in_features: Sequence[int] = (8, 12, 10),
    out_features: int = 6,
    rank: int = 3,
    num_data: int = 2000,
    noise: float = 0.1,
    append_one: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticData:
    """Regression data from a CP fusion of known rank.

    Inputs ``x_m ~ N(0, I)``; factors ``U_m ~ N(0, 1/d~_m)`` (each projection is O(1));
    ``U_out`` columns are scaled so that every component carries a similar share of the output
    variance and ``Var(y) ~ 1``; ``y = fusion(x) + noise * N(0, I)``. ``rank = 0``: no
    interaction at all, the mean is linear in the concatenated views (what main effects fit).

    :returns: :class:`SyntheticData` with ``true_rank = rank``.
    """
    check_positive_int("rank", rank, minimum=0)
    check_positive_int("num_data", num_data)
    check_positive_float("noise", noise)
    gen = torch.Generator().manual_seed(seed)
    inputs, truth, clean = _cp_truth(in_features, out_features, rank, num_data, append_one, gen)
    y = clean + noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    truth = {k: v.to(dtype) for k, v in truth.items()}
    return SyntheticData([x.to(dtype) for x in inputs], y.to(dtype), rank, noise, truth)


def make_cp_classification(
    in_features: Sequence[int] = (6, 8, 5),
    classes: int = 4,
    rank: int = 3,
    num_data: int = 2000,
    logit_scale: float = 3.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticData:
    """Multi-class labels from the softmax of an append-one CP fusion of known rank.

    The fusion is built as in :func:`make_cp_regression` (unit std), times ``logit_scale``;
    labels are drawn from ``Categorical(logits)``. ``truth["probs"]`` ``(N, classes)`` holds
    the true class probabilities, so the Bayes-optimal accuracy and log-loss are known.

    :param logit_scale: std of the true logits (larger: more separable classes).
    :param rank: the CP rank of the logits; ``0``: linear logits, no interaction.
    :returns: :class:`SyntheticData` with integer labels ``y`` ``(N,)`` and ``noise = 0``.
    """
    check_positive_int("rank", rank, minimum=0)
    check_positive_int("num_data", num_data)
    check_positive_int("classes", classes)
    check_positive_float("logit_scale", logit_scale)
    gen = torch.Generator().manual_seed(seed)
    inputs, truth, clean = _cp_truth(in_features, classes, rank, num_data, True, gen)
    probs = (logit_scale * clean).softmax(-1)
    y = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    for name in ("out_factor", "main_effects"):
        if name in truth:
            truth[name] = truth[name] * logit_scale
    truth["probs"] = probs
    truth = {k: v.to(dtype) for k, v in truth.items()}
    return SyntheticData([x.to(dtype) for x in inputs], y, rank, 0.0, truth)


def make_xox_regression(
    in_features: int = 20,
    out_features: int = 10,
    genes: int = 3,
    num_data: int = 2000,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticData:
    """Regression data ``y = x W^T + noise`` with ``W = X_out O X_in^T`` of ``genes`` genes.

    :returns: :class:`SyntheticData` with ``true_rank = genes``.
    """
    check_positive_int("genes", genes)
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    x_in = torch.randn(in_features, genes, **kw)
    core = torch.randn(genes, genes, **kw)
    x_out = torch.randn(out_features, genes, **kw)
    x = torch.randn(num_data, in_features, **kw)
    clean = xox_linear(x, x_in, core, x_out)
    scale = clean.std()
    clean = clean / scale
    y = clean + noise * torch.randn(clean.shape, **kw)
    truth = {"x_in": x_in.to(dtype), "core": (core / scale).to(dtype), "x_out": x_out.to(dtype)}
    return SyntheticData(x.to(dtype), y.to(dtype), genes, noise, truth)
