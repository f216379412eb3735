"""Several SVI steps in one compiled call (``fit(..., jit="fused")``).

A compiled loss (``jit=True``) still returns to Python every step: the backward pass, the
finiteness check and the optimizer update run from there, and on a small model those calls
cost more than the arithmetic. NumPyro avoids them by compiling the whole loop
(``lax.scan``). :class:`FusedSteps` does the same with ``torch.compile``: one graph holds
``steps`` complete steps -- the one-particle direct ELBO and its gradient
(``torch.func.grad_and_value``), the element-wise gradient clamp and the Adam update of
:class:`~bayes_fusion.optim.FusedClippedAdam` with its per-step learning-rate decay -- over
one flat vector of all guide parameters, and inductor's C++ wrapper calls its kernels.

Semantics are those of the step-by-step loop: a step whose loss or gradient is not finite is
not applied (nor is any later step of the call), and the fit stops there with
:class:`~bayes_fusion.NonFiniteLossError`; the KL warm-up weight is given per step; the last
call of a fit runs with only its first steps active, so one graph serves every call. The
guide's parameters and the optimizer's state are written back when the fit ends (or stops).
Random draws come from torch's generator through the same kernels as in eager mode
(inductor's ``fallback_random``), and the first call is checked against the eager function
from the same random state.
"""

from __future__ import annotations

import time
import types
import warnings

import pyro
import torch
from torch import Tensor

from ..seams import private_code
from .optim import FusedClippedAdam, adam_step_size, clipped_adam_update

__all__ = ["FUSED_STEPS", "FusedSteps"]

#: steps per compiled call: 8 makes a small model's step about 4x faster than ``jit=True``
#: for 30-60 s of compile time on a 2-core CPU (benchmarks/results)
FUSED_STEPS = 8


