"""Prune a fit to compact deterministic layers at the rank its posterior reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers.base import rank_layers
from .layers.cp import CPFusion
from .layers.deterministic import DeterministicCPFusion, DeterministicXOXLinear
from .layers.xox import XOXLinear
from .rank import RankPosterior, rank_posterior

__all__ = ["PruneResult", "prune", "point_values"]


@dataclass
class PruneResult:
    """Compact deterministic layers and what pruning removed.

    :ivar modules: layer path -> deterministic ``nn.Module`` at the kept rank.
    :ivar layers: layer path -> ``{"rank", "kept", "mode", "hdi", "params_before",
        "params_after"}``: the rank kept, the kept component indices (CP; XOX: singular
        directions), the rank posterior's mode and HDI, and the layer's weights (the
        :meth:`~bayes_fusion.CPFusion.num_parameters` count: the pruned module's CP ``weights``,
        all ones, are redundant with its factors and not counted).
    :ivar values: the point values (full site name -> tensor) the layers were built from.
    :ivar posteriors: layer path -> the :class:`~bayes_fusion.RankPosterior` whose mode was
        kept.
    """

    modules: dict[str, nn.Module]
    layers: dict[str, dict]
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    posteriors: dict[str, RankPosterior] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        """The single pruned layer (for models with exactly one rank-bearing layer)."""
        if len(self.modules) != 1:
            raise ValueError(
                f"module: the model has {len(self.modules)} rank-bearing layers; use .modules[path]"
            )
        return next(iter(self.modules.values()))


def point_values(
    result,
    draw: str | int = "mean",
    num_samples: int = 500,
    threshold: float | None = None,
    criterion: str = "auto",
) -> dict[str, torch.Tensor]:
    """One point in parameter space: the posterior mean or one draw.

    For SVI the mean of guide draws is well defined (the guide is unimodal). For MCMC the
    per-site mean is not (components permute and columns flip sign between draws), so
    ``"mean"`` falls back to the last draw whose effective rank (``threshold``, ``criterion``:
    as :func:`~bayes_fusion.rank_posterior`) equals the posterior mode in every layer.

    :param draw: ``"mean"`` or the index of a draw.
    :returns: full site name -> value (no draw dim).
    """
    samples = result.posterior_draws(num_samples)
    rps = None
    if result.is_mcmc and draw == "mean":
        rps = rank_posterior(result, threshold=threshold, samples=samples, criterion=criterion)
    return _point(result, samples, draw, rps)


def _point(result, samples, draw, rps) -> dict[str, torch.Tensor]:
    """:func:`point_values` from the fit's draws (``rps``: their rank posteriors, MCMC)."""
    total = next(iter(samples.values())).shape[0]
    if isinstance(draw, int) and not isinstance(draw, bool):
        if not -total <= draw < total:
            raise ValueError(f"draw: expected an index in [0, {total}), got {draw}")
        return {k: v[draw] for k, v in samples.items()}
    if draw != "mean":
        raise ValueError(f"draw: expected 'mean' or an int, got {draw!r}")
    if not result.is_mcmc:
        return {k: v.mean(0) for k, v in samples.items()}
    modal = torch.ones(total, dtype=torch.bool)
    for rp in rps.values():
        modal &= rp.rank_draws == rp.mode
    index = int(torch.nonzero(modal)[-1]) if bool(modal.any()) else total - 1
    return {k: v[index] for k, v in samples.items()}


def _target_ranks(rps: dict[str, RankPosterior], rank) -> dict[str, int]:
    """Rank to keep per layer: the posterior mode, or what ``rank`` asks for."""
    if rank is None:
        return {path: rp.mode for path, rp in rps.items()}
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - set(rps))
        if unknown:
            raise ValueError(f"rank: expected layer paths among {sorted(rps)}, got {unknown}")
        wanted = {path: rank.get(path, rp.mode) for path, rp in rps.items()}
    else:
        wanted = {path: rank for path in rps}
    for path, k in wanted.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= rps[path].max_rank:
            raise ValueError(
                f"rank: expected an integer in [0, {rps[path].max_rank}] for layer {path!r}, "
                f"got {k!r}"
            )
    return wanted


