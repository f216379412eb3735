"""The one place where ArviZ 0.2x and ArviZ 1.x differ for this package.

ArviZ 0.2x (the last line that installs on Python 3.11) returns ``InferenceData``; ArviZ >= 1.0
(Python >= 3.12: ``arviz-base``, ``arviz-stats``, ``arviz-plots``) returns an xarray
``DataTree``. Both hold the same groups (``posterior``, ``log_likelihood``, ...) reachable as
attributes, both give ``az.summary`` / ``az.rhat`` / ``az.ess`` with the same call, and this
module smooths over the calls that differ:

* :func:`from_dict` -- group-per-keyword (0.x) vs one dict of groups (1.x);
* :func:`loo` -- a pandas ``ELPDData`` with ``elpd_loo`` / ``p_loo`` (0.x) vs an
  ``ELPDDataLOO`` object with ``elpd`` / ``p`` (1.x), returned here as one :class:`Elpd`;
* :func:`compare` -- the comparison table with the 1.x column names on both;
* :func:`plot_forest` -- a matplotlib axes array (0.x) vs an arviz-plots ``PlotCollection``
  (1.x), returned here as ``(figure, axes)``.

arviz is imported inside the functions: importing :mod:`bayes_fusion` does not import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Elpd", "compare", "from_dict", "loo", "major_version", "plot_forest"]

#: the column names of :func:`compare` on every ArviZ version (0.x names are renamed)
COMPARE_COLUMNS = ("rank", "elpd", "p", "elpd_diff", "weight", "se", "dse")
_COLUMNS_0X = {"elpd_loo": "elpd", "p_loo": "p"}


def major_version() -> int:
    """Major version of the installed ArviZ: 0 (``InferenceData``) or 1+ (``DataTree``)."""
    import arviz as az

    return int(az.__version__.split(".")[0])


def from_dict(
    groups: dict[str, dict[str, np.ndarray]],
    coords: dict[str, Any] | None = None,
    dims: dict[str, list[str]] | None = None,
    attrs: dict[str, Any] | None = None,
):
    """Build ArviZ data from arrays: ``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x.

    :param groups: group name (``"posterior"``, ``"posterior_predictive"``,
        ``"log_likelihood"``, ``"observed_data"``, ``"sample_stats"``, ...) -> variable name ->
        array. Arrays of sampled groups have shape ``(chain, draw, ...)``; ``observed_data``
        has no sample dims.
    :param coords: dim name -> coordinate values.
    :param dims: variable name -> names of its non-sample dims.
    :param attrs: attributes set on every group.
    """
    import arviz as az

    if not isinstance(groups, dict) or "posterior" not in groups:
        raise ValueError(
            f"groups: expected a dict with a 'posterior' group, got {type(groups).__name__}"
            + (f" with groups {sorted(groups)}" if isinstance(groups, dict) else "")
        )
    if major_version() >= 1:
        data = az.from_dict(groups, coords=coords, dims=dims)
    else:
        data = az.from_dict(**groups, coords=coords, dims=dims)
    for group in groups:
        getattr(data, group).attrs.update(attrs or {})
    return data


def bfmi(data) -> np.ndarray:
    """E-BFMI of an MCMC fit's energy (``sample_stats.energy``), one value per chain (below 0.3:
    momentum resampling explores the energy levels poorly), on either ArviZ line.

    :param data: ArviZ data with a ``sample_stats`` group holding ``energy`` ``(chain, draw)``.
    """
    import arviz as az

    values = az.bfmi(data)
    return np.asarray(getattr(values, "energy", values), dtype=float)  # 1.x: a DataTree


@dataclass(frozen=True)
class Elpd:
    """PSIS-LOO estimate, the same fields on every ArviZ version.

    :ivar elpd: expected log pointwise predictive density (higher is better).
    :ivar se: its standard error.
    :ivar p: effective number of parameters (``p_loo``).
    :ivar pareto_k: Pareto shape per observation, shape ``(N,)`` (> 0.7: unreliable).
    :ivar native: the object ArviZ returned (``ELPDData`` / ``ELPDDataLOO``).
    """

    elpd: float
    se: float
    p: float
    pareto_k: np.ndarray
    native: Any


def loo(data, var_name: str | None = None) -> Elpd:
    """``az.loo`` on ArviZ data with a ``log_likelihood`` group.

    :param data: ``InferenceData`` (0.x) or ``DataTree`` (1.x).
    :param var_name: the log-likelihood variable (``None``: the only one).
    """
    import arviz as az

    native = az.loo(data, var_name=var_name, pointwise=True)
    if major_version() >= 1:
        elpd, se, p = native.elpd, native.se, native.p
    else:
        elpd, se, p = native["elpd_loo"], native["se"], native["p_loo"]
    k = native.pareto_k
    return Elpd(float(elpd), float(se), float(p), np.asarray(getattr(k, "values", k)), native)


def compare(datasets: dict[str, Any]):
    """``az.compare`` by PSIS-LOO with stacking weights.

    :param datasets: model name -> ArviZ data with a ``log_likelihood`` group.
    :returns: pandas ``DataFrame``, one row per model (best first), unrounded, with at least
        the columns :data:`COMPARE_COLUMNS` on every ArviZ version, in ArviZ 1.x's convention:
        ``elpd_diff`` is the model's elpd minus the best model's (``<= 0``; ArviZ 0.x reports
        the opposite sign, turned here).
    """
    import arviz as az

    if major_version() >= 1:
        return az.compare(datasets, round_to="none")
    table = az.compare(datasets).rename(columns=_COLUMNS_0X)
    table["elpd_diff"] = -table["elpd_diff"]
    return table


def plot_forest(
    data, var_names: list[str], ci_prob: float, height: float, labels=None, xlabel: str = ""
):
    """Forest plot of ``var_names`` (chains combined) with central ``ci_prob`` HDIs, one row
    per entry of each variable's single dim, labelled ``labels(var, index)``.

    :param data: ``InferenceData`` (0.x) or ``DataTree`` (1.x).
    :param var_names: posterior variables to show (each with one dim besides chain/draw).
    :param ci_prob: probability mass of the highest-density interval.
    :param height: figure height in inches.
    :param labels: ``(var_name, index) -> str`` row labels (``None``: ArviZ's own).
    :param xlabel: label of the value axis.
    :returns: ``(figure, axes)``, ``axes`` a numpy array of matplotlib axes, the one holding
        the intervals first.
    """
    fig, axes = _plot_forest(data, var_names, ci_prob, height)
    if labels is not None:
        _relabel_forest(axes, var_names, labels)
    axes[0].set_xlabel(xlabel)
    return fig, axes


def _relabel_forest(axes, var_names: list[str], labels) -> None:
    """Replace ArviZ's row labels (``var[0]``, ``[1]``... on 0.x; a variable-name text over a
    column of coordinates and a ``variable / dim`` footer on 1.x) by ``labels(var, i)``."""
    if major_version() >= 1:
        column = axes[1]
        current = None
        for text in column.texts:
            value = text.get_text()
            if value in var_names:
                current = value
                text.set_text("")
            elif current is not None and value.isdigit():
                text.set_text(labels(current, int(value)))
        column.set_xticks([])
        for spine in column.spines.values():
            spine.set_visible(False)
        return
    ax = axes[0]
    ticks = ax.get_yticks()
    current, new = None, []
    for tick in reversed(ax.get_yticklabels()):  # top row first: it carries the name
        match = re.fullmatch(r"(.*)\[(\d+)\]", tick.get_text())
        if match is None:
            new.append(tick.get_text())
            continue
        current = match.group(1) or current
        new.append(labels(current, int(match.group(2))))
    ax.set_yticks(ticks)
    ax.set_yticklabels(new[::-1])


def _plot_forest(data, var_names: list[str], ci_prob: float, height: float):
    """ArviZ's forest plot on either line: ``(figure, axes)``, the intervals' axes first."""
    import arviz as az

    if major_version() >= 1:
        collection = az.plot_forest(
            data,
            var_names=var_names,
            combined=True,
            ci_kind="hdi",
            ci_probs=(0.5, ci_prob),
            backend="matplotlib",
        )
        fig = collection.viz["figure"].item()
        plots = collection.viz["plot"]
        # the forest itself first, then the labels column (0.x draws labels on the same axes)
        columns = list(plots["column"].values)
        order = sorted(range(len(columns)), key=lambda i: columns[i] != "forest")
        axes = np.ravel(plots.values)[order]
        fig.set_size_inches(8, height)
        return fig, axes
    axes = np.ravel(
        az.plot_forest(
            data, var_names=var_names, hdi_prob=ci_prob, combined=True, figsize=(6, height)
        )
    )
    return axes[0].figure, axes
