"""Which rows each SVI step sees: the model's dataset size for minibatch scaling, the
reshuffled global batches, and (distributed) this process's shard of each."""

from __future__ import annotations

import contextlib

import torch
from pyro.poutine.util import site_is_subsample

from ..._checks import check_positive_int
from ..data import inspection_trace, slice_rows
from . import distributed as bfdist

__all__ = [
    "BatchStream",
    "check_no_own_subsampling",
    "configure_batching",
    "kept_num_data",
    "prototype_args",
    "start_distributed",
]


@contextlib.contextmanager
def kept_num_data(model):
    """Context manager: the model's ``num_data`` (the dataset size its likelihood is scaled to),
    which a fit sets for minibatches or shards, is back to its value on entry when it closes."""
    if not hasattr(model, "num_data"):
        yield
        return
    before = model.num_data
    try:
        yield
    finally:
        model.num_data = before


def configure_batching(model, rows: int | None, batch_size: int | None, sync) -> int | None:
    """Validate ``batch_size`` and set the model's ``num_data`` (the library's models scale
    their likelihood by ``N / batch``; a model without ``num_data`` has its observed sites
    scaled by the fit, :class:`BatchStream`); returns the batch size in effect (``None``: full
    batch).

    :raises ValueError: a non-positive ``batch_size`` or no tensor with rows.
    """
    if batch_size is not None:
        batch_size = check_positive_int("batch_size", batch_size)
        if rows is None:
            raise ValueError("batch_size: the model arguments hold no tensor with rows")
        batch_size = min(batch_size, rows)
        if hasattr(model, "num_data"):
            model.num_data = rows if batch_size < rows else None
    elif sync is not None:
        model.num_data = rows  # each rank sees a shard: scale its likelihood to all rows
    elif getattr(model, "num_data", None) not in (None, rows):
        # full-batch fit: a dataset size left over from an earlier minibatch fit on other
        # data would scale the likelihood wrongly
        model.num_data = None
    return batch_size


def prototype_args(args: tuple, batch_size: int | None, rows: int | None, sync) -> tuple:
    """Arguments of the shape one step sees (the guide is built on these)."""
    if sync is not None:
        return slice_rows(args, sync.plan.local_rows(torch.arange(batch_size or rows)), rows)
    return args if batch_size is None else slice_rows(args, slice(0, batch_size), rows)


def check_no_own_subsampling(model, args: tuple) -> None:
    """A model minibatched by ``fit`` must not subsample its rows itself (the fit slices the
    row-aligned arguments and scales the observed sites by ``N / batch``: a subsampled plate
    would scale them again).

    :param args: the model's full arguments.
    :raises ValueError: naming the model's subsampled plate.
    """
    trace = inspection_trace(model, *args)
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                raise ValueError(
                    f"batch_size: the model subsamples its rows itself (plate {frame.name!r}, "
                    f"{frame.size} of {frame.full_size}); pass batch_size=None and keep your "
                    "subsampled plate, or let fit slice the rows and use a plain plate over them"
                )


class BatchStream:
    """Endless iterator over the model arguments of each step.

    Full batch: ``args`` every step. Minibatches: rows reshuffled every epoch by
    ``generator`` (so a resumed fit continues the sequence); the row-aligned tensors of
    ``args`` (first dim = ``rows``) are sliced, the others passed whole. A model without
    ``num_data`` (a user model) has its observed sites weighted by ``rows / batch`` on
    ``anneal.obs_scale``, so the expected loss is the full-data one. Distributed: the same global
    batch on every rank, each rank yielding its shard and setting its likelihood weight on
    ``anneal.obs_scale``.

    :param args: the full model arguments. :param rows: their row count.
    :param batch_size: global batch size (``None``: full batch).
    :param generator: ``torch.Generator`` of the shuffling.
    :param sync: distributed synchroniser or ``None``.
    :param anneal: the :class:`~bayes_fusion.infer.svi_step.PriorAnneal` of the fit.
    :param proto_args: this rank's full-batch shard (as :func:`prototype_args`).
    :param model: the model (whether it has ``num_data`` decides who scales the likelihood).
    """

    def __init__(self, args, rows, batch_size, generator, sync, anneal, proto_args, model) -> None:
        self.args, self.rows, self.batch_size = args, rows, batch_size
        self.generator, self.sync, self.anneal = generator, sync, anneal
        self.proto_args = proto_args
        #: the fit itself weights the observed sites (a model without ``num_data``)
        self.weights_observations = not hasattr(model, "num_data")

    def _global_batches(self):
        while True:
            if self.batch_size is None or self.batch_size >= self.rows:
                yield None
                continue
            perm = torch.randperm(self.rows, generator=self.generator)
            for i in range(0, self.rows - self.batch_size + 1, self.batch_size):
                yield perm[i : i + self.batch_size]

    def __iter__(self):
        sync = self.sync
        for idx in self._global_batches():
            if sync is None and idx is None:
                yield self.args
            elif sync is None:
                if self.weights_observations:
                    self.anneal.obs_scale = self.rows / len(idx)
                yield slice_rows(self.args, idx, self.rows)
            elif idx is None:  # full batch: this rank's shard is proto_args, every step
                self.anneal.obs_scale = sync.plan.likelihood_weight(self.rows)
                yield self.proto_args
            else:
                self.anneal.obs_scale = sync.plan.likelihood_weight(len(idx))
                yield slice_rows(self.args, sync.plan.local_rows(idx), self.rows)


def start_distributed(model, args, rows: int | None, batch_size: int | None, timeout: float):
    """Join the torchrun process group and return the gradient synchroniser.

    :raises ValueError: no rows to shard, a model without ``num_data``, or fewer rows in a
        global batch than processes.
    """
    if rows is None:
        raise ValueError("distributed: the model arguments hold no tensor with rows to shard")
    if not hasattr(model, "num_data"):
        raise ValueError(
            "distributed: this model has no num_data attribute to scale each rank's shard "
            "of the likelihood; use bf.Regressor/bf.Classifier or add num_data to your model"
        )
    params = list(model.parameters()) + list(model.buffers())
    device = params[0].device if params else torch.device("cpu")
    bfdist.init(device=device, timeout=timeout)
    bfdist.check_backend_device(device)
    sync = bfdist.GradientSync(device)
    smallest = min(rows, batch_size or rows)
    if smallest < sync.world_size:
        raise ValueError(
            f"batch_size: expected at least one row per process ({sync.world_size}), "
            f"got a global batch of {smallest}"
        )
    return sync
