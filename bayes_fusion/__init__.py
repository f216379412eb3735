"""bayes_fusion: Bayesian low-rank tensor layers with automatic rank determination on Pyro."""

from . import arviz_compat, datasets, distributed, ops  # noqa: E402
from ._version import __version__  # noqa: E402
from .contributions import ModalityContributions, modality_contributions  # noqa: E402
from .guides import GUIDES, make_guide, rank_layers  # noqa: E402
from .infer import FitResult, NonFiniteLossError, fit, fit_nuts, fit_svi, load  # noqa: E402
from .layers import (  # noqa: E402
    CPFusion,
    DeterministicCPFusion,
    DeterministicXOXLinear,
    RankLayer,
    XOXLinear,
    cp_from_tltorch,
    cp_to_tltorch,
    cpfusion_values_from_tltorch,
    cpfusion_values_to_tltorch,
)
from .models import Classifier, Regressor  # noqa: E402
from .priors import HalfCauchyRankPrior, LogUniformRankPrior  # noqa: E402
from .prune import PruneResult, prune  # noqa: E402
from .rank import RankPosterior, effective_rank_draws, rank_posterior  # noqa: E402
from .summary import (  # noqa: E402
    compare,
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
    "fit_nuts",
    "fit_svi",
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
