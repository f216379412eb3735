"""NUTS on any model: :func:`fit_nuts` validates its options, picks the potential (the model's
own log density, or the same with the layer's output sites integrated out where the model is
conjugate in them), starts the chains apart around the MAP point and runs Pyro's NUTS on them
(:mod:`.chains`). One path and one ``info`` schema serve every model."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings

import torch
from pyro.poutine.util import site_is_subsample

from ..._checks import check_choice, check_positive_int
from ...layers.base import rank_layers
from ..data import check_args_finite, inspection_trace, seeded
from ..faults import without_trace_shapes
from ..result import FitResult
from .chains import defined_in_main, kernel_settings, run_chains
from .output_marginal import NonConjugateError, OutputMarginal, supports_output_marginal
from .polya_gamma import PolyaGammaPotential, supports_polya_gamma
from .potential import ModelPotential
from .starts import (
    centred_components,
    chain_starts,
    map_point,
    parallel_chains,
    start_description,
)

__all__ = [
    "COMPILE_MIN_ITERATIONS",
    "NUTSOptions",
    "check_continuous_latents",
    "choose_potential",
    "fit_nuts",
]

#: iterations per chain from which ``jit="auto"`` compiles the potential
COMPILE_MIN_ITERATIONS = 200


@dataclasses.dataclass(frozen=True)
class NUTSOptions:
    """The validated options of one :func:`fit_nuts` run (see its parameters)."""

    num_samples: int
    warmup_steps: int
    num_chains: int
    progress: bool
    reparam: bool
    init: str
    init_steps: int
    jit: bool
    max_tree_depth: int
    target_accept_prob: float
    chain_method: str
    marginalize: str | bool
    full_mass: str | bool


@without_trace_shapes()
def fit_nuts(
    model,
    *args,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 1,
    seed: int | None = 0,
    progress: bool = True,
    reparam: bool = True,
    init: str = "map",
    init_steps: int = 2000,
    jit: str | bool = "auto",
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.95,
    chain_method: str = "auto",
    marginalize: str | bool = "auto",
    full_mass: str | bool = "auto",
    jit_compile: str | bool | None = None,
) -> FitResult:
    """Draw from the posterior of ``model`` with NUTS.

    The potential is the model's own log density (:class:`~bayes_fusion.infer.mcmc.potential
    .ModelPotential`: factors of the components the MAP finds active centred and the others
    non-centred, a ``Classifier``'s class means drawn from their prior). Where the model is
    conjugate in its layer's output sites they are integrated out (``marginalize``): a
    full-batch Gaussian ``Regressor`` around a rank layer (:class:`~bayes_fusion.infer.mcmc
    .output_marginal.OutputMarginal`; the output factor, bias and main effects are drawn from
    their exact conditional afterwards) and a full-batch binary ``Classifier`` (given
    Polya-Gamma variables redrawn by a Gibbs block after every NUTS step,
    :class:`~bayes_fusion.infer.mcmc.polya_gamma.PolyaGammaPotential`).
    The chains start from the best of ``MAP_RESTARTS`` (3) MAP fits by default -- chain 0 at
    the MAP point, the others at draws of the Laplace approximation there -- with a dense
    metric from the same approximation.

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``.
    :param num_samples: draws per chain (after warm-up).
    :param warmup_steps: warm-up (adaptation) steps per chain.
    :param num_chains: chains: in parallel worker processes when ``num_chains <= CPUs`` (one
        after another for a model defined in ``__main__``, which workers cannot import); more
        than the CPU count raises ``ValueError`` unless ``chain_method="sequential"``.
    :param seed: seed of this fit's own random draws (MAP starts, chain starts, the chains);
        the caller's global RNG streams are left as they were. ``None``: draw from (and
        advance) the global streams.
    :param progress: show progress bars.
    :param reparam: non-centre the factors of the components the MAP start finds inactive
        (all of them with ``init="default"``, and on a binary classifier's Polya-Gamma path,
        where that mixed best); ``False``: the model's own (centred) coordinates.
    :param init: ``"map"``: start from the best of 3 MAP fits; ``"default"``: the layers' own
        initial values (other sites: a draw from their prior).
    :param init_steps: SVI steps of each MAP fit.
    :param jit: run the potential and its gradient through ``torch.compile`` (5-30 s to
        compile per chain process, then about 4x faster gradients for the library's models;
        eager if compiling fails, ``info["compiled_potential"]`` says which). ``"auto"``:
        when ``num_samples + warmup_steps >= 200`` and the model computes its log joint without
        Pyro (the library's ``Regressor`` / ``Classifier``; a model built on Pyro's sample
        sites runs its handlers, which ``torch.compile`` cannot trace). The same name as
        :func:`~bayes_fusion.fit_svi`'s option.
    :param max_tree_depth: NUTS maximum tree depth.
    :param target_accept_prob: NUTS step-size adaptation target.
    :param chain_method: ``"auto"``, ``"parallel"`` or ``"sequential"``.
    :param marginalize: ``"auto"``: integrate the output sites out where the model allows (see
        above); ``True``: require it; ``False``: every site sampled. ``info["marginalized"]``
        names the sites integrated out.
    :param full_mass: dense mass matrix started from the Laplace approximation at the MAP
        (``"auto"``: up to 500 dimensions), else a diagonal one started from the identity.
    :param jit_compile: deprecated name of ``jit`` (removed in the next release).
    :returns: :class:`~bayes_fusion.FitResult` with the draws (``get_samples(group_by_chain=
        True)``: site -> ``(chains, draws, ...)``), ``sample_stats`` (per-draw NUTS statistics,
        ``(chains, draws)``) and ``info`` (``divergences`` per chain, ``seconds``, the
        potential's settings).
    :raises ValueError: bad options, or more chains than CPUs (see ``num_chains``).
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    if jit_compile is not None:
        warnings.warn(
            "fit_nuts: jit_compile is deprecated; use jit (the name fit_svi uses)",
            DeprecationWarning,
            stacklevel=2,
        )
        jit = jit_compile
    check_args_finite(args, model)
    check_continuous_latents(model, args)
    options = _checked_options(
        model,
        args,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        progress=progress,
        reparam=reparam,
        init=init,
        init_steps=init_steps,
        jit=jit,
        max_tree_depth=max_tree_depth,
        target_accept_prob=target_accept_prob,
        chain_method=chain_method,
        marginalize=marginalize,
        full_mass=full_mass,
    )
    with seeded(seed):
        return _run(model, args, options)


def check_continuous_latents(model, args: tuple) -> None:
    """NUTS moves continuous coordinates only: refuse a model with a discrete latent site before
    any fit or draw (naming the site), rather than failing after the MAP start.

    :raises ValueError: a latent site with a discrete distribution.
    """
    trace = inspection_trace(model, *args)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"model: NUTS samples continuous latent sites only; site {name!r} is discrete "
                f"({type(site['fn']).__name__}): marginalize it out in the model (e.g. "
                "pyro.infer.config_enumerate) or fit by SVI"
            )


def _checked_options(model, args: tuple, **given) -> NUTSOptions:
    """Validate fit_nuts's options (each error names its argument) and resolve ``jit="auto"``."""
    check_positive_int("num_samples", given["num_samples"])
    check_positive_int("warmup_steps", given["warmup_steps"], minimum=0)
    check_positive_int("num_chains", given["num_chains"])
    check_positive_int("init_steps", given["init_steps"])
    check_choice("init", given["init"], ("map", "default"))
    check_choice("chain_method", given["chain_method"], ("auto", "parallel", "sequential"))
    check_choice("marginalize", given["marginalize"], ("auto", True, False))
    check_choice("full_mass", given["full_mass"], ("auto", True, False))
    check_choice("jit", given["jit"], ("auto", True, False))
    conjugate = supports_output_marginal(model, args) or supports_polya_gamma(model, args)
    if given["marginalize"] is True and not conjugate:
        raise ValueError(
            "marginalize: True needs a full-batch Regressor or binary Classifier around a rank "
            f"layer (Gaussian or logistic likelihood, output sites), got {type(model).__name__}"
        )
    if given["jit"] == "auto":  # Pyro's handlers (a user model's sites) do not trace whole
        long_run = given["num_samples"] + given["warmup_steps"] >= COMPILE_MIN_ITERATIONS
        given["jit"] = long_run and bool(getattr(model, "has_log_joint", False))
    return NUTSOptions(**given)


def _run(model, args: tuple, options: NUTSOptions) -> FitResult:
    """One NUTS fit with validated options, inside the fit's own RNG streams."""
    parallel = parallel_chains(options.num_chains, options.chain_method, os.cpu_count() or 1)
    local = defined_in_main(model)
    parallel = parallel and not local
    t0 = time.perf_counter()
    layers = rank_layers(model).values()
    if options.init == "map":
        point = map_point(model, args, options.init_steps)
        values = {k: v[0] for k, v in point.items()}
        centered = {
            layer.site_name(layer.SCALE_SITE): centred_components(layer, point) for layer in layers
        }
    else:
        values, centered = None, {}
    if not options.reparam:  # every component centred: the model's own coordinates
        centered = {layer.site_name(layer.SCALE_SITE): torch.ones(layer.rank) for layer in layers}
    potential = choose_potential(
        model,
        args,
        centered,
        jit=options.jit,
        marginalize=options.marginalize,
        reparam=options.reparam,
    )
    start = potential.to_unconstrained(values if values is not None else potential.init_values)
    if hasattr(potential, "gibbs_init"):  # the Laplace metric sees the start's likelihood
        potential.gibbs_init(start)
    settings = kernel_settings(
        potential,
        start,
        max_tree_depth=options.max_tree_depth,
        target_accept_prob=options.target_accept_prob,
        full_mass=options.full_mass,
        laplace=options.init == "map",
    )
    seeds = torch.randint(0, 2**31 - 1, (options.num_chains,)).tolist()
    metric = settings.get("initial_inverse_mass_matrix")
    starts = chain_starts(start, metric, options.num_chains)
    run = run_chains(
        potential,
        starts,
        options.num_samples,
        options.warmup_steps,
        seeds,
        settings,
        parallel=parallel,
        progress=options.progress,
    )
    with torch.no_grad():
        samples = potential.complete(potential.constrain(run.samples))
    info = {
        "seconds": time.perf_counter() - t0,
        "divergences": [len(d) for d in run.divergences],
        "divergence_indices": run.divergences,
        "num_chains": options.num_chains,
        "reparam": bool(options.reparam),
        "init": options.init,
        "full_mass": settings["full_mass"],
        "centered_components": {k: v.tolist() for k, v in potential.centered.items()},
        "class_contrasts": sorted(potential.contrasts),
        "marginalized": sorted(getattr(potential, "marginalized", ())),
        "polya_gamma": isinstance(potential, PolyaGammaPotential),
        "parallel": parallel,
        "chain_starts": start_description(settings),
        "compiled_potential": False,
        **run.report,
    }
    if "potential_evaluations" in run.report:  # leapfrog steps (and step-size search)
        iterations = options.num_samples + options.warmup_steps
        info["steps_per_iteration"] = [n / iterations for n in run.report["potential_evaluations"]]
    if local and options.num_chains > 1:
        info["sequential_reason"] = (
            "the model is defined in __main__ (worker processes cannot import it)"
        )
    return FitResult(
        model, None, "nuts", args, mcmc_samples=samples, info=info, sample_stats=run.stats
    )


def choose_potential(
    model,
    args: tuple,
    centered: dict,
    *,
    jit: bool,
    marginalize,
    reparam: bool = True,
    gibbs: bool = True,
):
    """The potential of a NUTS fit: the output sites integrated out where ``marginalize``
    allows and the model is conjugate in them (:class:`~.output_marginal.OutputMarginal` for a
    Gaussian ``Regressor``, :class:`~.polya_gamma.PolyaGammaPotential` for a binary
    ``Classifier``), else :class:`~.potential.ModelPotential` (every site sampled). With
    ``reparam``, a potential whose ``CENTRE_ACTIVE`` is false non-centres every component
    instead of the ``centered`` ones.

    :param centered: scale-site name -> ``(R,)`` 1/0 per component (centred / non-centred).
    :param jit: compile the potential and its gradient.
    :param marginalize: ``"auto"``, ``True`` or ``False``, as :func:`fit_nuts`.
    :param gibbs: allow a potential with a Gibbs block (the Polya-Gamma path); the lockstep
        sampler, which has no per-chain Gibbs step, passes ``False``.
    """
    conjugate = {
        OutputMarginal: supports_output_marginal,
        PolyaGammaPotential: supports_polya_gamma,
    }
    if not gibbs:
        del conjugate[PolyaGammaPotential]
    for kind, supports in conjugate.items():
        if marginalize and supports(model, args):  # a Gaussian regression, a binary classifier
            if reparam and not kind.CENTRE_ACTIVE:
                centered = {}  # every component non-centred
            try:
                return kind(model, args, centered, compile=jit)
            except NonConjugateError:
                if marginalize is True:
                    raise
    return ModelPotential(model, args, centered, compile=jit)
