"""Convergence statistics of MCMC draws and the thresholds they are judged by.

Split r-hat and ESS come from :mod:`pyro.ops.stats`; a fit passes when every diagnosed quantity
has r-hat <= :data:`MAX_R_HAT` and ESS >= :data:`MIN_ESS` and no transition diverged. The
quantities themselves (label-switching invariant) are chosen by
:mod:`~bayes_fusion.infer.mcmc.diagnostics` and :mod:`bayes_fusion.rank`.
"""

from __future__ import annotations

from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

__all__ = ["MAX_R_HAT", "MIN_ESS", "r_hat_and_ess", "convergence_problems"]

#: largest split r-hat of a converged quantity
MAX_R_HAT = 1.01
#: smallest effective sample size a summary is trusted with
MIN_ESS = 100.0


def r_hat_and_ess(draws: Tensor) -> tuple[float, float]:
    """Largest split r-hat and smallest effective sample size over the entries of ``draws``
    ``(chains, draws, ...)``. Entries constant over every draw of every chain (an effective rank
    that never changes) are converged by definition and left out; if all are, r-hat is 1 and
    the ESS the number of draws."""
    flat = draws.double().reshape(draws.shape[0], draws.shape[1], -1)
    varies = (flat != flat[:1, :1]).any(dim=1).any(dim=0)
    if not bool(varies.any()):
        return 1.0, float(flat.shape[0] * flat.shape[1])
    flat = flat[..., varies]
    return float(split_gelman_rubin(flat).max()), float(effective_sample_size(flat).min())


def convergence_problems(quantities: dict[str, Tensor], divergences: list[int]) -> list[str]:
    """What fails the thresholds, one short text per problem (empty: everything passes).

    :param quantities: name -> draws ``(chains, draws, ...)``; quantities with fewer than 4
        draws per chain are not judged.
    :param divergences: divergent transitions per chain.
    """
    problems = []
    if sum(divergences):
        problems.append(f"{sum(divergences)} divergent transitions")
    for name, value in quantities.items():
        if value.shape[1] < 4:
            continue
        r_hat, ess = r_hat_and_ess(value)
        if not r_hat <= MAX_R_HAT:
            problems.append(f"r-hat {r_hat:.2f} > {MAX_R_HAT} for {name}")
        if not ess >= MIN_ESS:
            problems.append(f"ESS {ess:.0f} < {MIN_ESS:.0f} for {name}")
    return problems
