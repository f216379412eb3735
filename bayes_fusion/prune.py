"""Prune a fit to compact deterministic layers at the effective rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers.base import rank_layers
from .layers.cp import CPFusion
from .layers.deterministic import DeterministicCPFusion, DeterministicXOXLinear
from .layers.xox import XOXLinear
from .rank import effective_rank_draws, layer_draws, relevance_draws

__all__ = ["PruneResult", "prune", "point_values"]


@dataclass
class PruneResult:
    """Compact deterministic layers and what pruning removed.

    :ivar modules: layer path -> deterministic ``nn.Module`` at the effective rank.
    :ivar layers: layer path -> ``{"rank", "params_before", "params_after", "kept"}``.
    :ivar values: the point values (full site name -> tensor) the layers were built from.
    """

    modules: dict[str, nn.Module]
    layers: dict[str, dict]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        """The single pruned layer (for models with exactly one rank-bearing layer)."""
        if len(self.modules) != 1:
            raise ValueError(
                f"module: the model has {len(self.modules)} rank-bearing layers; use .modules[path]"
            )
        return next(iter(self.modules.values()))


def point_values(
    result, draw: str | int = "mean", num_samples: int = 500, threshold: float = 0.05
) -> dict[str, torch.Tensor]:
    """One point in parameter space: the posterior mean or one draw.

    For SVI the mean of guide draws is well defined (the guide is unimodal). For MCMC the
    per-site mean is not (components permute and columns flip sign between draws), so
    ``"mean"`` falls back to the last draw whose effective rank equals the posterior mode.

    :param draw: ``"mean"`` or the index of a draw.
    """
    samples = result.posterior_draws(num_samples)
    total = next(iter(samples.values())).shape[0]
    if isinstance(draw, int):
        if not -total <= draw < total:
            raise ValueError(f"draw: expected an index in [0, {total}), got {draw}")
        return {k: v[draw] for k, v in samples.items()}
    if draw != "mean":
        raise ValueError(f"draw: expected 'mean' or an int, got {draw!r}")
    if not result.is_mcmc:
        return {k: v.mean(0) for k, v in samples.items()}
    ok = torch.ones(total, dtype=torch.bool)
    for layer in rank_layers(result.model).values():
        ranks = effective_rank_draws(layer, samples, threshold)
        ok &= ranks == torch.bincount(ranks).argmax()
    index = int(torch.nonzero(ok)[-1]) if bool(ok.any()) else total - 1
    return {k: v[index] for k, v in samples.items()}


def prune(
    result, threshold: float = 0.05, draw: str | int = "mean", num_samples: int = 500
) -> PruneResult:
    """Build compact deterministic twins of every rank-bearing layer of a fit.

    CP fusion keeps the components whose relevance (at the point values) exceeds
    ``threshold`` times the largest; XOX keeps the leading singular directions of ``W`` above
    the same threshold (an exact XOX factorization at that rank, see
    :meth:`XOXLinear.compact_factors`).

    :param result: a :class:`bayes_fusion.FitResult`.
    :param threshold: relative relevance threshold in ``(0, 1)``.
    :param draw: ``"mean"`` (posterior mean; MCMC: a representative draw) or a draw index.
    :returns: :class:`PruneResult`.
    """
    layers = rank_layers(result.model)
    if not layers:
        raise ValueError(
            f"result: its model ({type(result.model).__name__}) holds no "
            "rank-bearing layer (CPFusion or XOXLinear)"
        )
    values = point_values(result, draw, num_samples, threshold)
    modules, info = {}, {}
    for path, layer in layers.items():
        one = {k: v.unsqueeze(0) for k, v in values.items()}
        rel = relevance_draws(layer, one)[0]
        rank = int(effective_rank_draws(layer, one, threshold)[0])
        own = {k: v[0] for k, v in layer_draws(layer, one).items()}
        bias = own.get("bias")
        if isinstance(layer, CPFusion):
            kept = torch.argsort(rel, descending=True)[: max(rank, 1)]
            factors = [own[f"factor_{m}"][:, kept] for m in range(layer.num_modalities)]
            module = DeterministicCPFusion.from_factors(
                factors,
                own["out_factor"][:, kept],
                None,
                bias,
                layer.append_one,
                main_effects=own.get("main_effects"),
            )
            kept_list = kept.tolist()
        elif isinstance(layer, XOXLinear):
            compact = layer.compact_factors(own, max(rank, 1))
            module = DeterministicXOXLinear.from_factors(
                compact["x_in"], compact["core"], compact["x_out"], compact["scale"], bias
            )
            kept_list = list(range(max(rank, 1)))
        else:  # pragma: no cover - only the two layer types exist
            raise TypeError(f"prune: unsupported layer type {type(layer).__name__}")
        modules[path] = module
        info[path] = {
            "rank": rank,
            "kept": kept_list,
            "params_before": layer.num_parameters(),
            "params_after": sum(p.numel() for p in module.parameters()),
        }
    return PruneResult(modules, info, values)
