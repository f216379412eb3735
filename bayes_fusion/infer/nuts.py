"""NUTS: :func:`fit_nuts` validates its options and picks the path, collapsed
(:mod:`.mcmc_collapsed`, ``Regressor(CPFusion)``) or generic (:mod:`.mcmc`)."""

from __future__ import annotations

from .._checks import check_choice, check_positive_int
from ..marginal import supports_marginal
from .data import apply_seed, check_args_finite
from .mcmc import run_generic_nuts
from .mcmc_collapsed import run_collapsed_nuts
from .output_marginal import supports_output_marginal
from .polya_gamma import supports_polya_gamma
from .result import FitResult

__all__ = ["fit_nuts"]

#: iterations per chain from which ``jit_compile="auto"`` compiles the potential
COMPILE_MIN_ITERATIONS = 200


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
    jit_compile: str | bool = "auto",
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.95,
    chain_method: str = "auto",
    marginalize: str | bool = "auto",
    full_mass: str | bool = "auto",
) -> FitResult:
    """Draw from the posterior of ``model`` with NUTS.

    ``Regressor(CPFusion)`` on full data takes the collapsed path (output factor and bias
    integrated out, see :mod:`bayes_fusion.marginal`; ``info["marginalized"]`` names them);
    every other model takes the generic path (:class:`~bayes_fusion.infer.potential
    .ModelPotential`: the model's own log density, factors of the components the MAP finds
    active centred and the others non-centred, a ``Classifier``'s class means drawn from their
    prior; a full-batch Gaussian ``Regressor`` around any other rank layer, or with main
    effects, has its layer's output sites integrated out the same way,
    :mod:`bayes_fusion.infer.output_marginal`; ``info["marginalized"]`` again names them; a
    full-batch binary ``Classifier`` has them integrated out given Polya-Gamma variables,
    redrawn by a Gibbs block after every NUTS step, :mod:`bayes_fusion.infer.polya_gamma`,
    ``info["polya_gamma"]``).
    Both start from the best of ``MAP_RESTARTS`` (3) MAP fits by default, with a
    metric from the Laplace approximation there; ``info["path"]`` says which path ran.

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``.
    :param num_samples: draws per chain (after warm-up).
    :param warmup_steps: warm-up (adaptation) steps per chain.
    :param num_chains: chains: in parallel worker processes when ``num_chains <= CPUs`` (one
        after another for a model defined in ``__main__``, which workers cannot import); more
        than the CPU count raises ``ValueError`` unless ``chain_method="sequential"``.
    :param seed: RNG seed; ``None`` leaves RNGs alone.
    :param progress: show progress bars.
    :param reparam: generic path: non-centre the factors of the components the MAP start finds
        inactive (all of them with ``init="default"``, and on a binary classifier's
        Polya-Gamma path, where that mixed best); ``False``: the model's own (centred)
        coordinates.
    :param init: ``"map"``: start from the best of 3 MAP fits; ``"default"``: the layers' own
        initial values (other sites: a draw from their prior).
    :param init_steps: SVI steps of each MAP fit.
    :param jit_compile: generic path: run the potential and its gradient through
        ``torch.compile`` (5-10 s to compile per chain process, then about 4x faster gradients
        for the library's models; eager if compiling fails, ``info`` says which). ``"auto"``:
        when ``num_samples + warmup_steps >= 200`` and the model computes its log joint without
        Pyro (the library's ``Regressor`` / ``Classifier``; a model built on Pyro's sample
        sites runs its handlers, which ``torch.compile`` cannot trace).
    :param max_tree_depth: NUTS maximum tree depth.
    :param target_accept_prob: NUTS step-size adaptation target.
    :param chain_method: ``"auto"``, ``"parallel"`` or ``"sequential"``.
    :param marginalize: ``"auto"``: integrate the output sites out where the model allows
        (a full-batch Gaussian ``Regressor``: the collapsed path for ``CPFusion`` without main
        effects, else the generic path with :class:`~bayes_fusion.infer.output_marginal
        .OutputMarginal`; a full-batch binary ``Classifier``: :class:`~bayes_fusion.infer
        .polya_gamma.PolyaGammaPotential`); ``True``: require it; ``False``: the generic
        path, every site sampled.
    :param full_mass: dense mass matrix started from the Laplace approximation at the MAP
        (``"auto"``: up to 500 dimensions), else a diagonal one started from the identity.
    :returns: :class:`FitResult` with ``mcmc_samples`` (site -> ``(chains, draws, ...)``)
        and ``info`` (``divergences`` per chain, ``seconds``, the path's settings).
    :raises ValueError: bad options, or more chains than CPUs (see ``num_chains``).
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    apply_seed(seed)
    check_args_finite(args)
    num_samples = check_positive_int("num_samples", num_samples)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    num_chains = check_positive_int("num_chains", num_chains)
    check_choice("init", init, ("map", "default"))
    check_choice("chain_method", chain_method, ("auto", "parallel", "sequential"))
    check_choice("marginalize", marginalize, ("auto", True, False))
    check_choice("full_mass", full_mass, ("auto", True, False))
    conjugate = supports_output_marginal(model, args) or supports_polya_gamma(model, args)
    if marginalize is True and not conjugate:
        raise ValueError(
            "marginalize: True needs a full-batch Regressor or binary Classifier around a rank "
            f"layer (Gaussian or logistic likelihood, output sites), got {type(model).__name__}"
        )
    check_choice("jit_compile", jit_compile, ("auto", True, False))
    if jit_compile == "auto":  # Pyro's handlers (a user model's sites) do not trace whole
        long_run = num_samples + warmup_steps >= COMPILE_MIN_ITERATIONS
        jit_compile = long_run and bool(getattr(model, "has_log_joint", False))
    common = (model, args, num_samples, warmup_steps, num_chains, progress)
    if marginalize in ("auto", True) and supports_marginal(model):
        return run_collapsed_nuts(
            *common, init, init_steps, max_tree_depth, target_accept_prob, chain_method, full_mass
        )
    return run_generic_nuts(
        *common, reparam, init, init_steps, max_tree_depth, target_accept_prob, chain_method,
        full_mass, jit_compile, marginalize,
    )  # fmt: skip
