"""Inductor's on-disk compile caches, as the library's compiled paths use them.

Every ``torch.compile`` of the library (the whole SVI steps of ``fit(jit=...)``, the compiled
loss, the compiled potentials of the samplers) goes through :func:`caching`. Inductor keeps
what it compiled on disk (its FX-graph cache; AOTAutograd's cache for compiled backward
passes), keyed by the graph, so a second process that compiles the same graph -- the same
model and data shapes, dtype, device and torch version -- loads the kernels instead of
generating and building them: seconds instead of tens of seconds on a small CPU. The
library's graphs take every per-fit number (learning rate, step count, KL warm-up) as an
input, so fits of different lengths share one graph.

Where: ``TORCHINDUCTOR_CACHE_DIR`` when set, otherwise torch's default
(``<tmp>/torchinductor_<user>``); :func:`cache_dir` says which. The library keeps its measured
compile costs (:mod:`bayes_fusion.infer.jit_choice`) beside inductor's files, in
``<cache dir>/bayes_fusion/compile_costs.json``, so that clearing the directory forgets both
(``BAYES_FUSION_COMPILE_COSTS`` names another file).

Off switch: set the environment variable ``BAYES_FUSION_COMPILE_CACHE=0`` (or ``off``,
``false``, ``no``): the library's compiles then neither read nor write the caches, and every
compile is a cold one (other code's ``torch.compile`` calls are not affected).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from .seams import (
    inductor_cache_counts,
    inductor_cache_dir,
    inductor_caches_off,
    trusted_vector_isa,
)

__all__ = [
    "CACHE_ENV",
    "COSTS_ENV",
    "CacheUse",
    "cache_dir",
    "cache_enabled",
    "caching",
    "costs_path",
]

#: the environment variable that turns the library's use of the on-disk caches off
CACHE_ENV = "BAYES_FUSION_COMPILE_CACHE"
#: the environment variable naming the compile-cost records' file (default: in the cache dir)
COSTS_ENV = "BAYES_FUSION_COMPILE_COSTS"


def cache_enabled() -> bool:
    """Whether the library's compiles use inductor's on-disk caches (see :data:`CACHE_ENV`)."""
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """The directory of inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR`` or torch's
    default)."""
    return inductor_cache_dir()


def costs_path() -> Path:
    """The file of the library's measured compile costs: :data:`COSTS_ENV` when set, otherwise
    ``<cache_dir()>/bayes_fusion/compile_costs.json``."""
    given = os.environ.get(COSTS_ENV)
    if given:
        return Path(given)
    return cache_dir() / "bayes_fusion" / "compile_costs.json"


@dataclasses.dataclass(frozen=True)
class CacheUse:
    """What the on-disk cache did for one compile.

    :param enabled: the cache was on (:func:`cache_enabled`).
    :param hits: compiled graphs loaded from the cache.
    :param misses: compiled graphs generated and built (then stored).
    """

    enabled: bool
    hits: int
    misses: int

    @property
    def state(self) -> str:
        """``"off"``, ``"warm"`` (every graph loaded), ``"cold"`` (every graph built) or
        ``"partly warm"``."""
        if not self.enabled:
            return "off"
        if self.misses == 0:
            return "warm"
        return "cold" if self.hits == 0 else "partly warm"


class _Counting:
    """The cache counters at the start of a :func:`caching` block."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = inductor_cache_counts()

    def use(self) -> CacheUse:
        """What the cache did since the block began."""
        hits, misses = inductor_cache_counts()
        return CacheUse(self.enabled, hits - self.start[0], misses - self.start[1])


@contextlib.contextmanager
def caching():
    """Compile inside this block to use the on-disk caches as configured (off when
    :data:`CACHE_ENV` says so); yields an object whose ``use()`` gives the block's
    :class:`CacheUse`.

    An empty cache also holds none of inductor's probe builds of the CPU's vector ISAs (~6 s
    on a 2-core CPU); inside the block they are skipped where torch's own kernels already run
    with the ISA inductor would pick (:func:`~bayes_fusion.infer.seams.trusted_vector_isa`).
    """
    enabled = cache_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(trusted_vector_isa())
        if not enabled:
            stack.enter_context(inductor_caches_off())
        yield _Counting(enabled)
