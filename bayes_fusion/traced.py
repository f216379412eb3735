"""Run a tensor function through ``torch.jit.trace``, checked against the eager function.

An SVI step of a small fusion model is a few hundred tiny tensor operations; calling them from
Python one by one costs more than the arithmetic. :class:`TracedFunction` records the function
once per input structure (nesting, non-tensor values, shapes, dtypes, devices) and replays the
recorded graph afterwards. Random draws are part of the graph (fresh on every call, from the
same generator in the same order as the eager function).

A trace replays the path the inputs of its first call took: Python branches on tensor *values*
would be frozen. So each new trace is checked once -- the traced and the eager function are
evaluated from the same random state and must agree -- and a function that fails the check is
run eagerly from then on (with a warning naming the difference).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["TracedFunction", "flatten_tensors", "unflatten_tensors"]


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


class TracedFunction:
    """``fn(*args)`` -> scalar tensor, traced once per input structure and checked.

    :param fn: a function of nested lists/tuples/dicts of tensors (and constants) returning a
        tensor. Tensors that require gradients must be passed in ``args``, never captured.
    :param extra_key: called on every call; its (hashable) value joins the cache key, for
        Python values ``fn`` reads from outside its arguments (e.g. a likelihood weight).
    :param rtol: relative tolerance of the trace check.
    :param name: what to call ``fn`` in the warning.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        extra_key: Callable[[], Any] | None = None,
        rtol: float = 1e-4,
        name: str = "function",
    ) -> None:
        self.fn = fn
        self.extra_key = extra_key
        self.rtol = rtol
        self.name = name
        self._cache: dict[Any, Any] = {}
        self.num_traces = 0

    def _flat_fn(self, spec):
        def flat(*tensors):
            return self.fn(*unflatten_tensors(spec, tensors))

        return flat

    def __call__(self, *args) -> Tensor:
        tensors, spec = flatten_tensors(args)
        key = (
            _spec_key(spec),
            tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in tensors),
            self.extra_key() if self.extra_key is not None else None,
        )
        traced = self._cache.get(key)
        if traced is None:
            traced = self._trace(spec, tensors)
            self._cache[key] = traced
            if traced is not False:
                return traced[1]  # the checked first output
        if traced is False:
            return self.fn(*args)
        return traced[0](*tensors)

    def _trace(self, spec, tensors):
        """Trace, check against the eager function; (graph, first output) or False."""
        flat = self._flat_fn(spec)
        device = next((t.device for t in tensors), torch.device("cpu"))
        start = _RandomState(device)
        with warnings.catch_warnings():
            # the tracer warns about every Python-side use of a tensor value (input checks);
            # the check below is what decides whether the trace can be trusted
            warnings.simplefilter("ignore")
            graph = torch.jit.trace(flat, tuple(tensors), check_trace=False)
        self.num_traces += 1
        start.restore()
        with torch.no_grad():
            expected = float(flat(*tensors))
        start.restore()
        out = graph(*tensors)
        got = float(out.detach())
        if not (
            math.isfinite(got) == math.isfinite(expected)
            and (
                not math.isfinite(got) or abs(got - expected) <= self.rtol * max(1.0, abs(expected))
            )
        ):
            warnings.warn(
                f"{self.name}: the traced graph gives {got!r} where the eager function gives "
                f"{expected!r} (Python control flow on tensor values?); running it eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            start.restore()
            return False
        return graph, out
