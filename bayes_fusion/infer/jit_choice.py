"""Compile or not, decided per fit from measured costs: SVI's ``fit(jit=None)`` and the lockstep
sampler's ``fit(guide="mcmc", jit="auto")``.

Compiling pays when the time it saves over the remaining steps exceeds the time it takes:

    compile  <=>  C + R * t_c  <  R * t_e

with ``R`` the steps left, ``t_e`` the eager step (measured on this fit: SVI times its first
:data:`PROBE_STEPS` steps after the validated first one; the lockstep sampler the leapfrog steps
of its first iterations, :mod:`bayes_fusion.infer.mcmc.compile_choice`), ``t_c`` the compiled
step and ``C`` the compile time. A *step* is an SVI step (engines ``"steps"``, whole steps, and
``"loss"``, the compiled loss) or one batched leapfrog step of every chain (engine
``"leapfrog"``). ``C`` and ``t_c / t_e`` come from what this machine measured before
(:class:`CostRecords`, a small JSON file beside inductor's on-disk cache,
:func:`~bayes_fusion.infer.compile_cache.costs_path`):

* the same graph compiled before, cache on: its last warm compile (graph loaded from the
  cache), or its cold compile times :data:`WARM_FRACTION` when it was only ever built;
* a graph not seen before (or the cache off): the median cold compile of the graphs this
  machine did build with the same engine, else :data:`DEFAULT_COLD_COMPILE_S`
  (:data:`DEFAULT_FUSED_COLD_COMPILE_S` for several SVI steps fused into one call);
* ``t_c / t_e``: this graph's measured ratio, else the median of the machine's for the engine,
  else :data:`DEFAULT_STEP_RATIO`.

After a compiled fit, its compile time (cold or warm, as the cache counters say) and the step
ratio it reached are recorded, so the next prediction is this machine's own. The choice, its
prediction and what happened are in ``FitResult.info["jit_choice"]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from .compile_cache import CacheUse, cache_enabled, costs_path

__all__ = [
    "DEFAULT_COLD_COMPILE_S",
    "DEFAULT_FUSED_COLD_COMPILE_S",
    "DEFAULT_STEP_RATIO",
    "PROBE_STEPS",
    "WARM_FRACTION",
    "CompileChoice",
    "CostRecords",
    "Prediction",
    "choose",
    "graph_signature",
]

#: eager steps timed (after the first, validated one) before ``jit=None`` decides
PROBE_STEPS = 10
#: a cold compile's seconds when this machine has none on record (2-core CPUs measured 15-20 s
#: for one whole step of the SVI benchmark model, 7-9 s on a fast day once inductor's ISA
#: probes were skipped; kept on the safe side: a fit that compiles only when it pays;
#: benchmarks/results)
DEFAULT_COLD_COMPILE_S = 20.0
#: the same for several whole SVI steps unrolled into one call (engine ``"steps xK"``,
#: ``jit="fused"``: 29-49 s for 8 steps on a 2-core Intel CPU, ~90 s on a 2-core AMD one)
DEFAULT_FUSED_COLD_COMPILE_S = 60.0
#: a warm compile (every graph loaded from inductor's cache) as a fraction of the cold one,
#: where only the cold one is on record (measured 0.15-0.25)
WARM_FRACTION = 0.25
#: compiled step over eager step, per compiled engine, where none is on record (measured on a
#: 2-core CPU: 0.09-0.15 for whole SVI steps, 0.4-0.6 for the compiled loss, 0.12-0.17 for a
#: batched leapfrog step of 16 chains: 1.0 ms against 5-8 ms on the benchmarks' CP and XOX models;
#: 0.07-0.1 per step for 8 fused SVI steps, engine ``"steps xK"``: key ``"fused"``)
DEFAULT_STEP_RATIO = {"steps": 0.25, "loss": 0.6, "leapfrog": 0.2, "fused": 0.1}


def graph_signature(engine: str, steps_per_call: int, model, params, batch, extra=()) -> str:
    """A key of what the compiled graph depends on: engine, steps per call, model and layer
    classes, parameter and data shapes / dtypes / devices, torch version, and ``extra`` (a
    tuple of anything else it depends on, e.g. the potential's kind)."""
    tensors = list(_tensors(batch))
    parts = (
        engine,
        steps_per_call,
        tuple(extra),
        torch.__version__,
        type(model).__qualname__,
        type(getattr(model, "layer", None)).__qualname__,
        tuple((tuple(p.shape), str(p.dtype), str(p.device)) for p in params),
        tuple((tuple(t.shape), str(t.dtype), str(t.device)) for t in tensors),
    )
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:20]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted costs of compiling one fit's graph.

    :param compile_s: seconds to compile. :param step_ratio: compiled step / eager step.
    :param basis: where the numbers come from, in words.
    """

    compile_s: float
    step_ratio: float
    basis: str


class CostRecords:
    """This machine's measured compile costs, per graph signature, in a JSON file.

    :param path: the file (``None``: :func:`~bayes_fusion.infer.compile_cache.costs_path`).
        An unreadable file reads as empty; one that cannot be written is left as it is (the
        records only sharpen predictions).
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else costs_path()
        try:
            self.entries: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def _of_engine(self, engine: str, key: str) -> list[float]:
        return [e[key] for e in self.entries.values() if e.get("engine") == engine and key in e]

    def predict(self, signature: str, engine: str, cache_on: bool | None = None) -> Prediction:
        """The predicted compile time and step ratio of graph ``signature`` of ``engine``
        (``"steps"``, ``"steps xK"`` for K fused steps, ``"loss"`` or ``"leapfrog"``), with the
        on-disk cache on or off (``None``: as configured)."""
        cache_on = cache_enabled() if cache_on is None else cache_on
        fused = engine.startswith("steps x")
        own = self.entries.get(signature, {})
        ratios = self._of_engine(engine, "step_ratio")
        if "step_ratio" in own:
            ratio = own["step_ratio"]
        elif ratios:
            ratio = statistics.median(ratios)
        else:
            ratio = DEFAULT_STEP_RATIO["fused" if fused else engine]
        if cache_on and "warm_s" in own:
            return Prediction(own["warm_s"], ratio, "this graph's last warm compile here")
        if cache_on and "cold_s" in own:
            return Prediction(
                own["cold_s"] * WARM_FRACTION, ratio, "this graph's cold compile here, cached"
            )
        if "cold_s" in own:
            return Prediction(own["cold_s"], ratio, "this graph's cold compile here")
        colds = self._of_engine(engine, "cold_s")
        if colds:
            return Prediction(statistics.median(colds), ratio, "this machine's cold compiles")
        default = DEFAULT_FUSED_COLD_COMPILE_S if fused else DEFAULT_COLD_COMPILE_S
        return Prediction(default, ratio, "the default (nothing on record)")

    def record(
        self,
        signature: str,
        engine: str,
        compile_s: float,
        cache: CacheUse | None,
        step_ratio: float | None,
    ) -> None:
        """Keep one compiled fit's costs (its compile as cold or warm, by ``cache``)."""
        entry = dict(self.entries.get(signature, {}), engine=engine)
        state = cache.state if cache is not None else "partly warm"
        if state in ("cold", "off"):
            entry["cold_s"] = round(compile_s, 3)
        elif state == "warm":
            entry["warm_s"] = round(compile_s, 3)
        if step_ratio is not None and step_ratio > 0:
            entry["step_ratio"] = round(step_ratio, 4)
        self.entries[signature] = entry
        self._write()

    def steps_per_iteration(self, signature: str) -> float | None:
        """The leapfrog steps per iteration a lockstep fit of graph ``signature`` took on average
        when last run here (``None``: never)."""
        value = self.entries.get(signature, {}).get("steps_per_iteration")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    def record_steps_per_iteration(self, signature: str, engine: str, steps: float) -> None:
        """Keep the leapfrog steps per iteration of one lockstep fit (compiled or eager)."""
        entry = dict(self.entries.get(signature, {}), engine=engine)
        entry["steps_per_iteration"] = round(float(steps), 2)
        self.entries[signature] = entry
        self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass


