"""Likelihood models: a layer, a likelihood and a data plate that owns the dataset size."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import Tensor

from ._checks import check_finite, check_positive_float, check_positive_int
from .layers.base import to_op_layout

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

_NUMPY_HINT = " (convert NumPy arrays with torch.as_tensor({}, dtype=torch.{}))"


def _is_array(obj) -> bool:
    """Whether ``obj`` is array-like (NumPy, pandas, a list of numbers): a conversion hint helps."""
    return hasattr(obj, "__array__") or isinstance(obj, (list, tuple))


def check_data_inputs(inputs) -> int:
    """Check the model-level inputs (exactly 2-D ``(N, d)`` tensors) and return ``N``.

    :param inputs: a ``(N, d)`` tensor or a list of them (``None`` allowed for a missing
        modality).
    """
    tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    rows = None
    for m, x in enumerate(tensors):
        name = f"inputs[{m}]" if isinstance(inputs, (list, tuple)) else "inputs"
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor of shape (N, d), got {type(x).__name__}"
                + _NUMPY_HINT.format("x", "float32") * _is_array(x)
            )
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor (N, d), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: expected at least one row, got an empty batch")
        rows = x.shape[0] if rows is None else rows
    if rows is None:
        raise ValueError("inputs: expected at least one tensor that is not None, got none")
    return rows


def _defined_together(obj, *names: str) -> bool:
    """Whether the methods ``names`` of ``obj`` all come from the same class (a subclass that
    overrides one of them alone breaks the correspondence between them)."""

    def owner(name):
        return next((c for c in type(obj).__mro__ if name in vars(c)), None)

    return len({owner(name) for name in names}) == 1


class _Likelihood(PyroModule):
    """A layer + a likelihood over the rows of the data, in a plate of the dataset size.

    :param layer: any (Pyro)module mapping ``inputs`` to ``(..., N, P)`` predictions.
    :param num_data: full dataset size for minibatch scaling (``None``: the batch is the full
        dataset). :func:`bayes_fusion.fit` sets it when ``batch_size`` is given.
    """

    def __init__(self, layer: torch.nn.Module, num_data: int | None = None) -> None:
        super().__init__()
        if not isinstance(layer, torch.nn.Module):
            raise TypeError(f"layer: expected a torch.nn.Module, got {type(layer).__name__}")
        self.layer = layer
        self.num_data = None if num_data is None else check_positive_int("num_data", num_data)

    @property
    def has_log_joint(self) -> bool:
        """Whether :meth:`log_joint` computes what :meth:`forward` samples: the layer is one of
        the library's rank layers, and neither this model's nor the layer's class overrides
        ``forward`` without its Pyro-free twin (``log_joint`` / ``apply``)."""
        from .layers.base import RankLayer

        return (
            isinstance(self.layer, RankLayer)
            and _defined_together(self, "forward", "log_joint")
            and _defined_together(self.layer, "forward", "apply", "site_priors")
        )

    def _data_scale(self, rows: int) -> float:
        """Weight of the likelihood of a batch of ``rows`` rows (``num_data / rows`` for a
        minibatch, as the subsampled data plate scales it)."""
        return 1.0 if self.num_data is None else self.num_data / rows

    def _plate(self, rows: int, observed: bool):
        size = self.num_data if (observed and self.num_data is not None) else rows
        if size < rows:
            raise ValueError(f"num_data: expected >= the batch size {rows}, got {size}")
        if size == rows:
            return pyro.plate("data", rows, dim=-1)
        # minibatch: the likelihood is scaled by num_data / rows
        return pyro.plate("data", size, subsample=torch.arange(rows), dim=-1)


class Regressor(_Likelihood):
    """Gaussian regression ``y ~ Normal(layer(inputs), sigma)`` with learned per-output noise.

    Sites: the layer's sites (prefixed ``layer.``), ``noise`` ``(P,)`` with a weakly-informative
    ``HalfNormal(noise_prior_scale)`` prior (for standardized targets), and the observed
    ``obs`` ``(N, P)`` inside the plate ``data``. ``forward`` returns the mean prediction.

    :param layer: rank-bearing layer (or any module) producing ``(..., N, P)``.
    :param num_data: see :class:`_Likelihood`.
    :param noise_prior_scale: scale of the half-normal noise prior (``> 0``).

    Example::

        >>> import torch, bayes_fusion as bf
        >>> model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=4))
        >>> model([torch.randn(5, 3), torch.randn(5, 4)]).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        layer: torch.nn.Module,
        num_data: int | None = None,
        noise_prior_scale: float = 1.0,
    ) -> None:
        super().__init__(layer, num_data)
        self.register_buffer(
            "noise_prior_scale",
            torch.tensor(check_positive_float("noise_prior_scale", noise_prior_scale)),
        )

    def forward(self, inputs, y: Tensor | None = None) -> Tensor:
        """Sample the weights and score (or sample) the targets.

        :param inputs: ``(N, d)`` tensor or list of them.
        :param y: targets ``(N, P)`` or ``(N,)`` when ``P == 1``.
        :returns: the mean prediction ``(..., N, P)``.
        """
        rows = check_data_inputs(inputs)
        pred = self.layer(inputs)
        out = pred.shape[-1]
        if y is not None:
            y = self._check_targets(y, rows, out, pred.dtype)
        noise = pyro.sample("noise", self._noise_prior(out, pred.dtype))
        noise = to_op_layout(noise, 1).unsqueeze(-2)
        with self._plate(rows, y is not None):
            pyro.sample("obs", dist.Normal(pred, noise).to_event(1), obs=y)
        return pred

    def _noise_prior(self, out: int, dtype: torch.dtype) -> dist.TorchDistribution:
        return dist.HalfNormal(self.noise_prior_scale.to(dtype).expand(out)).to_event(1)

    def log_joint(
        self, values: dict[str, Tensor], inputs, y: Tensor, latent_scale=1.0, obs_scale=1.0
    ) -> Tensor:
        """``log p(y, values | inputs)`` at one draw, computed without Pyro: the same value as
        the scaled log-densities of :meth:`forward`'s sites (the minibatch scale of the data
        plate included), for :class:`~bayes_fusion.direct_elbo.DirectELBO`'s fast path.

        :param values: site name -> value of every latent site (no particle dims).
        :param inputs: the (already validated) inputs. :param y: targets ``(N, P)`` / ``(N,)``.
        :param latent_scale: weight of the latent sites' log-densities (the KL warm-up).
        :param obs_scale: extra weight of the likelihood (a distributed shard's weight).
        :returns: scalar tensor.
        """
        pred = self.layer.apply(self.layer.short_values(values), inputs)
        noise = values["noise"]
        log_prior = self.layer.log_prior(values)
        log_prior = log_prior + self._noise_prior(pred.shape[-1], pred.dtype).log_prob(noise)
        y = y.unsqueeze(-1) if y.dim() == 1 else y
        # sum of Normal(y | pred, noise).log_prob, with the noise terms on (P,) not (N, P)
        rows = pred.numel() // pred.shape[-1]
        log_lik = (
            -0.5 * ((y - pred) / noise).square().sum()
            - rows * noise.log().sum()
            - pred.numel() * _HALF_LOG_2PI
        )
        weight = obs_scale * self._data_scale(pred.shape[-2])
        return latent_scale * log_prior + weight * log_lik

    @staticmethod
    def _check_targets(y, rows: int, out: int, dtype: torch.dtype) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(
                f"y: expected a torch.Tensor of shape ({rows}, {out}), got {type(y).__name__}"
                + _NUMPY_HINT.format("y", "float32") * _is_array(y)
            )
        if not torch.is_floating_point(y):
            raise TypeError(f"y: expected a floating-point tensor, got dtype {y.dtype}")
        if y.dim() == 1 and out == 1:
            y = y.unsqueeze(-1)
        if tuple(y.shape) != (rows, out):
            raise ValueError(f"y: expected shape ({rows}, {out}), got {tuple(y.shape)}")
        if y.dtype != dtype:
            raise TypeError(f"y: expected dtype {dtype} like the predictions, got {y.dtype}")
        return check_finite("y", y)


