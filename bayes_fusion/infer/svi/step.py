"""One SVI step: the KL warm-up weight, the fit's one loss engine (the direct ELBO, compiled or
eager, or Pyro's ``Trace_ELBO``), the default optimizer, and the refusal to apply non-finite
gradients."""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

from ..compiled import CompiledFunction
from ..data import torch_rng_kept
from ..faults import non_finite_error, refused_non_finite
from .elbo import DirectELBO
from .optim import FusedClippedAdam

__all__ = [
    "DirectLoss",
    "PriorAnneal",
    "SVIStepper",
    "compilable_model",
    "default_optimizer",
    "svi_step",
]


def default_optimizer(lr: float, num_steps: int, final_lr_fraction: float) -> FusedClippedAdam:
    """ClippedAdam (fused) whose learning rate decays geometrically from ``lr`` to
    ``final_lr_fraction * lr`` over ``num_steps``."""
    lrd = final_lr_fraction ** (1.0 / max(1, num_steps))
    return FusedClippedAdam({"lr": lr, "lrd": lrd, "clip_norm": 10.0, "betas": (0.9, 0.99)})


class PriorAnneal(pyro.poutine.messenger.Messenger):
    """Scales every latent sample site's log-density by ``beta`` (KL warm-up) and every
    observed site's by ``obs_scale`` (a distributed rank's shard weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.beta = 1.0
        self.obs_scale = 1.0

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        factor = self.obs_scale if msg["is_observed"] else self.beta
        if isinstance(factor, torch.Tensor) or factor != 1.0:
            msg["scale"] = msg["scale"] * factor


def svi_step(svi: SVI, batch, sync=None, step: int = 0, direct=None, beta=1.0) -> float:
    """One SVI step that refuses to apply non-finite gradients.

    With ``sync`` (distributed), loss and gradients are averaged over ranks first, so a
    non-finite value on any rank stops every rank at the same step. With ``direct`` (a
    :class:`DirectLoss`), the loss comes from the direct ELBO at KL weight ``beta`` instead
    of ``svi``'s ELBO.
    """
    if direct is not None:
        loss, params = direct.loss_and_grads(batch, beta), direct.params
    else:
        with poutine.trace(param_only=True) as capture:
            try:
                loss = svi.loss_and_grads(svi.model, svi.guide, *batch)
            except ValueError as exc:
                if sync is None or not refused_non_finite(exc):
                    raise
                loss = float("nan")  # tell the other ranks before stopping
        params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    loss = float(loss)
    if sync is not None:
        loss = sync.average(loss, step)
    if not math.isfinite(loss):
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return float("nan")
    svi.optim(params)
    if grads:
        torch._foreach_zero_(grads)
    return loss


def compilable_model(model) -> bool:
    """Whether ``model`` computes its log joint without Pyro (``model.log_joint``: the
    library's ``Regressor`` / ``Classifier`` around a ``CPFusion`` / ``XOXLinear``), so that
    its loss can be compiled into one graph."""
    return bool(getattr(model, "has_log_joint", False))


class DirectLoss:
    """fit's fast loss: the direct ELBO of ``guide``, maybe compiled.

    For the library's own models the model's log joint is computed without Pyro
    (``model.log_joint``, equal to Pyro's scoring of its sites); for any other model, the
    model runs under :class:`~bayes_fusion.direct_elbo.LogJoint` inside ``anneal``.

    :param direct: the :class:`DirectELBO` of the guide.
    :param anneal: the KL warm-up / shard-weight messenger (its ``beta`` weights the model's
        latent sites and ``log q``; its ``obs_scale`` the likelihood).
    :param model: the model.
    """

    def __init__(self, direct: DirectELBO, anneal: PriorAnneal, model) -> None:
        self.direct = direct
        self.anneal = anneal
        self.pure = compilable_model(model)
        self.model = model if self.pure else anneal(model)
        self.params = direct.params()
        #: the compiled loss (:meth:`compile`), ``None`` while eager
        self.compiled: CompiledFunction | None = None

    def compile(self) -> None:
        """Compile the loss from the next step on (a model with a Pyro-free log joint only:
        :class:`~bayes_fusion.infer.compiled.CompiledFunction`, eager after a warning when the
        compile fails)."""
        if not self.pure:
            raise ValueError("model: only a Pyro-free log joint (model.log_joint) compiles")
        self.compiled = CompiledFunction(self._loss, name="fit(jit)")

    def _loss(self, beta, obs_scale, params, batch) -> Tensor:
        if self.pure:
            values, log_q = self.direct.sample_guide(params)
            log_p = self.model.log_joint(values, *batch, latent_scale=beta, obs_scale=obs_scale)
            return -(log_p - beta * log_q)
        self.anneal.beta = beta
        return self.direct.differentiable_loss(self.model, batch, guide_scale=beta, params=params)

    def loss_and_grads(self, batch, beta: float) -> float:
        """Loss at KL weight ``beta``; gradients accumulated into the parameters' ``.grad``."""
        with pyro.validation_enabled(False):
            if self.compiled is None:
                loss = self._loss(beta, self.anneal.obs_scale, self.params, batch)
            else:
                like = self.params[0]
                weights = torch.tensor([beta, self.anneal.obs_scale], dtype=like.dtype)
                beta_t, obs_t = weights.to(like.device).unbind()
                loss = self.compiled(beta_t, obs_t, self.params, tuple(batch))
        loss.backward()
        return float(loss.detach())


class SVIStepper:
    """The steps of one SVI fit: picks the fit's one loss engine, then runs :func:`svi_step`
    per batch.

    The engine is the direct ELBO (:class:`~bayes_fusion.infer.svi.elbo.DirectELBO`) for the
    preset guides with one particle (its loss compiled when
    :class:`~bayes_fusion.infer.svi.compilation.Compilation` says so); otherwise Pyro's
    ``Trace_ELBO``. Every step of the fit uses that engine. Before the first step Pyro checks
    model and guide once (its validation as set: shapes, supports, argument values) by
    evaluating the ELBO, without a step and without drawing from the fit's random stream.

    :param model: the model. :param guide: the guide (parameters already created).
    :param optim: a ``pyro.optim`` optimizer.
    :param num_particles: ELBO particles. :param vectorize_particles: vectorize them.
    :param direct_elbo: allow the direct ELBO.
    :param sync: the distributed gradient synchroniser, or ``None``.
    """

    def __init__(
        self,
        model,
        guide,
        optim,
        *,
        num_particles: int,
        vectorize_particles: bool,
        direct_elbo: bool,
        sync,
    ) -> None:
        self.model, self.guide, self.sync = model, guide, sync
        self.anneal = PriorAnneal()
        self.direct = None
        if direct_elbo and num_particles == 1 and not DirectELBO.unsupported_reason(guide):
            self.direct = DirectLoss(DirectELBO(guide), self.anneal, model)
        elbo = Trace_ELBO(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles and num_particles > 1,
        )
        self.svi = SVI(self.anneal(model), self.anneal(guide), optim, elbo)

    def check(self, batch, step: int) -> None:
        """Pyro's checks of model and guide on ``batch`` (its validation as set), by evaluating
        the ELBO without a step; the direct ELBO skips them. The ``Trace_ELBO`` engine checks
        on every step, so there is nothing to do for it.

        :raises NonFiniteLossError: Pyro found non-finite distribution parameters.
        """
        if self.direct is None:
            return
        try:
            with torch_rng_kept():  # the check draws nothing from the fit's random stream
                self.svi.evaluate_loss(*batch)
        except ValueError as exc:
            # with validation on, Pyro refuses NaN distribution parameters; distributed, the
            # step's non-finite loss stops every rank at once instead
            if not refused_non_finite(exc):
                raise
            if self.sync is None:
                raise non_finite_error(step, float("nan"), self.model, self.guide, batch) from exc

    def __call__(self, batch, step: int, beta: float) -> float:
        """One step on ``batch`` at KL weight ``beta``.

        :raises NonFiniteLossError: the loss or a gradient is NaN/inf (names the sites).
        """
        self.anneal.beta = beta
        try:
            loss = svi_step(self.svi, batch, self.sync, step, direct=self.direct, beta=beta)
        except ValueError as exc:
            # with validation on, Pyro refuses NaN distribution parameters before the loss
            if not refused_non_finite(exc):
                raise
            raise non_finite_error(step, float("nan"), self.model, self.guide, batch) from exc
        if not math.isfinite(loss):
            raise non_finite_error(step, loss, self.model, self.guide, batch)
        return loss