def prune(
    result,
    threshold: float | None = None,
    draw: str | int = "mean",
    num_samples: int = 500,
    *,
    rank: int | dict[str, int] | None = None,
    criterion: str = "auto",
    samples: dict[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Build compact deterministic twins of every rank-bearing layer of a fit, at the rank the
    posterior reports.

    Each layer keeps its posterior's modal effective rank ``k``
    (:func:`~bayes_fusion.rank_posterior` with ``threshold`` and ``criterion``), so the pruned
    rank lies inside the rank posterior's HDI. At the point values (``draw``) CP fusion keeps
    its ``k`` most relevant components (largest rank-one terms); XOX keeps the ``k`` leading
    singular directions of ``W`` (an exact XOX factorization at that rank, see
    :meth:`XOXLinear.compact_factors`). ``k = 0`` gives a layer with the main effects and
    bias alone (CP) or the bias alone (XOX).

    :param result: a :class:`bayes_fusion.FitResult`.
    :param threshold: the effective-rank threshold (``None``: the criterion's default).
    :param draw: ``"mean"`` (posterior mean; MCMC: a draw at the modal rank) or a draw index.
    :param num_samples: guide draws of an SVI fit.
    :param rank: keep this many components instead of the mode: one int for every layer or a
        dict layer path -> int (unlisted layers: the mode).
    :param criterion: ``"auto"``, ``"information"`` or ``"relative"`` (see
        :mod:`bayes_fusion.rank`).
    :param samples: the fit's posterior draws (site -> ``(S, ...)``) to use instead of drawing
        them (a summary that shows both the rank posterior and the pruned rank passes its own).
    :returns: :class:`PruneResult`; ``layers[path]`` holds ``rank``, ``kept``, ``mode``,
        ``hdi``, ``params_before`` and ``params_after`` (the weights the layer needs at that
        rank: never more than before).
    """
    layers = rank_layers(result.model)
    if not layers:
        raise ValueError(
            f"result: its model ({type(result.model).__name__}) holds no "
            "rank-bearing layer (CPFusion or XOXLinear)"
        )
    samples = result.posterior_draws(num_samples) if samples is None else samples
    rps = rank_posterior(result, threshold=threshold, samples=samples, criterion=criterion)
    targets = _target_ranks(rps, rank)
    values = _point(result, samples, draw, rps)
    modules, info = {}, {}
    for path, layer in layers.items():
        k = targets[path]
        own = layer.short_values(values)
        module, kept = _compact(layer, own, k)
        modules[path] = module
        info[path] = {
            "rank": k,
            "kept": kept,
            "mode": rps[path].mode,
            "hdi": rps[path].hdi,
            "params_before": layer.num_parameters(),
            "params_after": layer.num_parameters(k),
        }
    return PruneResult(modules, info, values, rps)


def _compact(layer, own: dict[str, torch.Tensor], k: int) -> tuple[nn.Module, list[int]]:
    """The deterministic twin of ``layer`` at rank ``k`` from one point (short names)."""
    bias = own.get("bias")
    if isinstance(layer, CPFusion):
        relevance = layer.relevance(own)
        kept = torch.argsort(relevance, descending=True)[:k]
        factors = [own[f"factor_{m}"][:, kept] for m in range(layer.num_modalities)]
        module = DeterministicCPFusion.from_factors(
            factors,
            own["out_factor"][:, kept],
            None,
            bias,
            layer.append_one,
            main_effects=own.get("main_effects"),
        )
        return module, kept.tolist()
    if isinstance(layer, XOXLinear):
        compact = layer.compact_factors(own, k)
        module = DeterministicXOXLinear.from_factors(
            compact["x_in"], compact["core"], compact["x_out"], compact["scale"], bias
        )
        return module, list(range(k))
    raise TypeError(f"prune: unsupported layer type {type(layer).__name__}")  # pragma: no cover
