"""One SVI step: the KL warm-up weight, the choice of loss (direct ELBO traced or eager, Pyro's
``Trace_ELBO`` / ``JitTrace_ELBO``), the default optimizer, and the refusal to apply
non-finite gradients."""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO
from torch import Tensor

from ..direct_elbo import DirectELBO
from ..layers.base import RankLayer
from ..models import _Likelihood
from ..optim import FusedClippedAdam
from ..traced import TracedFunction
from .faults import non_finite_error

__all__ = ["PriorAnneal", "SVIStepper", "default_optimizer", "svi_step"]


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

    def from_last_arg(self, fn):
        """``fn`` under this messenger, taking ``beta`` as a tensor appended to its args."""

        def weighted(*args, **kwargs):
            self.beta = args[-1]
            return self(fn)(*args[:-1], **kwargs)

        return weighted


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
                if sync is None or "invalid values" not in str(exc):
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


def traceable_model(model) -> bool:
    """Whether ``model`` is one of the library's own models, safe to trace by default."""
    return isinstance(model, _Likelihood) and isinstance(model.layer, RankLayer)


class DirectLoss:
    """fit's fast loss: the direct ELBO of ``guide`` on ``anneal(model)``, maybe traced.

    :param direct: the :class:`DirectELBO` of the guide.
    :param anneal: the KL warm-up / shard-weight messenger (its ``beta`` weights the model's
        latent sites; the same ``beta`` weights ``log q`` here).
    :param model: the model. :param compiled: trace the loss (:class:`TracedFunction`).
    """

    def __init__(self, direct: DirectELBO, anneal: PriorAnneal, model, compiled: bool) -> None:
        self.direct = direct
        self.anneal = anneal
        self.model = anneal(model)
        self.params = direct.params()
        self.traced = (
            TracedFunction(self._loss, extra_key=lambda: anneal.obs_scale, name="fit(jit)")
            if compiled
            else None
        )

    def _loss(self, beta, params, batch) -> Tensor:
        self.anneal.beta = beta
        return self.direct.differentiable_loss(self.model, batch, guide_scale=beta, params=params)

    def loss_and_grads(self, batch, beta: float) -> float:
        """Loss at KL weight ``beta``; gradients accumulated into the parameters' ``.grad``."""
        with pyro.validation_enabled(False):
            if self.traced is None:
                loss = self._loss(beta, self.params, batch)
            else:
                like = self.params[0]
                beta_t = torch.tensor(beta, dtype=like.dtype, device=like.device)
                loss = self.traced(beta_t, self.params, tuple(batch))
        self.anneal.beta = beta
        loss.backward()
        return float(loss.detach())


class SVIStepper:
    """The steps of one SVI fit: picks the loss once, then runs :func:`svi_step` per batch.

    The direct ELBO (:class:`~bayes_fusion.direct_elbo.DirectELBO`) serves the preset guides
    with one particle, traced when ``jit`` asks for it (``None``: for the library's own
    models); otherwise Pyro's ``Trace_ELBO``, or ``JitTrace_ELBO`` for ``jit=True``.

    :param model: the model. :param guide: the guide (parameters already created).
    :param optim: a ``pyro.optim`` optimizer.
    :param num_particles: ELBO particles. :param vectorize_particles: vectorize them.
    :param jit: ``None`` / ``True`` / ``False``, as :func:`~bayes_fusion.fit_svi`.
    :param direct_elbo: allow the direct ELBO.
    :param sync: the distributed gradient synchroniser, or ``None``.
    """

    def __init__(
        self, model, guide, optim, num_particles, vectorize_particles, jit, direct_elbo, sync
    ) -> None:
        self.model, self.guide, self.sync = model, guide, sync
        self.anneal = PriorAnneal()
        self.direct = None
        if direct_elbo and num_particles == 1 and not DirectELBO.unsupported_reason(guide):
            direct_loss = DirectELBO(guide)
            wanted = traceable_model(model) if jit is None else bool(jit)
            compiled = direct_loss.traceable and wanted
            if compiled or not jit:  # jit=True on other guides: Pyro's JitTrace_ELBO below
                self.direct = DirectLoss(direct_loss, self.anneal, model, compiled)
        self.pyro_jit = bool(jit) and self.direct is None
        elbo_kwargs = {
            "num_particles": num_particles,
            "vectorize_particles": vectorize_particles and num_particles > 1,
        }
        if self.pyro_jit:
            # JitTrace_ELBO bakes Python numbers into the compiled graph: the KL weight must
            # enter as a tensor argument (the last one) to change from step to step
            elbo = JitTrace_ELBO(ignore_jit_warnings=True, **elbo_kwargs)
            weighted = self.anneal.from_last_arg
        else:
            elbo, weighted = Trace_ELBO(**elbo_kwargs), self.anneal
        self.svi = SVI(weighted(model), weighted(guide), optim, elbo)

    def __call__(self, batch, step: int, beta: float, validate: bool) -> float:
        """One step on ``batch`` at KL weight ``beta``; ``validate``: through Pyro's
        ``Trace_ELBO`` with Pyro's validation as set (the direct ELBO skips it).

        :raises NonFiniteLossError: the loss or a gradient is NaN/inf (names the sites).
        """
        self.anneal.beta = beta
        try:
            loss = svi_step(
                self.svi,
                (*batch, torch.tensor(beta)) if self.pyro_jit else batch,
                self.sync,
                step,
                direct=None if validate else self.direct,
                beta=beta,
            )
        except ValueError as exc:
            # with validation on, Pyro refuses NaN distribution parameters before the loss
            if "invalid values" not in str(exc):
                raise
            raise non_finite_error(step, float("nan"), self.model, self.guide, batch) from exc
        if not math.isfinite(loss):
            raise non_finite_error(step, loss, self.model, self.guide, batch)
        return loss
