"""The generic NUTS path (any model, through :class:`~.potential.ModelPotential`) and what
every NUTS path shares: the MAP start, the chains' starting points and their layout. The
collapsed path for ``Regressor(CPFusion)`` is in :mod:`.mcmc_collapsed`."""

from __future__ import annotations

import math
import os
import time

import torch
from torch import Tensor

from ..guides import rank_layers
from ..rank import active_components
from .chains import flatten_params, laplace_inverse_mass_matrix, run_chains
from .output_marginal import NonConjugateError, OutputMarginal, supports_output_marginal
from .polya_gamma import PolyaGammaPotential, supports_polya_gamma
from .potential import ModelPotential
from .result import FitResult
from .svi import fit_svi

__all__ = [
    "MAP_RESTARTS",
    "START_JITTER",
    "centred_components",
    "chain_starts",
    "generic_potential",
    "map_point",
    "nuts_settings",
    "parallel_chains",
    "run_generic_nuts",
    "start_description",
]


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
    max_tree_depth: int,
    target_accept_prob: float,
    chain_method: str,
    full_mass,
    compile: bool,
    collapse: str | bool = "auto",
) -> FitResult:
    """NUTS on any model through :class:`~.potential.ModelPotential`: factors of the
    components the MAP point finds active centred, the others non-centred (``reparam``), softmax
    class means of a ``Classifier`` drawn from their prior, a dense metric started from the
    Laplace approximation at the MAP, chains started at draws of it. With ``collapse``
    (``"auto"``: where the prediction is linear in them; ``True``: required), a Gaussian
    ``Regressor`` has its layer's output sites integrated out
    (:class:`~.output_marginal.OutputMarginal`), a binary ``Classifier`` too, given
    Polya-Gamma variables that a Gibbs block redraws after every NUTS step
    (:class:`~.polya_gamma.PolyaGammaPotential`). Arguments as
    :func:`~bayes_fusion.fit_nuts`, already validated."""
    parallel = parallel_chains(num_chains, chain_method, os.cpu_count() or 1, reserve=0)
    local = _defined_in_main(model)
    parallel = parallel and not local
    t0 = time.perf_counter()
    if init == "map":
        point = map_point(model, args, init_steps)
        values = {k: v[0] for k, v in point.items()}
        centered = {
            layer.site_name(layer.SCALE_SITE): centred_components(layer, point)
            for layer in rank_layers(model).values()
        }
    else:
        values, centered = None, {}
    if not reparam:  # every component centred: the model's own coordinates
        centered = {
            layer.site_name(layer.SCALE_SITE): torch.ones(layer.rank)
            for layer in rank_layers(model).values()
        }
    potential = generic_potential(model, args, centered, compile, collapse, reparam)
    start = potential.to_unconstrained(values if values is not None else potential.init_values)
    if hasattr(potential, "gibbs_init"):  # the Laplace metric sees the start's likelihood
        potential.gibbs_init(start)
    kernel_kwargs = nuts_settings(
        potential, start, max_tree_depth, target_accept_prob, full_mass, init == "map"
    )
    seeds = torch.randint(0, 2**31 - 1, (num_chains,)).tolist()
    starts = chain_starts(start, kernel_kwargs.get("initial_inverse_mass_matrix"), num_chains)
    raw, div_idx, report = run_chains(
        potential, starts, num_samples, warmup_steps, seeds, kernel_kwargs, parallel, progress
    )
    with torch.no_grad():
        samples = potential.complete(potential.constrain(raw))
    info = {
        "seconds": time.perf_counter() - t0,
        "divergences": [len(d) for d in div_idx],
        "divergence_indices": div_idx,
        "num_chains": num_chains,
        "path": "generic",
        "reparam": bool(reparam),
        "init": init,
        "full_mass": kernel_kwargs["full_mass"],
        "centered_components": {k: v.tolist() for k, v in potential.centered.items()},
        "class_contrasts": sorted(potential.contrasts),
        "marginalized": sorted(getattr(potential, "collapsed", ())),
        "polya_gamma": isinstance(potential, PolyaGammaPotential),
        "parallel": parallel,
        "chain_starts": start_description(kernel_kwargs),
        "compiled_potential": False,
        **report,
    }
    if "potential_evaluations" in report:  # leapfrog steps (and step-size search) per iteration
        info["steps_per_iteration"] = [
            n / (num_samples + warmup_steps) for n in report["potential_evaluations"]
        ]
    if local and num_chains > 1:
        info["sequential_reason"] = (
            "the model is defined in __main__ (worker processes cannot import it)"
        )
    return FitResult(model, None, "nuts", args, mcmc_samples=samples, info=info)


def generic_potential(
    model, args: tuple, centered: dict, compile: bool, collapse, reparam: bool = True
):
    """The generic path's potential: the output sites integrated out where ``collapse`` allows
    and the model is conjugate in them (:class:`~.output_marginal.OutputMarginal` for a
    Gaussian ``Regressor``, :class:`~.polya_gamma.PolyaGammaPotential` for a binary
    ``Classifier``), else :class:`~.potential.ModelPotential` (every site sampled). With
    ``reparam``, a potential whose ``CENTRE_ACTIVE`` is false non-centres every component
    instead of the ``centered`` ones."""
    conjugate = {
        OutputMarginal: supports_output_marginal,
        PolyaGammaPotential: supports_polya_gamma,
    }
    for kind, supports in conjugate.items():
        if collapse and supports(model, args):  # a Gaussian regression, a binary classifier
            if reparam and not kind.CENTRE_ACTIVE:
                centered = {}  # every component non-centred
            try:
                return kind(model, args, centered, compile=compile)
            except NonConjugateError:
                if collapse is True:
                    raise
    return ModelPotential(model, args, centered, compile=compile)


def nuts_settings(
    potential, start: dict, max_tree_depth: int, target_accept_prob: float, full_mass, laplace
) -> dict:
    """NUTS kernel options of both paths: a dense mass matrix (``full_mass="auto"``: up to 500
    dimensions; it absorbs the linear correlations between scales and factors), started from
    the Laplace approximation at ``start`` when ``laplace`` (the MAP start)."""
    dim = sum(v.numel() for v in start.values())
    settings = {
        "max_tree_depth": max_tree_depth,
        "target_accept_prob": target_accept_prob,
        "full_mass": dim <= 500 if full_mass == "auto" else bool(full_mass),
    }
    if settings["full_mass"] and laplace:
        metric = laplace_inverse_mass_matrix(potential, start)
        if metric is not None:
            settings["initial_inverse_mass_matrix"] = metric
    return settings


def centred_components(layer, point: dict[str, Tensor]) -> Tensor:
    """``(R,)`` 1/0 per component of ``layer``: active at the MAP ``point`` (one leading draw
    dim), by relevance where it is per component (CP) and by scale otherwise (XOX, whose
    relevances are the singular values of ``W``, not per gene)."""
    active = active_components(layer, point)[0]
    if active.shape[-1] != layer.rank:
        active = active_components(layer, point, kind="scale")[0]
    return active.to(point[layer.site_name(layer.SCALE_SITE)].dtype)


def _defined_in_main(model) -> bool:
    """Whether the model (or one of its submodules) is a class or function of ``__main__``, which
    a chain's worker process cannot import."""
    objs = list(model.modules()) if isinstance(model, torch.nn.Module) else [model]
    return any(
        getattr(o, "__module__", None) == "__main__" or type(o).__module__ == "__main__"
        for o in objs
    )


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
