"""Running NUTS chains on a potential function: one chain (:func:`run_chain`, also the entry
point of a chain's worker process), several in parallel processes or one after another
(:func:`run_chains`), the dense metric from the Laplace approximation that starts their warm-up
(:func:`laplace_inverse_mass_matrix`), and a Gibbs block after every NUTS step where the
potential has one.

Pyro's NUTS sees one flat site (:class:`FlatPotential`): its leapfrog steps, energies and U-turn
checks then run one tensor operation per step where they ran one per site (a fifth to a quarter
less time per leapfrog step on the benchmark's models: the step cost there is Python and
dispatch, not arithmetic). The draws come back per site.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from torch import Tensor

__all__ = [
    "FlatPotential",
    "flatten_params",
    "laplace_inverse_mass_matrix",
    "run_chain",
    "run_chains",
]


def run_chain(
    potential,
    init: dict[str, Tensor],
    num_samples: int,
    warmup_steps: int,
    seed: int,
    kernel_kwargs: dict,
    threads: int | None = None,
    progress: bool = False,
    validate: bool = True,
):
    """Run one NUTS chain on ``potential`` (a picklable callable); also a process entry point.

    :returns: ``(samples, divergences, report)``: unconstrained draws ``name -> (S, ...)``, the
        indices of divergent transitions after warm-up and the potential's ``report()`` (what
        it says of its computation; ``{}`` without one).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    pyro.enable_validation(validate)
    pyro.set_rng_seed(seed)
    if hasattr(potential, "evaluations"):
        potential.evaluations = 0  # this chain's count (a sequential run reuses the potential)
    flat = FlatPotential(potential, init)
    kernel_kwargs = dict(kernel_kwargs)
    metric = flat.metric(kernel_kwargs.pop("initial_inverse_mass_matrix", None))
    kernel_class = _nuts_with_initial_metric(metric)
    if hasattr(potential, "gibbs_update"):
        kernel_class = _with_gibbs_block(kernel_class)
    kernel = kernel_class(potential_fn=flat, **kernel_kwargs)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        initial_params={FlatPotential.SITE: flat.start},
        disable_progbar=not progress,
    )
    mcmc.run()
    # the kernel's own record: MCMC.diagnostics() would also compute r-hat / ESS of every
    # site, and fails for fewer than 4 draws
    divergences = mcmc._diagnostics[0].get("divergences", [])
    report = potential.report() if hasattr(potential, "report") else {}
    samples = flat.unflatten(mcmc.get_samples()[FlatPotential.SITE])
    if hasattr(potential, "gibbs_update"):
        samples.update(kernel.block_draws())
    return samples, [int(i) for i in divergences], report


class FlatPotential:
    """``potential`` (a function of a dict of unconstrained sites) as a function of one flat
    site, :attr:`SITE` ``(D,)``: the sites' entries concatenated in sorted-name order (the
    order of :func:`flatten_params` and of :func:`laplace_inverse_mass_matrix`'s metric). A
    Gibbs block of ``potential`` (``gibbs_init`` / ``gibbs_update``) gets the dict as well.

    :param potential: the potential, ``dict[str, Tensor] -> scalar tensor``.
    :param like: a point of its sites (their names and shapes; also :attr:`start`).
    """

    #: the name Pyro's NUTS knows the flat site by
    SITE = "z"

    def __init__(self, potential, like: dict[str, Tensor]) -> None:
        self.potential = potential
        start, self._unflatten = flatten_params({k: v.detach() for k, v in like.items()})
        #: ``like`` flattened ``(D,)``
        self.start = start.clone()
        self._names = tuple(sorted(like))

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``(..., D)`` -> site -> ``(..., site shape)``."""
        return self._unflatten(flat)

    def metric(self, metric: dict | None) -> dict | None:
        """A dense inverse mass matrix over every site (keyed by their sorted names, as from
        :func:`laplace_inverse_mass_matrix`) rekeyed to the flat site; ``None`` stays."""
        if metric is None:
            return None
        if set(metric) != {self._names}:
            raise ValueError(
                "initial_inverse_mass_matrix: expected one dense block over the sites "
                f"{self._names}, got blocks {sorted(metric)}"
            )
        return {(self.SITE,): metric[self._names]}

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """The potential at ``{SITE: z}``, ``z`` ``(D,)`` (scalar)."""
        return self.potential(self._unflatten(params[self.SITE]))

    def gibbs_init(self, params: dict[str, Tensor]) -> None:
        """The potential's ``gibbs_init`` at ``{SITE: z}``."""
        self.potential.gibbs_init(self._unflatten(params[self.SITE]))

    def gibbs_update(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The potential's ``gibbs_update`` at ``{SITE: z}``: its draws, name -> tensor."""
        return self.potential.gibbs_update(self._unflatten(params[self.SITE]))


def run_chains(
    potential, inits, num_samples, warmup_steps, seeds, kernel_kwargs, parallel, progress
):
    """Run one chain per entry of ``inits`` (its start, unconstrained coordinates), in
    parallel processes (spawned, one thread share each) or one after another.
    :returns: ``(samples name -> (C, S, ...), divergences per chain, the first chain's
    potential report; its ``potential_evaluations``, if any, a list per chain)``."""
    validate = pyro.infer.util.is_validation_enabled()
    jobs = [
        (potential, init, num_samples, warmup_steps, int(s), kernel_kwargs)
        for init, s in zip(inits, seeds, strict=True)
    ]
    if parallel:
        threads = max(1, torch.get_num_threads() // len(jobs))
        runs = _run_in_processes([(*job, threads, False, validate) for job in jobs], threads)
    else:
        runs = [run_chain(*job, None, progress, validate) for job in jobs]
    samples = {k: torch.stack([r[0][k] for r in runs]) for k in runs[0][0]}
    report = dict(runs[0][2])
    if "potential_evaluations" in report:  # per chain
        report["potential_evaluations"] = [r[2]["potential_evaluations"] for r in runs]
    return samples, [r[1] for r in runs], report


def _run_in_processes(jobs: list[tuple], threads: int) -> list:
    """Run ``run_chain(*job)`` for every job in its own fresh Python process.

    Workers are started as ``python -m bayes_fusion._chain_worker IN OUT`` rather than with
    ``multiprocessing``: they never re-import the user's ``__main__`` (no
    ``if __name__ == "__main__"`` guard needed, works from notebooks).
    """
    with tempfile.TemporaryDirectory(prefix="bf-chains-") as tmp:
        procs = []
        # the workers must import this very package, even when it is not installed
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
        for i, job in enumerate(jobs):
            src, dst = Path(tmp) / f"in{i}.pt", Path(tmp) / f"out{i}.pt"
            torch.save(job, src)
            cmd = [sys.executable, "-m", "bayes_fusion._chain_worker", str(src), str(dst)]
            procs.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), dst))
        runs = []
        for i, (proc, dst) in enumerate(procs):
            _, err = proc.communicate()
            if proc.returncode != 0:
                for other, _ in procs:
                    other.kill()
                raise RuntimeError(
                    f"num_chains: chain {i} failed in its worker process (exit code "
                    f"{proc.returncode}):\n{err[-2000:]}"
                )
            runs.append(torch.load(dst, weights_only=False))
    return runs


