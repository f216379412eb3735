"""Run a tensor function through ``torch.compile``, checked against the eager function.

An SVI step of a small fusion model is a few hundred tiny tensor operations; calling them from
Python one by one costs more than the arithmetic. :class:`CompiledFunction` compiles the
function (forward and, through AOTAutograd, backward) into one graph per input structure
(nesting, non-tensor values, shapes, dtypes, devices) with ``torch.compile(fullgraph=True)``
and inductor; random draws stay in the graph and come from the same generator in the same
order as in the eager function (inductor's ``fallback_random``).

A function whose Python ``torch.compile`` cannot follow -- a user's Pyro model runs its effect
handlers, context managers that dynamo refuses -- can be *traced* first (``trace=True``):
``make_fx`` runs it once and records its tensor operations (forward, and the backward of
``torch.func.grad`` inside it) as an aten graph, which is then compiled. The Python runs only at
trace time, so the function's operations must not depend on tensor values; a function under
``torch.func.vmap`` qualifies (vmap refuses value-dependent branches).

Each new compilation is checked once -- the compiled and the eager function are evaluated
from the same random state and must agree -- and a function that fails the check, or fails to
compile, runs eagerly from then on (with one warning naming the reason). "Agree" allows for
float rounding: within ``rtol`` of each output's scale, or, where the function is so
ill-conditioned at these inputs that rounding alone moves its output further (a float32
gradient after cancellations), within :data:`ROUNDING_SLACK` times the change the eager
function itself shows when every input moves by one unit in the last place -- never beyond
:data:`ROUNDING_RTOL_MAX` of the scale, so a wrong graph is still caught. Compiling costs
seconds (about 15-20 s for an SVI loss on a 2-core CPU, a few seconds when inductor's on-disk
cache holds the graph: :mod:`~bayes_fusion.infer.compile_cache`):
:attr:`CompiledFunction.compile_seconds` records it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx

from .compile_cache import CacheUse, caching
from .seams import private_code

__all__ = ["CompiledFunction", "flatten_tensors", "unflatten_tensors"]


def flatten_tensors(obj) -> tuple[list[Tensor], Any]:
    """Split nested lists/tuples/dicts into their tensors and a hashable structure spec."""
    tensors: list[Tensor] = []

    def walk(x):
        if isinstance(x, Tensor):
            tensors.append(x)
            return ("T",)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(walk(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple(x), tuple(walk(v) for v in x.values()))
        if x is None or isinstance(x, (bool, int, float, str)):
            return ("C", x)
        return ("O", id(x), x)  # any other object: kept as is, keyed by identity

    spec = walk(obj)
    return tensors, spec


def unflatten_tensors(spec, tensors) -> Any:
    """Inverse of :func:`flatten_tensors`."""
    it = iter(tensors)

    def build(s):
        kind = s[0]
        if kind == "T":
            return next(it)
        if kind in ("list", "tuple"):
            items = [build(v) for v in s[1]]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            return {k: build(v) for k, v in zip(s[1], s[2], strict=True)}
        return s[1] if kind == "C" else s[2]

    return build(spec)


def _spec_key(spec):
    """Hashable key of a spec (objects by identity)."""
    if spec[0] == "O":
        return ("O", spec[1])
    if spec[0] in ("list", "tuple"):
        return (spec[0], tuple(_spec_key(v) for v in spec[1]))
    if spec[0] == "dict":
        return ("dict", spec[1], tuple(_spec_key(v) for v in spec[2]))
    return spec


#: a compiled output beyond ``rtol`` still agrees within this many times the eager function's
#: own rounding noise (:func:`_rounding_noise`) ...
ROUNDING_SLACK = 8.0
#: ... but never beyond this fraction of the output's scale
ROUNDING_RTOL_MAX = 1e-2


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _agree(got, expected, rtol: float, noise: list[float] | None = None):
    """Whether a compiled output (a tensor or a tuple of tensors) matches the eager one: every
    entry within ``rtol`` relative to the larger of 1 and the largest eager magnitude (the
    output's scale) -- or, given the eager function's rounding ``noise`` per output, within
    ``ROUNDING_SLACK * noise`` up to ``ROUNDING_RTOL_MAX`` of the scale -- and finite where
    the eager entry is. Returns ``(agree, compiled entry, eager entry)``, the entries those of
    the first disagreement (as floats)."""
    for i, (g, w) in enumerate(zip(_outputs(got), _outputs(expected), strict=True)):
        g, w = g.detach().double(), w.detach().double()
        same_finite = torch.isfinite(g) == torch.isfinite(w)
        both = torch.isfinite(g) & torch.isfinite(w)
        scale = max(1.0, float(w[both].abs().max())) if bool(both.any()) else 1.0
        tolerance = rtol * scale
        if noise is not None:
            allowed = min(ROUNDING_RTOL_MAX * scale, ROUNDING_SLACK * noise[i])
            tolerance = max(tolerance, allowed)
        close = (g - w).abs() <= tolerance
        bad = ~same_finite | (both & ~close)
        if bool(bad.any()):
            at = int(torch.nonzero(bad.flatten())[0])
            return False, float(g.flatten()[at]), float(w.flatten()[at])
    return True, 0.0, 0.0


def _rounding_noise(flat, tensors, expected, start: _RandomState) -> list[float]:
    """Per output of ``flat``, the largest change of the eager output ``expected`` when every
    floating-point input moves by one unit in the last place (up, then down; the same random
    state for each call): how far float rounding alone moves the output at these inputs.
    Leaves the random generators as it found them."""
    after = _RandomState(start.device)
    wants = _outputs(expected)
    noise = [0.0] * len(wants)
    with torch.no_grad():
        for towards in (math.inf, -math.inf):
            moved = [
                torch.nextafter(t.detach(), torch.full_like(t, towards))
                if t.is_floating_point()
                else t
                for t in tensors
            ]
            start.restore()
            for i, (m, w) in enumerate(zip(_outputs(flat(*moved)), wants, strict=True)):
                change = (m.detach().double() - w.detach().double()).abs()
                finite = change[torch.isfinite(change)]
                if finite.numel():
                    noise[i] = max(noise[i], float(finite.max()))
    after.restore()
    return noise


class _RandomState:
    """Snapshot of the generators a call on ``device`` draws from."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class CompiledFunction:
    """``fn(*args)`` -> a tensor (or a tuple of tensors), compiled once per input structure and
    checked.

    :param fn: a function of nested lists/tuples/dicts of tensors (and constants) returning a
        tensor, free of Python control flow on tensor values. Tensors that require gradients
        must be passed in ``args``, never captured.
    :param rtol: relative tolerance of the check against the eager function (see the module
        doc for the allowance beyond it where rounding alone moves the output further).
    :param name: what to call ``fn`` in the warning.
    :param trace: record ``fn``'s tensor operations with ``make_fx`` first and compile that
        graph (see the module doc); for functions called without autograd (under
        ``torch.no_grad``; ``torch.func`` transforms inside are fine).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        rtol: float = 1e-4,
        name: str = "function",
        trace: bool = False,
    ) -> None:
        self.fn = fn
        self.rtol = rtol
        self.name = name
        self.trace = trace
        self._cache: dict[Any, Any] = {}
        self.num_compiles = 0
        #: seconds spent compiling (first calls of every input structure), in all
        self.compile_seconds = 0.0
        self.failed: str | None = None
        #: what inductor's on-disk cache did for each compilation
        #: (:mod:`~bayes_fusion.infer.compile_cache`)
        self.cache_uses: list[CacheUse] = []

    def _flat_fn(self, spec):
        def flat(*tensors):
            return self.fn(*unflatten_tensors(spec, tensors))

        # a private code object per instance and structure: dynamo keeps its compiled graphs
        # (and counts recompilations, giving up after 8) per code object, so one shared
        # ``flat`` would stop compiling after a few fits in one process
        return private_code(flat, f"flat_{id(self):x}_{len(self._cache)}")

    def __call__(self, *args) -> Tensor:
        if self.failed is not None:
            return self.fn(*args)
        tensors, spec = flatten_tensors(args)
        key = (
            _spec_key(spec),
            tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors),
        )
        compiled = self._cache.get(key)
        if compiled is None:
            compiled, out = self._compile(spec, tensors)
            if compiled is None:
                return self.fn(*args)
            self._cache[key] = compiled
            return out  # the checked first output
        return compiled(*tensors)

    def _compile(self, spec, tensors):
        """Compile, run once, check against the eager function: (compiled, its output) or
        (None, None) after a warning (then every later call runs eagerly)."""
        flat = self._flat_fn(spec)
        device = next((t.device for t in tensors), torch.device("cpu"))
        start = _RandomState(device)
        t0 = time.perf_counter()
        try:
            graph = flat
            if self.trace:
                with torch.no_grad():
                    graph = make_fx(flat)(*tensors)
                start.restore()  # tracing ran the function: its draws come again
            compiled = torch.compile(
                graph, fullgraph=True, dynamic=False, options={"fallback_random": True}
            )
            with warnings.catch_warnings(), caching() as cache:
                # the compiler's own use of deprecated torch APIs is nothing a caller can act on
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
                if any(t.requires_grad for t in tensors):
                    # the backward graph compiles on its first use: warm it here, on copies
                    # (the caller's ``out`` keeps its own graph for its single backward pass)
                    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
                    warm = compiled(*copies)
                    leaves = [t for t in copies if t.requires_grad]
                    torch.autograd.grad(warm, leaves, allow_unused=True)
                    start.restore()
                out = compiled(*tensors)
            self.cache_uses.append(cache.use())
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            return self._give_up(
                f"torch.compile failed ({type(exc).__name__}: {first_line})", start
            )
        finally:
            self.compile_seconds += time.perf_counter() - t0
        self.num_compiles += 1
        start.restore()
        with torch.no_grad():
            expected = flat(*tensors)
        agree, got, want = _agree(out, expected, self.rtol)
        if not agree:  # beyond rtol: within what float rounding alone does here?
            noise = _rounding_noise(flat, tensors, expected, start)
            agree, got, want = _agree(out, expected, self.rtol, noise)
        if not agree:
            return self._give_up(
                f"the compiled graph gives {got!r} where the eager function gives {want!r} "
                "(Python control flow on tensor values?)",
                start,
            )
        return compiled, out

    def _give_up(self, reason: str, start: _RandomState):
        self.failed = reason
        warnings.warn(f"{self.name}: {reason}; running it eagerly", RuntimeWarning, stacklevel=4)
        start.restore()
        return None, None
