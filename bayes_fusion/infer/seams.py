"""Every use of a private attribute of Pyro or torch in the package, in one place.

Each seam is a function or class here, named for what it does, with a test
(``tests/test_seams.py``) that fails loudly when the library underneath moves it. Where a public
API serves, the package uses that instead; what is left has none:

* Pyro's NUTS kernel keeps its adaptation, iteration counter, cached potential energy and
  divergences in private attributes (``_adapter``, ``_initial_params``, ``_t``,
  ``_warmup_steps``, ``_fetch_from_cache``, ``_kinetic_energy``, ``_mean_accept_prob``,
  ``_divergences``): :func:`nuts_kernel_class` builds the one NUTS subclass that starts warm-up
  from a given metric, runs a Gibbs block after every step and records the per-draw statistics
  ArviZ reads (energy, step size, acceptance, leapfrog steps, log density, divergences).
* ``AutoContinuous._unpack_latent`` splits a joint draw of the packed latent vector into sites
  (:func:`unpack_latent`).
* Dynamo keeps its compiled graphs, and counts recompilations, per code object; a fresh code
  object per compiled function keeps one fit's graphs from using up another's recompile
  budget (:func:`private_code`).
* Inductor's on-disk cache: where it lives by default
  (``cache_dir_utils.default_cache_dir``), how often a compile hit or missed it (dynamo's
  ``counters``), and the config switches that turn it off (``fx_graph_cache``,
  ``enable_autograd_cache``): :func:`inductor_cache_dir`,
  :func:`inductor_cache_counts`, :func:`inductor_caches_off`.
* Inductor's probe builds of the CPU's vector instruction sets (``cpu_vec_isa``: the ISAs the
  CPU lists, the one it picks, and the config switch ``cpp.vec_isa_ok`` that skips the
  probes): :func:`trusted_vector_isa`.
* A chain's worker process must import this very package even when it is not installed (a
  source checkout): :func:`worker_environment` puts its root on ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path

import torch
from pyro.infer import NUTS
from pyro.ops.integrator import potential_grad

__all__ = [
    "SAMPLE_STATS",
    "inductor_cache_counts",
    "inductor_cache_dir",
    "inductor_caches_off",
    "nuts_kernel_class",
    "private_code",
    "trusted_vector_isa",
    "unpack_latent",
    "worker_environment",
]

#: the per-draw NUTS statistics :func:`nuts_kernel_class` records (ArviZ's ``sample_stats``
#: names)
SAMPLE_STATS = ("diverging", "energy", "step_size", "n_steps", "lp", "acceptance_rate")


def nuts_kernel_class(metric: dict | None = None, gibbs: bool = False) -> type:
    """A subclass of Pyro's ``NUTS`` whose warm-up starts from ``metric`` (``None``: Pyro's
    identity), that runs the Gibbs block of its ``potential_fn`` after every NUTS step when
    ``gibbs`` (``gibbs_init`` / ``gibbs_update``: the potential changes with the block's state,
    so the cached energy is dropped after each update), and that records per-draw statistics.

    The kernel's extra methods: ``draw_stats()`` -- stat name (:data:`SAMPLE_STATS`) -> list of
    one float per draw after warm-up; ``block_draws()`` -- the Gibbs block's draws after warm-up,
    name -> ``(S, ...)`` (``{}`` without a block); ``in_warmup()``; ``divergences()`` -- the
    indices of divergent transitions after warm-up.

    :param metric: Pyro's ``{tuple of site names: inverse mass matrix}``.
    :param gibbs: run the potential's Gibbs block.
    """

    class _Kernel(NUTS):
        def setup(self, warmup_steps, *args, **kwargs):
            self._block = []
            self._stats = {name: [] for name in SAMPLE_STATS}
            self._first_kinetic = None
            if gibbs:
                self.potential_fn.gibbs_init(self.initial_params)
            super().setup(warmup_steps, *args, **kwargs)

        def _initialize_adapter(self):
            super()._initialize_adapter()
            if metric is None:
                return
            adapter = self._adapter.mass_matrix_adapter
            if set(adapter.inverse_mass_matrix) == set(metric):
                adapter.inverse_mass_matrix = {k: v.clone() for k, v in metric.items()}
                if self._adapter.adapt_step_size:
                    self._adapter.reset_step_size_adaptation(self._initial_params)

        def _kinetic_energy(self, r_unscaled):
            energy = super()._kinetic_energy(r_unscaled)
            if self._first_kinetic is None:  # the trajectory's start: the draw's momentum
                self._first_kinetic = float(energy)
            return energy

        def in_warmup(self) -> bool:
            return self._t < self._warmup_steps

        def divergences(self) -> list[int]:
            return [int(i) for i in self._divergences]

        def sample(self, params):
            warm = self.in_warmup()
            z_start, start_energy, _ = self._fetch_from_cache()
            if z_start is None:  # after a Gibbs update: evaluate the start as NUTS would
                grads, start_energy = potential_grad(self.potential_fn, params)
                self._cache(params, start_energy, grads)
            mean_before, step_size = self._mean_accept_prob, self.step_size
            evaluations = getattr(self.potential_fn, "evaluations", 0)
            self._first_kinetic = None
            z = super().sample(params)
            if not warm:
                n = self._t - self._warmup_steps  # draws so far (the running mean's count)
                stats = self._stats
                stats["acceptance_rate"].append(self._mean_accept_prob * n - mean_before * (n - 1))
                stats["step_size"].append(float(step_size))
                diverged = bool(self._divergences) and self._divergences[-1] == n - 1
                stats["diverging"].append(float(diverged))
                after = getattr(self.potential_fn, "evaluations", 0)
                stats["n_steps"].append(float(after - evaluations))
                potential = self._fetch_from_cache()[1]
                stats["lp"].append(-float(potential) if potential is not None else float("nan"))
                stats["energy"].append(float(start_energy) + self._first_kinetic)
            if gibbs:
                draw = self.potential_fn.gibbs_update(z)
                self.clear_cache()
                if not warm:
                    self._block.append(draw)
            return z

        def draw_stats(self) -> dict[str, list[float]]:
            return {k: list(v) for k, v in self._stats.items()}

        def block_draws(self) -> dict[str, torch.Tensor]:
            if not self._block:
                return {}
            return {k: torch.stack([d[k] for d in self._block]) for k in self._block[0]}

    return _Kernel


def unpack_latent(guide, latent: torch.Tensor):
    """``guide._unpack_latent(latent)``: ``(site, unconstrained value)`` pairs of an
    ``AutoContinuous`` guide's packed latent draw."""
    return guide._unpack_latent(latent)