@dataclasses.dataclass
class CompileChoice:
    """``jit=None``'s decision for one fit, and what came of it.

    :param compile: whether to compile. :param engine: ``"steps"`` (whole steps), ``"loss"`` or
        ``"leapfrog"``.
    :param remaining: steps left at the decision. :param eager_ms: the measured eager step.
    :param prediction: the predicted compile costs.
    """

    compile: bool
    engine: str
    remaining: int
    eager_ms: float
    prediction: Prediction

    @property
    def predicted_eager_s(self) -> float:
        """Seconds the remaining steps take eagerly."""
        return self.remaining * self.eager_ms / 1e3

    @property
    def predicted_compiled_s(self) -> float:
        """Seconds the remaining steps take compiled, the compile included."""
        step_s = self.eager_ms * self.prediction.step_ratio / 1e3
        return self.prediction.compile_s + self.remaining * step_s

    def report(self, compile_s=None, compiled_step_ms=None, cache: CacheUse | None = None) -> dict:
        """The record ``FitResult.info["jit_choice"]`` holds."""
        out = {
            "chosen": "compiled " + self.engine if self.compile else "eager",
            "remaining_steps": self.remaining,
            "eager_step_ms": round(self.eager_ms, 4),
            "predicted": {
                "compile_s": round(self.prediction.compile_s, 3),
                "compiled_step_ms": round(self.eager_ms * self.prediction.step_ratio, 4),
                "eager_s": round(self.predicted_eager_s, 3),
                "compiled_s": round(self.predicted_compiled_s, 3),
                "basis": self.prediction.basis,
            },
        }
        if compile_s is not None:
            out["actual"] = {
                "compile_s": round(compile_s, 3),
                "compiled_step_ms": None
                if compiled_step_ms is None
                else round(compiled_step_ms, 4),
                "cache": cache.state if cache is not None else None,
            }
        return out


def choose(remaining: int, eager_ms: float, engine: str, prediction: Prediction) -> CompileChoice:
    """Compile when the predicted compile time plus the compiled steps beat the eager steps."""
    choice = CompileChoice(False, engine, remaining, eager_ms, prediction)
    choice.compile = choice.predicted_compiled_s < choice.predicted_eager_s
    return choice
