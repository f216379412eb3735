"""Relevance of components, effective rank and the posterior over the rank.

**Relevance** (default ``"norm"``): for CP fusion, the Frobenius norm of component r's rank-one
term ``||u_1r o ... o u_Mr o u_out,r||_F = prod_m ||u_mr|| * ||u_out,r||``; for XOX, the norm of
everything gene g contributes to ``W`` (:func:`bayes_fusion.ops.xox_gene_norms`). It measures
what removing the component changes in the weight, so it is what pruning is judged by, and it
is invariant to the scale/sign symmetries of CP factors (``u_1r * c, u_2r / c``; flipping signs
of columns in pairs). ``"scale"`` uses ``lambda_r`` instead: a prior scale, which the data only
constrain indirectly, so it separates active from inactive components less sharply (see
``docs/concepts.rst`` and the test that measures the separation).

**Effective rank** per draw: the number of components whose relevance exceeds
``threshold * max_r relevance_r`` (scale-aware: relative to the largest component of the same
draw) and an absolute floor (``floor_factor`` times the relevance a component would have with
every entry at the prior floor ``eps``), so that a fully collapsed layer has rank 0.

Components are exchangeable, so every summary here works with *sorted* relevances per draw and
is invariant to permuting components and to sign flips of factor columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layers.base import RankLayer, rank_layers

__all__ = [
    "RankPosterior",
    "layer_draws",
    "relevance_draws",
    "active_components",
    "effective_rank_draws",
    "rank_posterior",
    "hdi_int",
    "hdi_float",
]

RELEVANCE_KINDS = ("norm", "scale")


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold: expected a number in (0, 1), got {threshold!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a number in (0, 1), got {threshold!r}")
    return float(threshold)


def layer_draws(layer: RankLayer, samples: dict[str, Tensor]) -> dict[str, Tensor]:
    """The layer's own draws (short site name -> ``(S, ...)``) out of a model-wide dict."""
    out = {}
    for short, full in layer.site_names().items():
        if full in samples:
            out[short] = samples[full]
    missing = [
        full
        for short, full in layer.site_names().items()
        if short != "bias" and full not in samples
    ]
    if missing:
        raise ValueError(f"samples: expected draws of sites {missing}, got {sorted(samples)}")
    if next(iter(out.values())).shape[0] == 0:
        raise ValueError("samples: expected at least one posterior draw, got an empty posterior")
    return out


def relevance_draws(layer: RankLayer, samples: dict[str, Tensor], kind: str = "norm") -> Tensor:
    """Relevance of each component per draw, shape ``(S, R)`` (unsorted)."""
    if kind not in RELEVANCE_KINDS:
        raise ValueError(f"kind: expected one of {RELEVANCE_KINDS}, got {kind!r}")
    draws = layer_draws(layer, samples)
    if kind == "scale":
        return draws[layer.SCALE_SITE]
    return layer.relevance(draws)


def _floor(layer: RankLayer, kind: str) -> float:
    """Relevance of a component with every entry at the prior floor scale (x10)."""
    eps = 10.0 * float(layer.scale_floor)
    if kind == "scale":
        return eps
    draws = {
        short: torch.full(shape, eps, dtype=torch.float64)
        for short, shape in layer.site_shapes().items()
    }
    return float(layer.relevance(draws).max())


def active_components(
    layer: RankLayer,
    samples: dict[str, Tensor],
    threshold: float = 0.05,
    kind: str = "norm",
) -> Tensor:
    """Which components count as switched on in each draw, shape ``(S, R)`` (bool): relevance
    above ``threshold`` times the draw's largest and above the absolute floor."""
    threshold = _check_threshold(threshold)
    rel = relevance_draws(layer, samples, kind)
    top = rel.max(dim=-1, keepdim=True).values
    return (rel > threshold * top) & (rel > _floor(layer, kind))


def effective_rank_draws(
    layer: RankLayer,
    samples: dict[str, Tensor],
    threshold: float = 0.05,
    kind: str = "norm",
) -> Tensor:
    """Effective rank per draw, shape ``(S,)`` (int64)."""
    return active_components(layer, samples, threshold, kind).sum(-1)


