"""``fit()``: SVI (MAP / mean-field / low-rank / full) and NUTS, returning a :class:`FitResult`."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, JitTrace_ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuide, init_to_value
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ._checks import check_choice, check_positive_float, check_positive_int
from .direct_elbo import DirectELBO
from .guides import GUIDES, make_guide, rank_layers
from .optim import FusedClippedAdam
from .traced import TracedFunction

__all__ = ["fit", "FitResult", "NonFiniteLossError", "load", "model_latent_shapes"]


class NonFiniteLossError(FloatingPointError):
    """Raised when the ELBO (or a gradient) becomes NaN/inf; training stops at once."""


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------
def _num_rows(obj) -> int | None:
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    if isinstance(obj, (list, tuple)):
        for item in obj:
            rows = _num_rows(item)
            if rows is not None:
                return rows
    return None


def slice_rows(obj, index):
    """Select rows ``index`` of every tensor in a (nested) list/tuple of model arguments."""
    if isinstance(obj, Tensor):
        return obj[index] if obj.dim() > 0 else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_rows(item, index) for item in obj)
    return obj


def _check_args_finite(obj, name="args") -> None:
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            bad = int((~torch.isfinite(obj)).sum())
            raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_args_finite(item, f"{name}[{i}]")


def model_latent_shapes(model, *args, **kwargs) -> tuple[dict[str, torch.Size], int]:
    """Latent site name -> value shape (unbatched) and the model's max plate nesting."""
    # a prior trace consumes random numbers: fork the RNG so that inspecting a model (e.g. when
    # writing a checkpoint) never changes the course of training
    with torch.random.fork_rng(), poutine.block(), torch.no_grad():
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    shapes, nesting = {}, 0
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if not site["is_observed"] and not site["infer"].get("is_auxiliary", False):
            shapes[name] = site["value"].shape
    return shapes, nesting


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
class FitResult:
    """What :func:`fit` returns: the fitted model and guide (or MCMC draws) plus the history.

    :ivar model: the model that was fit.
    :ivar guide: the guide (``None`` for NUTS).
    :ivar method: ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``, ``"custom"`` or
        ``"nuts"``.
    :ivar losses: list of SVI losses (negative ELBO), one per step.
    :ivar args: the model arguments the fit used (kept by reference, not copied).
    """

    def __init__(
        self,
        model,
        guide,
        method: str,
        args: tuple,
        losses: list[float] | None = None,
        mcmc_samples: dict[str, Tensor] | None = None,
        info: dict | None = None,
        optim_state: dict | None = None,
        param_state: dict | None = None,
    ) -> None:
        self.model = model
        self.guide = guide
        self.method = method
        self.args = args
        self.losses = list(losses or [])
        self.mcmc_samples = mcmc_samples
        self.info = dict(info or {})
        self.optim_state = optim_state
        # the parameter-store scope of this fit (see ParamStoreDict.scope)
        self._param_state = (
            param_state if param_state is not None else {"params": {}, "constraints": {}}
        )
        self._latent_shapes, self._nesting = model_latent_shapes(model, *args)

    @property
    def is_mcmc(self) -> bool:
        return self.mcmc_samples is not None

    @property
    def latent_sites(self) -> list[str]:
        """Names of the model's latent sites."""
        return list(self._latent_shapes)

    def param_scope(self):
        """Context manager that activates this fit's own parameter store (so several fits
        with the same parameter names coexist)."""
        return pyro.get_param_store().scope(self._param_state)

    def posterior_samples(
        self, num_samples: int = 200, group_by_chain: bool = False, seed: int | None = None
    ) -> dict[str, Tensor]:
        """Posterior draws of every latent site.

        :param num_samples: SVI: number of guide draws. MCMC: ignored (all draws are returned).
        :param group_by_chain: MCMC: keep the chain axis, ``(C, D, ...)``; SVI: one chain,
            ``(1, S, ...)``.
        :param seed: optional RNG seed for the guide draws.
        :returns: site name -> tensor ``(S, ...)`` (or ``(C, D, ...)``).
        """
        if self.is_mcmc:
            if group_by_chain:
                return dict(self.mcmc_samples)
            return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.mcmc_samples.items()}
        num_samples = check_positive_int("num_samples", num_samples)
        if seed is not None:
            pyro.set_rng_seed(seed)
        with self.param_scope():
            draws = sample_guide(
                self.guide, self.args, num_samples, self._latent_shapes, self._nesting
            )
        if group_by_chain:
            draws = {k: v.unsqueeze(0) for k, v in draws.items()}
        return draws

    def predict(
        self,
        *args,
        num_samples: int = 200,
        chunk_size: int = 100,
        interval: float = 0.9,
        return_samples: bool = False,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """Posterior predictive summaries for new inputs.

        Draws are pushed through the model ``chunk_size`` at a time (vectorized), so memory is
        bounded by the chunk, not by ``num_samples``; the observed targets are never passed.

        :param args: model inputs (without targets), e.g. ``(inputs,)``.
        :param num_samples: number of posterior draws (SVI); MCMC uses all its draws.
        :param interval: mass of the central predictive interval.
        :param return_samples: also return the draws (``"samples"``: ``(S, N, P)``).
        :returns: regression: ``mean``, ``std``, ``lower``, ``upper`` (shape ``(N, P)``);
            classification: ``probs`` ``(N, C)`` and ``mean`` (the same).
        """
        from .models import Classifier

        if not 0 < interval < 1:
            raise ValueError(f"interval: expected a number in (0, 1), got {interval!r}")
        chunk_size = check_positive_int("chunk_size", chunk_size)
        if seed is not None:
            pyro.set_rng_seed(seed)
        draws = self.posterior_samples(num_samples)
        classify = isinstance(self.model, Classifier)
        means, obs = [], []
        for out in self.predictive_chunks(draws, args, ["_RETURN", "obs"], chunk_size):
            ret = out["_RETURN"]
            means.append(ret.softmax(-1) if classify else ret)
            if not classify and "obs" in out:
                obs.append(out["obs"].reshape(ret.shape))
        mean_draws = torch.cat(means)
        if classify:
            probs = mean_draws.mean(0)
            result = {"probs": probs, "mean": probs}
        else:
            samples = torch.cat(obs) if obs else mean_draws
            lo, hi = (1 - interval) / 2, (1 + interval) / 2
            q = torch.quantile(samples, torch.tensor([lo, hi], dtype=samples.dtype), dim=0)
            result = {
                "mean": mean_draws.mean(0),
                "std": samples.std(0),
                "lower": q[0],
                "upper": q[1],
            }
        if return_samples:
            result["samples"] = mean_draws
        return result

    def predictive_chunks(
        self, draws: dict[str, Tensor], args: tuple, sites: list[str], chunk_size: int = 100
    ):
        """Run the model on ``draws`` (site -> ``(S, ...)``) ``chunk_size`` draws at a time
        (vectorized), yielding ``Predictive`` outputs for ``sites``: memory stays bounded by
        the chunk, whatever ``S`` is."""
        total = next(iter(draws.values())).shape[0]
        for start in range(0, total, chunk_size):
            chunk = {k: v[start : start + chunk_size] for k, v in draws.items()}
            n = next(iter(chunk.values())).shape[0]
            pred = pyro.infer.Predictive(
                self.model,
                posterior_samples=chunk,
                num_samples=n,
                parallel=True,
                return_sites=sites,
            )
            with torch.no_grad(), self.param_scope():
                yield pred(*args)

    def diagnostics(self) -> dict[str, Any]:
        """MCMC diagnostics: divergences per chain and r-hat / ESS of every site, with the
        rank scales *sorted per draw* (label-switching invariant). Warns when r-hat > 1.01 or
        when any transition diverged.

        :raises ValueError: for SVI results (no chains to diagnose).
        """
        if not self.is_mcmc:
            raise ValueError(
                f"diagnostics: expected an MCMC (guide='nuts') result, got method={self.method!r}"
            )
        from pyro.ops.stats import effective_sample_size, split_gelman_rubin

        r_hat, ess = {}, {}
        sorted_names = {
            layer.site_name(layer.SCALE_SITE) for layer in rank_layers(self.model).values()
        }
        for name, value in self.mcmc_samples.items():
            v = value.double()
            if name in sorted_names:
                v = v.sort(dim=-1, descending=True).values
                name = f"{name} (sorted)"
            if v.shape[1] < 4:
                continue
            r_hat[name] = float(split_gelman_rubin(v).max())
            ess[name] = float(effective_sample_size(v).min())
        divergences = self.info.get("divergences", [])
        out = {"divergences": divergences, "r_hat": r_hat, "ess": ess}
        bad = {k: v for k, v in r_hat.items() if not v <= 1.01}
        if bad or sum(divergences):
            warnings.warn(
                f"MCMC diagnostics: {sum(divergences)} divergent transitions; r-hat > 1.01 "
                f"for {sorted(bad)}. Run more warm-up, raise target_accept_prob, or use "
                "reparam=True.",
                RuntimeWarning,
                stacklevel=2,
            )
        return out

    # --- persistence ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything :func:`load` needs (tensors, numbers and strings only)."""
        from . import __version__

        example = slice_rows(self.args, slice(0, 2))
        return {
            "format": "bayes_fusion.FitResult",
            "version": __version__,
            "method": self.method,
            "losses": self.losses,
            "info": self.info,
            "model_state": self.model.state_dict(),
            "guide_state": None if self.guide is None else self.guide.state_dict(),
            "optim_state": self.optim_state,
            "mcmc_samples": self.mcmc_samples,
            "example_args": example,
            "latent_shapes": {k: list(v) for k, v in self._latent_shapes.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Save to ``path`` atomically (temporary file + rename: a failed save never leaves a
        half-written file in place of a good one)."""
        save_state(self.state(), path)


def save_state(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path`` and rename it into place."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_state(path) -> dict:
    from . import __version__

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(
            f"path: {path!r} is not a readable bayes_fusion checkpoint "
            f"(truncated or corrupted?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != "bayes_fusion.FitResult":
        raise ValueError(f"path: {path!r} is not a bayes_fusion checkpoint")
    major = str(state.get("version", "?")).split(".")[:2]
    if major != __version__.split(".")[:2]:
        raise ValueError(
            f"path: checkpoint written by bayes_fusion {state.get('version')}, "
            f"this is {__version__}; re-fit or load it with that version"
        )
    return state


def load(path: str | os.PathLike, model, guide=None) -> FitResult:
    """Load a :class:`FitResult` saved with :meth:`FitResult.save` into ``model``.

    :param path: checkpoint file.
    :param model: a model of the same architecture as the one that was saved.
    :param guide: required only when the fit used a custom guide: an instance to load into.
    :raises FileNotFoundError: no such file. :raises ValueError: corrupted/truncated file, a
        file from another library version, or a model whose shapes do not match.
    """
    state = _read_state(path)
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"model: does not match the checkpoint: {exc}") from exc
    args = state["example_args"]
    shapes, _ = model_latent_shapes(model, *args)
    saved = {k: torch.Size(v) for k, v in state["latent_shapes"].items()}
    if saved != dict(shapes):
        diff = {
            k: (tuple(saved.get(k, ())), tuple(shapes.get(k, ())))
            for k in set(saved) | set(shapes)
            if saved.get(k) != shapes.get(k)
        }
        raise ValueError(
            f"model: latent sites do not match the checkpoint (site: (saved, given)) {diff}"
        )
    method = state["method"]
    param_state = {"params": {}, "constraints": {}}
    if method != "nuts":
        if guide is None:
            if method == "custom":
                raise ValueError("guide: this checkpoint used a custom guide; pass an instance")
            guide = make_guide(method, model, *args)
        with pyro.get_param_store().scope(param_state), poutine.block(), torch.no_grad():
            guide(*args)  # warm up: creates the guide's parameters before loading them
            guide.load_state_dict(state["guide_state"])
    else:
        guide = None
    result = FitResult(
        model,
        guide,
        method,
        args,
        state["losses"],
        state["mcmc_samples"],
        state["info"],
        state["optim_state"],
        param_state=param_state,
    )
    return result


def sample_guide(guide, args, num_samples: int, shapes: dict, nesting: int) -> dict:
    """Draw ``num_samples`` joint samples of the latent sites from ``guide`` (vectorized)."""
    with torch.no_grad(), poutine.block(), pyro.plate("_bf_draws", num_samples, dim=-nesting - 1):
        tr = poutine.trace(guide).get_trace(*args)
    out = {}
    for name, shape in shapes.items():
        value = tr.nodes[name]["value"].reshape((-1,) + tuple(shape))
        out[name] = (
            value.expand((num_samples,) + tuple(shape)).clone() if value.shape[0] == 1 else value
        )
    return out


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------
def _find_bad_sites(model, guide, args) -> list[str]:
    """Sites (or params) whose value or log-density is not finite, for the error message."""
    bad = []
    for name, value in pyro.get_param_store().items():
        if not bool(torch.isfinite(value).all()):
            bad.append(f"param {name}")
    try:
        with poutine.block(), torch.no_grad():
            g = poutine.trace(guide).get_trace(*args)
            m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args)
        for tr in (g, m):
            for name, site in tr.nodes.items():
                if site["type"] != "sample":
                    continue
                if not bool(torch.isfinite(site["value"]).all()):
                    bad.append(f"site {name} (value)")
                elif not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all()):
                    bad.append(f"site {name} (log density)")
    except Exception as exc:  # noqa: BLE001 - diagnosis must not hide the original error
        bad.append(f"(tracing failed: {type(exc).__name__}: {exc})")
    return sorted(set(bad))


def _non_finite(step, loss, model, guide, batch) -> NonFiniteLossError:
    bad = _find_bad_sites(model, guide, batch) or "unknown"
    return NonFiniteLossError(
        f"fit: non-finite loss {loss} at step {step}; offending: {bad}. Training stopped; "
        "lower lr, standardize the data, or check the inputs."
    )


def _default_optimizer(lr: float, num_steps: int, final_lr_fraction: float):
    lrd = final_lr_fraction ** (1.0 / max(1, num_steps))
    return FusedClippedAdam({"lr": lr, "lrd": lrd, "clip_norm": 10.0, "betas": (0.9, 0.99)})


def fit(
    model,
    *args,
    guide: str | AutoGuide | type = "meanfield",
    num_steps: int = 3000,
    lr: float = 0.05,
    optimizer=None,
    final_lr_fraction: float = 0.1,
    num_particles: int = 1,
    vectorize_particles: bool = True,
    batch_size: int | None = None,
    seed: int | None = 0,
    progress: bool = True,
    early_stopping: int | None = None,
    early_stopping_tol: float = 1e-4,
    callback: Callable[[int, float], Any] | None = None,
    jit: bool | None = None,
    direct_elbo: bool = True,
    init_scale: float = 0.01,
    kl_warmup: float = 0.2,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: FitResult | str | os.PathLike | None = None,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 1,
    distributed: bool = False,
    distributed_timeout: float = 120.0,
    **nuts_kwargs,
) -> FitResult:
    """Fit ``model`` to data by SVI or NUTS.

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``; tensors' first dim is the data rows.
    :param guide: ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``, ``"nuts"``, an
        autoguide class (built with the preset initialisation) or a guide instance.
    :param num_steps: SVI steps (``>= 1``).
    :param lr: initial learning rate of the default ClippedAdam.
    :param optimizer: a ``pyro.optim`` optimizer to use instead of the default ClippedAdam,
        whose learning rate decays geometrically to ``final_lr_fraction * lr``.
    :param num_particles: ELBO particles; vectorized when ``vectorize_particles``.
    :param batch_size: minibatch size (``None``: full batch). Rows are reshuffled every epoch;
        the model's ``num_data`` is set so the likelihood is scaled by ``N / batch_size``.
    :param seed: RNG seed (same seed -> same result on CPU); ``None`` leaves RNGs alone.
    :param progress: show a tqdm progress bar.
    :param early_stopping: stop when the smoothed loss has not improved by a relative
        ``early_stopping_tol`` for this many steps (``None``: run all steps).
    :param callback: called as ``callback(step, loss)`` after each step; returning ``True``
        stops training.
    :param jit: compile the loss with ``torch.jit.trace``. ``None`` (default): compile the
        direct ELBO (below) for the library's own models (``Regressor``/``Classifier`` around a
        ``CPFusion``/``XOXLinear``), whose Python control flow depends on shapes only;
        ``True``: compile for any model (Pyro's ``JitTrace_ELBO`` where the direct ELBO does
        not apply); ``False``: never. Every new trace is checked against the eager loss once.
    :param direct_elbo: compute the one-particle ELBO of the preset guides (``AutoDelta``,
        ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoLowRankMultivariateNormal``)
        straight from the guide parameters (:mod:`bayes_fusion.direct_elbo`: the same value
        and gradients as ``Trace_ELBO``, without recording traces). The first step always
        runs through Pyro's ``Trace_ELBO`` with Pyro's validation as set; later steps skip
        Pyro's per-step argument validation (loss and gradients are still checked for
        NaN/inf every step). ``False``: ``Trace_ELBO`` on every step.
    :param init_scale: initial std of the Gaussian guides.
    :param kl_warmup: fraction of the steps over which the weight of the latent sites'
        terms (prior and guide: the KL part of the ELBO) rises linearly from ~0 to 1. Helps
        on small data sets (many parameters, few rows), where the prior otherwise switches
        every component off before the likelihood has pulled any into use. 0 disables it.
    :param checkpoint_path: save a resumable checkpoint here every ``checkpoint_every`` steps
        and at the end (atomically).
    :param resume: a :class:`FitResult` or checkpoint path to continue from: guide parameters,
        optimizer state, RNG state and the loss history are restored and training continues
        up to ``num_steps`` steps in total.
    :param num_samples: NUTS draws per chain. :param warmup_steps: NUTS warm-up per chain.
    :param num_chains: NUTS chains: in parallel processes when ``num_chains <= CPUs - 1``,
        one after another when ``num_chains <= CPUs``; more than the CPU count raises
        ``ValueError`` unless ``chain_method="sequential"``.
    :param distributed: data-parallel SVI across the processes of a ``torchrun`` launch (see
        :mod:`bayes_fusion.distributed`): every rank passes the same full ``args``, evaluates
        its shard of each global batch (``batch_size`` is the global batch) and applies the
        rank-averaged gradient; checkpoints are written by rank 0 only.
    :param distributed_timeout: seconds a collective waits for a peer before
        :class:`~bayes_fusion.distributed.DistributedError` is raised.
    :param nuts_kwargs: passed to the NUTS path: ``reparam`` (non-centred factors, default
        True), ``init`` (``"map"`` default: start from the best of ``infer.MAP_RESTARTS`` (3) MAP
        fits of ``init_steps`` (2000) steps each; or ``"default"``), ``init_steps``,
        ``jit_compile``,
        ``max_tree_depth`` (8), ``target_accept_prob`` (0.95), ``chain_method`` (``"auto"``,
        ``"parallel"``, ``"sequential"``), ``marginalize`` (``"auto"``: integrate the output
        factor and bias out for ``Regressor(CPFusion)``, see :mod:`bayes_fusion.marginal`;
        ``False``: the generic path), ``full_mass`` (``"auto"``: dense metric up to 500
        dimensions on the collapsed path).
    :returns: :class:`FitResult`.
    :raises NonFiniteLossError: when a loss or gradient turns NaN/inf (names step and sites).
    """
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    if isinstance(guide, str):
        check_choice("guide", guide, GUIDES + ("nuts",))
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int or None, got {seed!r}")
        pyro.set_rng_seed(seed)
    _check_args_finite(args)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True or False, got {distributed!r}")
    if distributed and guide == "nuts":
        raise ValueError("distributed: NUTS runs on one process; use num_chains for parallelism")
    if guide == "nuts":
        return _fit_nuts(
            model, args, num_samples, warmup_steps, num_chains, progress, **nuts_kwargs
        )
    if nuts_kwargs:
        raise TypeError(f"fit: unexpected keyword arguments {sorted(nuts_kwargs)} for SVI")
    num_steps = check_positive_int("num_steps", num_steps)
    lr = check_positive_float("lr", lr)
    num_particles = check_positive_int("num_particles", num_particles)
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
    rows = _num_rows(args)
    sync = (
        _start_distributed(model, args, rows, batch_size, distributed_timeout)
        if distributed
        else None
    )
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
        if rows is None:
            raise ValueError("batch_size: the model arguments hold no tensor with rows")
        batch_size = min(batch_size, rows)
        if hasattr(model, "num_data"):
            model.num_data = rows if batch_size < rows else None
        elif batch_size < rows:
            raise ValueError(
                "batch_size: this model has no num_data attribute to scale its "
                "likelihood; subsample inside your model instead"
            )
    elif sync is not None:
        model.num_data = rows  # each rank sees a shard: scale its likelihood to all rows
    elif getattr(model, "num_data", None) not in (None, rows):
        # full-batch fit: a dataset size left over from an earlier minibatch fit on other
        # data would scale the likelihood wrongly
        model.num_data = None

    # train in a private parameter-store scope: fits never collide by parameter name
    with pyro.get_param_store().scope() as param_state:
        proto_args = args if batch_size is None else slice_rows(args, slice(0, batch_size))
        if sync is not None:
            proto_args = slice_rows(args, sync.plan.local_rows(torch.arange(batch_size or rows)))
        if isinstance(guide, str):
            method = guide
            guide_obj = make_guide(guide, model, *proto_args, init_scale=init_scale)
        elif isinstance(guide, type) and issubclass(guide, AutoGuide):
            method = "custom"
            from .guides import layer_init_values

            guide_obj = guide(model, init_loc_fn=init_to_value(values=layer_init_values(model)))
        elif callable(guide):
            method, guide_obj = "custom", guide
        else:
            raise TypeError(f"guide: expected a name, an autoguide class or a guide, got {guide!r}")

        losses: list[float] = []
        optim = optimizer or _default_optimizer(lr, num_steps, final_lr_fraction)
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else seed)
        start_step = 0
        # create the guide's parameters before the first step (same RNG use in every mode)
        with poutine.block(), torch.no_grad():
            guide_obj(*proto_args)
        if resume is not None:
            state = resume.state() if isinstance(resume, FitResult) else _read_state(resume)
            guide_obj.load_state_dict(state["guide_state"])
            if state.get("optim_state"):
                optim.set_state(state["optim_state"])
            losses = list(state["losses"])
            start_step = len(losses)
            rng = state["info"].get("rng_state")
            if rng is not None:
                torch.set_rng_state(rng["torch"])
                gen.set_state(rng["batches"])

        elbo_kwargs = {
            "num_particles": num_particles,
            "vectorize_particles": vectorize_particles and num_particles > 1,
        }
        anneal = _PriorAnneal()
        direct = None
        if direct_elbo and num_particles == 1 and not DirectELBO.unsupported_reason(guide_obj):
            direct_loss = DirectELBO(guide_obj)
            wanted = _traceable_model(model) if jit is None else bool(jit)
            compiled = direct_loss.traceable and wanted
            if compiled or not jit:  # jit=True on other guides: Pyro's JitTrace_ELBO below
                direct = _DirectLoss(direct_loss, anneal, model, compiled)
        pyro_jit = bool(jit) and direct is None
        elbo = (
            JitTrace_ELBO(ignore_jit_warnings=True, **elbo_kwargs)
            if pyro_jit
            else Trace_ELBO(**elbo_kwargs)
        )
        if pyro_jit:
            # JitTrace_ELBO bakes Python numbers into the compiled graph: the KL weight must
            # enter as a tensor argument (the last one) to change from step to step
            svi = SVI(anneal.from_last_arg(model), anneal.from_last_arg(guide_obj), optim, elbo)
        else:
            svi = SVI(anneal(model), anneal(guide_obj), optim, elbo)
        warmup = int(kl_warmup * num_steps)
        if sync is not None:
            # start every rank from rank 0's values, as DDP does
            sync.attach([p for _, p in sorted(pyro.get_param_store().named_parameters())])

        def global_batches():
            while True:
                if batch_size is None or batch_size >= rows:
                    yield None
                    continue
                perm = torch.randperm(rows, generator=gen)
                for i in range(0, rows - batch_size + 1, batch_size):
                    yield perm[i : i + batch_size]

        def batches():
            for idx in global_batches():
                if sync is None:
                    yield args if idx is None else slice_rows(args, idx)
                elif idx is None:  # full batch: this rank's shard is proto_args, every step
                    anneal.obs_scale = sync.plan.likelihood_weight(rows)
                    yield proto_args
                else:
                    anneal.obs_scale = sync.plan.likelihood_weight(len(idx))
                    yield slice_rows(args, sync.plan.local_rows(idx))

        from tqdm.auto import tqdm

        batch_iter = batches()
        # skip the batches a resumed run already consumed is not needed: the generator state
        # restored above continues the shuffling sequence
        smoothed, best, since_best = None, math.inf, 0
        t0 = time.perf_counter()
        bar = tqdm(
            range(start_step, num_steps),
            disable=not progress,
            desc=f"fit[{method}]",
            initial=start_step,
            total=num_steps,
            leave=False,
        )
        last_step = start_step
        for step in bar:
            batch = next(batch_iter)
            beta = min(1.0, (step + 1) / warmup) if warmup else 1.0
            anneal.beta = beta
            try:
                loss = _svi_step(
                    svi,
                    (*batch, torch.tensor(beta)) if pyro_jit else batch,
                    sync,
                    step,
                    direct=direct if step > start_step else None,  # Pyro validates step 1
                    beta=beta,
                )
            except ValueError as exc:
                # with validation on, Pyro refuses NaN distribution parameters before the loss
                if "invalid values" not in str(exc):
                    raise
                raise _non_finite(step, float("nan"), model, guide_obj, batch) from exc
            if not math.isfinite(loss):
                raise _non_finite(step, loss, model, guide_obj, batch)
            losses.append(loss)
            last_step = step + 1
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
            if callback is not None:
                stop = bool(callback(step, loss))
                if sync is not None:
                    stop = sync.any(stop, f"the callback stop vote of step {step}")
                if stop:
                    break
            if early_stopping is not None:
                smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
                if smoothed < best - early_stopping_tol * abs(best):
                    best, since_best = smoothed, 0
                else:
                    since_best += 1
                    if since_best >= early_stopping:
                        break
            if checkpoint_path is not None and last_step % checkpoint_every == 0:
                if sync is not None:
                    sync.check_in_sync(last_step)
                if sync is None or sync.rank == 0:
                    _checkpoint(model, guide_obj, method, args, losses, optim, gen, checkpoint_path)
        bar.close()
        if sync is not None:
            sync.check_in_sync(last_step)
        info = {
            "seconds": time.perf_counter() - t0,
            "steps": last_step,
            "kl_warmup_steps": warmup,
            "rng_state": {"torch": torch.get_rng_state(), "batches": gen.get_state()},
        }
        if sync is not None:
            info["distributed"] = {"rank": sync.rank, "world_size": sync.world_size}
        result = FitResult(
            model,
            guide_obj,
            method,
            args,
            losses,
            info=info,
            optim_state=optim.get_state(),
            param_state=param_state,
        )
        if checkpoint_path is not None and (sync is None or sync.rank == 0):
            result.save(checkpoint_path)
        if sync is not None:
            sync.barrier("the end-of-fit barrier")  # the checkpoint exists when fit returns
        _warn_on_collapse(result)
        return result


class _PriorAnneal(pyro.poutine.messenger.Messenger):
    """Scales every latent sample site's log-density by ``beta`` (KL warm-up) and every
    observed site's by ``obs_scale`` (a distributed rank's shard weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = 1.0
        self.obs_scale = 1.0

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        factor = self.obs_scale if msg["is_observed"] else self.beta
        if isinstance(factor, torch.Tensor) or factor != 1.0:
            msg["scale"] = msg["scale"] * factor

    def from_last_arg(self, fn):
        """``fn`` under this messenger, taking ``beta`` as a tensor appended to its args."""

        def weighted(*args, **kwargs):
            self.beta = args[-1]
            return self(fn)(*args[:-1], **kwargs)

        return weighted


def _checkpoint(model, guide, method, args, losses, optim, gen, path) -> None:
    info = {"rng_state": {"torch": torch.get_rng_state(), "batches": gen.get_state()}}
    FitResult(model, guide, method, args, losses, info=info, optim_state=optim.get_state()).save(
        path
    )


def _svi_step(svi: SVI, batch, sync=None, step: int = 0, direct=None, beta=1.0) -> float:
    """One SVI step that refuses to apply non-finite gradients.

    With ``sync`` (distributed), loss and gradients are averaged over ranks first, so a
    non-finite value on any rank stops every rank at the same step. With ``direct`` (a
    :class:`_DirectLoss`), the loss comes from the direct ELBO at KL weight ``beta`` instead
    of ``svi``'s ELBO.
    """
    if direct is not None:
        loss, params = direct.loss_and_grads(batch, beta), direct.params
    else:
        with poutine.trace(param_only=True) as capture:
            try:
                loss = svi.loss_and_grads(svi.model, svi.guide, *batch)
            except ValueError as exc:
                if sync is None or "invalid values" not in str(exc):
                    raise
                loss = float("nan")  # tell the other ranks before stopping
        params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    loss = float(loss)
    if sync is not None:
        loss = sync.average(loss, step)
    if not math.isfinite(loss):
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return float("nan")
    svi.optim(params)
    if grads:
        torch._foreach_zero_(grads)
    return loss


def _traceable_model(model) -> bool:
    """Whether ``model`` is one of the library's own models, safe to trace by default."""
    from .layers.base import RankLayer
    from .models import _Likelihood

    return isinstance(model, _Likelihood) and isinstance(model.layer, RankLayer)


class _DirectLoss:
    """fit's fast loss: the direct ELBO of ``guide`` on ``anneal(model)``, maybe traced.

    :param direct: the :class:`DirectELBO` of the guide.
    :param anneal: the KL warm-up / shard-weight messenger (its ``beta`` weights the model's
        latent sites; the same ``beta`` weights ``log q`` here).
    :param model: the model. :param compiled: trace the loss (:class:`TracedFunction`).
    """

    def __init__(self, direct: DirectELBO, anneal: _PriorAnneal, model, compiled: bool) -> None:
        self.direct = direct
        self.anneal = anneal
        self.model = anneal(model)
        self.params = direct.params()
        self.traced = (
            TracedFunction(self._loss, extra_key=lambda: anneal.obs_scale, name="fit(jit)")
            if compiled
            else None
        )

    def _loss(self, beta, params, batch) -> Tensor:
        self.anneal.beta = beta
        return self.direct.differentiable_loss(self.model, batch, guide_scale=beta, params=params)

    def loss_and_grads(self, batch, beta: float) -> float:
        """Loss at KL weight ``beta``; gradients accumulated into the parameters' ``.grad``."""
        with pyro.validation_enabled(False):
            if self.traced is None:
                loss = self._loss(beta, self.params, batch)
            else:
                like = self.params[0]
                beta_t = torch.tensor(beta, dtype=like.dtype, device=like.device)
                loss = self.traced(beta_t, self.params, tuple(batch))
        self.anneal.beta = beta
        loss.backward()
        return float(loss.detach())


def _start_distributed(model, args, rows, batch_size, timeout):
    """Join the torchrun process group and return the gradient synchroniser."""
    from . import distributed as bfdist

    if rows is None:
        raise ValueError("distributed: the model arguments hold no tensor with rows to shard")
    if not hasattr(model, "num_data"):
        raise ValueError(
            "distributed: this model has no num_data attribute to scale each rank's shard "
            "of the likelihood; use bf.Regressor/bf.Classifier or add num_data to your model"
        )
    params = list(model.parameters()) + list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    bfdist.init(device=device, timeout=timeout)
    bfdist.check_backend_device(device)
    sync = bfdist.GradientSync(device)
    smallest = min(rows, batch_size or rows)
    if smallest < sync.world_size:
        raise ValueError(
            f"batch_size: expected at least one row per process ({sync.world_size}), "
            f"got a global batch of {smallest}"
        )
    return sync


def _warn_on_collapse(result: FitResult) -> None:
    """Warn when every component of a rank-bearing layer is switched off."""
    from .rank import effective_rank_draws

    layers = rank_layers(result.model)
    if not layers:
        return
    draws = result.posterior_samples(num_samples=50 if result.method != "map" else 1)
    for path, layer in layers.items():
        ranks = effective_rank_draws(layer, draws)
        if int(ranks.max()) == 0:
            warnings.warn(
                f"fit: every component of layer {path or type(layer).__name__!r} collapsed "
                "(effective rank 0): all lambda -> 0. Standardize inputs/targets, raise eta, "
                "lower lr, or use guide='meanfield'.",
                RuntimeWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------------------------
# NUTS
# --------------------------------------------------------------------------------------------
def _scaled_sites(model) -> dict[str, tuple]:
    """Full factor-site name -> (layer, scale-site name) for every rank-bearing layer."""
    out = {}
    for layer in rank_layers(model).values():
        for short in layer.scaled_sites():
            out[layer.site_name(short)] = (layer, layer.site_name(layer.SCALE_SITE))
    return out


def _fit_nuts(
    model,
    args,
    num_samples,
    warmup_steps,
    num_chains,
    progress,
    reparam=True,
    init="map",
    init_steps=2000,
    jit_compile=False,
    max_tree_depth=8,
    target_accept_prob=0.95,
    chain_method="auto",
    marginalize="auto",
    full_mass="auto",
) -> FitResult:
    from .marginal import supports_marginal

    num_samples = check_positive_int("num_samples", num_samples)
    warmup_steps = check_positive_int("warmup_steps", warmup_steps, minimum=0)
    num_chains = check_positive_int("num_chains", num_chains)
    check_choice("init", init, ("map", "default"))
    check_choice("chain_method", chain_method, ("auto", "parallel", "sequential"))
    check_choice("marginalize", marginalize, ("auto", True, False))
    check_choice("full_mass", full_mass, ("auto", True, False))
    if marginalize is True and not supports_marginal(model):
        raise ValueError(
            "marginalize: True needs a full-batch Regressor(CPFusion(...)) (Gaussian "
            f"likelihood, conjugate output factor), got {type(model).__name__}"
        )
    if marginalize in ("auto", True) and supports_marginal(model):
        return _fit_nuts_marginal(
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
        )
    parallel = _parallel_chains(num_chains, chain_method, os.cpu_count() or 1)
    scaled = _scaled_sites(model)
    nuts_model = model
    if reparam and scaled:
        nuts_model = poutine.reparam(model, config={s: LocScaleReparam(0.0) for s in scaled})
    init_values = {}
    t0 = time.perf_counter()
    if init == "map":
        values = {k: v[0] for k, v in _map_point(model, args, init_steps).items()}
        for name, value in values.items():
            if reparam and name in scaled:
                layer, scale_site = scaled[name]
                init_values[f"{name}_decentered"] = value / (values[scale_site] + layer.scale_floor)
            else:
                init_values[name] = value
    kernel = NUTS(
        nuts_model,
        init_strategy=init_to_value(values=init_values),
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
            runs.append((mcmc.get_samples(group_by_chain=True), _divergences(mcmc)))
        raw = {k: torch.cat([r[0][k] for r in runs]) for k in runs[0][0]}
        div_idx = [d for r in runs for d in r[1]]
    else:
        mcmc.run(*args)
        raw = mcmc.get_samples(group_by_chain=True)
        div_idx = _divergences(mcmc)
    samples = {}
    for name, value in raw.items():
        if name.endswith("_decentered") and name[: -len("_decentered")] in scaled:
            base = name[: -len("_decentered")]
            layer, scale_site = scaled[base]
            samples[base] = value * (raw[scale_site] + layer.scale_floor).unsqueeze(-2)
        else:
            samples[name] = value
    info = {
        "seconds": time.perf_counter() - t0,
        "divergences": [len(d) for d in div_idx],
        "divergence_indices": div_idx,
        "num_chains": num_chains,
        "reparam": bool(reparam),
        "init": init,
    }
    return FitResult(model, None, "nuts", args, mcmc_samples=samples, info=info)


def _parallel_chains(num_chains: int, chain_method: str, cpus: int, reserve: int = 1) -> bool:
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


def _map_point(model, args, init_steps: int, restarts: int = MAP_RESTARTS) -> dict[str, Tensor]:
    """The best of ``restarts`` MAP fits, to start NUTS from: site -> value with one leading
    draw dim. The MAP objective has several local optima (a spurious extra component, a
    component split in two); one fit lands in a poor one often enough to matter for NUTS,
    whose centring and initial metric come from this point."""
    best, best_loss = None, math.inf
    for _ in range(restarts):  # seed=None: each restart draws new initial factors
        pre = fit(model, *args, guide="map", num_steps=init_steps, progress=False, seed=None)
        tail = pre.losses[-20:]
        loss = sum(tail) / len(tail)
        if best is None or loss < best_loss:
            best, best_loss = pre, loss
    return {k: v.detach() for k, v in best.posterior_samples(1).items()}


def _fit_nuts_marginal(
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
    """NUTS on Regressor(CPFusion) with the output factor and bias integrated out."""
    from .marginal import CPRegressionMarginal, laplace_inverse_mass_matrix, run_chains
    from .rank import active_components

    parallel = _parallel_chains(num_chains, chain_method, os.cpu_count() or 1, reserve=0)
    t0 = time.perf_counter()
    layer = model.layer
    if init == "map":
        point = _map_point(model, args, init_steps)
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
    raw, div_idx = run_chains(
        potential,
        start,
        num_chains,
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
    }
    return FitResult(model, None, "nuts", args, mcmc_samples=samples, info=info)


def _divergences(mcmc) -> list[list[int]]:
    """Indices of the divergent transitions (after warm-up), one list per chain."""
    div = mcmc.diagnostics().get("divergences", {})
    return [[int(i) for i in v] for v in div.values()]
