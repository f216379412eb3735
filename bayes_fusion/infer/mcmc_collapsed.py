"""Collapsed NUTS for ``Regressor(CPFusion)``: the output factor and bias integrated out
(:mod:`bayes_fusion.marginal`), active components centred, a dense metric started from the
Laplace approximation at the MAP, chains in worker processes, exact conditional draws of the
integrated sites afterwards."""

from __future__ import annotations

import os
import time

import torch

from ..marginal import (
    CPRegressionMarginal,
    flatten_params,
    laplace_inverse_mass_matrix,
    run_chains,
)
from ..rank import active_components
from .mcmc import START_JITTER, map_point, parallel_chains
from .result import FitResult

__all__ = ["run_collapsed_nuts", "chain_starts"]


def chain_starts(start: dict, metric: dict | None, num_chains: int) -> list[dict]:
    """One start per chain (unconstrained coordinates): chain 0 at ``start``, every other chain
    at a draw of the Laplace approximation around it (covariance ``metric``, the
    curvature-clipped inverse Hessian of :func:`laplace_inverse_mass_matrix`; without one,
    ``Normal(0, START_JITTER^2)`` jitter). Chains that start apart let r-hat see a chain that
    stays stuck; from one shared point it cannot.
    """
    center, unflatten = flatten_params(start)
    chol = None
    if metric is not None:
        cov = next(iter(metric.values()))
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        chol = torch.linalg.cholesky(cov + 1e-9 * eye)
    starts = [dict(start)]
    for _ in range(1, num_chains):
        noise = torch.randn_like(center)
        point = center + (chol @ noise if chol is not None else START_JITTER * noise)
        starts.append(unflatten(point))
    return starts


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
    dim = sum(v.numel() for v in start.values())
    kernel_kwargs = {
        "max_tree_depth": max_tree_depth,
        "target_accept_prob": target_accept_prob,
        # a dense mass matrix absorbs the linear correlations between scales and factors
        "full_mass": dim <= 500 if full_mass == "auto" else bool(full_mass),
    }
    if kernel_kwargs["full_mass"] and init == "map":
        metric = laplace_inverse_mass_matrix(potential, start)
        if metric is not None:
            kernel_kwargs["initial_inverse_mass_matrix"] = metric
    seeds = torch.randint(0, 2**31 - 1, (num_chains,)).tolist()
    starts = chain_starts(start, kernel_kwargs.get("initial_inverse_mass_matrix"), num_chains)
    raw, div_idx = run_chains(
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
        "reparam": True,
        "init": init,
        "marginalized": [potential.out_site]
        + ([potential.bias_site] if potential.bias_site else []),
        "full_mass": kernel_kwargs["full_mass"],
        "centered_components": potential.centered.tolist(),
        "parallel": parallel,
        "chain_starts": "chain 0 at the MAP point, the others at draws of the Laplace "
        "approximation around it"
        if "initial_inverse_mass_matrix" in kernel_kwargs
        else f"chain 0 at the start point, the others jittered by Normal(0, {START_JITTER}^2)",
    }
    return FitResult(model, None, "nuts", args, mcmc_samples=samples, info=info)
