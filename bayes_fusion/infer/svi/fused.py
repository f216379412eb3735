"""Whole SVI steps compiled into one call (``fit(..., jit=True)`` and ``jit="fused"``).

A compiled *loss* still returns to Python every step: the backward pass, the finiteness check
and the optimizer update run from there, and on a small model those calls cost more than the
arithmetic. NumPyro avoids them by compiling the whole loop (``lax.scan``). :class:`FusedSteps`
compiles whole steps with ``torch.compile``: one graph holds ``steps`` complete steps -- the
one-particle direct ELBO and its gradient (``torch.func.grad_and_value``), the element-wise
gradient clamp and the Adam update of :class:`~bayes_fusion.infer.svi.optim.FusedClippedAdam`
with its per-step learning-rate decay and the KL warm-up weight -- over one flat vector of all
guide parameters, and inductor's C++ wrapper calls its kernels.

Everything that differs between fits of the same model and data shapes is an *input* of the
graph, never a constant baked into it: the step counter, the learning rate and its decay, the
KL warm-up length, the likelihood weight. So one graph serves every fit of those shapes, and
inductor's on-disk cache (:mod:`bayes_fusion.infer.compile_cache`) serves it to the next process
in seconds. ``steps=1`` (``jit=True``) compiles in about a quarter of the time of
:data:`FUSED_STEPS` unrolled steps (``jit="fused"``), whose steps are a little faster.

Semantics are those of the step-by-step loop: a step whose loss or gradient is not finite is
not applied (nor is any later step of the call), and the fit stops there with
:class:`~bayes_fusion.NonFiniteLossError`; the last call of a fit may run with only its first
steps active, so one graph serves every call. The guide's parameters and the optimizer's state
are written back when the fit ends (or stops). Random draws come from torch's generator through
the same kernels as in eager mode (inductor's ``fallback_random``), and the first call is
checked against the eager function from the same random state.
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings

import pyro
import torch
from torch import Tensor

from ..compile_cache import CacheUse, caching
from ..seams import private_code
from .optim import FusedClippedAdam, adam_step_size, clipped_adam_update

__all__ = ["FUSED_STEPS", "STEPS_PER_RUN", "FusedSteps", "fused_or_none"]

#: steps one :meth:`FusedSteps.run` takes before the training loop gets control back (its
#: progress bar; several compiled calls share one entry into their contexts)
STEPS_PER_RUN = 64

#: steps per compiled call of ``jit="fused"``: 8 unrolled steps run a small model's step about
#: 1.4x faster than one step per call, for about 4x the compile time (benchmarks/results)
FUSED_STEPS = 8


class FusedSteps:
    """``steps`` SVI steps per compiled call for a :class:`~bayes_fusion.infer.svi.step.DirectLoss`
    of a pure model and a :class:`~bayes_fusion.infer.svi.optim.FusedClippedAdam` optimizer.

    :param direct: the fit's direct loss (``direct.pure`` must hold).
    :param optim: the fit's optimizer (its arguments give the update).
    :param steps: steps per call (``>= 1``).
    :param warmup: the fit's KL warm-up steps (the weight of step ``s`` is
        ``min(1, (s + 1) / warmup)``; 0: always 1).
    :param obs_scale: the likelihood's extra weight (a distributed shard's; 1 otherwise).
    """

    def __init__(
        self, direct, optim, steps: int = 1, warmup: int = 0, obs_scale: float = 1.0
    ) -> None:
        self.direct, self.optim, self.steps = direct, optim, steps
        self.params: list[Tensor] = list(direct.params)
        self._shapes = [p.shape for p in self.params]
        self._sizes = [p.numel() for p in self.params]
        like = self.params[0]
        scalar = {"dtype": like.dtype, "device": like.device}
        # the fit's constants, as graph inputs (one graph for every fit of these shapes)
        self._constants = (
            torch.tensor(float(optim.args["lrd"]), **scalar),
            torch.tensor(float(warmup), **scalar),
            torch.tensor(float(obs_scale), **scalar),
        )
        self._active = {n: torch.tensor(n, device=like.device) for n in range(1, steps + 1)}
        self.compile_seconds = 0.0
        #: what inductor's on-disk cache did for the compile (``None`` before it)
        self.cache: CacheUse | None = None
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
        self._state: list[Tensor] | None = None  # flat theta, m, v; step count; lr

    # --- the compiled function ----------------------------------------------------------
    def _unflat(self, theta: Tensor) -> list[Tensor]:
        parts = torch.split(theta, self._sizes)
        return [part.view(shape) for part, shape in zip(parts, self._shapes, strict=True)]

    def _chunk(self, theta, m, v, t, lr, lrd, warmup, obs_scale, active, batch):
        args = self.optim.args

        def loss_of(flat, beta):
            return self.direct._loss(beta, obs_scale, self._unflat(flat), batch)

        grad_and_loss = torch.func.grad_and_value(loss_of)
        ok = torch.ones((), dtype=torch.bool, device=theta.device)
        losses, finite = [], []
        for k in range(self.steps):
            # the loop's KL weight of step t (0-based): min(1, (t + 1) / warmup), 1 without
            beta = torch.where(warmup > 0, torch.clamp((t + 1) / warmup, max=1.0), 1.0)
            grad, loss = grad_and_loss(theta, beta)
            good = torch.isfinite(loss) & torch.isfinite(grad).all()
            ok = ok & good & (active > k)
            lr_k = lr * lrd
            step_size = adam_step_size(lr_k, t + 1, args["betas"])
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
            t, lr = torch.where(ok, t + 1, t), torch.where(ok, lr_k, lr)
            losses.append(loss)
            finite.append(good)
        return theta, m, v, t, lr, torch.stack(losses), torch.stack(finite)

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
        like = self.params[0]
        scalars = [
            torch.tensor(float(x.pop()), dtype=like.dtype, device=like.device) for x in (steps, lrs)
        ]
        moments = ([s.exp_avg for s in states], [s.exp_avg_sq for s in states])
        flat = [
            torch.cat([t.detach().reshape(-1) for t in tensors])
            for tensors in (self.params, *moments)
        ]
        self._state = flat + scalars

    def write_back(self) -> None:
        """Copy the parameters and the optimizer state back into the guide and optimizer."""
        if self._state is None:
            return
        theta, m, v = (self._unflat(t) for t in self._state[:3])
        step, lr = int(self._state[3]), float(self._state[4])
        with torch.no_grad():
            for p, value, m_p, v_p in zip(self.params, theta, m, v, strict=True):
                p.copy_(value)
                state = self.optim.state_of(p)
                state.exp_avg, state.exp_avg_sq = m_p.clone(), v_p.clone()
                state.lr, state.step = lr, step
        self._state = None

    # --- one call -----------------------------------------------------------------------
    def run(self, batch, n: int) -> tuple[list[float], int]:
        """Run the next ``n`` steps, in calls of :attr:`steps` (the last one maybe shorter).

        The calls share one entry into the contexts they need (no per-step distribution
        validation, trusted guards): entered per call, those were ~10 % of a compiled step of
        the benchmark model.

        :returns: the losses of the steps run, and the index of the first step whose loss or
            gradient was not finite (``-1``: none; that step and later ones were not applied).
        """
        if self._state is None:
            self._load()
        losses: list[float] = []
        # as the step-by-step direct loss: no per-step argument validation of distributions
        with pyro.validation_enabled(False):
            if not self._checked:
                first = min(n, self.steps)
                losses, bad = self._unpack(
                    self._first_call(self._inputs(batch, first), first), first
                )
                if bad >= 0 or first == n:
                    return losses, bad
            with _trusted_guards():
                while len(losses) < n:
                    k = min(self.steps, n - len(losses))
                    chunk, bad = self._unpack(self._compiled(*self._inputs(batch, k)), k)
                    if bad >= 0:
                        return losses + chunk, len(losses) + bad
                    losses += chunk
        return losses, -1

    def _inputs(self, batch, n: int) -> tuple:
        return (*self._state, *self._constants, self._active[n], tuple(batch))

    def _unpack(self, out, n: int) -> tuple[list[float], int]:
        """Keep one call's new state; its losses (up to the first non-finite step) and the
        index of that step (``-1``: none)."""
        *state, losses, finite = out
        self._state = state
        if self.steps == 1:
            losses, finite = [losses.item()], [bool(finite)]
        else:
            losses, finite = losses[:n].tolist(), finite[:n].tolist()
        bad = next((k for k, good in enumerate(finite) if not good), -1)
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
            with warnings.catch_warnings(), caching() as cache:
                # deprecations inside torch's own compiler stack are not the user's to act on
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
                out = self._compiled(*inputs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            lines = [ln.strip() for ln in f"{type(exc).__name__}: {exc}".splitlines()]
            self.failed = " ".join(ln for ln in lines if ln)[:300]
            self._state = None  # nothing applied: the guide keeps its own values
            raise RuntimeError(self.failed) from exc
        self.compile_seconds += time.perf_counter() - start
        self.cache = cache.use()
        torch.set_rng_state(after)
        got, want = out[-2][:n].double(), eager[-2][:n].double()
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-6 * max(1.0, float(want.abs().max()))):
            self.failed = (
                f"the compiled steps' losses {got.tolist()} differ from eager {want.tolist()}"
            )
            self._state = None
            raise RuntimeError(self.failed)
        self._checked = True
        return out


def _trusted_guards():
    """Skip dynamo's guard checks on a checked call (``torch.compiler.set_stance(
    skip_guard_eval_unsafe=True)``, 0.07 ms of a 0.5 ms call): every call of one
    :class:`FusedSteps` passes inputs of the same structure, shapes and dtypes to the one graph
    its private code object holds. A no-op on a torch without the option."""
    try:
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


def fused_or_none(
    direct, optim, steps: int, warmup: int, obs_scale: float, other_reason: str = "", warn=True
):
    """A :class:`FusedSteps` of ``steps`` steps per call when the fit qualifies; otherwise
    ``None``, with a warning naming the reason when ``warn``.

    :param other_reason: why the fit's options rule fused steps out ('' when they do not).
    """
    reason = other_reason or FusedSteps.unsupported_reason(direct, optim)
    if reason:
        if warn:
            warnings.warn(
                f"fit: jit='fused' runs step by step: {reason}", RuntimeWarning, stacklevel=4
            )
        return None
    return FusedSteps(direct, optim, steps, warmup, obs_scale)
