"""Stochastic variational inference: :func:`fit_svi`, its training loop, early stopping, KL
warm-up and checkpoints. One step's mechanics live in :mod:`.svi_step`, the rows each step
sees in :mod:`.batches`."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide, init_to_value
from tqdm.auto import tqdm

from ..._checks import check_choice, check_positive_float, check_positive_int
from ...layers.base import layer_init_values
from ..data import check_args_finite, intra_op_threads, num_rows, seeded
from ..faults import non_finite_error, warn_on_collapse, without_trace_shapes
from ..persist import read_state
from ..result import FitResult
from .batches import (
    BatchStream,
    check_no_own_subsampling,
    configure_batching,
    kept_num_data,
    prototype_args,
    start_distributed,
)
from .compilation import Compilation
from .fused import STEPS_PER_RUN
from .guides import GUIDES, default_num_steps, make_guide
from .step import SVIStepper, default_optimizer

__all__ = ["fit_svi"]


@without_trace_shapes()
def fit_svi(
    model,
    *args,
    guide: str | AutoGuide | type = "meanfield",
    num_steps: int | None = None,
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
    jit: bool | str | None = None,
    direct_elbo: bool = True,
    init_scale: float = 0.01,
    kl_warmup: float = 0.2,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: FitResult | str | os.PathLike | None = None,
    distributed: bool = False,
    distributed_timeout: float = 120.0,
    num_threads: int | None = None,
) -> FitResult:
    """Fit ``model`` by SVI (MAP, mean-field, low-rank or full Gaussian, or any guide).

    :param model: a Pyro model, e.g. ``Regressor(CPFusion(...))`` or any user PyroModule.
    :param args: model arguments, e.g. ``(inputs, y)``; tensors' first dim is the data rows.
    :param guide: ``"map"``, ``"meanfield"``, ``"lowrank"``, ``"full"``, an autoguide class
        (built with the preset initialisation) or a guide instance.
    :param num_steps: SVI steps (``>= 1``); ``None``: the guide's default
        (:func:`~bayes_fusion.infer.svi.guides.default_num_steps`: 3,000, the low-rank guide --
        ``"lowrank"`` or an ``AutoLowRankMultivariateNormal`` -- 4,000).
    :param lr: initial learning rate of the default ClippedAdam.
    :param optimizer: a ``pyro.optim`` optimizer to use instead of the default ClippedAdam,
        whose learning rate decays geometrically to ``final_lr_fraction * lr``.
    :param num_particles: ELBO particles; vectorized when ``vectorize_particles``.
    :param batch_size: minibatch size (``None``: full batch). Rows are reshuffled every epoch;
        the row-aligned tensor arguments (first dim ``N``, the rows of the first tensor) are
        sliced, other arguments passed whole. The library's models scale their likelihood by
        ``N / batch_size`` through ``num_data`` (set during the fit, afterwards back to what it
        was); any other model has its observed sites scaled by ``N / batch_size`` by the fit
        (it must then not subsample its rows itself: ``ValueError``), so the expected loss is
        the full-data ELBO either way.
    :param seed: seed of this fit's own random draws (same seed -> same result on CPU); the
        caller's global RNG streams (``random``, NumPy, torch) are left as they were. ``None``:
        draw from (and advance) the global streams.
    :param progress: show a tqdm progress bar.
    :param early_stopping: stop when the smoothed loss has not improved by a relative
        ``early_stopping_tol`` for this many steps (``None``: run all steps).
    :param callback: called as ``callback(step, loss)`` after each step; returning ``True``
        stops training.
    :param jit: compile with ``torch.compile`` (the library's own models -- ``Regressor`` /
        ``Classifier`` around a ``CPFusion`` / ``XOXLinear``, whose log joint is computed
        without Pyro -- with the direct ELBO; :mod:`bayes_fusion.infer.svi.compilation`).
        ``True``: whole steps (loss, gradient, clipped-Adam update) compiled into one call
        (:mod:`bayes_fusion.infer.svi.fused`) where the fit allows it (full batch, the default
        optimizer, no ``callback`` / ``early_stopping`` / ``checkpoint_path`` /
        ``distributed``), otherwise the loss (forward and backward); ``"fused"``:
        :data:`~bayes_fusion.infer.svi.fused.FUSED_STEPS` whole steps per call (faster steps,
        about 4x the compile time; a warning and the compiled loss where the fit does not
        allow it); ``False``: eager. ``None`` (default): the fit's first steps run eagerly and
        are timed, then it compiles (as ``True``) only when the predicted compile time plus
        compiled steps beat the eager steps left (:mod:`bayes_fusion.infer.jit_choice`:
        compile times measured on this machine, inductor's on-disk cache
        (:mod:`bayes_fusion.infer.compile_cache`) taken into account); ``info["jit_choice"]``
        gives the prediction and the outcome. Every compilation is checked against the eager
        function once; a failure falls back to eager with one warning.
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
    :param distributed: data-parallel SVI across the processes of a ``torchrun`` launch (see
        :mod:`bayes_fusion.distributed`): every rank passes the same full ``args``, evaluates
        its shard of each global batch (``batch_size`` is the global batch) and applies the
        rank-averaged gradient; checkpoints are written by rank 0 only.
    :param distributed_timeout: seconds a collective waits for a peer before
        :class:`~bayes_fusion.distributed.DistributedError` is raised.
    :param num_threads: torch intra-op threads for this fit (restored afterwards); ``None``:
        leave torch's setting. The steps of small models gain little from several threads, and
        threads that spin while the cores are busy with other work can make steps many times
        slower: ``num_threads=1`` is the safe choice on a shared machine.
    :returns: :class:`FitResult` with ``losses`` (one per step) and ``info`` (``seconds``,
        ``steps``, ``kl_warmup_steps``, ``loss_engine`` (``"direct"``, ``"direct
        (compiled)"``, ``"compiled steps"`` or ``"Trace_ELBO"``), ``compile_seconds``
        (``None`` when not compiled; part of ``seconds``), ``rng_state``; with compiled whole
        steps ``fused_steps``, the steps per compiled call; with ``jit=None`` on a compilable
        model ``jit_choice``: ``chosen``, ``eager_step_ms``, ``predicted`` costs and, when
        compiled, ``actual`` ones).
    :raises NonFiniteLossError: when a loss or gradient turns NaN/inf (names step and sites).

    Example::

        >>> import bayes_fusion as bf
        >>> from bayes_fusion.datasets import make_cp_regression
        >>> data = make_cp_regression((3, 4), 2, rank=1, num_data=50, seed=0)
        >>> model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
        >>> res = bf.fit_svi(model, data.inputs, data.y, num_steps=100, progress=False)
        >>> len(res.losses), res.method
        (100, 'meanfield')
    """
    if num_steps is None:
        num_steps = default_num_steps(guide)
    num_steps, lr, num_particles, checkpoint_every = _checked_numbers(
        model,
        guide,
        distributed=distributed,
        jit=jit,
        num_steps=num_steps,
        lr=lr,
        num_particles=num_particles,
        checkpoint_every=checkpoint_every,
    )
    threads = intra_op_threads(num_threads)
    check_args_finite(args, model)
    rows = num_rows(args)
    # the fit's own random streams, the model's dataset size as the caller left it, and a
    # private parameter-store scope (fits never collide by parameter name)
    with (
        threads,
        seeded(seed),
        kept_num_data(model),
        pyro.get_param_store().scope() as param_state,
    ):
        sync = None
        if distributed:
            sync = start_distributed(model, args, rows, batch_size, distributed_timeout)
        batch_size = configure_batching(model, rows, batch_size, sync)
        if batch_size is not None and batch_size < rows and not hasattr(model, "num_data"):
            check_no_own_subsampling(model, args)
        proto_args = prototype_args(args, batch_size, rows, sync)
        method, guide_obj = _build_guide(guide, model, proto_args, init_scale)
        optim = optimizer or default_optimizer(lr, num_steps, final_lr_fraction)
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else seed)
        # create the guide's parameters before the first step (same RNG use in every mode)
        with poutine.block(), torch.no_grad():
            guide_obj(*proto_args)
        losses = _restore(resume, guide_obj, optim, gen)
        stepper = SVIStepper(
            model,
            guide_obj,
            optim,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            direct_elbo=direct_elbo,
            sync=sync,
        )
        warmup = int(kl_warmup * num_steps)
        unfusable = _unfusable(
            batch_size=batch_size,
            rows=rows,
            callback=callback,
            early_stopping=early_stopping,
            checkpoint_path=checkpoint_path,
            sync=sync,
        )
        compilation = Compilation(
            jit,
            stepper,
            optim,
            unfusable=unfusable,
            warmup=warmup,
            num_steps=num_steps,
            start_step=len(losses),
        )
        if sync is not None:
            # start every rank from rank 0's values, as DDP does
            sync.attach([p for _, p in sorted(pyro.get_param_store().named_parameters())])
        batches = BatchStream(args, rows, batch_size, gen, sync, stepper.anneal, proto_args, model)
        run = _Run(model, guide_obj, method, args, optim, gen, sync, checkpoint_path)
        t0 = time.perf_counter()
        last_step = _run_steps(
            stepper,
            iter(batches),
            losses,
            num_steps=num_steps,
            warmup=warmup,
            method=method,
            progress=progress,
            callback=callback,
            stopper=_EarlyStopping(early_stopping, early_stopping_tol),
            checkpoints=run if checkpoint_path is not None else None,
            checkpoint_every=checkpoint_every,
            compilation=compilation,
        )
        if sync is not None:
            sync.check_in_sync(last_step)
        info = {
            "seconds": time.perf_counter() - t0,
            "steps": last_step,
            "kl_warmup_steps": warmup,
            **compilation.report(proto_args),
        }
        result = run.finish(losses, info, param_state)
        warn_on_collapse(result)
        return result


def _unfusable(*, batch_size, rows, callback, early_stopping, checkpoint_path, sync) -> str:
    """Which of fit_svi's options rules out fused steps ('' when none does)."""
    for name, value in (
        ("batch_size", batch_size is not None and batch_size < rows),
        ("callback", callback is not None),
        ("early_stopping", early_stopping is not None),
        ("checkpoint_path", checkpoint_path is not None),
        ("distributed", sync is not None),
    ):
        if value:
            return f"{name} needs the loop to return after every step"
    return ""


def _checked_numbers(
    model, guide, *, distributed, jit, num_steps, lr, num_particles, checkpoint_every
):
    """Validate fit_svi's model, guide name and numbers (each error names its argument)."""
    if not callable(model):
        raise TypeError(f"model: expected a callable Pyro model, got {type(model).__name__}")
    if isinstance(guide, str):
        check_choice("guide", guide, GUIDES)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed: expected True or False, got {distributed!r}")
    if jit not in (None, True, False, "fused"):
        raise ValueError(f"jit: expected None, True, False or 'fused', got {jit!r}")
    return (
        check_positive_int("num_steps", num_steps),
        check_positive_float("lr", lr),
        check_positive_int("num_particles", num_particles),
        check_positive_int("checkpoint_every", checkpoint_every),
    )


class _Run:
    """What one fit trains, as far as checkpoints and the result need it: writes resumable
    checkpoints (rank 0 only when distributed) and builds the :class:`FitResult`."""

    def __init__(self, model, guide, method, args, optim, generator, sync, path) -> None:
        self.model, self.guide, self.method, self.args = model, guide, method, args
        self.optim, self.generator, self.sync, self.path = optim, generator, sync, path

    def _result(self, losses, info, param_state=None) -> FitResult:
        info = {**info, "rng_state": _rng_state(self.generator)}
        return FitResult(
            self.model,
            self.guide,
            self.method,
            self.args,
            losses,
            info=info,
            optim_state=self.optim.get_state(),
            param_state=param_state,
        )

    def _writes(self) -> bool:
        return self.path is not None and (self.sync is None or self.sync.rank == 0)

    def checkpoint(self, losses: list[float]) -> None:
        """Save a resumable checkpoint of the fit so far."""
        if self._writes():
            self._result(losses, {}).save(self.path)

    def finish(self, losses: list[float], info: dict, param_state: dict) -> FitResult:
        """The fit's result, saved as the final checkpoint; distributed: all ranks wait for it."""
        if self.sync is not None:
            info["distributed"] = {"rank": self.sync.rank, "world_size": self.sync.world_size}
        result = self._result(losses, info, param_state)
        if self._writes():
            result.save(self.path)
        if self.sync is not None:
            self.sync.barrier("the end-of-fit barrier")  # the checkpoint exists when fit returns
        return result


def _build_guide(guide, model, proto_args: tuple, init_scale: float):
    """``(method name, guide instance)`` for a preset name, an autoguide class or a guide."""
    if isinstance(guide, str):
        return guide, make_guide(guide, model, *proto_args, init_scale=init_scale)
    if isinstance(guide, type) and issubclass(guide, AutoGuide):
        return "custom", guide(model, init_loc_fn=init_to_value(values=layer_init_values(model)))
    if callable(guide):
        return "custom", guide
    raise TypeError(f"guide: expected a name, an autoguide class or a guide, got {guide!r}")


def _restore(resume, guide, optim, generator: torch.Generator) -> list[float]:
    """Load a resumed fit's guide, optimizer and RNG states; returns its loss history."""
    if resume is None:
        return []
    state = resume.state() if isinstance(resume, FitResult) else read_state(resume)
    guide.load_state_dict(state["guide_state"])
    if state.get("optim_state"):
        optim.set_state(state["optim_state"])
    rng = state["info"].get("rng_state")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["batches"])
    return list(state["losses"])


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "batches": generator.get_state()}


