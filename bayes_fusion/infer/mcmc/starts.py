"""Where NUTS chains start: the MAP point (best of several fits), which components to centre
there, one starting point per chain spread by the Laplace approximation, and whether the chains
run in parallel processes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...rank import active_components
from ..svi.loop import fit_svi
from .potential import flatten_params

__all__ = [
    "MAP_RESTARTS",
    "START_JITTER",
    "centred_components",
    "chain_starts",
    "map_point",
    "parallel_chains",
    "start_description",
]


def centred_components(layer, point: dict[str, Tensor]) -> Tensor:
    """``(R,)`` 1/0 per component of ``layer``: active at the MAP ``point`` (one leading draw
    dim), by relevance where it is per component (CP) and by scale otherwise (XOX, whose
    relevances are the singular values of ``W``, not per gene)."""
    active = active_components(layer, point)[0]
    if active.shape[-1] != layer.rank:
        active = active_components(layer, point, kind="scale")[0]
    return active.to(point[layer.site_name(layer.SCALE_SITE)].dtype)


#: std of the unconstrained jitter of each chain's start when there is no Laplace metric
START_JITTER = 0.1


def chain_starts(start: dict, metric: dict | None, num_chains: int) -> list[dict]:
    """One start per chain (unconstrained coordinates): chain 0 at ``start``, every other chain
    at a draw of the Laplace approximation around it (covariance ``metric``, the
    curvature-clipped inverse Hessian of :func:`~bayes_fusion.infer.chains
    .laplace_inverse_mass_matrix`; without one, ``Normal(0, START_JITTER^2)`` jitter). Chains
    that start apart let r-hat see a chain that stays stuck; from one shared point it cannot.
    """
    center, unflatten = flatten_params(start)
    scale = None
    if metric is not None:
        cov = next(iter(metric.values()))
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        scale = torch.linalg.cholesky(cov + 1e-9 * eye)
    starts = [dict(start)]
    for _ in range(1, num_chains):
        noise = torch.randn_like(center)
        point = center + (scale @ noise if scale is not None else START_JITTER * noise)
        starts.append(unflatten(point))
    return starts


def start_description(kernel_kwargs: dict) -> str:
    """``info["chain_starts"]``: where the chains started."""
    if "initial_inverse_mass_matrix" in kernel_kwargs:
        return "chain 0 at the MAP point, the others at draws of the Laplace approximation"
    return f"chain 0 at the start point, the others jittered by Normal(0, {START_JITTER}^2)"


def parallel_chains(num_chains: int, chain_method: str, cpus: int) -> bool:
    """Whether NUTS chains run in parallel worker processes; refuses impossible requests.

    ``"auto"`` and ``"parallel"`` run the chains in parallel when ``num_chains <= cpus`` (the
    parent process only waits for them); more chains than CPUs is refused unless the user asks
    for ``"sequential"`` explicitly (an oversubscribed machine is a likely mistake).
    """
    if num_chains == 1 or chain_method == "sequential":
        return False
    if num_chains > cpus:
        raise ValueError(
            f"num_chains: expected at most the CPU count ({cpus}), got {num_chains}; pass "
            "chain_method='sequential' to run more chains one after another"
        )
    return True


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