class FusedSteps:
    """``steps`` SVI steps per compiled call for a :class:`~bayes_fusion.infer.svi_step.DirectLoss`
    of a pure model and a :class:`~bayes_fusion.optim.FusedClippedAdam` optimizer.

    :param direct: the fit's direct loss (``direct.pure`` must hold).
    :param optim: the fit's optimizer (its arguments give the update).
    :param steps: steps per call (``>= 1``).
    """

    def __init__(self, direct, optim, steps: int = FUSED_STEPS) -> None:
        self.direct, self.optim, self.steps = direct, optim, steps
        self.params: list[Tensor] = list(direct.params)
        self._shapes = [p.shape for p in self.params]
        self._sizes = [p.numel() for p in self.params]
        self.compile_seconds = 0.0
        # a private copy of the chunk's code per instance: dynamo caches compiled graphs per
        # code object and stops compiling one after a few recompilations (one per fit)
        chunk = private_code(FusedSteps._chunk, f"_chunk_{id(self):x}")
        self._compiled = torch.compile(
            types.MethodType(chunk, self),
            fullgraph=True,
            dynamic=False,
            options={"cpp_wrapper": True, "fallback_random": True},
        )
        self._checked = False
        #: why the compiled call was given up (``None``: it was not)
        self.failed: str | None = None
        self._state: list[Tensor] | None = None  # flat theta, m, v between calls
        self._step0 = 0
        self._lr0 = 0.0

    # --- the compiled function ----------------------------------------------------------
    def _unflat(self, theta: Tensor) -> list[Tensor]:
        parts = torch.split(theta, self._sizes)
        return [part.view(shape) for part, shape in zip(parts, self._shapes, strict=True)]

    def _chunk(self, theta, m, v, t0, lr0, betas, active, obs_scale, batch):
        args = self.optim.args

        def loss_of(flat, beta):
            return self.direct._loss(beta, obs_scale, self._unflat(flat), batch)

        grad_and_loss = torch.func.grad_and_value(loss_of)
        ok = torch.ones((), dtype=torch.bool, device=theta.device)
        losses, finite = [], []
        for k in range(self.steps):
            grad, loss = grad_and_loss(theta, betas[k])
            good = torch.isfinite(loss) & torch.isfinite(grad).all()
            ok = ok & good & (active > k)
            lr = lr0 * args["lrd"] ** (k + 1)
            step_size = adam_step_size(lr, t0 + (k + 1), args["betas"])
            (delta,), (m_new,), (v_new,) = clipped_adam_update(
                [grad],
                [m],
                [v],
                step_size,
                betas=args["betas"],
                eps=args["eps"],
                clip_norm=args["clip_norm"],
            )
            theta = torch.where(ok, theta + delta, theta)
            m, v = torch.where(ok, m_new, m), torch.where(ok, v_new, v)
            losses.append(loss)
            finite.append(good)
        return theta, m, v, torch.stack(losses), torch.stack(finite)

    def report(self) -> dict:
        """What :attr:`FitResult.info` says of the fused steps (nothing if they were given up)."""
        if self.failed is not None:
            return {}
        return {"fused_steps": self.steps, "compile_seconds": self.compile_seconds}

    # --- state in and out ---------------------------------------------------------------
    @staticmethod
    def unsupported_reason(direct, optim) -> str:
        """Why a fit cannot run fused steps ('' when it can)."""
        if direct is None or not direct.pure:
            return "the loss is not the direct ELBO of a model with a Pyro-free log joint"
        if type(optim) is not FusedClippedAdam:
            return f"the optimizer is {type(optim).__name__}, not the default FusedClippedAdam"
        return ""

    def _load(self) -> None:
        states = [self.optim.state_of(p) for p in self.params]
        steps, lrs = {s.step for s in states}, {s.lr for s in states}
        if len(steps) != 1 or len(lrs) != 1:
            raise RuntimeError("fused steps need one step count and learning rate for all")
        self._step0, self._lr0 = steps.pop(), lrs.pop()
        moments = ([s.exp_avg for s in states], [s.exp_avg_sq for s in states])
        self._state = [
            torch.cat([t.detach().reshape(-1) for t in tensors])
            for tensors in (self.params, *moments)
        ]

    def write_back(self) -> None:
        """Copy the parameters and the optimizer state back into the guide and optimizer."""
        if self._state is None:
            return
        theta, m, v = (self._unflat(t) for t in self._state)
        with torch.no_grad():
            for p, value, m_p, v_p in zip(self.params, theta, m, v, strict=True):
                p.copy_(value)
                state = self.optim.state_of(p)
                state.exp_avg, state.exp_avg_sq = m_p.clone(), v_p.clone()
                state.lr, state.step = self._lr0, self._step0
        self._state = None

    # --- one call -----------------------------------------------------------------------
    def run(self, batch, betas: list[float], obs_scale: float) -> tuple[list[float], int]:
        """Run ``len(betas)`` (``<= steps``) steps at these KL weights.

        :returns: the losses of the steps run, and the index of the first step whose loss or
            gradient was not finite (``-1``: none; that step and later ones were not applied).
        """
        if self._state is None:
            self._load()
        like = self._state[0]
        n = len(betas)
        padded = list(betas) + [1.0] * (self.steps - n)
        inputs = (
            *self._state,
            torch.tensor(float(self._step0), dtype=like.dtype, device=like.device),
            torch.tensor(self._lr0, dtype=like.dtype, device=like.device),
            torch.tensor(padded, dtype=like.dtype, device=like.device),
            torch.tensor(n, device=like.device),
            torch.tensor(obs_scale, dtype=like.dtype, device=like.device),
            tuple(batch),
        )
        # as the step-by-step direct loss: no per-step argument validation of distributions
        with pyro.validation_enabled(False):
            out = self._compiled(*inputs) if self._checked else self._first_call(inputs, n)
        theta, m, v, losses, finite = out
        losses, finite = losses[:n].tolist(), finite[:n].tolist()
        bad = next((k for k, good in enumerate(finite) if not good), -1)
        done = n if bad < 0 else bad
        self._state = [theta, m, v]
        self._lr0 *= self.optim.args["lrd"] ** done
        self._step0 += done
        return (losses if bad < 0 else losses[: bad + 1]), bad

    def _first_call(self, inputs, n: int):
        """Compile, and check the compiled call against the eager one from the same random
        state; raises ``RuntimeError`` (the caller falls back to step-by-step) on failure."""
        cpu = torch.get_rng_state()
        with torch.no_grad():
            eager = self._chunk(*inputs)
        after = torch.get_rng_state()
        torch.set_rng_state(cpu)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # deprecations inside torch's own compiler stack are not the user's to act on
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
                out = self._compiled(*inputs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines()]
            self.failed = " ".join(ln for ln in lines if ln)[:300]
            raise RuntimeError(self.failed) from exc
        self.compile_seconds += time.perf_counter() - start
        torch.set_rng_state(after)
        got, want = out[3][:n].double(), eager[3][:n].double()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-6 * max(1.0, float(want.abs().max()))):
            self.failed = (
                f"the compiled steps' losses {got.tolist()} differ from eager {want.tolist()}"
            )
            raise RuntimeError(self.failed)
        self._checked = True
        return out


def fused_or_none(direct, optim, wanted: bool, other_reason: str = ""):
    """A :class:`FusedSteps` when ``wanted`` and the fit qualifies; otherwise ``None``, with a
    warning naming the reason when it was wanted.

    :param other_reason: why the fit's options rule fused steps out ('' when they do not).
    """
    if not wanted:
        return None
    reason = other_reason or FusedSteps.unsupported_reason(direct, optim)
    if reason:
        warnings.warn(f"fit: jit='fused' runs step by step: {reason}", RuntimeWarning, stacklevel=4)
        return None
    return FusedSteps(direct, optim)
