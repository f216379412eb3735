"""Collapsed NUTS for ``Regressor(CPFusion)``: the output factor and bias integrated out
(:mod:`bayes_fusion.marginal`), active components centred, a dense metric started from the
Laplace approximation at the MAP, chains in worker processes, exact conditional draws of the
integrated sites afterwards."""

from __future__ import annotations

import os
import time

import torch

from ..marginal import CPRegressionMarginal
from ..rank import active_components
from .chains import run_chains
from .mcmc import chain_starts, map_point, nuts_settings, parallel_chains, start_description
from .result import FitResult

__all__ = ["run_collapsed_nuts"]


def run_collapsed_nuts(
    model,
    args,
    num_samples,
    warmup_steps,
    num_chains,
    progress,
    init,
    init_steps,
    max_tree_depth,
    target_accept_prob,
    chain_method,
    full_mass,
) -> FitResult:
    """NUTS on Regressor(CPFusion) with the output factor and bias integrated out. Arguments as
    :func:`~bayes_fusion.fit_nuts`, already validated."""
    parallel = parallel_chains(num_chains, chain_method, os.cpu_count() or 1, reserve=0)
    t0 = time.perf_counter()
    layer = model.layer
    if init == "map":
        point = map_point(model, args, init_steps)
        values = {k: v[0] for k, v in point.items()}
        # components the data pin down mix better centred, the others non-centred
        centered = active_components(layer, point)[0]
    else:
        values = dict(layer.init_values())
        centered = None
    potential = CPRegressionMarginal(model, *args, centered=centered)
    values.setdefault("noise", potential.y.std(0).clamp(min=1e-3))
    start = potential.to_unconstrained(values)
    kernel_kwargs = nuts_settings(
        potential, start, max_tree_depth, target_accept_prob, full_mass, init == "map"
    )
    seeds = torch.randint(0, 2**31 - 1, (num_chains,)).tolist()
    starts = chain_starts(start, kernel_kwargs.get("initial_inverse_mass_matrix"), num_chains)
    raw, div_idx, _ = run_chains(
        potential,
        starts,
        num_samples,
        warmup_steps,
        seeds,
        kernel_kwargs,
        parallel,
        progress,
    )
    with torch.no_grad():
        constrained = potential.constrain(raw)  # (C, S, ...)
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in constrained.items()}
        drawn = potential.sample_conditional(flat)
    lead = (num_chains, num_samples)
    samples = {k: v.reshape(lead + v.shape[2:]) for k, v in constrained.items()}
    samples.update({k: v.reshape(lead + v.shape[1:]) for k, v in drawn.items()})
    info = {
        "seconds": time.perf_counter() - t0,
        "divergences": [len(d) for d in div_idx],
        "divergence_indices": div_idx,
        "num_chains": num_chains,
        "path": "collapsed",
        "reparam": True,
        "init": init,
        "marginalized": [potential.out_site]
        + ([potential.bias_site] if potential.bias_site else []),
        "full_mass": kernel_kwargs["full_mass"],
        "centered_components": potential.centered.tolist(),
        "parallel": parallel,
        "chain_starts": start_description(kernel_kwargs),
    }
    return FitResult(model, None, "nuts", args, mcmc_samples=samples, info=info)
