"""NUTS: :func:`fit_nuts` validates its options and picks the path, collapsed
(:mod:`.mcmc_collapsed`, ``Regressor(CPFusion)``) or generic (:mod:`.mcmc`)."""

from __future__ import annotations

from .._checks import check_choice, check_positive_int
from ..marginal import supports_marginal
from .data import apply_seed, check_args_finite
from .mcmc import run_generic_nuts
from .mcmc_collapsed import run_collapsed_nuts
from .result import FitResult

__all__ = ["fit_nuts"]


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
    jit_compile: bool = False,
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.95,
    chain_method: str = "auto",
    marginalize: str | bool = "auto",
    full_mass: str | bool = "auto",
) -> FitResult:
    """Draw from the posterior of ``model`` with NUTS.

    ``Regressor(CPFusion)`` on full data takes the collapsed path (output factor and bias
    integrated out, see :mod:`bayes_fusion.marginal`; ``info["marginalized"]`` names them);
    every other model takes the generic path (Pyro's ``MCMC`` with the scaled factors
    non-centred). Both start from the best of ``MAP_RESTARTS`` (3) MAP fits by default.

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``.
    :param num_samples: draws per chain (after warm-up).
    :param warmup_steps: warm-up (adaptation) steps per chain.
    :param num_chains: chains: in parallel processes when ``num_chains <= CPUs - 1`` (generic
        path) or ``<= CPUs`` (collapsed path), else one after another when ``num_chains <=
        CPUs``; more than the CPU count raises ``ValueError`` unless
        ``chain_method="sequential"``.
    :param seed: RNG seed; ``None`` leaves RNGs alone.
    :param progress: show progress bars.
    :param reparam: generic path: sample the factors non-centred (``LocScaleReparam``).
    :param init: ``"map"``: start from the best of 3 MAP fits; ``"default"``: the layers' own
        initial values (collapsed path) or Pyro's default (generic path).
    :param init_steps: SVI steps of each MAP fit.
    :param jit_compile: generic path: Pyro's own ``jit_compile`` option (it records the
        potential with ``torch.jit``, which torch deprecates).
    :param max_tree_depth: NUTS maximum tree depth.
    :param target_accept_prob: NUTS step-size adaptation target.
    :param chain_method: ``"auto"``, ``"parallel"`` or ``"sequential"``.
    :param marginalize: ``"auto"``: the collapsed path where it applies; ``True``: require it;
        ``False``: the generic path.
    :param full_mass: collapsed path: dense mass matrix (``"auto"``: up to 500 dimensions).
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
    if marginalize is True and not supports_marginal(model):
        raise ValueError(
            "marginalize: True needs a full-batch Regressor(CPFusion(...)) without main "
            "effects (Gaussian likelihood, conjugate output factor), got "
            f"{type(model).__name__}"
        )
    common = (model, args, num_samples, warmup_steps, num_chains, progress)
    if marginalize in ("auto", True) and supports_marginal(model):
        return run_collapsed_nuts(
            *common, init, init_steps, max_tree_depth, target_accept_prob, chain_method, full_mass
        )
    return run_generic_nuts(
        *common, reparam, init, init_steps, jit_compile, max_tree_depth, target_accept_prob,
        chain_method,
    )  # fmt: skip
