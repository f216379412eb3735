"""ArviZ conversion, LOO / model comparison, plots and the one-call text summary.

ArviZ 0.2x (Python 3.11) returns ``InferenceData``; ArviZ >= 1.0 (Python >= 3.12) returns an
xarray ``DataTree``. Every function here gives the same groups, variables, dims and coords on
both; the calls that differ between the two go through :mod:`bayes_fusion.arviz_compat`.
arviz and matplotlib are imported lazily.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from . import arviz_compat
from .infer.data import inspection_trace, seeded
from .layers.base import rank_layers
from .rank import RankPosterior, rank_posterior, rank_quantities

__all__ = [
    "from_pyro",
    "observed_sites",
    "pointwise_log_likelihoods",
    "to_inference_data",
    "loo",
    "compare",
    "pointwise_log_likelihood",
    "plot_rank_posterior",
    "plot_relevance_forest",
    "plot_elbo",
    "rank_summary",
]

_VARIATIONAL_NOTE = (
    "Draws come from a variational guide (one pseudo-chain of independent draws): r-hat and "
    "ESS computed on them are not evidence of convergence."
)


def _chains(result, num_samples: int) -> dict[str, torch.Tensor]:
    """Posterior draws with a chain axis: ``(C, D, ...)`` (SVI: one pseudo-chain)."""
    draws = result.posterior_draws(num_samples, group_by_chain=True)
    if not draws or next(iter(draws.values())).numel() == 0:
        raise ValueError("result: expected at least one posterior draw, got an empty posterior")
    return draws


def pointwise_log_likelihood(
    result, samples: dict[str, torch.Tensor], *args, chunk_size: int = 100, site: str = "obs"
) -> torch.Tensor:
    """``log p(y_n | theta_s)`` of the observed site ``site`` for every draw and data row,
    shape ``(S, N)``.

    :param samples: flat draws, site -> ``(S, ...)``.
    :param args: model arguments including the targets (default: the fit's own data).
    :param site: the observed site (the library's models: ``"obs"``).
    """
    out = pointwise_log_likelihoods(result, samples, *args, chunk_size=chunk_size)
    if site not in out:
        raise ValueError(
            f"site: expected an observed site of the model ({sorted(out)}), got {site!r}"
        )
    return out[site]


def pointwise_log_likelihoods(
    result, samples: dict[str, torch.Tensor], *args, chunk_size: int = 100
) -> dict[str, torch.Tensor]:
    """``log p(y_n | theta_s)`` of every observed site of the model, per draw and per entry of
    its batch shape (the rows of its data plate), site -> ``(S, N_site)``.

    :param samples: flat draws, site -> ``(S, ...)``.
    :param args: model arguments including the targets (default: the fit's own data).
    """
    args = args or result.args
    total = next(iter(samples.values())).shape[0]
    nesting = result._nesting
    # a site's draws go left of its own plate dims: (n, 1 ..., plate dims, event dims)
    with result.param_scope():
        proto = inspection_trace(result.model, *args)
    plates = {
        name: node["value"].dim() - node["fn"].event_dim
        for name, node in proto.nodes.items()
        if node["type"] == "sample" and not site_is_subsample(node)
    }
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, total, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in samples.items()}
        n = next(iter(chunk.values())).shape[0]
        shaped = {
            k: v.reshape((n,) + (1,) * (nesting - plates.get(k, 0)) + v.shape[1:])
            for k, v in chunk.items()
        }
        with torch.no_grad(), poutine.block(), result.param_scope():
            with pyro.plate("_bf_draws", n, dim=-nesting - 1):
                tr = poutine.trace(poutine.condition(result.model, shaped)).get_trace(*args)
        for name, node in tr.nodes.items():
            observed = node["type"] == "sample" and node["is_observed"] and name not in shaped
            if observed and not site_is_subsample(node):  # not a conditioned latent site
                lp = node["fn"].log_prob(node["value"])
                out.setdefault(name, []).append(lp.expand((n,) + lp.shape[1:]).reshape(n, -1))
    if not out:
        raise ValueError("result: the model has no observed site to score")
    return {name: torch.cat(parts) for name, parts in out.items()}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy()


def to_inference_data(
    result,
    num_samples: int = 500,
    posterior_predictive: bool = True,
    log_likelihood: bool = True,
    threshold: float | None = None,
    seed: int | None = 0,
):
    """Convert a fit to ArviZ (``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x).

    Groups: ``posterior`` (every latent site; per rank-bearing layer ``{layer}.relevance_sorted``
    and ``{layer}.rank_scale_sorted`` -- sorted per draw, so aligned across draws and chains and
    meaningful for r-hat/ESS --, ``{layer}.effective_rank`` and, where the information
    criterion applies, ``{layer}.m_eff``: see :mod:`bayes_fusion.rank`), ``posterior_predictive``
    (``obs``), ``log_likelihood`` (pointwise ``obs``, for ``az.loo``/``az.waic``/``az.compare``),
    ``observed_data`` (every observed site of any model; ``log_likelihood`` holds each one's
    pointwise densities, per row of its data plate) and, for MCMC, ``sample_stats``
    (``diverging``, ``energy``, ``step_size``, ``n_steps``, ``lp``, ``acceptance_rate``:
    ``az.plot_energy``, ``az.bfmi`` and ``az.summary`` work on it). SVI results are one
    pseudo-chain and carry ``attrs["inference"] = "variational"`` with a warning note.

    :param result: a :class:`bayes_fusion.FitResult`.
    :param num_samples: guide draws for SVI results.
    :param posterior_predictive: add the ``posterior_predictive`` group.
    :param log_likelihood: add the pointwise ``log_likelihood`` group.
    :param threshold: threshold of the effective rank (``None``: the criterion's default; see
        :func:`~bayes_fusion.rank_posterior`).
    :param seed: seed of the conversion's own draws (guide draws, posterior predictive): the
        same seed gives the same data, so ``bf.loo(result)`` and
        ``az.loo(bf.to_inference_data(result))`` agree; the global RNG streams are left as they
        were. ``None``: the global streams.
    """
    with seeded(seed):
        return _inference_data(result, num_samples, posterior_predictive, log_likelihood, threshold)


def _inference_data(result, num_samples, posterior_predictive, log_likelihood, threshold):
    """:func:`to_inference_data` inside its seeded streams."""
    draws = _chains(result, num_samples)
    chains, ndraw = next(iter(draws.values())).shape[:2]
    flat = {k: v.reshape((chains * ndraw,) + v.shape[2:]) for k, v in draws.items()}
    posterior, dims, coords = {}, {}, {}
    layers = rank_layers(result.model)
    rps = rank_posterior(result, threshold=threshold, samples=flat) if layers else {}
    for name, value in draws.items():
        posterior[name] = _np(value)
    for path, layer in layers.items():
        rank_dim = f"{path or 'layer'}_rank"
        coords[rank_dim] = np.arange(layer.rank)
        for short, full in layer.site_names().items():
            if full not in draws:
                continue
            shape = layer.site_shapes()[short]
            if short == layer.SCALE_SITE:
                dims[full] = [rank_dim]
            elif short == "main_effects":
                dims[full] = [f"{full}_output", f"{full}_feature"]
            elif len(shape) == 2 and shape[1] == layer.rank:
                dims[full] = [f"{full}_row", rank_dim]
        rp: RankPosterior = rps[path]
        rel_dim = f"{path or 'layer'}_component"
        coords[rel_dim] = np.arange(rp.relevance.shape[-1])
        for name, value in rank_quantities(layer, rp).items():  # the names diagnostics() uses
            posterior[name] = _np(value.reshape((chains, ndraw) + value.shape[1:]))
            if name.endswith("relevance_sorted"):
                dims[name] = [rel_dim]
            elif name.endswith("rank_scale_sorted"):
                dims[name] = [rank_dim]
    groups: dict[str, Any] = {"posterior": posterior}
    observed = observed_sites(result)
    if observed:
        groups["observed_data"] = {name: _np(v) for name, v in observed.items()}
        for name, value in observed.items():
            dims[name] = [f"{name}_row"] + [f"{name}_dim_{i}" for i in range(1, value.dim())]
    y = _observed(result)
    if y is not None and posterior_predictive:  # a Regressor / Classifier: new targets
        obs = _predictive_obs(result, flat, result.args[:-1], tuple(y.shape))
        groups["posterior_predictive"] = {"obs": _np(obs.reshape((chains, ndraw) + y.shape))}
    if observed and log_likelihood:
        pointwise = pointwise_log_likelihoods(result, flat)
        groups["log_likelihood"] = {
            name: _np(ll.reshape(chains, ndraw, -1)) for name, ll in pointwise.items()
        }
        for name in pointwise:
            dims.setdefault(name, [f"{name}_row"])
    if result.is_mcmc:
        groups["sample_stats"] = _sample_stats(result, chains, ndraw)
    attrs = {
        "inference": "mcmc" if result.is_mcmc else "variational",
        "method": result.method,
        "library": "bayes_fusion",
    }
    if not result.is_mcmc:
        attrs["note"] = _VARIATIONAL_NOTE
    return arviz_compat.from_dict(groups, coords=coords, dims=dims, attrs=attrs)


def _sample_stats(result, chains: int, ndraw: int) -> dict[str, np.ndarray]:
    """ArviZ's ``sample_stats`` of an MCMC fit: ``diverging`` (from the divergence indices) and
    the per-draw NUTS statistics the sampler recorded (``energy``, ``step_size``, ``n_steps``,
    ``lp``, ``acceptance_rate``), each ``(chains, draws)``."""
    div = np.zeros((chains, ndraw), dtype=bool)
    for c, idx in enumerate(result.info.get("divergence_indices", [])):
        div[c, [i for i in idx if i < ndraw]] = True
    stats = {"diverging": div}
    for name, value in (result.sample_stats or {}).items():
        if name != "diverging" and tuple(value.shape) == (chains, ndraw):
            stats[name] = _np(value)
    if "n_steps" in stats:
        stats["n_steps"] = stats["n_steps"].astype(np.int64)
    return stats


def _arviz_data(obj, num_samples: int, seed: int | None = 0):
    """ArviZ data with a log-likelihood group: ``obj`` itself, or the conversion of a fit."""
    if hasattr(obj, "posterior"):
        if not hasattr(obj, "log_likelihood"):
            raise ValueError("data: expected ArviZ data with a 'log_likelihood' group, got none")
        return obj
    if not hasattr(obj, "posterior_samples"):
        raise TypeError(
            f"expected a FitResult or ArviZ data (InferenceData / DataTree), got "
            f"{type(obj).__name__}"
        )
    return to_inference_data(obj, num_samples=num_samples, posterior_predictive=False, seed=seed)


def loo(
    result_or_data, num_samples: int = 500, var_name: str | None = None, seed: int | None = 0
) -> arviz_compat.Elpd:
    """PSIS leave-one-out cross-validation of a fit, the same on ArviZ 0.x and 1.x.

    :param result_or_data: a :class:`bayes_fusion.FitResult` of a ``Regressor`` /
        ``Classifier`` (converted with :func:`to_inference_data`), or ArviZ data with a
        pointwise ``log_likelihood`` group.
    :param num_samples: guide draws when a variational fit is given.
    :param var_name: the observed site to score (``None``: the only one, or ``"obs"``).
    :param seed: seed of the conversion (:func:`to_inference_data`'s): with the same seed
        ``az.loo(bf.to_inference_data(result))`` gives the same numbers.
    :returns: :class:`bayes_fusion.arviz_compat.Elpd`: ``elpd``, ``se``, ``p``, ``pareto_k``
        (shape ``(N,)``) and the ``native`` ArviZ object.

    Example::

        >>> import bayes_fusion as bf
        >>> from bayes_fusion.datasets import make_cp_regression
        >>> data = make_cp_regression((3, 4), 2, rank=1, num_data=60, seed=0)
        >>> model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=2))
        >>> res = bf.fit(model, data.inputs, data.y, num_steps=200, progress=False)
        >>> estimate = bf.loo(res, num_samples=50)
        >>> estimate.pareto_k.shape
        (60,)
    """
    data = _arviz_data(result_or_data, num_samples, seed)
    return arviz_compat.loo(data, var_name=var_name or _only_observed(data))


def _only_observed(data) -> str:
    """The log-likelihood variable to score: the only one, else ``obs``."""
    names = list(data.log_likelihood.data_vars)
    if len(names) == 1 or "obs" in names:
        return names[0] if len(names) == 1 else "obs"
    raise ValueError(f"var_name: the model has several observed sites {names}; name one")


def from_pyro(fitted, model, *args, num_samples: int = 500, seed: int | None = 0):
    """ArviZ data (``InferenceData`` on ArviZ 0.x, ``DataTree`` on 1.x) of a fit made with
    plain Pyro -- a ``pyro.infer.MCMC`` run or a trained guide -- with the rank layers'
    label-switching-invariant quantities (sorted scales and relevances, effective rank),
    ``observed_data`` and pointwise ``log_likelihood`` of every observed site, as
    :func:`to_inference_data` gives for the library's own fits. For the library's diagnostics
    (``diagnostics()``, ``rank_posterior``), wrap the fit with
    :meth:`bayes_fusion.FitResult.from_pyro`.

    :param fitted: a ``pyro.infer.MCMC`` that has run, or a guide whose parameters are in Pyro's
        parameter store.
    :param model: the model. :param args: the model arguments of the fit.
    :param num_samples: guide draws (a guide).
    :param seed: as :func:`to_inference_data`.
    """
    from .infer.result import FitResult

    result = FitResult.from_pyro(fitted, model, *args)
    return to_inference_data(result, num_samples=num_samples, seed=seed)


def compare(results: dict[str, Any], num_samples: int = 500):
    """Rank fits by PSIS-LOO (``az.compare``, stacking weights), on ArviZ 0.x and 1.x alike.

    :param results: model name -> :class:`bayes_fusion.FitResult` or ArviZ data with a
        pointwise ``log_likelihood`` group (e.g. two ``max_rank`` settings on the same data).
    :param num_samples: guide draws per variational fit.
    :returns: pandas ``DataFrame``, one row per model, best first, with the columns ``rank``,
        ``elpd``, ``p``, ``elpd_diff``, ``weight``, ``se``, ``dse`` on every ArviZ version.
    """
    if not isinstance(results, dict) or len(results) < 2:
        raise ValueError(
            f"results: expected a dict of at least two named fits, got {results!r:.80}"
        )
    return arviz_compat.compare(
        {name: _arviz_data(obj, num_samples) for name, obj in results.items()}
    )


def _observed(result) -> torch.Tensor | None:
    """The observed targets of a Regressor/Classifier fit (last model argument)."""
    from .models import Classifier, Regressor

    if isinstance(result.model, (Regressor, Classifier)) and len(result.args) >= 2:
        y = result.args[-1]
        if isinstance(y, torch.Tensor):
            if isinstance(result.model, Regressor) and y.dim() == 1:
                y = y.unsqueeze(-1)
            return y
    return None


def observed_sites(result) -> dict[str, torch.Tensor]:
    """The observed data of a fit, observed site -> value: the targets of a ``Regressor`` /
    ``Classifier`` (``obs``), the observed sites of any other model (one trace at the fit's
    arguments)."""
    y = _observed(result)
    if y is not None:
        return {"obs": y}
    with result.param_scope():
        trace = inspection_trace(result.model, *result.args)
    return {
        name: node["value"].detach()
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and node["is_observed"] and not site_is_subsample(node)
    }


def _predictive_obs(result, flat, inputs, y_shape) -> torch.Tensor:
    """Posterior predictive draws of ``obs`` for the given draws, ``(S, *y_shape)``."""
    return torch.cat(
        [
            out["obs"].reshape((-1,) + y_shape)
            for out in result.predictive_chunks(flat, inputs, ["obs"])
        ]
    )


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _save(fig, path):
    if path is not None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_rank_posterior(result_or_posteriors, path=None, num_samples: int = 500):
    """Bar chart of ``P(rank = r)`` per rank-bearing layer, titled with what it is (MAP point
    estimate / variational / MCMC posterior) and, in red, the MCMC diagnostics that failed.

    :param result_or_posteriors: a fit result or the output of :func:`rank_posterior`.
    :param path: optional PNG path to save to.
    :returns: ``(fig, axes)``.
    """
    import matplotlib.pyplot as plt

    rps = (
        result_or_posteriors
        if isinstance(result_or_posteriors, dict)
        else rank_posterior(result_or_posteriors, num_samples=num_samples)
    )
    fig, axes = plt.subplots(1, len(rps), figsize=(4.5 * len(rps), 3.4), squeeze=False)
    for ax, (path_name, rp) in zip(axes[0], rps.items(), strict=True):
        ranks = np.arange(rp.max_rank + 1)
        ax.bar(ranks, rp.probs.numpy(), color="tab:gray" if rp.is_point else "tab:blue")
        ax.set_title(_plot_title(path_name, rp), fontsize=8, loc="left")
        if rp.warning:
            warning = textwrap.fill(rp.warning, 60)
            ax.text(
                0.5,
                0.97,
                warning,
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                color="tab:red",
            )
        ax.set_xlabel(f"effective rank ({rp.criterion} criterion)")
        ax.set_ylabel("point estimate" if rp.is_point else "posterior probability")
        ax.set_xticks(ranks)
        ax.set_ylim(0, 1.25 if rp.warning else 1.05)
    fig.tight_layout()
    _save(fig, path)
    return fig, axes


def _plot_title(path_name: str, rp: RankPosterior) -> str:
    """Two lines: the layer and what the summary is; the rank (mode and HDI, or the point)."""
    if rp.is_point:
        return f"{path_name or 'layer'}: {rp.label}\nrank {rp.mode}"
    lo, hi = rp.hdi
    return (
        f"{path_name or 'layer'}: {rp.label}\n"
        f"mode {rp.mode}, {int(rp.hdi_prob * 100)}% HDI [{lo}, {hi}]"
    )


def plot_relevance_forest(
    result_or_idata,
    path=None,
    var: str = "relevance_sorted",
    hdi_prob: float = 0.9,
    num_samples: int = 500,
):
    """ArviZ forest plot of the sorted relevances (or ``var="rank_scale_sorted"``) with HDIs.

    :param result_or_idata: a fit result or the output of :func:`to_inference_data`.
    :param path: optional PNG path to save to.
    :param var: ``"relevance_sorted"`` or ``"rank_scale_sorted"``.
    :param hdi_prob: mass of the highest-density intervals drawn.
    :param num_samples: guide draws when a (variational) fit result is given.
    :returns: ``(fig, axes)``: a matplotlib figure and a numpy array of its axes.
    """
    idata = result_or_idata
    if not hasattr(idata, "posterior"):
        idata = to_inference_data(
            result_or_idata,
            num_samples=num_samples,
            posterior_predictive=False,
            log_likelihood=False,
        )
    names = [n for n in idata.posterior.data_vars if n.endswith(f".{var}")]
    if not names:
        raise ValueError(f"var: expected a rank variable like 'relevance_sorted', got {var!r}")
    height = 1 + 0.35 * sum(idata.posterior[n].shape[-1] for n in names)
    quantity = "relevance" if var == "relevance_sorted" else "rank scale lambda"

    def label(name: str, index: int) -> str:  # "layer #1": the largest of the layer's draws
        return f"{name.rsplit('.', 1)[0]} #{index + 1}"

    fig, axes = arviz_compat.plot_forest(
        idata, names, hdi_prob, height, labels=label, xlabel=f"{quantity} (sorted per draw)"
    )
    axes[0].set_title(
        f"sorted {var.replace('_sorted', '')} ({int(hdi_prob * 100)}% HDI)", fontsize=9
    )
    _save(fig, path)
    return fig, axes


def plot_elbo(result, path=None, smooth: int = 25):
    """The SVI loss (negative ELBO) per step, raw and smoothed; the KL warm-up steps, during
    which the loss is not the full negative ELBO, are shaded.

    :returns: ``(fig, ax)``.
    """
    import matplotlib.pyplot as plt

    if not result.losses:
        raise ValueError(
            f"result: expected an SVI fit with a loss history, got none (method={result.method!r})"
        )
    losses = np.asarray(result.losses)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(losses, lw=0.6, alpha=0.5, label="loss")
    if len(losses) > smooth:
        kernel = np.ones(smooth) / smooth
        ax.plot(
            np.arange(smooth - 1, len(losses)),
            np.convolve(losses, kernel, "valid"),
            lw=1.5,
            label=f"moving average ({smooth})",
        )
    warmup = result.info.get("kl_warmup_steps") or 0
    if warmup:
        ax.axvspan(0, warmup, color="0.85", alpha=0.5, lw=0, label="KL warm-up (prior weight < 1)")
    ax.set_xlabel("step")
    ax.set_ylabel("negative ELBO")
    lo, hi = np.percentile(losses, [0, 95])
    ax.set_ylim(lo - 0.05 * abs(hi - lo), hi + 0.05 * abs(hi - lo))
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return fig, ax


# ---------------------------------------------------------------------------------------------
# text summary
# ---------------------------------------------------------------------------------------------
def rank_summary(
    result,
    num_samples: int = 500,
    threshold: float | None = None,
    print_it: bool = True,
    criterion: str = "auto",
) -> str:
    """Print (and return) the rank posterior of every rank-bearing layer: what it is (MAP
    point estimate, a guide's variational posterior, MCMC), the criterion, the table of
    ``P(rank = r)``, the effective rank's mode / HDI / mean and ``m_eff``, the parameter counts
    full vs pruned at the modal rank (:func:`~bayes_fusion.prune`), and -- for MCMC -- a
    warning line when the diagnostics of the layer's invariant quantities fail.

    :param threshold: ``criterion``: as :func:`~bayes_fusion.rank_posterior`.
    :param print_it: print the text as well as returning it.
    """
    from .prune import prune

    pruned = prune(result, threshold=threshold, num_samples=num_samples, criterion=criterion)
    rps = pruned.posteriors  # the rank posteriors whose modes were kept
    lines = []
    for path, rp in rps.items():
        layer = rank_layers(result.model)[path]
        lines.append(
            f"== layer {path or type(layer).__name__!r} ({type(layer).__name__}, "
            f"max rank {rp.max_rank}): {rp.label}{_POINT_HINT if rp.is_point else ''} =="
        )
        lines.append(_criterion_line(rp))
        lines.append(rp.table())  # under the warning line when MCMC diagnostics failed
        lines.append(rp.headline())
        info = pruned.layers[path]
        lines.append(
            f"parameters: full {info['params_before']}, pruned (rank "
            f"{info['rank']}) {info['params_after']} "
            f"({info['params_after'] / info['params_before']:.1%})"
        )
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text


_POINT_HINT = " (no uncertainty: fit a guide or NUTS for a posterior)"


def _criterion_line(rp: RankPosterior) -> str:
    if rp.criterion == "information":
        return (
            f"a component counts when 1 - kappa > {rp.threshold:g} (information criterion: the "
            "data outweigh the shrinkage)"
        )
    return (
        f"a component counts when its relevance exceeds {rp.threshold:g} x the largest "
        "(relative criterion)"
    )
