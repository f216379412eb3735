"""Running NUTS chains on a potential: one chain (:func:`run_chain`, also the entry point of a
chain's worker process), several in parallel processes or one after another
(:func:`run_chains`), the kernel's settings with the dense metric from the Laplace approximation
that starts their warm-up (:func:`kernel_settings`, :func:`laplace_inverse_mass_matrix`), and a
Gibbs block after every NUTS step where the potential has one.

Pyro's NUTS kernel runs on the potential's flat site (:class:`~.potential.FlatPotential`): its
leapfrog steps, energies and U-turn checks run one tensor operation per step where they would
run one per site. This module drives the kernel itself (``setup``, then ``sample`` per
iteration), so the per-draw statistics ArviZ reads are recorded as it goes
(:func:`~bayes_fusion.infer.seams.nuts_kernel_class`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..seams import SAMPLE_STATS, nuts_kernel_class, worker_environment
from .potential import FlatPotential, flatten_params

__all__ = [
    "ChainRun",
    "defined_in_main",
    "kernel_settings",
    "laplace_inverse_mass_matrix",
    "run_chain",
    "run_chains",
]


@dataclasses.dataclass
class ChainRun:
    """What :func:`run_chains` returns.

    :ivar samples: unconstrained draws, site -> ``(chains, draws, ...)``.
    :ivar divergences: per chain, the indices of divergent transitions after warm-up.
    :ivar stats: per-draw NUTS statistics (:data:`~bayes_fusion.infer.seams.SAMPLE_STATS`),
        name -> ``(chains, draws)``.
    :ivar report: what the potential says of its computation (its ``report()``; its
        ``potential_evaluations``, if any, a list per chain).
    """

    samples: dict[str, Tensor]
    divergences: list[list[int]]
    stats: dict[str, Tensor]
    report: dict


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
    label: str = "",
    progress_path: str | None = None,
) -> tuple[dict[str, Tensor], list[int], dict[str, list[float]], dict]:
    """Run one NUTS chain on ``potential`` (a picklable potential); also a process entry point.

    :param potential: a potential (:class:`~.potential.ModelPotential` or any object with
        ``potential(params)``, optionally a Gibbs block).
    :param init: the chain's start, unconstrained coordinates (site -> tensor).
    :param num_samples: draws after warm-up. :param warmup_steps: warm-up iterations.
    :param seed: the chain's RNG seed.
    :param kernel_kwargs: NUTS options (:func:`kernel_settings`).
    :param threads: torch intra-op threads (``None``: unchanged).
    :param progress: show a progress bar. :param validate: Pyro's validation.
    :param label: the progress bar's name (e.g. ``"chain 1"``).
    :param progress_path: a file to keep the count of finished iterations in (a worker
        process's progress, which the parent shows; written at most every half second).
    :returns: ``(samples, divergences, stats, report)``: unconstrained draws ``name -> (S, ...)``
        (and the Gibbs block's draws), the indices of divergent transitions after warm-up, the
        per-draw statistics (name -> list of ``S`` floats) and the potential's ``report()``
        (``{}`` without one).
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
    gibbs = hasattr(potential, "gibbs_update")
    kernel = nuts_kernel_class(metric, gibbs)(potential_fn=flat, **kernel_kwargs)
    kernel.initial_params = {FlatPotential.SITE: flat.start}
    kernel.setup(warmup_steps)
    params = kernel.initial_params
    draws = []
    total = warmup_steps + num_samples
    reported = time.monotonic()
    with tqdm(total=total, disable=not progress, desc=label or "NUTS", leave=False) as bar:
        for i in range(total):
            params = kernel.sample(params)
            if i >= warmup_steps:
                draws.append(params[FlatPotential.SITE].detach().clone())
            bar.update(1)
            if progress_path is not None and time.monotonic() - reported > 0.5:
                _write_count(progress_path, i + 1)
                reported = time.monotonic()
            if i % 25 == 0:
                phase = "warmup" if i < warmup_steps else "sample"
                bar.set_postfix(phase=phase, step_size=f"{kernel.step_size:.2e}", refresh=False)
    if progress_path is not None:
        _write_count(progress_path, total)
    samples = flat.unflatten(torch.stack(draws))
    samples.update(kernel.block_draws())
    divergences, stats = kernel.divergences(), kernel.draw_stats()
    kernel.cleanup()
    report = potential.report() if hasattr(potential, "report") else {}
    return samples, divergences, stats, report


def run_chains(
    potential,
    inits: list[dict[str, Tensor]],
    num_samples: int,
    warmup_steps: int,
    seeds: list[int],
    kernel_kwargs: dict,
    *,
    parallel: bool,
    progress: bool,
) -> ChainRun:
    """Run one chain per entry of ``inits`` (its start, unconstrained coordinates), in
    parallel processes (spawned, one thread share each; a progress bar counts finished chains)
    or one after another (a progress bar per chain).

    :param potential: as :func:`run_chain`. :param seeds: one RNG seed per chain.
    :param kernel_kwargs: NUTS options (:func:`kernel_settings`).
    :param parallel: run the chains in worker processes.
    :param progress: show progress.
    """
    validate = pyro.infer.util.is_validation_enabled()
    jobs = [
        (potential, init, num_samples, warmup_steps, int(s), kernel_kwargs)
        for init, s in zip(inits, seeds, strict=True)
    ]
    if parallel:
        threads = max(1, torch.get_num_threads() // len(jobs))
        runs = _run_in_processes(
            [(*job, threads, False, validate) for job in jobs], threads, progress
        )  # each job gets its label and progress file there
    else:
        runs = [
            run_chain(*job, None, progress, validate, f"chain {i}") for i, job in enumerate(jobs)
        ]
    samples = {k: torch.stack([r[0][k] for r in runs]) for k in runs[0][0]}
    stats = {
        name: torch.tensor([r[2][name] for r in runs], dtype=torch.float64) for name in SAMPLE_STATS
    }
    report = dict(runs[0][3])
    if "potential_evaluations" in report:  # per chain
        report["potential_evaluations"] = [r[3]["potential_evaluations"] for r in runs]
    return ChainRun(samples, [r[1] for r in runs], stats, report)


def _write_count(path: str, count: int) -> None:
    """Replace the file at ``path`` by one holding ``count`` (atomically: never half written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(count))
    os.replace(tmp, path)


def _read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _run_in_processes(jobs: list[tuple], threads: int, progress: bool) -> list:
    """Run ``run_chain(*job)`` for every job in its own fresh Python process.

    Workers are started as ``python -m bayes_fusion.infer.mcmc.worker IN OUT`` rather than with
    ``multiprocessing``: they never re-import the user's ``__main__`` (no
    ``if __name__ == "__main__"`` guard needed, works from notebooks). Each keeps its count of
    finished iterations in a file; with ``progress`` one bar shows the iterations of all chains.
    """
    with tempfile.TemporaryDirectory(prefix="bf-chains-") as tmp, contextlib.ExitStack() as stack:
        procs, counts, logs = [], [], []
        env = worker_environment(threads)
        for i, job in enumerate(jobs):
            src, dst = Path(tmp) / f"in{i}.pt", Path(tmp) / f"out{i}.pt"
            counts.append(Path(tmp) / f"progress{i}")
            torch.save((*job, f"chain {i}", str(counts[-1])), src)
            cmd = [sys.executable, "-m", "bayes_fusion.infer.mcmc.worker", str(src), str(dst)]
            logs.append(stack.enter_context(open(Path(tmp) / f"err{i}.txt", "w+")))
            procs.append((subprocess.Popen(cmd, env=env, stderr=logs[-1], text=True), dst))
        stack.callback(_kill_running, [proc for proc, _ in procs])
        total = sum(job[2] + job[3] for job in jobs)  # draws + warm-up of every chain
        with tqdm(total=total, disable=not progress, desc="NUTS chains", leave=False) as bar:
            while True:
                codes = [proc.poll() for proc, _ in procs]
                if all(code == 0 for code in codes) or any(code for code in codes):
                    break
                bar.n = sum(_read_count(c) for c in counts)
                bar.refresh()
                time.sleep(0.25)
        for i, (proc, _) in enumerate(procs):
            if proc.returncode:  # the first failed chain stops the others (the exit stack)
                logs[i].seek(0)
                raise RuntimeError(
                    f"num_chains: chain {i} failed in its worker process (exit code "
                    f"{proc.returncode}):\n{logs[i].read()[-2000:]}"
                )
        runs = [torch.load(dst, weights_only=False) for _, dst in procs]
    return runs


def laplace_inverse_mass_matrix(potential, params: dict[str, Tensor], min_curvature=1.0):
    """Inverse Hessian of ``potential`` at ``params`` (flattened in sorted-name order, as
    Pyro's dense mass matrix), with curvatures clipped below at ``min_curvature`` so flat or
    non-convex directions get unit scale. Starts NUTS's warm-up with a metric that already
    fits the posterior's scales and correlations, instead of the identity.

    Where curvatures span more orders of magnitude than the dtype resolves (a float32 Hessian
    with curvatures 1 and 1e9), the reassembled inverse can come out indefinite by rounding,
    and every Cholesky factor of it (the chains' starts, the sampler's metric) would fail: the
    largest curvatures are then capped, a factor of 10 at a time, until it factors.

    :returns: ``{sorted site names: (D, D) covariance}``, or ``None`` when the Hessian is not
        finite.
    """
    flat0, unflatten = flatten_params({k: v.detach() for k, v in params.items()})
    hess = torch.autograd.functional.hessian(lambda f: potential.potential(unflatten(f)), flat0)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    if not bool(torch.isfinite(evals).all()):
        return None
    cap = math.inf
    while True:
        inv = (evecs / evals.clamp(min=min_curvature, max=cap)) @ evecs.T
        inv = 0.5 * (inv + inv.T)
        if cap <= min_curvature or not bool(torch.linalg.cholesky_ex(inv).info):
            return {tuple(sorted(params)): inv}
        cap = min(cap, float(evals.max())) / 10


def kernel_settings(
    potential,
    start: dict[str, Tensor],
    *,
    max_tree_depth: int,
    target_accept_prob: float,
    full_mass: str | bool,
    laplace: bool,
) -> dict:
    """NUTS kernel options: a dense mass matrix (``full_mass="auto"``: up to 500 dimensions;
    it absorbs the linear correlations between scales and factors), started from the Laplace
    approximation at ``start`` when ``laplace`` (the MAP start).

    :param potential: the fit's potential. :param start: its start (unconstrained).
    :returns: keyword arguments of Pyro's ``NUTS`` plus ``initial_inverse_mass_matrix`` where
        the Laplace metric was computed.
    """
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


def defined_in_main(model) -> bool:
    """Whether the model (or one of its submodules) is a class or function of ``__main__``,
    which a chain's worker process cannot import."""
    objs = list(model.modules()) if isinstance(model, torch.nn.Module) else [model]
    return any(
        getattr(o, "__module__", None) == "__main__" or type(o).__module__ == "__main__"
        for o in objs
    )
