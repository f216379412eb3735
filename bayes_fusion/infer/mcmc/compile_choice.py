"""``fit(guide="mcmc", jit="auto")``: compile the lockstep leapfrog step or not, per fit, from
measured costs -- the cost model of :mod:`bayes_fusion.infer.jit_choice`, shared with SVI's
``jit=None``.

The fit's first :data:`PROBE_ITERATIONS` iterations run eagerly and their leapfrog steps are
timed (the median step: one batched potential-and-gradient call of every chain). The steps
left are predicted as the iterations left times the leapfrog steps per iteration: this graph's
own average when a fit of it ran on this machine before (:class:`~..jit_choice.CostRecords`),
else :data:`DEFAULT_STEPS_PER_ITERATION` (the probe's own count would under-predict: ChEES
starts from the shortest trajectories). The leapfrog step is compiled from the next iteration
on when the predicted compile plus the compiled steps beat the eager steps left. After the fit
its average steps per iteration -- and, when it compiled, the compile time and the compiled
step's ratio to the eager one -- are recorded for the next prediction.
"""

from __future__ import annotations

import statistics

from ..compile_cache import CacheUse
from ..jit_choice import CompileChoice, CostRecords, choose

__all__ = ["DEFAULT_STEPS_PER_ITERATION", "ENGINE", "PROBE_ITERATIONS", "LeapfrogCompileChoice"]

#: iterations run eagerly and timed before deciding
PROBE_ITERATIONS = 10
#: leapfrog steps per iteration predicted for a graph with nothing on record (the benchmark
#: models' fits with the defaults took 21-77 on a 2-core CPU: benchmarks/results)
DEFAULT_STEPS_PER_ITERATION = 30.0
#: the engine name the costs are recorded under
ENGINE = "leapfrog"


class LeapfrogCompileChoice:
    """``jit="auto"``'s decision for one lockstep fit, and its record.

    :param signature: the compiled graph's key
        (:func:`~bayes_fusion.infer.jit_choice.graph_signature`).
    :param records: this machine's compile costs (``None``: the default file).
    """

    def __init__(self, signature: str, records: CostRecords | None = None) -> None:
        self.signature = signature
        self.records = records
        self.choice: CompileChoice | None = None
        self.predicted_steps_per_iteration: float | None = None

    def _records(self) -> CostRecords:
        if self.records is None:
            self.records = CostRecords()
        return self.records

    def decide(self, eager_step_seconds: list[float], iterations_left: int) -> bool:
        """Whether to compile, from the probe's eager leapfrog steps (seconds each) and the
        iterations still to run."""
        records = self._records()
        per_iteration = records.steps_per_iteration(self.signature) or DEFAULT_STEPS_PER_ITERATION
        self.predicted_steps_per_iteration = per_iteration
        eager_ms = statistics.median(eager_step_seconds) * 1e3
        remaining = max(int(round(iterations_left * per_iteration)), 0)
        prediction = records.predict(self.signature, ENGINE)
        self.choice = choose(remaining, eager_ms, ENGINE, prediction)
        return self.choice.compile

    def report(
        self,
        steps_per_iteration: float,
        compile_s: float | None = None,
        compiled_step_ms: float | None = None,
        cache: CacheUse | None = None,
    ) -> dict | None:
        """Record the fit's costs; ``FitResult.info["jit_choice"]`` (``None`` when the fit
        ended before the probe did).

        :param steps_per_iteration: the fit's average leapfrog steps per iteration.
        :param compile_s: seconds the compile took (``None``: nothing compiled).
        :param compiled_step_ms: the compiled leapfrog step's median, ms.
        :param cache: what inductor's on-disk cache did for the compile.
        """
        records = self._records()
        records.record_steps_per_iteration(self.signature, ENGINE, steps_per_iteration)
        if self.choice is None:
            return None
        if compile_s is not None:
            ratio = None
            if compiled_step_ms is not None and self.choice.eager_ms > 0:
                ratio = compiled_step_ms / self.choice.eager_ms
            records.record(self.signature, ENGINE, compile_s, cache, ratio)
        out = self.choice.report(compile_s, compiled_step_ms, cache)
        out["steps_per_iteration"] = {
            "predicted": round(self.predicted_steps_per_iteration, 2),
            "actual": round(steps_per_iteration, 2),
        }
        out["probe_iterations"] = PROBE_ITERATIONS
        return out
