"""MCMC: :func:`fit_nuts`, the generic NUTS path (Pyro's ``MCMC``, non-centred factors, MAP
start) and what every NUTS path shares: the MAP start, the chain layout and divergence counts.
The collapsed path for ``Regressor(CPFusion)`` is in :mod:`.mcmc_collapsed`."""

from __future__ import annotations

import math
import os
import time

import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_value
from pyro.infer.reparam import LocScaleReparam
from torch import Tensor
from torch.distributions import biject_to

from ..guides import rank_layers
from .result import FitResult
from .svi import fit_svi

__all__ = ["MAP_RESTARTS", "divergences", "map_point", "parallel_chains", "run_generic_nuts"]


def _scaled_sites(model) -> dict[str, tuple]:
    """Full factor-site name -> (layer, scale-site name) for every rank-bearing layer."""
    out = {}
    for layer in rank_layers(model).values():
        for short in layer.scaled_sites():
            out[layer.site_name(short)] = (layer, layer.site_name(layer.SCALE_SITE))
    return out


def run_generic_nuts(
    model,
    args: tuple,
    num_samples: int,
    warmup_steps: int,
    num_chains: int,
    progress: bool,
    reparam: bool,
    init: str,
    init_steps: int,
    jit_compile: bool,
    max_tree_depth: int,
    target_accept_prob: float,
    chain_method: str,
) -> FitResult:
    """NUTS with Pyro's ``MCMC`` on any model: the scaled factors non-centred
    (``reparam``), started from the best MAP fit (``init="map"``). Arguments as
    :func:`~bayes_fusion.fit_nuts`, already validated."""
    parallel = parallel_chains(num_chains, chain_method, os.cpu_count() or 1)
    scaled = _scaled_sites(model)
    nuts_model = model
    if reparam and scaled:
        nuts_model = poutine.reparam(model, config={s: LocScaleReparam(0.0) for s in scaled})
    t0 = time.perf_counter()
    init_values = {}
    if init == "map":
        init_values = _decentred_start(model, args, init_steps, scaled, reparam)
    kernel = NUTS(
        nuts_model,
        init_strategy=init_near(init_values),
        jit_compile=jit_compile,
        ignore_jit_warnings=True,
        max_tree_depth=max_tree_depth,
        target_accept_prob=target_accept_prob,
    )
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains if parallel else 1,
        disable_progbar=not progress,
        mp_context="spawn" if parallel else None,
    )
    if not parallel and num_chains > 1:
        runs = []
        for _ in range(num_chains):
            mcmc.run(*args)
            runs.append((mcmc.get_samples(group_by_chain=True), divergences(mcmc)))
        raw = {k: torch.cat([r[0][k] for r in runs]) for k in runs[0][0]}
        div_idx = [d for r in runs for d in r[1]]
    else:
        mcmc.run(*args)
        raw = mcmc.get_samples(group_by_chain=True)
        div_idx = divergences(mcmc)
    info = {
        "seconds": time.perf_counter() - t0,
        "divergences": [len(d) for d in div_idx],
        "divergence_indices": div_idx,
        "num_chains": num_chains,
        "reparam": bool(reparam),
        "init": init,
        "chain_starts": f"the MAP point jittered by Normal(0, {START_JITTER}^2) (unconstrained) "
        "per chain"
        if init_values
        else "Pyro's default init per chain",
    }
    return FitResult(model, None, "nuts", args, mcmc_samples=_recentred(raw, scaled), info=info)


#: std of the unconstrained jitter of each chain's start around the MAP point
START_JITTER = 0.1


def init_near(values: dict[str, Tensor], jitter: float = START_JITTER):
    """A Pyro init strategy: every site at ``values`` moved by ``Normal(0, jitter^2)`` in its
    unconstrained coordinates (sites not in ``values``: Pyro's default). Each chain (each
    worker process, each sequential run) draws its own jitter, so chains start apart and r-hat
    can see one that stays stuck.
    """
    fallback = init_to_value(values={})

    def init(site=None):
        if site is None or site["name"] not in values:
            return fallback(site)
        transform = biject_to(site["fn"].support)
        u = transform.inv(values[site["name"]])
        return transform(u + jitter * torch.randn_like(u))

    return init


def _decentred_start(model, args, init_steps: int, scaled: dict, reparam: bool) -> dict:
    """The MAP point in the sampler's coordinates (scaled factors divided by their scale)."""
    values = {k: v[0] for k, v in map_point(model, args, init_steps).items()}
    init_values = {}
    for name, value in values.items():
        if reparam and name in scaled:
            layer, scale_site = scaled[name]
            init_values[f"{name}_decentered"] = value / (values[scale_site] + layer.scale_floor)
        else:
            init_values[name] = value
    return init_values


def _recentred(raw: dict[str, Tensor], scaled: dict) -> dict[str, Tensor]:
    """Draws of the model's own sites from the sampler's (``*_decentered`` times scale)."""
    samples = {}
    for name, value in raw.items():
        if name.endswith("_decentered") and name[: -len("_decentered")] in scaled:
            base = name[: -len("_decentered")]
            layer, scale_site = scaled[base]
            samples[base] = value * (raw[scale_site] + layer.scale_floor).unsqueeze(-2)
        else:
            samples[name] = value
    return samples


def parallel_chains(num_chains: int, chain_method: str, cpus: int, reserve: int = 1) -> bool:
    """Whether NUTS chains run in parallel processes; refuses impossible requests.

    Pyro runs chains in parallel only when ``num_chains <= cpu_count - 1`` (``reserve=1``: one
    CPU stays with the parent); the collapsed CP path runs its own worker processes and needs
    no reserve. ``"auto"`` runs chains in parallel when they fit and one after another when
    ``num_chains <= cpu_count``; more chains than CPUs is refused unless the user asks for
    ``"sequential"`` explicitly (an oversubscribed machine is a likely mistake).
    """
    if num_chains == 1 or chain_method == "sequential":
        return False
    fits = num_chains <= max(1, cpus - reserve)
    if chain_method == "parallel" and not fits:
        raise ValueError(
            f"num_chains: chain_method='parallel' needs num_chains <= CPU count - {reserve} = "
            f"{cpus - reserve}, got {num_chains}; use chain_method='sequential'"
        )
    if num_chains > cpus:
        raise ValueError(
            f"num_chains: expected at most the CPU count ({cpus}), got {num_chains}; pass "
            "chain_method='sequential' to run more chains one after another"
        )
    return fits


#: MAP fits (from different random initial factors) whose best starts NUTS
MAP_RESTARTS = 3


def map_point(model, args, init_steps: int, restarts: int = MAP_RESTARTS) -> dict[str, Tensor]:
    """The best of ``restarts`` MAP fits, to start NUTS from: site -> value with one leading
    draw dim. The MAP objective has several local optima (a spurious extra component, a
    component split in two); one fit lands in a poor one often enough to matter for NUTS,
    whose centring and initial metric come from this point."""
    best, best_loss = None, math.inf
    for _ in range(restarts):  # seed=None: each restart draws new initial factors
        pre = fit_svi(model, *args, guide="map", num_steps=init_steps, progress=False, seed=None)
        tail = pre.losses[-20:]
        loss = sum(tail) / len(tail)
        if best is None or loss < best_loss:
            best, best_loss = pre, loss
    return {k: v.detach() for k, v in best.posterior_samples(1).items()}


def divergences(mcmc) -> list[list[int]]:
    """Indices of the divergent transitions (after warm-up), one list per chain."""
    div = mcmc.diagnostics().get("divergences", {})
    return [[int(i) for i in v] for v in div.values()]
