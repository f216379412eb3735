"""Relevance of components, effective rank and the posterior over the rank.

**Effective rank** per draw (default ``criterion="information"``): the number of components
the data can tell from zero. Component ``k`` adds ``scores[n, k] * loadings[p, k]`` to the
model's output (:meth:`~bayes_fusion.layers.base.RankLayer.component_terms`); its
**information**

    ``a_k = 2 sum_n KL(p(y | eta_n) || p(y | eta_n - c_nk))``

is the deviance the fitted model expects the data to show against its own predictions ``eta``
without the component: for regression exactly ``sum_n |c_nk|^2 / sigma^2``, for classification
the categorical KL of the two softmaxes (to second order ``c^T H c`` with the Fisher
information ``H = diag(pi) - pi pi^T``; exact where the fit is confident and ``H`` vanishes).
Akaike's rule prices a component at its free parameters ``nu_k``
(:meth:`~bayes_fusion.layers.base.RankLayer.component_dof`), so with ``s_k = a_k / (2 nu_k)``
the shrinkage factor of the horseshoe literature (Piironen & Vehtari 2017) is
``kappa_k = 1 / (1 + s_k)``; a component counts when ``1 - kappa_k > threshold`` (default
``0.5``: the log-likelihood it adds exceeds its parameters' price, the data outweigh the
shrinkage), and ``m_eff = sum_k (1 - kappa_k)`` is the continuous effective number of components
reported beside the integer rank. Noise, main effects and tiny components are thus weighed on
one absolute scale: a model with no interaction has rank 0 however its components compare with
each other. It needs the likelihood, so it applies to the rank layers of a
:class:`~bayes_fusion.Regressor` / :class:`~bayes_fusion.Classifier`: for ``model.layer`` in
closed form, for a layer deeper inside by ablation (the model run without each component). A
MAP point is counted by the relative criterion under ``"auto"``: its components fitted to noise
are not shrunk away and carry their full information.

``criterion="relative"`` (the fallback for layers in a user's own model, whose likelihood the
library does not know): a component counts when its **relevance** exceeds ``threshold``
(default ``0.05``) times the draw's largest and an absolute floor (``floor_factor`` times the
relevance of a component with every entry at the prior floor ``eps``). Relevance (default
``"norm"``): for CP fusion the Frobenius norm of component r's rank-one term
``prod_m ||u_mr|| * ||u_out,r||``; for XOX the singular values of ``W``. ``"scale"`` uses
``lambda_r`` instead. Compared only with the largest component, it counts every component when
all are small (no interaction) and none when MAP pushes them under the floor.

Components are exchangeable, so every summary here works with *sorted* quantities per draw and
is invariant to permuting components and to sign flips of factor columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layers.base import RankLayer, rank_layers
from .models import Classifier, Regressor

__all__ = [
    "RankPosterior",
    "layer_draws",
    "relevance_draws",
    "active_components",
    "component_information",
    "information_applies",
    "effective_rank_draws",
    "layer_rank_posterior",
    "rank_posterior",
    "rank_quantities",
    "hdi_int",
    "hdi_float",
]

RELEVANCE_KINDS = ("norm", "scale")
CRITERIA = ("auto", "information", "relative")
#: default ``threshold`` of each criterion (``1 - kappa`` / relevance relative to the largest)
DEFAULT_THRESHOLD = {"information": 0.5, "relative": 0.05}


def _check_threshold(threshold: float | None, criterion: str) -> float:
    if threshold is None:
        return DEFAULT_THRESHOLD[criterion]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold: expected a number in (0, 1) or None, got {threshold!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a number in (0, 1) or None, got {threshold!r}")
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
    """The relative criterion: which components count in each draw, shape ``(S, R)`` (bool):
    relevance above ``threshold`` times the draw's largest and above the absolute floor."""
    threshold = _check_threshold(threshold, "relative")
    rel = relevance_draws(layer, samples, kind)
    top = rel.max(dim=-1, keepdim=True).values
    return (rel > threshold * top) & (rel > _floor(layer, kind))


def information_applies(model, layer: RankLayer) -> bool:
    """Whether the information criterion applies to ``layer``: it is a rank layer of a
    :class:`~bayes_fusion.Regressor` / :class:`~bayes_fusion.Classifier`, whose likelihood's
    Fisher information weighs the predictions (the layer itself, ``model.layer``, or a layer
    inside it, e.g. the hidden layer of an MLP)."""
    return isinstance(model, (Regressor, Classifier)) and any(
        found is layer for found in rank_layers(model).values()
    )


