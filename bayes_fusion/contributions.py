"""Which modality matters: split a CP fusion into interaction orders.

With append-one, each factor is ``U_m = [A_m; c_m]`` (feature rows ``A_m``, constant row
``c_m``), so ``x~_m U_m = x_m A_m + c_m`` and the fused output expands exactly into a sum over
subsets ``S`` of the modalities::

    y - b = sum_S  [ (prod_{m in S} x_m A_m) * (prod_{m not in S} c_m) ] U_out^T  =: sum_S t_S

``t_{}`` is a constant, ``t_{m}`` the unimodal term of modality m, ``t_{m,k}`` the pairwise
interaction, ... For every posterior draw the *share* of term ``S`` is
``Var_n(t_S) / sum_S' Var_n(t_S')`` (variance over the data rows, summed over outputs); the
constant term has no variance. Shares sum to 1 per draw; terms can be correlated, so a share
is a term's own variance relative to all terms' variances, not a variance decomposition of
``y`` into orthogonal parts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .layers.base import rank_layers
from .layers.cp import CPFusion, check_modalities
from .ops.cp import cp_main_effects
from .rank import hdi_float, layer_draws

__all__ = ["ModalityContributions", "modality_contributions", "interaction_terms"]


def interaction_terms(
    inputs: list[Tensor],
    factors: list[Tensor],
    out_factor: Tensor,
    main_effects: Tensor | None = None,
) -> dict[tuple[int, ...], Tensor]:
    """Every non-constant interaction term ``t_S`` of an append-one CP fusion.

    :param inputs: M tensors ``(N, d_m)``.
    :param factors: M factors ``(..., d_m + 1, R)``; ``out_factor``: ``(..., P, R)``.
    :param main_effects: optional main effects ``(..., P, sum_m d_m)``, added to the
        one-modality terms.
    :returns: subset (tuple of modality indices) -> ``(..., N, P)``; the terms plus the constant
        term and the bias add up to the fusion output.
    """
    proj = [torch.matmul(x, f[..., :-1, :]) for x, f in zip(inputs, factors, strict=True)]
    const = [f[..., -1:, :] for f in factors]
    m = len(inputs)
    terms = {}
    for order in range(1, m + 1):
        for subset in itertools.combinations(range(m), order):
            h = None
            for k in range(m):
                part = proj[k] if k in subset else const[k]
                h = part if h is None else h * part
            terms[subset] = torch.matmul(h, out_factor.transpose(-1, -2))
    if main_effects is not None:
        sizes = [x.shape[-1] for x in inputs]
        for k, x in enumerate(inputs):
            only = [x if j == k else None for j in range(m)]
            terms[(k,)] = terms[(k,)] + cp_main_effects(only, main_effects, sizes)
    return terms


@dataclass
class ModalityContributions:
    """Per-draw variance shares of the interaction terms of one CP fusion layer.

    :ivar names: term names, e.g. ``"gene"``, ``"gene x lipid"``.
    :ivar shares: ``(S, T)`` per draw and term; rows sum to 1.
    :ivar modality_shares: ``(S, M)``: for each modality, the summed share of the terms it
        takes part in (these overlap, so they need not sum to 1).
    """

    names: list[str]
    modality_names: list[str]
    shares: Tensor
    modality_shares: Tensor
    hdi_prob: float = 0.9

    def summary(self) -> list[dict]:
        """Mean and HDI of each term's share."""
        rows = []
        for j, name in enumerate(self.names):
            lo, hi = hdi_float(self.shares[:, j], self.hdi_prob)
            rows.append(
                {"term": name, "mean": float(self.shares[:, j].mean()), "lower": lo, "upper": hi}
            )
        return rows

    def table(self) -> str:
        lines = [f"{'term':<30} share  {int(self.hdi_prob * 100)}% HDI"]
        for r in self.summary():
            lines.append(f"{r['term']:<30} {r['mean']:5.1%}  [{r['lower']:.1%}, {r['upper']:.1%}]")
        return "\n".join(lines)

    def plot(self, path=None):
        """Horizontal bars of the mean shares with HDI whiskers; returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        rows = self.summary()
        fig, ax = plt.subplots(figsize=(5.5, 0.4 * len(rows) + 1))
        means = [r["mean"] for r in rows]
        err = [[r["mean"] - r["lower"] for r in rows], [r["upper"] - r["mean"] for r in rows]]
        ax.barh([r["term"] for r in rows], means, xerr=err, color="tab:green", capsize=3)
        ax.set_xlabel("share of term variance")
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
        return fig, ax


def modality_contributions(
    result,
    inputs: list[Tensor],
    layer: str | None = None,
    num_samples: int = 200,
    modality_names: list[str] | None = None,
    hdi_prob: float = 0.9,
) -> ModalityContributions:
    """Each interaction term's share of the fused output's variance, per posterior draw.

    :param result: a fit whose model holds a :class:`CPFusion` with ``append_one=True``.
    :param inputs: the M modality tensors ``(N, d_m)`` to evaluate the shares on.
    :param layer: path of the CP layer (default: the only one).
    :param modality_names: names for the M modalities (default ``"m0"``, ``"m1"``, ...).
    :returns: :class:`ModalityContributions`.
    """
    layers = {p: lay for p, lay in rank_layers(result.model).items() if isinstance(lay, CPFusion)}
    if not layers:
        raise ValueError("result: its model holds no CPFusion layer")
    if layer is None:
        if len(layers) != 1:
            raise ValueError(f"layer: expected one of {sorted(layers)}, got None")
        layer = next(iter(layers))
    if layer not in layers:
        raise ValueError(f"layer: expected one of {sorted(layers)}, got {layer!r}")
    fusion = layers[layer]
    if not fusion.append_one:
        raise ValueError("layer: interaction terms need append_one=True, got append_one=False")
    inputs = check_modalities(inputs, fusion.in_features, min_dim=2, max_dim=2)
    if any(x is None for x in inputs):
        raise ValueError("inputs: expected every modality (no None) to measure contributions")
    names = modality_names or [f"m{m}" for m in range(fusion.num_modalities)]
    if len(names) != fusion.num_modalities:
        raise ValueError(
            f"modality_names: expected {fusion.num_modalities} names, got {len(names)}"
        )
    draws = layer_draws(fusion, result.posterior_draws(num_samples))
    factors = [draws[f"factor_{m}"] for m in range(fusion.num_modalities)]
    with torch.no_grad():
        terms = interaction_terms(
            list(inputs), factors, draws["out_factor"], draws.get("main_effects")
        )
    keys = list(terms)
    var = torch.stack([terms[k].var(dim=-2).sum(-1) for k in keys], dim=-1)  # (S, T)
    total = var.sum(-1, keepdim=True).clamp_min(torch.finfo(var.dtype).tiny)
    shares = var / total
    mod_shares = torch.stack(
        [
            shares[:, [j for j, k in enumerate(keys) if m in k]].sum(-1)
            for m in range(fusion.num_modalities)
        ],
        dim=-1,
    )
    term_names = [" x ".join(names[m] for m in k) for k in keys]
    return ModalityContributions(term_names, names, shares, mod_shares, hdi_prob)
