"""Trouble during a fit: the error that stops training on a non-finite loss, the diagnosis that
names the offending sites, the warning for a layer whose components all collapsed, and our own
input errors kept free of the shape table Pyro's tracer appends to them."""

from __future__ import annotations

import contextlib
import os
import warnings

import pyro
import torch
from pyro import poutine

from ..layers.base import rank_layers
from ..rank import effective_rank_draws

__all__ = [
    "NonFiniteLossError",
    "non_finite_error",
    "refused_non_finite",
    "warn_on_collapse",
    "without_trace_shapes",
]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NonFiniteLossError(FloatingPointError):
    """Raised when the ELBO (or a gradient) becomes NaN/inf; training stops at once."""


def refused_non_finite(exc: ValueError) -> bool:
    """Whether ``exc`` is Pyro's validation refusing NaN/inf distribution parameters (how a
    non-finite loss shows up with validation on, before any loss is computed)."""
    return "invalid values" in str(exc)


def _raised_in_package(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by this package's own code (its innermost frame)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep)


@contextlib.contextmanager
def without_trace_shapes():
    """Re-raise the package's own errors as they were raised. Pyro's tracer re-raises a
    ``ValueError`` / ``RuntimeError`` from inside a model with its "Trace Shapes:" table appended
    (once per nested trace); for our input checks -- which already name the argument, what was
    expected and what was given -- that table buries the message. Errors from a user's own
    model code keep it. Usable as a decorator."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        root = exc
        while (
            "Trace Shapes:" in str(root)
            and root.__cause__ is not None
            and type(root.__cause__) is type(root)
        ):
            root = root.__cause__
        if root is not exc and _raised_in_package(root):
            raise root.with_traceback(root.__traceback__) from None
        raise


def _find_bad_sites(model, guide, args) -> list[str]:
    """Sites (or params) whose value or log-density is not finite, for the error message."""
    bad = []
    for name, value in pyro.get_param_store().items():
        if not bool(torch.isfinite(value).all()):
            bad.append(f"param {name}")
    try:
        with poutine.block(), torch.no_grad():
            g = poutine.trace(guide).get_trace(*args)
            m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args)
        for tr in (g, m):
            for name, site in tr.nodes.items():
                if site["type"] != "sample":
                    continue
                if not bool(torch.isfinite(site["value"]).all()):
                    bad.append(f"site {name} (value)")
                elif not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all()):
                    bad.append(f"site {name} (log density)")
    except Exception as exc:  # noqa: BLE001 - diagnosis must not hide the original error
        bad.append(f"(tracing failed: {type(exc).__name__}: {exc})")
    return sorted(set(bad))


def non_finite_error(step: int, loss: float, model, guide, batch) -> NonFiniteLossError:
    """The error for a non-finite loss at ``step``, naming the offending sites of ``batch``."""
    bad = _find_bad_sites(model, guide, batch) or "unknown"
    return NonFiniteLossError(
        f"fit: non-finite loss {loss} at step {step}; offending: {bad}. Training stopped; "
        "lower lr, standardize the data, or check the inputs."
    )


def warn_on_collapse(result) -> None:
    """Warn when every component of a rank-bearing layer of ``result``'s model is off. A
    layer with main effects is exempt: there rank 0 is an answer (the linear term is enough),
    not a layer that stopped computing anything."""
    layers = {
        path: layer
        for path, layer in rank_layers(result.model).items()
        if not getattr(layer, "main_effects", False)
    }
    if not layers:
        return
    draws = result.posterior_samples(num_samples=50 if result.method != "map" else 1)
    for path, layer in layers.items():
        ranks = effective_rank_draws(layer, draws)
        if int(ranks.max()) == 0:
            warnings.warn(
                f"fit: every component of layer {path or type(layer).__name__!r} collapsed "
                "(effective rank 0): all lambda -> 0. Standardize inputs/targets, raise eta, "
                "lower lr, or use guide='meanfield'.",
                RuntimeWarning,
                stacklevel=3,
            )