class Classifier(_Likelihood):
    """Classification ``y ~ Categorical(logits=layer(inputs))``.

    Sites: the layer's sites and the observed ``obs`` ``(N,)`` in the plate ``data``.
    ``forward`` returns the logits ``(..., N, C)``.

    A :class:`~bayes_fusion.CPFusion` built with ``main_effects=None`` (its default) gets main
    effects here: a linear term with its own prior, so the rank prior only has to pay for the
    interactions (without it, small real data sets lose 10-20 accuracy points to logistic
    regression; see ``docs/howto.rst``). Pass ``main_effects=False`` to the layer to keep the
    pure CP model.

    :param layer: module producing ``(..., N, C)`` logits.
    :param num_data: see :class:`_Likelihood`.

    Example::

        >>> import torch, bayes_fusion as bf
        >>> model = bf.Classifier(bf.CPFusion((3, 4), 5, max_rank=4))
        >>> model.layer.main_effects
        True
    """

    def __init__(self, layer: torch.nn.Module, num_data: int | None = None) -> None:
        super().__init__(layer, num_data)
        if getattr(layer, "main_effects_auto", False):
            layer.main_effects = True

    def forward(self, inputs, y: Tensor | None = None) -> Tensor:
        """Sample the weights and score (or sample) the labels.

        :param inputs: ``(N, d)`` tensor or list of them.
        :param y: integer labels ``(N,)`` in ``[0, C)``.
        :returns: logits ``(..., N, C)``.
        """
        rows = check_data_inputs(inputs)
        logits = self.layer(inputs)
        if y is not None:
            y = self._check_labels(y, rows, logits.shape[-1])
        with self._plate(rows, y is not None):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits

    def log_joint(
        self, values: dict[str, Tensor], inputs, y: Tensor, latent_scale=1.0, obs_scale=1.0
    ) -> Tensor:
        """``log p(y, values | inputs)`` at one draw, computed without Pyro (see
        :meth:`Regressor.log_joint`; ``y`` holds integer labels ``(N,)``)."""
        logits = self.layer.apply(self.layer.short_values(values), inputs)
        # Categorical(logits).log_prob in plain ops (torch.compile traces it whole)
        log_lik = logits.log_softmax(-1).gather(-1, y.unsqueeze(-1)).sum()
        weight = obs_scale * self._data_scale(logits.shape[-2])
        return latent_scale * self.layer.log_prior(values) + weight * log_lik

    @staticmethod
    def _check_labels(y, rows: int, classes: int) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(
                f"y: expected a torch.Tensor of shape ({rows},), got {type(y).__name__}"
                + _NUMPY_HINT.format("y", "long") * _is_array(y)
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
            raise TypeError(f"y: expected integer class labels, got dtype {y.dtype}")
        if tuple(y.shape) != (rows,):
            raise ValueError(f"y: expected shape ({rows},), got {tuple(y.shape)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"y: expected labels in [0, {classes - 1}], got values in [{lo}, {hi}]"
            )
        return y.long()