def private_code(function: types.FunctionType, name: str) -> types.FunctionType:
    """``function`` with a code object of its own named ``name`` (same globals and closure):
    dynamo keeps compiled graphs, and its recompile limit, per code object."""
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(
        code, function.__globals__, closure=function.__closure__, name=function.__name__
    )


def worker_environment(threads: int) -> dict[str, str]:
    """The environment of a chain's worker process: ``threads`` OpenMP threads, and this
    package's root first on ``PYTHONPATH`` (a source checkout that is not installed)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)


def inductor_cache_dir() -> Path:
    """The directory of inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR`` when set,
    otherwise torch's default, ``<tmp>/torchinductor_<user>``)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()).absolute()


def inductor_cache_counts() -> tuple[int, int]:
    """``(hits, misses)`` of inductor's FX-graph cache in this process so far."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"])


@contextlib.contextmanager
def inductor_caches_off():
    """Inside: compiles neither read nor write inductor's FX-graph cache and AOTAutograd's
    cache."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with (
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    ):
        yield


def _aten_runs_inductor_isa() -> bool:
    """Whether torch's own kernels already run, in this process, with the vector ISA inductor
    would pick on this CPU (x86 only; never for AMX, which needs a per-process permission)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    from torch._inductor import cpu_vec_isa

    width = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    listed = set(cpu_vec_isa.x86_isa_checker())
    candidates = [
        str(isa).split()
        for isa in cpu_vec_isa.supported_vec_isa_list
        if all(flag in listed for flag in str(isa).split())
    ]
    if width is None or not candidates:
        return False
    pick = candidates[0]
    return pick[0] == width and "amx_tile" not in pick


@contextlib.contextmanager
def trusted_vector_isa():
    """Inside: inductor trusts the CPU's listed vector ISAs instead of probing them, where
    torch's own kernels already run with the one it would pick.

    Before its first C++ build with an empty cache, inductor builds and loads (in a subprocess)
    a test program per vector ISA the CPU lists, to learn what compiler and OS support: on a
    2-core AVX-512 CPU six builds and three loads, ~6 s -- half of a cold compile of the SVI
    step, more than the graph's own build. ATen has settled the OS's half at start-up
    (``torch.backends.cpu.get_cpu_capability()``: ``"AVX512"`` means this process runs AVX-512
    kernels); when that is the width inductor would pick (and no AMX, which needs a per-process
    permission), inductor's ``cpp.vec_isa_ok`` is set inside. Should the compiler not build for
    the ISA, the graph's build fails and the caller runs eagerly after a warning. Nothing
    changes where ``cpp.vec_isa_ok`` is already set, on other CPUs, or when torch lacks these
    internals.
    """
    try:
        import torch._inductor.config as inductor_config

        trusted = inductor_config.cpp.vec_isa_ok is None and _aten_runs_inductor_isa()
    except (ImportError, AttributeError, OSError):  # torch without them; no /proc/cpuinfo
        trusted = False
    if not trusted:
        yield
        return
    with inductor_config.patch({"cpp.vec_isa_ok": True}):
        yield
