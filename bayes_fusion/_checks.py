"""Argument checks that raise clear errors naming the argument, the expectation and the value."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer ``>= minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(name: str, value) -> float:
    """Return ``value`` as float if it is a finite number ``> 0``, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a positive number, got {value!r}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_float_tensor(name: str, x, min_dim: int = 1, max_dim: int | None = None) -> Tensor:
    """Check that ``x`` is a floating-point tensor of an allowed rank (finite if validating)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name}: expected a floating-point tensor, got dtype {x.dtype} "
            "(convert with .float() or .double())"
        )
    if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
        want = f"{min_dim}" if max_dim == min_dim else f">= {min_dim}"
        if max_dim is not None and max_dim != min_dim:
            want = f"{min_dim}..{max_dim}"
        raise ValueError(f"{name}: expected a tensor with {want} dims, got shape {tuple(x.shape)}")
    return x


def check_finite(name: str, x: Tensor) -> Tensor:
    """Raise if ``x`` holds NaN or inf (one device sync)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    return x
