"""Data-parallel SVI across processes and machines on ``torch.distributed``.

``fit(..., distributed=True)`` in a script launched by ``torchrun`` runs one SVI replica per
process. Every step each rank evaluates the ELBO on its shard of the global minibatch (rows
``r, r + W, r + 2W, ...`` of it, as ``DistributedSampler`` does), the gradients of the guide
parameters and the loss are averaged over ranks in one all-reduce, and every rank applies the
same optimizer update, so parameters stay identical (checked with a checksum at every
checkpoint and at the end). The likelihood of each shard is weighted so that the averaged
gradient is exactly the gradient of the single-process ELBO on the global batch: with the
model's ``num_data`` set to the dataset size ``N``, a shard of ``b_r`` rows of a global batch
of ``B`` rows gets weight ``W * b_r / B`` on top of the plate's ``N / b_r``.

The process group uses ``gloo`` for CPU models and ``nccl`` for CUDA ones (``init`` picks it
from the device unless told). A peer that dies or stops answering makes the others raise
:class:`DistributedError` within ``timeout`` seconds instead of hanging.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..._checks import check_choice, check_positive_float

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective operation failed: a peer process died, hung or diverged."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or with its environment variables)."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def init(backend: str | None = None, device=None, timeout: float = 120.0) -> None:
    """Initialise the default process group from the ``torchrun`` environment (idempotent).

    :param backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA); ``None`` picks from ``device``.
    :param device: the model's device, used to pick the backend.
    :param timeout: seconds a collective waits for its peers before failing.
    :raises RuntimeError: when not launched by ``torchrun`` (``RANK``, ``WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT`` unset) and no group is initialised.
    """
    if dist.is_initialized():
        return
    timeout = check_positive_float("timeout", timeout)
    if not launched():
        missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
        raise RuntimeError(
            f"distributed: expected a torchrun launch (environment variables {missing} are "
            "unset); start the script with `torchrun --nproc_per_node N script.py`"
        )
    if backend is None:
        is_cuda = device is not None and torch.device(device).type == "cuda"
        backend = "nccl" if is_cuda else "gloo"
    check_choice("backend", backend, ("gloo", "nccl"))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class ShardPlan:
    """Which rows of a global batch this rank evaluates and how its likelihood is weighted.

    :param rank: this process's rank. :param world_size: number of processes.
    """

    rank: int
    world_size: int

    def local_rows(self, global_rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rank, rank + W, ...`` of a global batch's row indices ``(B,)``."""
        return global_rows[self.rank :: self.world_size]

    def likelihood_weight(self, global_size: int) -> float:
        """``W * b_r / B``: makes the rank-average gradient the global-batch gradient."""
        local = len(range(self.rank, global_size, self.world_size))
        return self.world_size * local / global_size


class GradientSync:
    """Averages losses and gradients over ranks; detects dead peers and diverged replicas.

    :param device: device of the parameters (the all-reduce buffer lives there).
    """

    def __init__(self, device) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)
        self.plan = ShardPlan(self.rank, self.world_size)
        self.params: list[torch.Tensor] = []

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"distributed: rank {self.rank}/{self.world_size} failed during {what}: a peer "
                f"process died or did not answer in time ({type(exc).__name__}: {exc})"
            ) from exc

    def attach(self, params: list[torch.Tensor]) -> None:
        """Synchronise these parameters (same order on every rank) from now on and copy rank
        0's values to every rank, as DDP does at construction."""
        self.params = list(params)
        if not params:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            self._collective("the initial parameter broadcast", dist.broadcast, flat, src=0)
            _copy_flat_into(flat, params, params)

    def average(self, loss: float, step: int) -> float:
        """All-reduce ``loss`` and the attached parameters' gradients (in place) to their mean.

        One flat buffer carries every gradient and the loss, so a step costs one collective;
        its layout is fixed at :meth:`attach`, so it matches across ranks even when one rank's
        step failed half-way. A parameter without gradient contributes zeros and keeps
        ``grad = None`` afterwards.
        :returns: the mean loss over ranks (NaN when any rank's loss is non-finite).
        """
        params = self.params
        grads = [p.grad for p in params]
        pieces = [
            g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=p.device)
            for p, g in zip(params, grads, strict=True)
        ]
        dtype = pieces[0].dtype if pieces else torch.float64
        loss_t = torch.tensor([loss], dtype=dtype, device=self.device)
        flat = torch.cat([*(x.to(dtype) for x in pieces), loss_t])
        self._collective(f"the gradient all-reduce of step {step}", dist.all_reduce, flat)
        flat /= self.world_size
        with torch.no_grad():
            _copy_flat_into(flat, grads, params)
        return float(flat[-1])

    def any(self, flag: bool, what: str) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a callback's stop)."""
        t = torch.tensor([float(flag)], device=self.device)
        self._collective(what, dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def check_in_sync(self, step: int) -> None:
        """Raise :class:`DistributedError` when ranks hold different parameter values."""
        params = self.params
        with torch.no_grad():
            total = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(params))
            t = torch.stack([torch.as_tensor(total), -torch.as_tensor(total)]).to(self.device)
        self._collective(
            f"the parameter check of step {step}", dist.all_reduce, t, op=dist.ReduceOp.MAX
        )
        if float(t[0]) != -float(t[1]):
            raise DistributedError(
                f"distributed: guide parameters differ across ranks at step {step} "
                f"(checksums from {-float(t[1])!r} to {float(t[0])!r}); every rank must run "
                "the same model, guide, seed and optimizer"
            )

    def barrier(self, what: str) -> None:
        """Wait for every rank (fails like the other collectives when a peer is gone)."""
        self._collective(what, dist.barrier)


def _copy_flat_into(flat: torch.Tensor, targets: list, params: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat``, laid out like ``params``, into ``targets`` (the
    parameters themselves or their gradients; a ``None`` target skips its piece)."""
    offset = 0
    for target, p in zip(targets, params, strict=True):
        if target is not None:
            target.copy_(flat[offset : offset + p.numel()].view_as(target))
        offset += p.numel()


def check_backend_device(device) -> None:
    """Refuse a CPU model on an nccl group (nccl only moves CUDA tensors)."""
    backend = dist.get_backend()
    is_cuda = torch.device(device).type == "cuda"
    if backend == "nccl" and not is_cuda:
        raise ValueError(
            "distributed: the process group uses nccl, which needs the model on a CUDA device; "
            f"got parameters on {device}"
        )