class _EarlyStopping:
    """Stop when an exponential moving average of the loss has not improved by a relative
    ``tol`` for ``patience`` steps (``patience=None``: never)."""

    def __init__(self, patience: int | None, tol: float) -> None:
        self.patience, self.tol = patience, tol
        self.smoothed, self.best, self.since_best = None, math.inf, 0

    def __call__(self, loss: float) -> bool:
        if self.patience is None:
            return False
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        if self.smoothed < self.best - self.tol * abs(self.best):
            self.best, self.since_best = self.smoothed, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience


def _run_steps(
    stepper: SVIStepper,
    batches,
    losses: list[float],
    *,
    num_steps: int,
    warmup: int,
    method: str,
    progress: bool,
    callback,
    stopper: _EarlyStopping,
    checkpoints: _Run | None,
    checkpoint_every: int,
    compilation: Compilation,
) -> int:
    """The training loop from ``len(losses)`` to ``num_steps``; appends to ``losses`` and
    returns the number of steps done in all (a resumed fit counts its earlier steps). Once
    ``compilation`` runs whole compiled steps, every later step runs in compiled chunks of
    :data:`~.fused.STEPS_PER_RUN` steps (or ``compilation.fused.steps``, if more)."""
    sync = stepper.sync
    start_step = step = len(losses)
    bar = tqdm(
        disable=not progress,
        desc=f"fit[{method}]",
        initial=start_step,
        total=num_steps,
        leave=False,
    )
    try:
        while step < num_steps:
            fused = compilation.fused if compilation.active else None
            if fused is not None and step > start_step:
                done = _fused_chunk(compilation, stepper, batches, losses, step, num_steps)
                step += done
                bar.update(done)
                if progress and done and step % 50 < done:
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
                continue
            batch = next(batches)
            if step == start_step:  # Pyro checks model and guide once, before the first step
                stepper.check(batch, step)
            started = time.perf_counter()
            loss = stepper(batch, step, _kl_weight(step, warmup))
            if compilation.probing and step > start_step:
                spent = time.perf_counter() - started
                compilation.eager_step_done(spent, num_steps - step - 1, batch)
            elif compilation.active:
                compilation.compiled_steps_done(1)
            losses.append(loss)
            step += 1
            bar.update(1)
            if progress and (step - 1) % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
            if callback is not None:
                stop = bool(callback(step - 1, loss))
                if sync is not None:
                    stop = sync.any(stop, f"the callback stop vote of step {step - 1}")
                if stop:
                    break
            if stopper(loss):
                break
            if checkpoints is not None and step % checkpoint_every == 0:
                if sync is not None:
                    sync.check_in_sync(step)
                checkpoints.checkpoint(losses)
    finally:
        if compilation.fused is not None:
            compilation.fused.write_back()
    bar.close()
    return step


def _kl_weight(step: int, warmup: int) -> float:
    """The KL warm-up weight of ``step`` (0-based)."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _fused_chunk(compilation, stepper, batches, losses, step, num_steps) -> int:
    """Run one compiled chunk of steps from ``step``; returns the steps done (0 when compiling
    failed: the loop goes on step by step).

    :raises NonFiniteLossError: a step's loss or gradient was not finite (the parameters are
        those before it)."""
    fused = compilation.fused
    n = min(max(fused.steps, STEPS_PER_RUN), num_steps - step)
    batch = next(batches)
    try:
        chunk, bad = fused.run(batch, n)
    except RuntimeError as exc:  # only the first call compiles: nothing to write back
        warnings.warn(f"fit: jit runs step by step: {exc}", RuntimeWarning, stacklevel=5)
        compilation.fused_failed()
        return 0
    if bad >= 0:
        losses.extend(chunk[:bad])
        fused.write_back()  # the error names offending sites from the guide's current values
        raise non_finite_error(step + bad, chunk[bad], stepper.model, stepper.guide, batch)
    losses.extend(chunk)
    compilation.compiled_steps_done(n)
    return n