def _deviance_without(model, fitted: Tensor, without: Tensor, noise: Tensor | None) -> Tensor:
    """``2 sum_n KL(p(y | fitted_n) || p(y | without_n))`` per draw, for predictions ``(s, N,
    P)``: the deviance the data would show, on average under the fitted model, against the
    predictions without a component. Regression (``noise`` ``(s, P)``): ``sum (fitted -
    without)^2 / sigma^2``; classification: the categorical KL of the two softmaxes (where the
    fit is confident its curvature vanishes, so a local quadratic would miss what is lost)."""
    if isinstance(model, Regressor):
        return ((fitted - without).pow(2) * noise.pow(-2).unsqueeze(-2)).sum((-1, -2))
    log_p, log_q = fitted.log_softmax(-1), without.log_softmax(-1)
    return 2.0 * (log_p.exp() * (log_p - log_q)).sum((-1, -2))


def component_information(
    model,
    layer: RankLayer,
    samples: dict[str, Tensor],
    inputs,
    chunk_size: int = 100,
    result=None,
) -> Tensor:
    """The information ``a_k = 2 sum_n KL(p(y | eta_n) || p(y | eta_n - d_nk))`` of each
    component per draw (see the module docstring): the deviance the fitted model expects the
    data to show against its own predictions ``eta`` without component ``k``, whose removal
    changes them by ``d_nk`` over the rows of ``inputs`` (to second order ``d^T H d`` with the
    Fisher information ``H``; regression: exactly ``sum d^2 / sigma^2``). For ``model.layer``
    the change is the component's term ``c_nk`` itself; for a layer deeper inside the model the
    model is run on the draws without each component in turn (its ablation: ``K + 1`` batched
    runs per ``chunk_size`` draws).

    :param model: a :class:`~bayes_fusion.Regressor` / :class:`~bayes_fusion.Classifier`
        holding ``layer``.
    :param samples: draws, full site name -> ``(S, ...)`` (a ``Regressor``'s include
        ``noise`` ``(S, P)``; a deeper layer's: every latent site of the model).
    :param inputs: the training inputs (``(N, d)`` tensor or list of them).
    :param chunk_size: draws per batch (memory ``chunk_size * N * K``).
    :param result: the :class:`~bayes_fusion.FitResult` of ``model`` (runs the model on the
        draws; needed for a layer other than ``model.layer``).
    :returns: ``(S, K)`` float64, ``K`` the layer's components (XOX: ``max_rank``).
    :raises ValueError: when the criterion does not apply (:func:`information_applies`).
    """
    if not information_applies(model, layer):
        raise ValueError(
            f"model: the information criterion needs a rank layer of a Regressor or "
            f"Classifier, got {type(model).__name__}; use criterion='relative'"
        )
    if isinstance(model, Regressor) and "noise" not in samples:
        raise ValueError(f"samples: expected draws of site 'noise', got {sorted(samples)}")
    if model.layer is not layer:
        if result is None:
            raise ValueError(
                "result: the information of a layer inside model.layer needs the fit result "
                "(to run the model without each component), got None"
            )
        return _ablation_information(result, layer, samples, inputs, chunk_size)
    own = layer_draws(layer, samples)
    total = next(iter(own.values())).shape[0]
    out = []
    for start in range(0, total, chunk_size):
        values = {k: v[start : start + chunk_size].detach() for k, v in own.items()}
        noise = (
            samples["noise"][start : start + chunk_size].detach() if "noise" in samples else None
        )
        with torch.no_grad():
            fitted = layer.apply(values, inputs)  # (s, N, P)
            scores, loadings = layer.component_terms(values, inputs)  # (s, N, K), (s, P, K)
            info = []
            for k in range(scores.shape[-1]):
                term = _component_term(scores, loadings, k)
                info.append(_deviance_without(model, fitted, fitted - term, noise))
        out.append(torch.stack(info, -1).double())
    return torch.cat(out)


def _component_term(scores: Tensor, loadings: Tensor, k: int) -> Tensor:
    """Component ``k``'s contribution ``(s, N, P)`` from ``component_terms``' scores ``(s, N,
    K)`` and loadings ``(s, P, K)``."""
    return scores[..., k].unsqueeze(-1) * loadings[..., k].unsqueeze(-2)


#: rows the ablation of a layer inside the model runs on (evenly spaced; the deviance summed
#: over them is scaled to every row): its cost is draws x components x model runs
ABLATION_ROWS = 512