def flatten_params(params: dict[str, Tensor]):
    """``params`` as one vector in sorted-name order (the order of Pyro's dense mass matrix and
    of :func:`laplace_inverse_mass_matrix`'s metric) and the function mapping such a vector
    back to the dict."""
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes, dim=-1)
        lead = flat.shape[:-1]
        return {n: p.reshape(lead + sh) for n, p, sh in zip(names, parts, shapes, strict=True)}

    return torch.cat([params[n].reshape(-1) for n in names]), unflatten


def laplace_inverse_mass_matrix(potential, params: dict[str, Tensor], min_curvature=1.0):
    """Inverse Hessian of ``potential`` at ``params`` (flattened in sorted-name order, as
    Pyro's dense mass matrix), with curvatures clipped below at ``min_curvature`` so flat or
    non-convex directions get unit scale. Starts NUTS's warm-up with a metric that already
    fits the posterior's scales and correlations, instead of the identity.
    """
    flat0, unflatten = flatten_params({k: v.detach() for k, v in params.items()})
    hess = torch.autograd.functional.hessian(lambda f: potential.potential(unflatten(f)), flat0)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    if not bool(torch.isfinite(evals).all()):
        return None
    inv = (evecs / evals.clamp(min=min_curvature)) @ evecs.T
    return {tuple(sorted(params)): 0.5 * (inv + inv.T)}


def _nuts_with_initial_metric(metric):
    """A NUTS class whose warm-up starts from ``metric`` (``None``: Pyro's identity)."""
    if metric is None:
        return NUTS

    class _NUTS(NUTS):
        def _initialize_adapter(self):
            super()._initialize_adapter()
            adapter = self._adapter.mass_matrix_adapter
            if set(adapter.inverse_mass_matrix) == set(metric):
                adapter.inverse_mass_matrix = {k: v.clone() for k, v in metric.items()}
                if self._adapter.adapt_step_size:
                    self._adapter.reset_step_size_adaptation(self._initial_params)

    return _NUTS


def _with_gibbs_block(cls):
    """``cls`` (a NUTS class) with the Gibbs block of its ``potential_fn`` (``gibbs_init`` /
    ``gibbs_update``, e.g. the Polya-Gamma variables of
    :class:`~bayes_fusion.infer.polya_gamma.PolyaGammaPotential`) after every NUTS step: the
    potential changes with the block's state, so the cached energy is dropped after each
    update. ``block_draws()``: the block's draws after warm-up, name -> ``(S, ...)`` (``{}``
    before any)."""

    class _Gibbs(cls):
        def setup(self, warmup_steps, *args, **kwargs):
            self._block_draws = []
            self.potential_fn.gibbs_init(self.initial_params)
            super().setup(warmup_steps, *args, **kwargs)

        def sample(self, params):
            z = super().sample(params)
            draw = self.potential_fn.gibbs_update(z)
            self.clear_cache()
            if self._t > self._warmup_steps:
                self._block_draws.append(draw)
            return z

        def block_draws(self):
            if not self._block_draws:
                return {}
            return {k: torch.stack([d[k] for d in self._block_draws]) for k in self._block_draws[0]}

    return _Gibbs
