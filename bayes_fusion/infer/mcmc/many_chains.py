"""``fit(model, *data, guide="mcmc")``: the full posterior from many chains in lockstep.

:func:`fit_mcmc` starts ``num_chains`` chains around the MAP point (draws of the Laplace
approximation there, chain 0 at the point itself), runs ChEES-HMC on all of them at once
(:mod:`.chees`: one batched potential-and-gradient call moves every chain) and returns the same
:class:`~bayes_fusion.FitResult` as :func:`~bayes_fusion.fit_nuts`. The potential is NUTS's
(:func:`~.nuts.choose_potential`): a Gaussian ``Regressor``'s output sites integrated out, the
factors of every component non-centred (one step size serves all chains; a centred component
whose scale shrinks in some chain is a funnel it cannot leave), a ``Classifier``'s class
contrasts. The Polya-Gamma block of a binary classifier is a per-chain Gibbs step and is not
used here: its logistic likelihood is sampled directly.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..._checks import check_choice, check_positive_float, check_positive_int
from ...layers.base import rank_layers
from ..data import check_args_finite, seeded
from ..faults import without_trace_shapes
from ..jit_choice import graph_signature
from ..result import FitResult
from .chains import laplace_inverse_mass_matrix
from .chees import DENSE_METRIC_MAX_DIM, ChEESState, run_lockstep
from .compile_choice import ENGINE, LeapfrogCompileChoice
from .nuts import check_continuous_latents, choose_potential
from .output_marginal import supports_output_marginal
from .potential import FlatPotential, flatten_params
from .starts import START_JITTER, chain_starts, map_point

__all__ = ["MAP_RESTARTS", "MCMCOptions", "default_draws", "fit_mcmc"]

#: MAP fits the chains start around (fewer than NUTS's: many chains and a warm-up that moves
#: stuck chains make one poor MAP optimum cheaper, and the whole fit's time counts)
MAP_RESTARTS = 2
#: draws of all chains together that ``num_samples=None`` aims at
TOTAL_DRAWS = 4000
#: fewest draws per chain ``num_samples=None`` gives (r-hat needs a few per chain)
MIN_DRAWS_PER_CHAIN = 50


def default_draws(num_chains: int) -> int:
    """Draws per chain when ``num_samples`` is not given: ``TOTAL_DRAWS`` (4000) shared by the
    chains, at least ``MIN_DRAWS_PER_CHAIN`` (50) each."""
    return max(MIN_DRAWS_PER_CHAIN, math.ceil(TOTAL_DRAWS / num_chains))


@dataclasses.dataclass(frozen=True)
class MCMCOptions:
    """The validated options of one :func:`fit_mcmc` run (see its parameters)."""

    num_chains: int
    num_samples: int
    warmup_steps: int
    target_accept_prob: float
    max_steps: int
    init_steps: int
    jit: bool | None
    marginalize: str | bool
    dense_metric: bool | str
    superchains: int
    progress: bool


@without_trace_shapes()
def fit_mcmc(
    model,
    *args,
    num_chains: int = 16,
    num_samples: int | None = None,
    warmup_steps: int = 500,
    seed: int | None = 0,
    progress: bool = True,
    target_accept_prob: float = 0.8,
    max_steps: int = 128,
    init_steps: int = 1000,
    jit: str | bool = "auto",
    marginalize: str | bool = "auto",
    dense_metric: str | bool = "auto",
    superchains: int | None = None,
    resume: FitResult | None = None,
) -> FitResult:
    """Draw from the posterior of ``model`` with many HMC chains in lockstep (ChEES-HMC).

    All chains move together: one batched evaluation of the potential and its gradient per
    leapfrog step, every chain taking the same number of steps. Warm-up adapts one step size
    (dual averaging of the chains' mean acceptance probability), the trajectory length (ChEES,
    jittered) and the metric (dense or diagonal, from the chains' draws) -- see
    :mod:`bayes_fusion.infer.mcmc.chees`.

    :param model: a Pyro model with continuous latent sites, e.g. ``Classifier(CPFusion(...))``
        or any user PyroModule whose log density broadcasts over a leading chain dimension
        (``torch.func.vmap``; otherwise the chains are evaluated one after another, which is
        slow but correct: ``info["batched"]`` says which and why).
    :param args: model arguments, e.g. ``(inputs, y)``.
    :param num_chains: chains (``C``); many short chains are the point -- r-hat and ESS are
        computed across them.
    :param num_samples: draws per chain after warm-up; ``None``: 4000 in all, at least 50 per
        chain (:func:`default_draws`).
    :param warmup_steps: warm-up iterations (adaptation), shared by the chains.
    :param seed: seed of this fit's random draws (MAP starts, chain starts, momenta); the
        caller's global RNG streams are left as they were. ``None``: the global streams.
    :param progress: show progress bars.
    :param target_accept_prob: target of the chains' mean acceptance probability (step-size
        adaptation).
    :param max_steps: most leapfrog steps in one iteration.
    :param init_steps: SVI steps of each of the ``MAP_RESTARTS`` (2) MAP fits whose best point
        the chains start around.
    :param jit: run the leapfrog step through ``torch.compile`` (``True``: a one-off compile
        of 10-20 s on a 2-core CPU, 1-4 s with inductor's on-disk cache warm; eager, with a
        warning, if compiling fails) or eagerly (``False``). A user's model, whose Pyro
        handlers ``torch.compile`` cannot follow, is traced first (``make_fx``: its tensor
        operations recorded once) and that graph compiled; a model whose chains do not batch
        runs eagerly. ``"auto"``: the first 10 iterations run eagerly and are timed, and the
        step is compiled from then on when the compile is predicted to pay for itself over the
        leapfrog steps left (checked again every 25 iterations while eager, as trajectories
        lengthen; :mod:`~bayes_fusion.infer.mcmc.compile_choice`: this machine's recorded
        compile times and steps per iteration, shared with SVI's ``jit=None``;
        ``info["jit_choice"]`` has the prediction and the outcome).
    :param marginalize: integrate a Gaussian ``Regressor``'s output sites out (``"auto"``:
        where the model allows; ``True``: require it; ``False``: sample every site).
    :param dense_metric: a dense metric (``"auto"``: up to 500 coordinates), else diagonal.
    :param superchains: groups of chains that start at one point (a draw of the Laplace
        approximation; the first group at the MAP point), for nested r-hat
        (:func:`~bayes_fusion.infer.mcmc.convergence.nested_r_hat`, in ``diagnostics()``);
        must divide ``num_chains``. ``None``: groups of 4 chains where ``num_chains`` is a
        multiple of 4 of at least 8, else one chain per group.
    :param resume: an earlier ``fit_mcmc`` result of the same model and data: continue its
        chains from where they stopped with the adapted step size, trajectory length and
        metric (no warm-up; ``warmup_steps`` and ``init_steps`` are ignored); the returned
        result holds the earlier draws followed by ``num_samples`` new ones per chain.
    :returns: :class:`~bayes_fusion.FitResult` (``method="mcmc"``): draws
        (``get_samples(group_by_chain=True)``: site -> ``(chains, draws, ...)``),
        ``sample_stats`` (``(chains, draws)`` each: ``diverging``, ``acceptance_rate``,
        ``n_steps``, ``step_size``, ``energy``, ``lp``) and ``info`` (``divergences`` per
        chain, ``warmup_divergences``, ``restarted_chains`` (stuck chains moved during
        warm-up), ``step_size``, ``trajectory_length``, ``gradients`` (batched calls),
        ``batched`` (``True`` or why not), ``compiled``, ``jit_choice`` (``jit="auto"``'s
        decision, ``None`` when not made), ``superchains``, ``seconds`` and
        ``seconds_breakdown``, the potential's settings, ``sampler_state`` for ``resume``).
    :raises ValueError: bad options (named), a discrete latent site, or a ``resume`` result
        that is not an MCMC fit of this sampler.
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    check_args_finite(args, model)
    check_continuous_latents(model, args)
    check_positive_int("num_chains", num_chains, minimum=2)
    if num_samples is None:
        num_samples = default_draws(num_chains)
    check_positive_int("num_samples", num_samples)
    check_positive_int("warmup_steps", warmup_steps, minimum=0)
    check_positive_int("max_steps", max_steps)
    check_positive_int("init_steps", init_steps)
    target_accept_prob = check_positive_float("target_accept_prob", target_accept_prob)
    if not target_accept_prob < 1:
        raise ValueError(
            f"target_accept_prob: expected a number in (0, 1), got {target_accept_prob}"
        )
    check_choice("jit", jit, ("auto", True, False))
    check_choice("marginalize", marginalize, ("auto", True, False))
    check_choice("dense_metric", dense_metric, ("auto", True, False))
    if superchains is None:
        superchains = num_chains // 4 if num_chains >= 8 and num_chains % 4 == 0 else num_chains
    check_positive_int("superchains", superchains)
    if num_chains % superchains:
        raise ValueError(
            f"superchains: expected a divisor of num_chains={num_chains}, got {superchains}"
        )
    if marginalize is True and not supports_output_marginal(model, args):
        raise ValueError(
            "marginalize: True needs a full-batch Gaussian Regressor around a rank layer, got "
            f"{type(model).__name__}"
        )
    if resume is not None and (resume.method != "mcmc" or "sampler_state" not in resume.info):
        raise ValueError(f"resume: expected a result of guide='mcmc', got method={resume.method!r}")
    if jit == "auto":
        jit = None  # decided from the measured costs
    options = MCMCOptions(
        num_chains=num_chains,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        target_accept_prob=target_accept_prob,
        max_steps=max_steps,
        init_steps=init_steps,
        jit=jit,
        marginalize=marginalize,
        dense_metric=dense_metric,
        superchains=superchains,
        progress=progress,
    )
    with seeded(seed):
        return _run(model, args, options, resume)


def _run(model, args: tuple, options: MCMCOptions, resume: FitResult | None) -> FitResult:
    """One lockstep fit with validated options, inside the fit's own RNG streams."""
    t0 = time.perf_counter()
    layers = rank_layers(model).values()
    values = None
    if resume is None:
        point = map_point(model, args, options.init_steps, restarts=MAP_RESTARTS)
        values = {k: v[0] for k, v in point.items()}
    # every component non-centred: one step size serves every chain, and a centred component
    # whose scale shrinks in some chain is a funnel that chain cannot leave
    centered = {layer.site_name(layer.SCALE_SITE): torch.zeros(layer.rank) for layer in layers}
    potential = choose_potential(
        model, args, centered, jit=False, marginalize=options.marginalize, gibbs=False
    )
    start = potential.to_unconstrained(values if values is not None else potential.init_values)
    flat = FlatPotential(potential, start)
    t_start = time.perf_counter()
    state = None
    if resume is not None:
        state = ChEESState(**resume.info["sampler_state"])
        if state.x.shape != (options.num_chains, flat.dim):
            raise ValueError(
                f"num_chains: the resumed fit has {state.x.shape[0]} chains of "
                f"{state.x.shape[1]} coordinates, got num_chains={options.num_chains} "
                f"({flat.dim} coordinates)"
            )
        starts, cov = state.x, state.cov
    else:
        starts, cov = _starts_and_metric(potential, start, options)
    signature = graph_signature(
        ENGINE, 1, model, [starts, cov], args, extra=(type(potential).__qualname__,)
    )
    t_warm = time.perf_counter()
    run = run_lockstep(
        flat,
        starts,
        cov,
        options.num_samples,
        options.warmup_steps,
        target_accept_prob=options.target_accept_prob,
        max_steps=options.max_steps,
        compile=options.jit,
        costs=LeapfrogCompileChoice(signature),
        state=state,
        progress=options.progress,
    )
    t_run = time.perf_counter()
    unconstrained = flat.unflatten(run.draws)
    with torch.no_grad():
        samples = potential.complete(potential.constrain(unconstrained))
    stats, divergences = run.stats, run.divergences
    if resume is not None:
        samples, stats, divergences = _after(resume, samples, stats, divergences)
    info = {
        "seconds": time.perf_counter() - t0,
        "seconds_breakdown": {
            "map_start": t_start - t0,
            "chain_starts": t_warm - t_start,
            "sampling": t_run - t_warm,
            "compile": (run.compile or {}).get("compile_seconds", 0.0),
        },
        "sampler": "ChEES-HMC, chains in lockstep",
        "num_chains": options.num_chains,
        "superchains": options.superchains if resume is None else resume.info["superchains"],
        "divergences": [len(d) for d in divergences],
        "divergence_indices": divergences,
        "warmup_divergences": run.warmup_divergences,
        "restarted_chains": run.restarted_chains,
        "step_size": run.state.step_size,
        "trajectory_length": run.state.trajectory_length,
        "gradients": run.gradients,
        "dense_metric": run.state.cov.dim() == 2,
        "batched": run.batched,
        "compiled": run.compile,
        "jit_choice": run.jit_choice,
        "resumed": resume is not None,
        "centered_components": {k: v.tolist() for k, v in potential.centered.items()},
        "class_contrasts": sorted(potential.contrasts),
        "marginalized": sorted(getattr(potential, "marginalized", ())),
        "chain_starts": "chain 0 at the MAP point, the others at draws of the Laplace approximation"
        if resume is None
        else "where the resumed fit stopped",
        "sampler_state": dataclasses.asdict(run.state),
    }
    return FitResult(model, None, "mcmc", args, mcmc_samples=samples, info=info, sample_stats=stats)


def _after(resume: FitResult, samples: dict, stats: dict, divergences: list):
    """The draws, statistics and divergence indices of a continued run appended to those of
    the fit it continues (per chain, along the draws)."""
    before = resume.mcmc_samples[next(iter(samples))].shape[1]
    return (
        {k: torch.cat([resume.mcmc_samples[k], v], 1) for k, v in samples.items()},
        {k: torch.cat([resume.sample_stats[k], v], 1) for k, v in stats.items()},
        [
            old + [before + j for j in new]
            for old, new in zip(resume.info["divergence_indices"], divergences, strict=True)
        ],
    )


def _start_description(options: MCMCOptions, resume: FitResult | None) -> str:
    """``info["chain_starts"]``: where the chains started."""
    if resume is not None:
        return "where the resumed fit stopped"
    per_group = options.num_chains // options.superchains
    return (
        f"{options.superchains} groups of {per_group} chains, each group at one point: the "
        "first at the MAP point, the others at draws of the Laplace approximation there"
    )


def _starts_and_metric(potential, start: dict, options: MCMCOptions):
    """The chains' starting points ``(C, D)`` -- ``superchains`` groups of consecutive chains,
    each at one point: the MAP ``start`` and draws of the Laplace approximation there -- and
    the starting metric's covariance: that approximation's (dense up to
    ``DENSE_METRIC_MAX_DIM`` coordinates, else its diagonal); without one (more coordinates,
    or a Hessian that is not finite) ``START_JITTER`` jitter and its variance."""
    dim = sum(v.numel() for v in start.values())
    dense = dim <= DENSE_METRIC_MAX_DIM if options.dense_metric == "auto" else options.dense_metric
    metric = laplace_inverse_mass_matrix(potential, start) if dim <= DENSE_METRIC_MAX_DIM else None
    points = chain_starts(start, metric, options.superchains)
    per_group = options.num_chains // options.superchains
    flat_starts = torch.stack([flatten_params(p)[0] for p in points])
    flat_starts = flat_starts.repeat_interleave(per_group, dim=0)
    if metric is None:
        cov = torch.full(
            (dim,), START_JITTER**2, dtype=flat_starts.dtype, device=flat_starts.device
        )
        return flat_starts, torch.diag(cov) if dense else cov
    cov = next(iter(metric.values()))
    return flat_starts, cov if dense else cov.diagonal().clone()
