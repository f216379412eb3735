"""Convergence statistics of MCMC draws and the thresholds they are judged by.

R-hat and ESS are rank-normalized (Vehtari, Gelman, Simpson, Carpenter & Buerkner 2021, the
definition ArviZ and Stan report): the draws are replaced by the normal scores of their ranks
over all chains, so heavy tails (the half-Cauchy scales of unused components) neither hide nor
fake a problem; r-hat is the larger of the split r-hat of the normalized draws and of their
folded distance to the median (a difference in spread), ESS the bulk ESS, both through
:mod:`pyro.ops.stats`. For many short chains started in groups (superchains: the chains of a
group start at one point), nested r-hat (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari &
Gelman 2022) compares the groups' means to the spread within groups. A fit passes when every
diagnosed quantity has r-hat <= :data:`MAX_R_HAT` and ESS >= :data:`MIN_ESS` and no transition
diverged. The
quantities themselves (label-switching invariant) are chosen by
:mod:`~bayes_fusion.infer.mcmc.diagnostics` and :mod:`bayes_fusion.rank`.
"""

from __future__ import annotations

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from scipy.stats import rankdata
from torch import Tensor

__all__ = [
    "MAX_R_HAT",
    "MIN_ESS",
    "convergence_problems",
    "nested_r_hat",
    "r_hat_and_ess",
    "rank_normalize",
]

#: largest split r-hat of a converged quantity
MAX_R_HAT = 1.01
#: smallest effective sample size a summary is trusted with
MIN_ESS = 100.0


def rank_normalize(draws: Tensor) -> Tensor:
    """The normal scores of the ranks of ``draws`` ``(chains, draws, K)`` over all chains and
    draws, per entry ``K`` (ties get their average rank): ``Phi^-1((r - 3/8) / (S + 1/4))``."""
    flat = draws.reshape(-1, draws.shape[-1]).cpu().numpy()
    ranks = torch.as_tensor(rankdata(flat, axis=0), dtype=torch.float64)
    total = flat.shape[0]
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.icdf((ranks - 0.375) / (total + 0.25)).reshape(draws.shape)


def r_hat_and_ess(draws: Tensor) -> tuple[float, float]:
    """Largest rank-normalized r-hat and smallest bulk ESS over the entries of ``draws``
    ``(chains, draws, ...)`` (see the module doc). Entries constant over every draw of every
    chain (an effective rank that never changes) are converged by definition and left out; if
    all are, r-hat is 1 and the ESS the number of draws. Chains stuck at different constants
    give an infinite r-hat."""
    flat = draws.double().reshape(draws.shape[0], draws.shape[1], -1)
    varies = (flat != flat[:1, :1]).any(dim=1).any(dim=0)
    if not bool(varies.any()):
        return 1.0, float(flat.shape[0] * flat.shape[1])
    flat = flat[..., varies]
    bulk = rank_normalize(flat)
    median = flat.reshape(-1, flat.shape[-1]).median(0).values
    folded = rank_normalize((flat - median).abs())
    r_hat = torch.maximum(split_gelman_rubin(bulk), split_gelman_rubin(folded))
    return float(r_hat.max()), float(effective_sample_size(bulk).min())


def nested_r_hat(draws: Tensor, superchains: int) -> float:
    """Largest nested r-hat over the entries of ``draws`` ``(chains, draws, ...)`` whose
    chains form ``superchains`` consecutive groups of equal size (the chains of a group
    started at one point): ``sqrt(1 + B / W)`` with ``B`` the variance of the groups' means
    and ``W`` the mean over groups of the variance of their chains' means plus the chains'
    mean within-chain variance (Margossian et al. 2022, eq. 2.2-2.4; with one chain per group
    ``W`` is the within-chain part alone). Constant entries count as converged (1).

    :raises ValueError: the chains do not split into ``superchains`` equal groups.
    """
    chains = draws.shape[0]
    if superchains < 2 or chains % superchains:
        raise ValueError(
            f"superchains: expected at least 2 groups dividing the {chains} chains, got "
            f"{superchains}"
        )
    flat = draws.double().reshape(superchains, chains // superchains, draws.shape[1], -1)
    chain_means = flat.mean(2)  # (K, M, E)
    group_means = chain_means.mean(1)  # (K, E)
    between = group_means.var(0, unbiased=True)
    within_chain = flat.var(2, unbiased=True).mean((0, 1))
    within = within_chain
    if flat.shape[1] > 1:
        within = within + chain_means.var(1, unbiased=True).mean(0)
    ratio = torch.where(within > 0, between / within, torch.where(between > 0, torch.inf, 0.0))
    return float(torch.sqrt(1 + ratio).max())


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
            problems.append(f"r-hat {r_hat:.3f} > {MAX_R_HAT} for {name}")
        if not ess >= MIN_ESS:
            problems.append(f"ESS {ess:.0f} < {MIN_ESS:.0f} for {name}")
    return problems