def _ablation_information(result, layer, samples, inputs, chunk_size: int) -> Tensor:
    """:func:`component_information` of a layer inside the model: per chunk of draws, the
    model's predictions as fitted and with each component subtracted from the layer's output
    (a forward hook), compared by :func:`_deviance_without` on at most :data:`ABLATION_ROWS`
    evenly spaced rows (scaled to all rows)."""
    rows = (inputs[0] if isinstance(inputs, (list, tuple)) else inputs).shape[0]
    if rows > ABLATION_ROWS:
        index = torch.linspace(0, rows - 1, ABLATION_ROWS).round().long()
        inputs = (
            [None if x is None else x[index] for x in inputs]
            if isinstance(inputs, (list, tuple))
            else inputs[index]
        )
    scale = rows / min(rows, ABLATION_ROWS)
    removed: dict = {}

    def without_component(module, args, output):
        if not removed:
            return None
        x = args[0]
        x = [_op_rows(v) for v in x] if isinstance(x, (list, tuple)) else _op_rows(x)
        term = _component_term(*module.component_terms(removed["values"], x), removed["k"])
        if term.numel() != output.numel():  # Predictive's first, unbatched look at the model
            return None
        return output - term.reshape(output.shape)

    model = result.model
    total = next(iter(samples.values())).shape[0]
    out = []
    handle = layer.register_forward_hook(without_component)
    try:
        for start in range(0, total, chunk_size):
            chunk = {k: v[start : start + chunk_size].detach() for k, v in samples.items()}
            n = next(iter(chunk.values())).shape[0]
            removed.clear()
            fitted = _predictions(result, chunk, inputs, n)
            noise = chunk.get("noise")
            info = []
            for k in range(layer.max_rank):
                removed.update(values=layer_draws(layer, chunk), k=k)
                without = _predictions(result, chunk, inputs, n)
                info.append(_deviance_without(model, fitted, without, noise))
            out.append(torch.stack(info, -1).double())
    finally:
        handle.remove()
    return scale * torch.cat(out)


def _op_rows(x: Tensor | None) -> Tensor | None:
    """A layer input inside a run over draws, as ``(s or 1, N, d)``."""
    return None if x is None else x.reshape((-1,) + tuple(x.shape[-2:]))


def _predictions(result, chunk, inputs, n: int) -> Tensor:
    """The model's predictions (its return value) at each draw of ``chunk``: ``(n, N, P)``."""
    (out,) = result.predictive_chunks(chunk, (inputs,), ["_RETURN"], chunk_size=n)
    pred = out["_RETURN"]
    return pred.reshape((n,) + tuple(pred.shape[-2:]))


