"""What ``fit``'s ``jit`` runs: eager steps, the compiled loss, or compiled whole steps -- and,
for ``jit=None``, the switch from eager to compiled once the fit's own eager steps have been
timed and the compile predicted to pay (:mod:`..jit_choice`)."""

from __future__ import annotations

import statistics
import time
import warnings

from ..jit_choice import PROBE_STEPS, CompileChoice, CostRecords, choose, graph_signature
from .fused import FUSED_STEPS, FusedSteps, fused_or_none

__all__ = ["Compilation"]


class Compilation:
    """The compiled engine of one SVI fit, chosen by ``jit``.

    * ``False``: eager steps.
    * ``True``: whole steps compiled, one per call (:class:`~.fused.FusedSteps`), where the fit
      allows it (full batch, the default optimizer, no callback, early stopping, checkpoints or
      distributed run); otherwise the loss compiled (forward and backward).
    * ``"fused"``: :data:`~.fused.FUSED_STEPS` whole steps per call (a warning and the
      compiled loss where the fit does not allow it).
    * ``None``: eager; after the first step and :data:`~..jit_choice.PROBE_STEPS` timed eager
      steps, compiled when :func:`~..jit_choice.choose` predicts that a compile pays for itself
      over the remaining steps -- whichever of the compiled engines the fit allows (whole
      steps one per call as ``True``, or :data:`~.fused.FUSED_STEPS` per call as ``"fused"``;
      else the loss) is predicted the fastest in all.

    Only the library's own models (a Pyro-free ``log_joint``) with the direct ELBO compile;
    ``jit=True`` / ``"fused"`` warn and run eagerly for any other. A distributed fit's
    ``jit=None`` stays eager (every rank must run the same engine).

    :param jit: ``None``, ``True``, ``False`` or ``"fused"``.
    :param stepper: the fit's :class:`~.step.SVIStepper`.
    :param optim: the fit's optimizer.
    :param unfusable: why the fit's options rule out whole compiled steps ('' when none does).
    :param warmup: the fit's KL warm-up steps. :param num_steps: the fit's steps in all.
    :param start_step: steps done before this run (a resumed fit).
    :param records: this machine's compile costs (``None``: the default file).
    """

    def __init__(
        self,
        jit,
        stepper,
        optim,
        *,
        unfusable: str,
        warmup: int,
        num_steps: int,
        start_step: int,
        records: CostRecords | None = None,
    ) -> None:
        self.stepper, self.optim, self.warmup = stepper, optim, warmup
        self.records = records
        self.fused: FusedSteps | None = None
        self.choice: CompileChoice | None = None
        self._probe: list[float] | None = None
        self._signatures: dict[int, str] = {}  # steps per call -> graph signature
        #: ``jit=None``: each candidate engine's predicted seconds for the rest of the fit
        self.candidates: dict[str, float] = {}
        self._since: float | None = None  # when the compiled engine took over
        self._steps_since = 0
        direct = stepper.direct
        can_compile = direct is not None and direct.pure
        self._steps_reason = unfusable or FusedSteps.unsupported_reason(direct, optim)
        if jit in (True, "fused"):
            if not can_compile:
                warnings.warn(
                    f"fit: jit={jit!r} compiles the library's own models (bf.Regressor / "
                    "bf.Classifier around CPFusion / XOXLinear) with direct_elbo=True, one "
                    "particle and a preset guide; this fit runs eagerly",
                    RuntimeWarning,
                    stacklevel=4,
                )
            elif jit == "fused":
                self._start("steps", FUSED_STEPS, warn=True)
            else:
                self._start(self.engine, 1)
        elif (
            jit is None
            and can_compile
            and stepper.sync is None  # ranks timing their own steps could choose differently
            and num_steps - start_step > PROBE_STEPS + 1
        ):
            self._probe = []

    @property
    def engine(self) -> str:
        """The compiled engine this fit allows: ``"steps"`` (whole steps) or ``"loss"``."""
        return "loss" if self._steps_reason else "steps"

    @property
    def probing(self) -> bool:
        """Whether ``jit=None`` is still timing eager steps."""
        return self._probe is not None

    @property
    def active(self) -> bool:
        """Whether a compiled engine runs the steps from now on."""
        return self._since is not None

    def _start(self, engine: str, steps: int, warn: bool = False) -> None:
        self._since = time.perf_counter()
        if engine == "steps":
            self.fused = fused_or_none(
                self.stepper.direct,
                self.optim,
                steps,
                self.warmup,
                self.stepper.anneal.obs_scale,
                self._steps_reason,
                warn=warn,
            )
            if self.fused is not None:
                return
        self.stepper.direct.compile()

    def eager_step_done(self, seconds: float, remaining: int, batch) -> None:
        """Time one eager step after the first (``jit=None``); after
        :data:`~..jit_choice.PROBE_STEPS` of them, decide."""
        self._probe.append(seconds)
        if len(self._probe) < PROBE_STEPS:
            return
        eager_ms = statistics.median(self._probe) * 1e3
        self._probe = None
        records = self._records()
        best, best_steps = None, 1
        for steps in (1, FUSED_STEPS) if self.engine == "steps" else (1,):
            engine = self._recorded_engine(steps)
            prediction = records.predict(self._graph_signature(batch, steps), engine)
            choice = choose(remaining, eager_ms, engine, prediction)
            self.candidates[engine] = round(choice.predicted_compiled_s, 3)
            if best is None or choice.predicted_compiled_s < best.predicted_compiled_s:
                best, best_steps = choice, steps
        self.choice = best
        if best.compile:
            self._start(self.engine, best_steps)

    def compiled_steps_done(self, n: int) -> None:
        """Count ``n`` steps run by the compiled engine."""
        self._steps_since += n

    def fused_failed(self) -> None:
        """The whole compiled steps were given up (the loop goes on eagerly)."""
        self._since = None

    def _records(self) -> CostRecords:
        if self.records is None:
            self.records = CostRecords()
        return self.records

    def _steps_per_call(self) -> int:
        """Whole steps per compiled call of the running engine (1: one step, or the loss)."""
        return self.fused.steps if self.fused is not None else 1

    def _graph_signature(self, batch, steps_per_call: int) -> str:
        if steps_per_call not in self._signatures:
            direct = self.stepper.direct
            self._signatures[steps_per_call] = graph_signature(
                self.engine, steps_per_call, direct.model, direct.params, batch
            )
        return self._signatures[steps_per_call]

    def _recorded_engine(self, steps_per_call: int) -> str:
        """The engine a compile is recorded (and predicted) under: ``"steps"`` for one whole
        step per call, ``"steps x8"`` for 8 (``jit="fused"``: its longer compile must not enter
        the one-step median), ``"loss"``."""
        return f"steps x{steps_per_call}" if steps_per_call > 1 else self.engine

    def _compiled(self):
        """``(compile seconds, cache use)`` of the compiled engine, ``None`` when none ran."""
        if self.fused is not None and self.fused.failed is None and self.fused.cache:
            return self.fused.compile_seconds, self.fused.cache
        direct = self.stepper.direct
        compiled = direct.compiled if direct is not None else None
        if compiled is not None and compiled.failed is None and compiled.cache_uses:
            return compiled.compile_seconds, compiled.cache_uses[-1]
        return None

    def report(self, batch) -> dict:
        """``FitResult.info`` entries: ``loss_engine``, ``compile_seconds`` (``None`` when
        nothing compiled), ``compile_cache`` (what inductor's on-disk cache did:
        :attr:`~bayes_fusion.infer.compile_cache.CacheUse.state`), ``fused_steps`` (whole
        steps per compiled call), ``jit_choice``
        (``jit=None``'s prediction and what happened; ``candidates``: each compiled engine's
        predicted seconds for the rest of the fit, compile included); records the compile's
        costs."""
        direct = self.stepper.direct
        compiled = self._compiled()
        if direct is None:
            engine = "Trace_ELBO"
        elif compiled is None:
            engine = "direct"
        else:
            engine = "compiled steps" if self.fused is not None else "direct (compiled)"
        info = {"loss_engine": engine, "compile_seconds": None}
        step_ms = None
        if compiled is not None:
            compile_s, cache = compiled
            info["compile_seconds"] = compile_s
            info["compile_cache"] = cache.state
            if self.fused is not None:
                info["fused_steps"] = self.fused.steps
            if self._steps_since and self._since is not None:
                spent = time.perf_counter() - self._since - compile_s
                step_ms = max(spent, 0.0) / self._steps_since * 1e3
            ratio = None
            if self.choice is not None and step_ms is not None:
                ratio = step_ms / self.choice.eager_ms
            self._records().record(
                self._graph_signature(batch, self._steps_per_call()),
                self._recorded_engine(self._steps_per_call()),
                compile_s,
                cache,
                ratio,
            )
        if self.choice is not None:
            if compiled is None:
                info["jit_choice"] = self.choice.report()
            else:
                info["jit_choice"] = self.choice.report(compile_s, step_ms, cache)
            info["jit_choice"]["candidates"] = dict(self.candidates)
        return info
