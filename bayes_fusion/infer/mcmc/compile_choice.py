"""``fit(guide="mcmc", jit="auto")``: compile the lockstep leapfrog step or not, per fit, from
measured costs -- the cost model of :mod:`bayes_fusion.infer.jit_choice`, shared with SVI's
``jit=None``.

The fit's first :data:`PROBE_ITERATIONS` iterations run eagerly and their leapfrog steps are
timed (the median step: one batched potential-and-gradient call of every chain). The steps
left are predicted as the iterations left times the leapfrog steps per iteration: the larger
of the fit's own recent average and this graph's average when it ran on this machine before
(:class:`~..jit_choice.CostRecords`; :data:`DEFAULT_STEPS_PER_ITERATION` when it never did).
The leapfrog step is compiled from the next iteration on when the predicted compile plus the
compiled steps beat the eager steps left. ChEES starts from the shortest trajectories and
lengthens them during warm-up, so an eager fit checks again every :data:`RECHECK_ITERATIONS`
iterations with its newer average. After the fit, its steps per iteration after warm-up --
and, when it compiled, the compile time and the compiled step's ratio to the eager one -- are
recorded for the next prediction.
"""

from __future__ import annotations

import statistics

from ..compile_cache import CacheUse
from ..jit_choice import CompileChoice, CostRecords, choose

__all__ = [
    "DEFAULT_STEPS_PER_ITERATION",
    "ENGINE",
    "PROBE_ITERATIONS",
    "RECHECK_ITERATIONS",
    "LeapfrogCompileChoice",
]

#: iterations run eagerly and timed before deciding
PROBE_ITERATIONS = 10
#: an eager fit decides again every this many iterations (its trajectories lengthen)
RECHECK_ITERATIONS = 25
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
        self.records = records if records is not None else CostRecords()
        self.choice: CompileChoice | None = None
        self.predicted_steps_per_iteration: float | None = None
        self.eager_ms: float | None = None
        #: decisions taken so far, and the iteration (1-based) of the last one
        self.checks = 0
        self.decided_after: int | None = None

    def decide(
        self,
        iterations_done: int,
        iterations_left: int,
        recent_steps_per_iteration: float,
        eager_step_seconds: list[float] | None = None,
    ) -> bool:
        """Whether to compile now.

        :param iterations_done: iterations run so far (eagerly).
        :param iterations_left: iterations still to run.
        :param recent_steps_per_iteration: the fit's average over its latest iterations.
        :param eager_step_seconds: the probe's eager leapfrog steps, seconds each (the first
            decision's; later ones reuse its median).
        """
        records = self.records
        if eager_step_seconds:
            self.eager_ms = statistics.median(eager_step_seconds) * 1e3
        if self.eager_ms is None:
            raise ValueError("eager_step_seconds: the first decision needs the probe's steps")
        recorded = records.steps_per_iteration(self.signature) or DEFAULT_STEPS_PER_ITERATION
        per_iteration = max(recorded, recent_steps_per_iteration)
        self.predicted_steps_per_iteration = per_iteration
        remaining = max(int(round(iterations_left * per_iteration)), 0)
        prediction = records.predict(self.signature, ENGINE)
        self.choice = choose(remaining, self.eager_ms, ENGINE, prediction)
        self.checks += 1
        self.decided_after = iterations_done
        return self.choice.compile

    def report(
        self,
        steps_per_iteration: float,
        compile_s: float | None = None,
        compiled_step_ms: float | None = None,
        cache: CacheUse | None = None,
    ) -> dict | None:
        """Record the fit's costs; ``FitResult.info["jit_choice"]`` (``None`` when nothing was
        decided: ``jit`` given, or the fit ended before the probe did).

        :param steps_per_iteration: the fit's average leapfrog steps per iteration after
            warm-up (with its adapted trajectory length).
        :param compile_s: seconds the compile took (``None``: nothing compiled).
        :param compiled_step_ms: the compiled leapfrog step's median, ms.
        :param cache: what inductor's on-disk cache did for the compile.
        """
        records = self.records
        records.record_steps_per_iteration(self.signature, ENGINE, steps_per_iteration)
        if compile_s is not None:
            ratio = None
            if compiled_step_ms is not None and self.eager_ms:
                ratio = compiled_step_ms / self.eager_ms
            records.record(self.signature, ENGINE, compile_s, cache, ratio)
        if self.choice is None:
            return None
        out = self.choice.report(compile_s, compiled_step_ms, cache)
        out["steps_per_iteration"] = {
            "predicted": round(self.predicted_steps_per_iteration, 2),
            "after_warmup": round(steps_per_iteration, 2),
        }
        out["checks"] = self.checks
        out["decided_after_iteration"] = self.decided_after
        return out