def _resolve_criterion(criterion: str, model, layer: RankLayer, inputs, result) -> str:
    """``"auto"``: information for the rank layers of a ``Regressor`` / ``Classifier`` fitted
    with a posterior (a guide or MCMC); relative for a MAP point -- whose components fitted to
    noise are not shrunk away and carry their full information -- and in other models."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: expected one of {CRITERIA}, got {criterion!r}")
    if criterion == "auto":
        if result is not None and _source(result) == "point":
            return "relative"
        runnable = getattr(model, "layer", None) is layer or result is not None
        applies = inputs is not None and runnable and information_applies(model, layer)
        return "information" if applies else "relative"
    return criterion


@dataclass
class _Counted:
    """Which components count per draw under one criterion."""

    criterion: str
    threshold: float
    active: Tensor  # (S, K) bool
    m_eff: Tensor | None  # (S,) sum of 1 - kappa (information criterion)


def _count(layer, samples, threshold, kind, criterion, model, inputs, result=None) -> _Counted:
    criterion = _resolve_criterion(criterion, model, layer, inputs, result)
    threshold = _check_threshold(threshold, criterion)
    if criterion == "relative":
        active = active_components(layer, samples, threshold, kind)
        return _Counted(criterion, threshold, active, None)
    if inputs is None:
        raise ValueError("inputs: the information criterion needs the training inputs, got None")
    information = component_information(model, layer, samples, inputs, result=result)
    signal = information / (2.0 * layer.component_dof())
    weight = signal / (1.0 + signal)  # 1 - kappa
    return _Counted(criterion, threshold, weight > threshold, weight.sum(-1))


def effective_rank_draws(
    layer: RankLayer,
    samples: dict[str, Tensor],
    threshold: float | None = None,
    kind: str = "norm",
    *,
    criterion: str = "auto",
    model=None,
    inputs=None,
    result=None,
) -> Tensor:
    """Effective rank per draw, shape ``(S,)`` (int64).

    :param threshold: ``1 - kappa`` above which a component counts (information, default
        0.5) or relevance relative to the draw's largest (relative, default 0.05).
    :param kind: relevance of the relative criterion, ``"norm"`` or ``"scale"``.
    :param criterion: ``"information"``, ``"relative"`` or ``"auto"`` (information where
        :func:`information_applies` and ``inputs`` -- and, for a layer inside ``model.layer``,
        ``result`` -- are given; relative otherwise).
    :param model: the fitted model. :param inputs: its training inputs (information).
    :param result: the fit (information of a layer inside ``model.layer``).
    """
    counted = _count(layer, samples, threshold, kind, criterion, model, inputs, result)
    return counted.active.sum(-1)


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
    :ivar max_rank: the largest rank the layer's map can have.
    :ivar rank_draws: effective rank per draw ``(S,)``.
    :ivar probs: ``P(rank = r)`` for ``r = 0..max_rank``, shape ``(max_rank + 1,)``.
    :ivar relevance: sorted (descending) relevances per draw ``(S, K)``.
    :ivar scales: sorted (descending) ``lambda`` per draw ``(S, R)``.
    :ivar criterion: ``"information"`` or ``"relative"`` (see the module docstring).
    :ivar threshold: the criterion's threshold.
    :ivar m_eff: ``sum_k (1 - kappa_k)`` per draw ``(S,)`` (information criterion; else
        ``None``).
    :ivar source: ``"point"`` (a MAP fit: one point, not a posterior), ``"variational"`` (the
        guide's approximation) or ``"mcmc"``.
    :ivar method: the fit's method (``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``,
        ``"nuts"``, ``"custom"``).
    :ivar problems: failed MCMC diagnostics on this layer's invariant quantities (r-hat >
        1.01, ESS < 100, divergences); empty when they pass or for SVI.
    """

    layer: str
    max_rank: int
    rank_draws: Tensor
    probs: Tensor
    relevance: Tensor
    scales: Tensor
    hdi_prob: float = 0.9
    criterion: str = "relative"
    threshold: float = 0.05
    m_eff: Tensor | None = None
    source: str = "variational"
    method: str = "custom"
    problems: list[str] = field(default_factory=list)
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

    @property
    def is_point(self) -> bool:
        """Whether this is a point estimate (MAP): one rank, no uncertainty."""
        return self.source == "point"

    @property
    def label(self) -> str:
        """What the summary is: ``"MAP point estimate"``, ``"variational posterior
        (meanfield guide's approximation)"`` or ``"MCMC posterior"``."""
        if self.source == "point":
            return "MAP point estimate"
        if self.source == "mcmc":
            return "MCMC posterior"
        return f"variational posterior ({self.method} guide's approximation)"

    @property
    def warning(self) -> str | None:
        """A one-line warning when MCMC diagnostics failed (``None`` otherwise)."""
        if not self.problems:
            return None
        return "WARNING: MCMC diagnostics fail (" + "; ".join(self.problems) + ")"

    def table(self) -> str:
        """The rank posterior as a text table (ranks with non-zero probability), under the
        :attr:`warning` line when MCMC diagnostics failed; a point estimate's single rank."""
        if self.is_point:
            return f"rank (point estimate): {self.mode}"
        lines = [self.warning] if self.warning else []
        lines.append("rank  P(rank)")
        for r, p in enumerate(self.probs.tolist()):
            if p > 0:
                lines.append(f"{r:>4}  {p:7.3f}")
        return "\n".join(lines)

    def headline(self) -> str:
        """One line: the effective rank (mode, HDI, mean) and ``m_eff``."""
        m_eff = ""
        if self.m_eff is not None:
            m_eff = f"; m_eff {float(self.m_eff.double().mean()):.2f}"
            if not self.is_point:
                lo, hi = hdi_float(self.m_eff, self.hdi_prob)
                m_eff += f" [{lo:.2f}, {hi:.2f}]"
        if self.is_point:
            return f"effective rank {self.mode} (MAP point estimate){m_eff}"
        lo, hi = self.hdi
        return (
            f"effective rank: mode {self.mode}, {int(self.hdi_prob * 100)}% HDI [{lo}, {hi}], "
            f"mean {self.mean:.2f}{m_eff}"
        )


