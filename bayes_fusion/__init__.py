"""bayes_fusion: Bayesian low-rank tensor layers with automatic rank determination on Pyro."""

from . import _moved, arviz_compat, datasets, ops
from ._version import __version__
from .contributions import ModalityContributions, modality_contributions
from .infer import FitResult, NonFiniteLossError, fit, fit_mcmc, fit_nuts, fit_svi, load
from .infer.svi import distributed
from .infer.svi.guides import GUIDES, make_guide
from .layers import (
    CPFusion,
    DeterministicCPFusion,
    DeterministicXOXLinear,
    ParameterBudgetWarning,
    RankLayer,
    XOXLinear,
    cp_from_tltorch,
    cp_to_tltorch,
    cpfusion_values_from_tltorch,
    cpfusion_values_to_tltorch,
    rank_layers,
)
from .models import Classifier, Regressor
from .priors import HalfCauchyRankPrior, LogUniformRankPrior
from .prune import PruneResult, prune
from .rank import RankPosterior, effective_rank_draws, rank_posterior
from .summary import (
    compare,
    from_pyro,
    loo,
    plot_elbo,
    plot_rank_posterior,
    plot_relevance_forest,
    rank_summary,
    to_inference_data,
)

__all__ = [
    "CPFusion",
    "Classifier",
    "DeterministicCPFusion",
    "DeterministicXOXLinear",
    "FitResult",
    "GUIDES",
    "HalfCauchyRankPrior",
    "LogUniformRankPrior",
    "NonFiniteLossError",
    "ParameterBudgetWarning",
    "RankLayer",
    "RankPosterior",
    "Regressor",
    "XOXLinear",
    "__version__",
    "arviz_compat",
    "compare",
    "cp_from_tltorch",
    "cp_to_tltorch",
    "cpfusion_values_from_tltorch",
    "cpfusion_values_to_tltorch",
    "datasets",
    "distributed",
    "effective_rank_draws",
    "fit",
    "fit_mcmc",
    "fit_nuts",
    "fit_svi",
    "from_pyro",
    "load",
    "loo",
    "make_guide",
    "ModalityContributions",
    "PruneResult",
    "modality_contributions",
    "plot_elbo",
    "plot_rank_posterior",
    "plot_relevance_forest",
    "prune",
    "rank_summary",
    "to_inference_data",
    "ops",
    "rank_layers",
    "rank_posterior",
]

_moved.install()


def __getattr__(name: str):
    """``bf.<old module>`` for a module path that moved (see :mod:`bayes_fusion._moved`)."""
    old = f"{__name__}.{name}"
    if old in _moved.MOVED:
        return _moved.resolve(old)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
