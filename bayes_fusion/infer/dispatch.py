"""``fit()``: the one entry point. It checks the guide name, refuses options the chosen method
does not take, and hands over to :func:`~bayes_fusion.fit_svi`, :func:`~bayes_fusion.fit_mcmc`
or :func:`~bayes_fusion.fit_nuts`, where every option is a named, documented parameter."""

from __future__ import annotations

import inspect

from pyro.infer.autoguide import AutoGuide

from .._checks import check_choice
from ..models import Classifier
from .mcmc.many_chains import fit_mcmc
from .mcmc.nuts import fit_nuts
from .result import MCMC_METHODS, FitResult
from .svi.guides import GUIDES
from .svi.loop import fit_svi

__all__ = ["fit", "auto_guide"]


def _options(method) -> list[str]:
    """The keyword-only parameters of ``method`` (the options ``fit`` may forward)."""
    params = inspect.signature(method).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def auto_guide(model) -> str:
    """The guide ``fit(..., guide="auto")`` picks for ``model``.

    ``"map"`` for a :class:`~bayes_fusion.Classifier` whose layer has main effects: its point
    predictions match L2 logistic regression on the bundled data sets, while averaging over a
    factorized posterior costs log-loss there (``benchmarks/classification.py``); choose
    ``"meanfield"`` or ``"mcmc"`` for intervals. ``"meanfield"`` for everything else (without
    main effects a MAP fit can switch every component off).
    """
    layer = getattr(model, "layer", None)
    if isinstance(model, Classifier) and getattr(layer, "main_effects", False):
        return "map"
    return "meanfield"


def fit(model, *args, guide: str | AutoGuide | type = "auto", **options) -> FitResult:
    """Fit ``model`` to data by SVI or MCMC.

    ``guide="mcmc"`` runs :func:`~bayes_fusion.fit_mcmc`, many HMC chains in lockstep (options
    ``num_chains``, ``num_samples``, ``warmup_steps``, ``target_accept_prob``, ``jit``,
    ``resume``, ...); ``guide="nuts"`` runs Pyro's NUTS, one chain at a time
    (:func:`~bayes_fusion.fit_nuts`: ``num_samples``, ``warmup_steps``, ``num_chains``,
    ``init``, ``target_accept_prob``, ``chain_method``, ...); any other guide runs
    :func:`~bayes_fusion.fit_svi` (options ``num_steps``, ``lr``, ``batch_size``,
    ``kl_warmup``, ``early_stopping``, ``checkpoint_path``, ``resume``, ``distributed``, ...).
    All take ``seed`` (default 0) and ``progress``. See those functions for every option and
    its default.

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``; tensors' first dim is the data rows.
    :param guide: ``"auto"`` (default: see :func:`~bayes_fusion.infer.auto_guide` -- ``"map"`` for a
        :class:`~bayes_fusion.Classifier` with main effects, ``"meanfield"`` otherwise),
        ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``, ``"mcmc"``, ``"nuts"``, an
        autoguide class (built with the preset initialisation) or a guide instance.
    :param options: keyword options of the chosen method.
    :returns: :class:`~bayes_fusion.FitResult`.
    :raises TypeError: an option the chosen method does not take (the message lists the ones
        it does).
    :raises ValueError: an unknown guide name, or bad option values (named).

    Example::

        >>> import bayes_fusion as bf
        >>> from bayes_fusion.datasets import make_cp_regression
        >>> data = make_cp_regression((3, 4), 2, rank=1, num_data=50, seed=0)
        >>> model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
        >>> res = bf.fit(model, data.inputs, data.y, guide="map", num_steps=100, progress=False)
        >>> res.method, len(res.losses)
        ('map', 100)
    """
    if isinstance(guide, str):
        check_choice("guide", guide, GUIDES + MCMC_METHODS + ("auto",))
        guide = auto_guide(model) if guide == "auto" else guide
    mcmc = isinstance(guide, str) and guide in MCMC_METHODS
    if mcmc and "distributed" in options and options.pop("distributed") is not False:
        raise ValueError(
            f"distributed: guide={guide!r} runs on one process; use num_chains for parallelism"
        )
    methods = {"mcmc": fit_mcmc, "nuts": fit_nuts}
    method = methods[guide] if mcmc else fit_svi
    accepted = _options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        others = [m for m in (fit_svi, fit_mcmc, fit_nuts) if m is not method]
        elsewhere = {
            other.__name__: [name for name in unknown if name in _options(other)]
            for other in others
        }
        hints = [f"{names} are options of {name}" for name, names in elsewhere.items() if names]
        hint = f"; {'; '.join(hints)}" if hints else ""
        raise TypeError(
            f"fit: unexpected keyword arguments {unknown} for guide={guide!r} "
            f"({method.__name__} takes {[n for n in accepted if n != 'guide']}){hint}"
        )
    if mcmc:
        return method(model, *args, **options)
    return fit_svi(model, *args, guide=guide, **options)