def _samples_of(result, num_samples: int) -> dict[str, Tensor]:
    samples = result.posterior_draws(num_samples)
    if not samples or next(iter(samples.values())).shape[0] == 0:
        raise ValueError("result: expected at least one posterior draw, got an empty posterior")
    return samples


def _source(result) -> str:
    if result.is_mcmc:
        return "mcmc"
    return "point" if result.method == "map" else "variational"


def layer_rank_posterior(
    model,
    layer: RankLayer,
    samples: dict[str, Tensor],
    inputs=None,
    threshold: float | None = None,
    kind: str = "norm",
    criterion: str = "auto",
    hdi_prob: float = 0.9,
    path: str = "",
    result=None,
) -> RankPosterior:
    """The rank posterior of one layer from flat draws (no labels: see
    :func:`rank_posterior`).

    :param model: the fitted model. :param layer: one of its rank layers.
    :param samples: full site name -> ``(S, ...)``. :param inputs: the training inputs
        (information criterion). :param result: the fit (information of a layer inside
        ``model.layer``). Other parameters as :func:`rank_posterior`.
    """
    counted = _count(layer, samples, threshold, kind, criterion, model, inputs, result)
    ranks = counted.active.sum(-1)
    probs = torch.bincount(ranks, minlength=layer.max_rank + 1).double() / ranks.numel()
    relevance = relevance_draws(layer, samples, kind).sort(dim=-1, descending=True).values
    scales = layer_draws(layer, samples)[layer.SCALE_SITE].sort(dim=-1, descending=True).values
    return RankPosterior(
        layer=path,
        max_rank=layer.max_rank,
        rank_draws=ranks,
        probs=probs,
        relevance=relevance,
        scales=scales,
        hdi_prob=hdi_prob,
        criterion=counted.criterion,
        threshold=counted.threshold,
        m_eff=counted.m_eff,
    )


def rank_posterior(
    result,
    num_samples: int = 500,
    threshold: float | None = None,
    kind: str = "norm",
    hdi_prob: float = 0.9,
    samples: dict[str, Tensor] | None = None,
    criterion: str = "auto",
) -> dict[str, RankPosterior]:
    """Posterior over the effective rank of every rank-bearing layer of a fit.

    :param result: a :class:`bayes_fusion.FitResult`.
    :param num_samples: guide draws for SVI results (MCMC: all draws).
    :param threshold: see :func:`effective_rank_draws` (``None``: the criterion's default).
    :param kind: relevance of the relative criterion, ``"norm"`` or ``"scale"``.
    :param hdi_prob: mass of the highest-density interval of the rank.
    :param samples: precomputed posterior draws (site -> ``(S, ...)``) to use instead.
    :param criterion: ``"auto"`` (information for the rank layers of a ``Regressor`` /
        ``Classifier``, relative in other models), ``"information"`` or ``"relative"``.
    :returns: layer path -> :class:`RankPosterior`, labelled with what it is (``source``)
        and, for MCMC, the diagnostics that failed on its invariant quantities.
    :raises ValueError: when the model has no rank-bearing layer or the posterior is empty.
    """
    layers = rank_layers(result.model)
    if not layers:
        raise ValueError(
            f"result: its model ({type(result.model).__name__}) holds no rank-bearing layer "
            "(CPFusion or XOXLinear)"
        )
    samples = _samples_of(result, num_samples) if samples is None else samples
    inputs = result.args[0] if result.args else None
    out = {}
    for path, layer in layers.items():
        rp = layer_rank_posterior(
            result.model, layer, samples, inputs, threshold, kind, criterion, hdi_prob, path, result
        )
        rp.source, rp.method = _source(result), result.method
        if result.is_mcmc:
            rp.problems = result.convergence_problems(rank_quantities(layer, rp))
        out[path] = rp
    return out


def rank_quantities(layer: RankLayer, rp: RankPosterior) -> dict[str, Tensor]:
    """The label-switching-invariant quantities of one layer's rank posterior, named as
    :func:`~bayes_fusion.to_inference_data` and ``diagnostics()`` name them: sorted scales,
    sorted relevances, effective rank and ``m_eff`` (information criterion), each
    ``(S, ...)``."""
    out = {
        layer.site_name("rank_scale_sorted"): rp.scales,
        layer.site_name("relevance_sorted"): rp.relevance,
        layer.site_name("effective_rank"): rp.rank_draws.double(),
    }
    if rp.m_eff is not None:
        out[layer.site_name("m_eff")] = rp.m_eff
    return out
