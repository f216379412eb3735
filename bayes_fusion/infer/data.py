"""Model arguments and RNG seeds: rows, row slicing, finiteness checks, latent-site shapes,
guide draws, and the fits' own seeded random streams. No Pyro inference here: every inference
method builds on these."""

from __future__ import annotations

import contextlib
import inspect
import random

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .._checks import check_positive_int

__all__ = [
    "seeded",
    "torch_rng_kept",
    "inspection_trace",
    "intra_op_threads",
    "check_args_finite",
    "model_latent_shapes",
    "num_rows",
    "sample_guide",
    "slice_rows",
]


@contextlib.contextmanager
def seeded(seed: int | None):
    """Context manager: inside, Python's, NumPy's and torch's RNGs (CPU and every CUDA device)
    start from ``seed`` (``pyro.set_rng_seed``); on exit they are back where the caller left
    them, so a fit's own draws never change the caller's random streams (a bootstrap loop
    around ``fit`` keeps drawing new resamples). ``None``: the global streams are used, and
    advanced, as they are.

    :raises TypeError: ``seed`` is neither an int nor ``None``.
    """
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int or None, got {seed!r}")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch_rng_kept():
            pyro.set_rng_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def torch_rng_kept():
    """Context manager: torch's random states (CPU and every CUDA device) are back where they
    were when it closes, whatever was drawn inside."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def intra_op_threads(num_threads: int | None):
    """Context manager: torch's intra-op thread count set to ``num_threads`` while it is open
    (``None``: unchanged).

    :raises ValueError: ``num_threads`` is not a positive int.
    """
    if num_threads is None:
        return contextlib.nullcontext()
    return _threads(check_positive_int("num_threads", num_threads))


def num_rows(obj) -> int | None:
    """Number of data rows: the first dim of the first tensor (with dims) in ``obj``, a tensor
    or a (nested) list/tuple of model arguments; ``None`` when there is none."""
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.dim() > 0 else None
    if isinstance(obj, (list, tuple)):
        for item in obj:
            rows = num_rows(item)
            if rows is not None:
                return rows
    return None


def slice_rows(obj, index, rows: int | None = None):
    """Select rows ``index`` of every tensor in a (nested) list/tuple of model arguments.

    :param rows: the data's row count: only tensors whose first dim is ``rows`` are sliced
        (row-aligned arguments), the others passed as they are; ``None``: every tensor with a
        dim is sliced.
    """
    if isinstance(obj, Tensor):
        aligned = obj.dim() > 0 and (rows is None or obj.shape[0] == rows)
        return obj[index] if aligned else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_rows(item, index, rows) for item in obj)
    return obj


def argument_names(model, count: int) -> list[str]:
    """The names of the first ``count`` positional arguments of ``model`` (its ``forward`` for
    a module), as a user wrote them (``inputs``, ``y``); ``args[i]`` where none is known."""
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for param in params:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
        elif param.kind == param.VAR_POSITIONAL:
            names.extend(f"{param.name}[{j}]" for j in range(count - len(names)))
            break
    names = names[:count]
    return names + [f"args[{i}]" for i in range(len(names), count)]


def check_args_finite(args: tuple, model=None) -> None:
    """Refuse NaN/inf in any floating tensor of the (nested) model arguments.

    :param args: the model's positional arguments.
    :param model: the model, whose signature names the arguments (``inputs[0]``, ``y``).
    :raises ValueError: naming the argument path (e.g. ``inputs[0]``; ``args[1]`` without a
        model) and the count.
    """
    names = argument_names(model, len(args)) if model is not None else None
    for i, item in enumerate(args):
        _check_finite_nested(item, names[i] if names else f"args[{i}]")


def _check_finite_nested(obj, name: str) -> None:
    if isinstance(obj, Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            bad = int((~torch.isfinite(obj)).sum())
            raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_finite_nested(item, f"{name}[{i}]")


def inspection_trace(model, *args, **kwargs):
    """One trace of ``model(*args, **kwargs)`` to inspect it (its sites, shapes, plates): no
    gradients, hidden from enclosing handlers, and on a fork of torch's RNG, so that inspecting a
    model (e.g. when writing a checkpoint) never changes the course of a fit."""
    with torch.random.fork_rng(), poutine.block(), torch.no_grad():
        return poutine.trace(model).get_trace(*args, **kwargs)


def model_latent_shapes(model, *args, **kwargs) -> tuple[dict[str, torch.Size], int]:
    """Latent site name -> value shape (unbatched) and the model's max plate nesting."""
    tr = inspection_trace(model, *args, **kwargs)
    shapes, nesting = {}, 0
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if not site["is_observed"] and not site["infer"].get("is_auxiliary", False):
            shapes[name] = site["value"].shape
    return shapes, nesting


def sample_guide(guide, args, num_samples: int, shapes: dict, nesting: int) -> dict:
    """Draw ``num_samples`` joint samples of the latent sites from ``guide`` (vectorized).

    :param shapes: latent site -> value shape, as from :func:`model_latent_shapes`.
    :param nesting: the model's plate nesting (the draws get a plate left of it).
    :returns: site -> tensor ``(num_samples, *shape)``.
    """
    with torch.no_grad(), poutine.block(), pyro.plate("_bf_draws", num_samples, dim=-nesting - 1):
        tr = poutine.trace(guide).get_trace(*args)
    out = {}
    for name, shape in shapes.items():
        value = tr.nodes[name]["value"].reshape((-1,) + tuple(shape))
        out[name] = (
            value.expand((num_samples,) + tuple(shape)).clone() if value.shape[0] == 1 else value
        )
    return out
