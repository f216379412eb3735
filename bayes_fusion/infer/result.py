"""What a fit returns: :class:`FitResult` (draws, prediction, MCMC diagnostics, saving) and
:func:`load`, which rebuilds one from a checkpoint."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import Tensor

from .._checks import check_positive_int
from .._version import __version__
from ..models import Classifier
from .data import model_latent_shapes, sample_guide, seeded, slice_rows
from .faults import without_trace_shapes
from .mcmc.convergence import MAX_R_HAT, convergence_problems, nested_r_hat, r_hat_and_ess
from .mcmc.diagnostics import invariant_draws
from .persist import CHECKPOINT_FORMAT, read_state, save_state
from .svi.guides import make_guide

__all__ = ["MCMC_METHODS", "FitResult", "load"]

#: the ``method`` of results that hold MCMC draws (no guide)
MCMC_METHODS = ("nuts", "mcmc")


class FitResult:
    """What :func:`fit` returns: the fitted model and guide (or MCMC draws) plus the history.

    :ivar model: the model that was fit.
    :ivar guide: the guide (``None`` for NUTS).
    :ivar method: ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``, ``"custom"`` or
        ``"nuts"`` (Pyro's NUTS) or ``"mcmc"`` (the lockstep sampler).
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
        sample_stats: dict[str, Tensor] | None = None,
    ) -> None:
        self.model = model
        self.guide = guide
        self.method = method
        self.args = args
        self.losses = list(losses or [])
        self.mcmc_samples = mcmc_samples
        self.info = dict(info or {})
        #: MCMC: per-draw sampler statistics, name -> ``(chains, draws)`` (``None`` for SVI)
        self.sample_stats = sample_stats
        self.optim_state = optim_state
        # the parameter-store scope of this fit (see ParamStoreDict.scope)
        self._param_state = (
            param_state if param_state is not None else {"params": {}, "constraints": {}}
        )
        self._latent_shapes, self._nesting = model_latent_shapes(model, *args)

    @classmethod
    def from_pyro(cls, fitted, model, *args) -> FitResult:
        """Wrap a fit made with plain Pyro -- a ``pyro.infer.MCMC`` run or a trained guide (its
        parameters in Pyro's global parameter store) -- so that the library's summaries work on
        it: ``to_inference_data`` (with the rank layers' label-switching-invariant quantities),
        ``rank_posterior``, ``diagnostics()``, ``predict``.

        :param fitted: a ``pyro.infer.MCMC`` that has run, or a guide (e.g. an autoguide).
        :param model: the model it was fit to.
        :param args: the model arguments it was fit on, e.g. ``(inputs, y)``.
        :raises TypeError: ``fitted`` is neither.
        """
        if isinstance(fitted, pyro.infer.MCMC):
            samples = fitted.get_samples(group_by_chain=True)
            info = {"num_chains": next(iter(samples.values())).shape[0]}
            try:
                divergences = fitted.diagnostics().get("divergences", {})
            except (RuntimeError, ValueError):  # too few draws to diagnose
                divergences = {}
            if divergences:
                info["divergence_indices"] = [list(map(int, v)) for v in divergences.values()]
                info["divergences"] = [len(v) for v in info["divergence_indices"]]
            return cls(model, None, "nuts", args, mcmc_samples=samples, info=info)
        if callable(fitted):
            state = pyro.get_param_store().get_state()
            return cls(model, fitted, "custom", args, param_state=state)
        raise TypeError(
            f"fitted: expected a pyro.infer.MCMC run or a guide, got {type(fitted).__name__}"
        )

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

    #: guide draws :meth:`get_samples` makes for an SVI fit when ``num_samples`` is not given
    DEFAULT_GUIDE_DRAWS = 200

    def get_samples(
        self,
        num_samples: int | None = None,
        group_by_chain: bool = False,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """Posterior draws of every latent site, as NumPyro's ``MCMC.get_samples``.

        :param num_samples: MCMC: ``None`` (default) returns every draw; a number returns that
            many, evenly spaced over the pooled draws (per chain with ``group_by_chain``, where
            it must be a multiple of the chains); more than the fit has raises ``ValueError``.
            SVI: draws from the guide (``None``: :attr:`DEFAULT_GUIDE_DRAWS`).
        :param group_by_chain: keep a chain axis, ``(chains, draws, ...)`` (SVI: one chain of
            independent guide draws, ``(1, S, ...)``).
        :param seed: seed of the guide draws (SVI); the caller's global RNG streams are left as
            they were. ``None``: draw from the global streams.
        :returns: site name -> tensor ``(S, ...)`` (or ``(chains, draws, ...)``).
        """
        if self.is_mcmc:
            return self._mcmc_draws(num_samples, group_by_chain)
        num_samples = check_positive_int(
            "num_samples", self.DEFAULT_GUIDE_DRAWS if num_samples is None else num_samples
        )
        with seeded(seed), self.param_scope():
            draws = sample_guide(
                self.guide, self.args, num_samples, self._latent_shapes, self._nesting
            )
        if group_by_chain:
            draws = {k: v.unsqueeze(0) for k, v in draws.items()}
        return draws

    def posterior_samples(
        self,
        num_samples: int | None = None,
        group_by_chain: bool = False,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """The same as :meth:`get_samples` (the name Pyro's ``Predictive`` uses for them)."""
        return self.get_samples(num_samples, group_by_chain, seed)

    def posterior_draws(self, guide_draws: int, group_by_chain: bool = False) -> dict:
        """What the summaries (rank posterior, ArviZ export, pruning) are computed from: every
        MCMC draw, or ``guide_draws`` draws of an SVI fit's guide.

        :param guide_draws: draws of the guide (ignored for MCMC).
        :param group_by_chain: as :meth:`get_samples`.
        """
        return self.get_samples(None if self.is_mcmc else guide_draws, group_by_chain)

    def _mcmc_draws(self, num_samples: int | None, group_by_chain: bool) -> dict[str, Tensor]:
        chains, per_chain = next(iter(self.mcmc_samples.values())).shape[:2]
        if num_samples is None:
            draws = dict(self.mcmc_samples)
        else:
            num_samples = check_positive_int("num_samples", num_samples)
            total = chains * per_chain
            if num_samples > total:
                raise ValueError(
                    f"num_samples: expected at most the fit's {total} draws "
                    f"({chains} chains x {per_chain}), got {num_samples}"
                )
            if group_by_chain and num_samples % chains:
                raise ValueError(
                    f"num_samples: with group_by_chain=True expected a multiple of the "
                    f"{chains} chains, got {num_samples}"
                )
            keep = num_samples // chains if group_by_chain else num_samples
            size = per_chain if group_by_chain else total
            index = torch.linspace(0, size - 1, keep).round().long()
            if group_by_chain:
                return {k: v[:, index] for k, v in self.mcmc_samples.items()}
            flat = {k: v.reshape((total,) + v.shape[2:]) for k, v in self.mcmc_samples.items()}
            return {k: v[index] for k, v in flat.items()}
        if group_by_chain:
            return draws
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in draws.items()}

    @without_trace_shapes()
    def predictive(
        self,
        *args,
        num_samples: int | None = None,
        return_sites: tuple[str, ...] | None = None,
        chunk_size: int = 100,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """Posterior predictive draws of the model's sites at new inputs, as
        ``pyro.infer.Predictive`` returns them: site -> ``(S, ...)``, one entry per posterior
        draw (the observed site ``obs`` holds new observations; ``_RETURN`` the model's return
        value, e.g. the mean prediction or the logits).

        :param args: model inputs without targets, e.g. ``(inputs,)``.
        :param num_samples: posterior draws, as :meth:`get_samples`.
        :param return_sites: the sites to return (default ``("obs", "_RETURN")``).
        :param chunk_size: draws pushed through the model at once (bounds memory).
        :param seed: seed of this call's draws; the global RNG streams are left as they were.
        """
        chunk_size = check_positive_int("chunk_size", chunk_size)
        sites = list(return_sites or ("obs", "_RETURN"))
        with seeded(seed):
            draws = self.get_samples(num_samples)
            parts = list(self.predictive_chunks(draws, args, sites, chunk_size))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @without_trace_shapes()
    def predict(
        self,
        *args,
        num_samples: int | None = None,
        chunk_size: int = 100,
        interval: float = 0.9,
        return_samples: bool = False,
        seed: int | None = None,
    ) -> dict[str, Tensor]:
        """Posterior predictive summaries for new inputs.

        Draws are pushed through the model ``chunk_size`` at a time (vectorized), so memory is
        bounded by the chunk, not by ``num_samples``; the observed targets are never passed.
        For the draws themselves, per site, see :meth:`predictive`.

        :param args: model inputs (without targets), e.g. ``(inputs,)``.
        :param num_samples: posterior draws, as :meth:`get_samples` (MCMC: all by default).
        :param interval: mass of the central interval.
        :param return_samples: also return the draws the summaries come from:
            ``"mean_samples"`` ``(S, N, P)``, the predictive mean (class probabilities) of every
            posterior draw, and for regression ``"obs_samples"`` ``(S, N, P)``, one new
            observation per draw.
        :param seed: seed of this call's draws; the global RNG streams are left as they were.
        :returns: regression: ``mean`` ``(N, P)``, the posterior predictive mean, and ``std``,
            ``lower``, ``upper`` ``(N, P)``: the spread and central ``interval`` of a *new
            observation* (posterior predictive interval, noise included); classification:
            ``probs`` ``(N, C)``, the posterior predictive class probabilities (``mean`` is the
            same tensor), and ``std``, ``lower``, ``upper`` ``(N, C)``: the spread and central
            ``interval`` of each class probability over posterior draws (a credible interval
            of ``p(y = c | x)``; MAP: no spread, the interval collapses onto ``probs``).
        """
        if not 0 < interval < 1:
            raise ValueError(f"interval: expected a number in (0, 1), got {interval!r}")
        chunk_size = check_positive_int("chunk_size", chunk_size)
        classify = isinstance(self.model, Classifier)
        with seeded(seed):
            draws = self.get_samples(num_samples)
            mean_draws, obs = self._predictive_draws(draws, args, chunk_size, observations=True)
        # classification: the interval is over the class probabilities themselves (how sure
        # the posterior is of p(y = c | x)); regression: over new observations
        samples = mean_draws if classify or obs is None else obs
        lo, hi = (1 - interval) / 2, (1 + interval) / 2
        q = torch.quantile(samples, torch.tensor([lo, hi], dtype=samples.dtype), dim=0)
        result = {"mean": mean_draws.mean(0), "std": samples.std(0), "lower": q[0], "upper": q[1]}
        if classify:
            result["probs"] = result["mean"]
        if return_samples:
            result["mean_samples"] = mean_draws
            if not classify and obs is not None:
                result["obs_samples"] = obs
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

    def diagnostics(self, *args) -> dict[str, Any]:
        """MCMC diagnostics on label-switching-invariant quantities (see
        :mod:`bayes_fusion.infer.diagnostics`): divergences per chain, and r-hat / ESS of
        every rank layer's sorted scales (``"layer.rank_scale_sorted"``), sorted relevances
        (``"layer.relevance_sorted"``) and effective rank (``"layer.effective_rank"``) -- the
        names :func:`~bayes_fusion.to_inference_data` gives them --, of
        every site outside the rank layers, and -- given model inputs -- of the posterior
        predictive mean at those points (``"predictive_mean"``; class probabilities for a
        ``Classifier``). Raw factor sites are not diagnosed: chains may hold the same mode in
        different component orders. R-hat is rank-normalized and ESS is the bulk ESS
        (:mod:`~bayes_fusion.infer.mcmc.convergence`); a fit whose chains started in groups
        (``guide="mcmc"``'s ``superchains``) also gets nested r-hat. Warns when an r-hat
        exceeds 1.01 or a transition diverged.

        :param args: optional model inputs without targets, e.g. held-out ``(inputs,)``.
        :returns: ``{"divergences": [per chain], "r_hat": {name: max}, "ess": {name: min}}``
            and, for grouped chains, ``"nested_r_hat": {name: max}``.
        :raises ValueError: for SVI results (no chains to diagnose).
        """
        if not self.is_mcmc:
            raise ValueError(
                "diagnostics: expected an MCMC (guide='mcmc' or 'nuts') result, got "
                f"method={self.method!r}"
            )
        quantities = invariant_draws(
            self.model, self.mcmc_samples, self.args[0] if self.args else None, result=self
        )
        if args:
            quantities["predictive_mean"] = self._chain_predictive_means(args)
        r_hat, ess, nested = {}, {}, {}
        chains = next(iter(self.mcmc_samples.values())).shape[0]
        groups = self.info.get("superchains", chains)
        for name, value in quantities.items():
            if value.shape[1] >= 4:
                r_hat[name], ess[name] = r_hat_and_ess(value)
                if groups < chains:
                    nested[name] = nested_r_hat(value, groups)
        divergences = self.info.get("divergences", [])
        out = {"divergences": divergences, "r_hat": r_hat, "ess": ess}
        if nested:
            out["nested_r_hat"] = nested
        bad = {k: v for k, v in r_hat.items() if not v <= MAX_R_HAT}
        if bad or sum(divergences):
            warnings.warn(
                f"MCMC diagnostics: {sum(divergences)} divergent transitions; r-hat > 1.01 "
                f"for {sorted(bad)}. Run longer chains (more warm-up and draws), raise "
                "target_accept_prob (divergences) or "
                + ("max_steps" if self.method == "mcmc" else "max_tree_depth")
                + " (slow mixing).",
                RuntimeWarning,
                stacklevel=2,
            )
        return out

    def convergence_problems(self, quantities: dict[str, Tensor]) -> list[str]:
        """Which convergence checks fail for ``quantities`` computed from this MCMC fit's draws
        (name -> ``(chains * draws, ...)``, chain-major as :meth:`get_samples` flattens them):
        r-hat > 1.01, ESS < 100, divergent transitions (see
        :mod:`~bayes_fusion.infer.mcmc.convergence`). Empty for SVI results.

        :raises ValueError: when a quantity does not hold one value per draw of the fit.
        """
        if not self.is_mcmc:
            return []
        chains, per_chain = next(iter(self.mcmc_samples.values())).shape[:2]
        by_chain = {}
        for name, value in quantities.items():
            if value.shape[0] != chains * per_chain:
                raise ValueError(
                    f"quantities: expected {chains * per_chain} draws ({chains} chains x "
                    f"{per_chain}) of {name!r}, got {value.shape[0]}"
                )
            by_chain[name] = value.reshape((chains, per_chain) + value.shape[1:])
        return convergence_problems(by_chain, self.info.get("divergences", []))

    def _predictive_draws(
        self, draws: dict[str, Tensor], args: tuple, chunk_size: int = 100, observations=False
    ) -> tuple[Tensor, Tensor | None]:
        """Per draw, the predictive mean at ``args`` (class probabilities for a Classifier)
        ``(S, N, P)`` and, with ``observations`` (regression), a new observation ``(S, N, P)``
        (``None`` otherwise)."""
        classify = isinstance(self.model, Classifier)
        sites = ["_RETURN", "obs"] if observations and not classify else ["_RETURN"]
        means, obs = [], []
        for out in self.predictive_chunks(draws, args, sites, chunk_size):
            ret = out["_RETURN"]
            means.append(ret.softmax(-1) if classify else ret)
            if "obs" in out:
                obs.append(out["obs"].reshape(ret.shape))
        return torch.cat(means), (torch.cat(obs) if obs else None)

    def _chain_predictive_means(self, args: tuple) -> Tensor:
        """Predictive mean of every MCMC draw at ``args``: ``(chains, draws, N, P)``."""
        chains, draws = next(iter(self.mcmc_samples.values())).shape[:2]
        flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.mcmc_samples.items()}
        mean = self._predictive_draws(flat, args)[0]
        return mean.reshape((chains, draws) + mean.shape[1:])

    # --- persistence ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything :func:`load` needs (tensors, numbers and strings only)."""
        example = slice_rows(self.args, slice(0, 2))
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "method": self.method,
            "losses": self.losses,
            "info": self.info,
            "model_state": self.model.state_dict(),
            "guide_state": None if self.guide is None else self.guide.state_dict(),
            "optim_state": self.optim_state,
            "mcmc_samples": self.mcmc_samples,
            "sample_stats": self.sample_stats,
            "example_args": example,
            "latent_shapes": {k: list(v) for k, v in self._latent_shapes.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Save to ``path`` atomically (temporary file + rename: a failed save never leaves a
        half-written file in place of a good one)."""
        save_state(self.state(), path)


def load(path: str | os.PathLike, model, guide=None) -> FitResult:
    """Load a :class:`FitResult` saved with :meth:`FitResult.save` into ``model``.

    :param path: checkpoint file.
    :param model: a model of the same architecture as the one that was saved.
    :param guide: required only when the fit used a custom guide: an instance to load into.
    :raises FileNotFoundError: no such file. :raises ValueError: corrupted/truncated file, a
        file from another library version, or a model whose shapes do not match.
    """
    state = read_state(path)
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
    if method not in MCMC_METHODS:
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
        sample_stats=state.get("sample_stats"),
    )
    return result
