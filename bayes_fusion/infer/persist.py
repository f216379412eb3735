"""The checkpoint file format: atomic writes and validated reads of a fit's state dict.

:meth:`bayes_fusion.FitResult.save` and :func:`bayes_fusion.load` build on these two.
"""

from __future__ import annotations

import os

import torch

from .._version import __version__

__all__ = ["CHECKPOINT_FORMAT", "read_state", "save_state"]

#: the ``"format"`` entry every checkpoint carries
CHECKPOINT_FORMAT = "bayes_fusion.FitResult"


def save_state(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path`` and rename it into place (a failed
    save never leaves a half-written file in place of a good one)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_state(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint written by :func:`save_state`.

    :raises FileNotFoundError: no such file.
    :raises ValueError: not a readable checkpoint (truncated, corrupted, another format) or one
        written by another minor version of the library.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no checkpoint file at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(
            f"path: {path!r} is not a readable bayes_fusion checkpoint "
            f"(truncated or corrupted?): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path: {path!r} is not a bayes_fusion checkpoint")
    major = str(state.get("version", "?")).split(".")[:2]
    if major != __version__.split(".")[:2]:
        raise ValueError(
            f"path: checkpoint written by bayes_fusion {state.get('version')}, "
            f"this is {__version__}; re-fit or load it with that version"
        )
    return state