def _hdi(values: Tensor, prob: float) -> tuple[Tensor, Tensor]:
    v = values.flatten().sort().values
    n = v.numel()
    if n == 0:
        raise ValueError("values: expected at least one draw, got none")
    k = max(1, math.ceil(prob * n))
    widths = v[k - 1 :] - v[: n - k + 1]
    i = int(torch.argmin(widths))
    return v[i], v[i + k - 1]


def hdi_int(values: Tensor, prob: float = 0.9) -> tuple[int, int]:
    """Shortest interval of integer values holding at least ``prob`` of the draws."""
    lo, hi = _hdi(values, prob)
    return int(lo), int(hi)


def hdi_float(values: Tensor, prob: float = 0.9) -> tuple[float, float]:
    """Shortest interval holding at least ``prob`` of the draws (highest density interval)."""
    lo, hi = _hdi(values, prob)
    return float(lo), float(hi)


@dataclass
class RankPosterior:
    """Posterior summary of one rank-bearing layer.

    :ivar layer: module path of the layer inside the model ("" at top level).
    :ivar rank_draws: effective rank per draw ``(S,)``.
    :ivar probs: ``P(rank = r)`` for ``r = 0..max_rank``, shape ``(R + 1,)``.
    :ivar relevance: sorted (descending) relevances per draw ``(S, R)``.
    :ivar scales: sorted (descending) ``lambda`` per draw ``(S, R)``.
    """

    layer: str
    max_rank: int
    rank_draws: Tensor
    probs: Tensor
    relevance: Tensor
    scales: Tensor
    hdi_prob: float = 0.9
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.rank_draws.double().mean())

    @property
    def mode(self) -> int:
        return int(torch.argmax(self.probs))

    @property
    def hdi(self) -> tuple[int, int]:
        return hdi_int(self.rank_draws, self.hdi_prob)

    def table(self) -> str:
        """The rank posterior as a text table (ranks with non-zero probability)."""
        lines = ["rank  P(rank)"]
        for r, p in enumerate(self.probs.tolist()):
            if p > 0:
                lines.append(f"{r:>4}  {p:7.3f}")
        return "\n".join(lines)


def _samples_of(result, num_samples: int) -> dict[str, Tensor]:
    samples = result.posterior_draws(num_samples)
    if not samples or next(iter(samples.values())).shape[0] == 0:
        raise ValueError("result: expected at least one posterior draw, got an empty posterior")
    return samples


def rank_posterior(
    result,
    num_samples: int = 500,
    threshold: float = 0.05,
    kind: str = "norm",
    hdi_prob: float = 0.9,
    samples: dict[str, Tensor] | None = None,
) -> dict[str, RankPosterior]:
    """Posterior over the effective rank of every rank-bearing layer of a fit.

    :param result: a :class:`bayes_fusion.FitResult`.
    :param num_samples: guide draws for SVI results (MCMC: all draws).
    :param threshold: relative relevance threshold in ``(0, 1)``.
    :param kind: relevance, ``"norm"`` or ``"scale"``.
    :param samples: precomputed posterior draws (site -> ``(S, ...)``) to use instead.
    :returns: layer path -> :class:`RankPosterior`.
    :raises ValueError: when the model has no rank-bearing layer or the posterior is empty.
    """
    _check_threshold(threshold)
    layers = rank_layers(result.model)
    if not layers:
        raise ValueError(
            f"result: its model ({type(result.model).__name__}) holds no rank-bearing layer "
            "(CPFusion or XOXLinear)"
        )
    samples = _samples_of(result, num_samples) if samples is None else samples
    out = {}
    for path, layer in layers.items():
        rel = relevance_draws(layer, samples, kind)
        ranks = effective_rank_draws(layer, samples, threshold, kind)
        # the largest rank the layer's map can have (XOX: min(genes, in, out))
        probs = torch.bincount(ranks, minlength=layer.max_rank + 1).double() / ranks.numel()
        scales = layer_draws(layer, samples)[layer.SCALE_SITE]
        out[path] = RankPosterior(
            layer=path,
            max_rank=layer.max_rank,
            rank_draws=ranks,
            probs=probs,
            relevance=rel.sort(dim=-1, descending=True).values,
            scales=scales.sort(dim=-1, descending=True).values,
            hdi_prob=hdi_prob,
        )
    return out
