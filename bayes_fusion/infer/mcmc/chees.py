"""Many HMC chains in lockstep: ChEES-HMC on a ``(chains, dim)`` state.

Every chain takes the same number of leapfrog steps in an iteration, so one batched call of the
potential and its gradient (:meth:`~.potential.FlatPotential.value_and_grad`, ``torch.func.vmap``)
moves all of them; while the tensors are small, ``C`` chains cost little more than one. The
tuning follows ChEES-HMC (Hoffman, Radul & Sountsov, AISTATS 2021; the reference
implementations are BlackJAX's ``chees_adaptation`` and TensorFlow Probability's
``gradient_based_trajectory_length_adaptation``), written here in torch:

* **metric** -- the chains move in whitened coordinates ``w``, ``x = loc + scale w``, with an
  identity mass matrix: ``scale`` is the Cholesky factor of a covariance (dense, up to
  :data:`DENSE_METRIC_MAX_DIM` coordinates) or its diagonal's square root. It starts from the
  Laplace approximation at the MAP point and is re-estimated at the end of each warm-up window
  from the draws of every chain in the window (Stan's doubling windows, its shrinkage towards a
  small diagonal);
* **step size** -- dual averaging (``pyro.ops.dual_averaging``) of the chains' mean acceptance
  probability towards ``target_accept_prob`` (the references' harmonic mean let one chain in a
  narrow region shrink every chain's step many-fold);
* **trajectory length** -- ``T`` maximizes the ChEES criterion (the change in the chains'
  spread about their mean over one trajectory), by Adam on ``log T`` with the clipped update of
  the references; every iteration takes ``ceil(u T / step size)`` steps with ``u`` from a Halton
  sequence (jitter: no fixed length resonates with the posterior);
* **divergences** -- a transition whose energy error exceeds :data:`DIVERGENCE_ENERGY` (or is
  not finite) is rejected and counted;
* **stuck chains** -- at the end of each warm-up window a chain that hardly moved in it (mean
  acceptance under :data:`STUCK_ACCEPTANCE`) restarts from another chain's position
  (:func:`move_stuck_chains`); never after warm-up.

The leapfrog step runs through ``torch.compile`` where asked (:class:`~..compiled
.CompiledFunction`, checked against eager, eager if compiling fails), or from the iteration on
where the cost model says it pays (:mod:`.compile_choice`); momenta and jitter are drawn outside
the graph.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings

import pyro
import torch
from pyro.ops.dual_averaging import DualAveraging
from torch import Tensor
from tqdm.auto import tqdm

from ..compiled import CompiledFunction
from .compile_choice import PROBE_ITERATIONS, RECHECK_ITERATIONS, LeapfrogCompileChoice

__all__ = [
    "DENSE_METRIC_MAX_DIM",
    "DIVERGENCE_ENERGY",
    "ChEESState",
    "LockstepRun",
    "Whitening",
    "halton",
    "move_stuck_chains",
    "run_lockstep",
    "warmup_windows",
]

#: energy error above which a transition counts as divergent (Stan's and Pyro's threshold)
DIVERGENCE_ENERGY = 1000.0
#: the metric is a dense covariance up to this many coordinates, diagonal above
DENSE_METRIC_MAX_DIM = 500
#: Adam on log T (the references' settings): learning rate, second-moment decay, update clip
TRAJECTORY_LR, TRAJECTORY_BETA2, TRAJECTORY_CLIP = 0.025, 0.95, 0.35
#: weight of iteration t in the moving average of log T: t ** -DECAY
DECAY = 0.5
#: fewest leapfrog steps the trajectory length spans: where chains hold the posterior in
#: different modes the ChEES criterion can shrink T to one step, a random walk (r-hat 2-3.5
#: on Regressor(XOXLinear), seed 2)
MIN_STEPS = 4
#: a chain whose mean acceptance probability over a warm-up window is below this is stuck
STUCK_ACCEPTANCE = 0.1
#: most leapfrog steps timed in each phase of a run whose costs are recorded (the eager probe,
#: the compiled steps): their median is the step's cost
TIMED_STEPS = 1000


def halton(index: int, base: int = 2) -> float:
    """The ``index``-th element (``index >= 1``) of the van der Corput / Halton sequence in
    ``base``: a low-discrepancy sequence in ``(0, 1)`` (jitter of the trajectory length)."""
    out, f = 0.0, 1.0 / base
    while index > 0:
        out += f * (index % base)
        index //= base
        f /= base
    return out


class Whitening:
    """The affine map ``x = loc + scale w`` between the chains' whitened coordinates ``w`` and
    the potential's coordinates ``x``.

    :param loc: ``(D,)``.
    :param cov: the covariance the map whitens, ``(D, D)`` (a dense metric) or ``(D,)`` (its
        diagonal: a diagonal metric).
    """

    def __init__(self, loc: Tensor, cov: Tensor) -> None:
        self.loc = loc
        self.dense = cov.dim() == 2
        if self.dense:
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            jitter = 1e-10 * cov.diagonal().mean().clamp(min=1.0)
            self.scale = torch.linalg.cholesky(0.5 * (cov + cov.T) + jitter * eye)
        else:
            self.scale = cov.sqrt()

    @classmethod
    def estimate(cls, draws: Tensor, dense: bool) -> Whitening:
        """From a window of draws ``(C, n, D)``: the centre of all of them and the pooled
        within-chain (co)variance -- each chain about its own mean, so that chains holding the
        posterior in different modes (the components in another order) do not inflate it --,
        shrunk towards ``1e-3 I`` as Stan does (weight ``5 / (m + 5)``, ``m`` the pooled
        draws)."""
        chains, n = draws.shape[:2]
        loc = draws.mean((0, 1))
        centred = (draws - draws.mean(1, keepdim=True)).reshape(chains * n, -1)
        m, dof = chains * n, max(chains * (n - 1), 1)
        if dense:
            cov = centred.T @ centred / dof
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            cov = (m / (m + 5.0)) * cov + 1e-3 * (5.0 / (m + 5.0)) * eye
        else:
            cov = (m / (m + 5.0)) * centred.square().sum(0) / dof + 1e-3 * (5.0 / (m + 5.0))
        return cls(loc, cov)

    @staticmethod
    def map_to_x(w: Tensor, loc: Tensor, scale: Tensor, dense: bool) -> Tensor:
        """``x = loc + scale w`` for ``w`` ``(..., D)``, from the map's tensors (so that a
        compiled function can take them as inputs)."""
        return loc + (w @ scale.T if dense else w * scale)

    @staticmethod
    def pull_back(g: Tensor, scale: Tensor, dense: bool) -> Tensor:
        """A gradient in ``x`` ``(..., D)`` as the gradient in ``w``: ``scale^T g``."""
        return g @ scale if dense else g * scale

    def to_x(self, w: Tensor) -> Tensor:
        """``(..., D)`` whitened -> potential coordinates."""
        return self.map_to_x(w, self.loc, self.scale, self.dense)

    def to_w(self, x: Tensor) -> Tensor:
        """``(..., D)`` potential coordinates -> whitened."""
        centred = x - self.loc
        if not self.dense:
            return centred / self.scale
        solved = torch.linalg.solve_triangular(self.scale, centred.T, upper=False)
        return solved.T

    def tensors(self) -> tuple[Tensor, Tensor]:
        """``(loc, scale)``: what the compiled leapfrog step takes as inputs."""
        return self.loc, self.scale


def move_stuck_chains(x: Tensor, stuck: Tensor) -> tuple[Tensor, int]:
    """Move every stuck chain to the position of a chain drawn at random from the others.

    One step size and one metric serve every chain; a chain that wandered during warm-up into
    a region they do not fit (a narrow ridge where the factors trade scale with each other)
    stops moving -- its acceptance falls to ~0 -- and it would stay there, telling nothing of
    the posterior but failing r-hat. During warm-up, whose draws are discarded, such a chain is
    given a moving chain's position instead (its own momenta then take it elsewhere). After
    warm-up no chain is moved: a chain that gets stuck while drawing is left for r-hat to see.

    :param x: positions ``(C, D)``. :param stuck: ``(C,)`` bool.
    :returns: the new positions and the number of chains moved (0 when every chain is stuck).
    """
    healthy = torch.nonzero(~stuck).flatten()
    moved = int(stuck.sum())
    if moved == 0 or healthy.numel() == 0:
        return x, 0
    donors = healthy[torch.randint(healthy.numel(), (moved,), device=x.device)]
    out = x.clone()
    out[stuck] = x[donors]
    return out, moved


def warmup_windows(warmup: int) -> list[int]:
    """The iterations (1-based counts of warm-up iterations done) after which the metric is
    re-estimated: Stan's schedule -- an initial 15 % adapting the step size and trajectory
    length only, windows doubling from 25 iterations (the last one stretched to the terminal
    10 %), a terminal 10 % with the final metric. Too short a warm-up for a window (under 60
    iterations) keeps the starting metric."""
    if warmup < 60:
        return []
    start, end = max(int(0.15 * warmup), 10), warmup - max(int(0.1 * warmup), 10)
    ends, size, at = [], 25, start
    while at + size < end:
        if at + 3 * size > end:  # the next window would be cut short: stretch this one
            break
        at += size
        ends.append(at)
        size *= 2
    ends.append(end)
    return ends


@dataclasses.dataclass
class ChEESState:
    """The state of a lockstep run, enough to continue it (more draws without adapting).

    :ivar x: the chains' positions in the potential's coordinates ``(C, D)``.
    :ivar step_size: the adapted leapfrog step size (whitened coordinates).
    :ivar trajectory_length: the adapted trajectory length ``T``.
    :ivar loc: the metric's centre ``(D,)``. :ivar cov: its covariance ``(D, D)`` or ``(D,)``.
    :ivar halton_index: the next index of the jitter sequence.
    """

    x: Tensor
    step_size: float
    trajectory_length: float
    loc: Tensor
    cov: Tensor
    halton_index: int

    def whitening(self) -> Whitening:
        return Whitening(self.loc, self.cov)


@dataclasses.dataclass
class LockstepRun:
    """What :func:`run_lockstep` returns.

    :ivar draws: positions after warm-up, potential coordinates ``(C, S, D)``.
    :ivar stats: per-draw statistics (ArviZ's ``sample_stats`` names: ``diverging``,
        ``acceptance_rate``, ``n_steps``, ``step_size``, ``energy``, ``lp``), name -> ``(C, S)``.
    :ivar divergences: per chain, the indices of divergent transitions after warm-up.
    :ivar warmup_divergences: divergent transitions during warm-up, all chains.
    :ivar restarted_chains: stuck chains moved during warm-up (:func:`move_stuck_chains`).
    :ivar state: where the run stopped (:class:`ChEESState`), to continue from.
    :ivar gradients: batched potential-and-gradient calls made (each moves every chain).
    :ivar compile: the compiled step's report (``None``: eager).
    :ivar batched: ``True`` when the chains were evaluated in one batched call, else why not.
    :ivar jit_choice: the cost-based compile choice and its outcome
        (:meth:`.compile_choice.LeapfrogCompileChoice.report`; ``None``: not asked, or the run
        ended before it was made).
    """

    draws: Tensor
    stats: dict[str, Tensor]
    divergences: list[list[int]]
    warmup_divergences: int
    restarted_chains: int
    state: ChEESState
    gradients: int
    compile: dict | None
    batched: bool | str
    jit_choice: dict | None = None


class _Leapfrog:
    """One leapfrog step of every chain in whitened coordinates (identity mass):
    ``(w, p, g, step_size, loc, scale) -> (w, p, U, g)`` with ``U`` ``(C,)`` the potential and
    ``g`` ``(C, D)`` its gradient in ``w`` (the flat potential's gradient in ``x`` through the
    whitening map); through ``torch.compile`` when ``compile``.

    The chains are evaluated in one batched call of the flat potential
    (:meth:`~.potential.FlatPotential.value_and_grad`). A potential that does not broadcast
    over the chain dimension (a user model whose code reads tensor values, e.g. a
    data-dependent ``if``) makes the first call fall back to one chain after another; the
    steps then run uncompiled (correct, about ``C`` times slower), with one warning, and
    :attr:`batched` says why.

    While :attr:`times` is a list, every step's wall time (seconds) is appended to it."""

    def __init__(self, flat, dense: bool, compile: bool) -> None:
        self.flat = flat
        self.dense = dense
        self.compiled: CompiledFunction | None = None
        if compile:
            self.compile_now()
        self.calls = 0
        self.times: list[float] | None = None

    def compile_now(self) -> None:
        """Run the steps from now on through ``torch.compile`` (unless the chains do not
        batch: those run one after another, eagerly). A potential that runs Pyro's handlers (a
        user's model) is traced first: they run once, at trace time."""
        if self.flat.batched is True:
            self.compiled = CompiledFunction(
                self._step,
                # float32 positions and gradients after one step agree to ~1e-4 of their scale
                rtol=1e-3,
                name="lockstep leapfrog",
                trace=not getattr(self.flat.potential, "pyro_free", True),
            )

    @property
    def batched(self) -> bool | str:
        """``True`` while the chains are evaluated in one batched call; else why not."""
        return self.flat.batched

    def _value_and_grad(self, w: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        x = Whitening.map_to_x(w, loc, scale, self.dense)
        if self.flat.batched is True:
            u, g = self.flat.batched_value_and_grad(x)
        else:
            u, g = self.flat.looped_value_and_grad(x)
        return u, Whitening.pull_back(g, scale, self.dense)

    def _step(self, w, p, g, step_size, loc, scale):
        p = p - 0.5 * step_size * g
        w = w + step_size * p
        u, g = self._value_and_grad(w, loc, scale)
        p = p - 0.5 * step_size * g
        return w, p, u, g

    def value_and_grad(self, w: Tensor, whitening: Whitening) -> tuple[Tensor, Tensor]:
        """The potential ``(C,)`` and its gradient ``(C, D)`` at ``w``; the first call finds
        out whether the chains batch."""
        self.calls += 1
        loc, scale = whitening.tensors()
        with torch.no_grad():
            if self.calls > 1:
                with pyro.validation_enabled(False):
                    return self._value_and_grad(w, loc, scale)
            u, g = self.flat.value_and_grad(whitening.to_x(w))
            if self.flat.batched is not True:
                self._unbatch()
            return u, Whitening.pull_back(g, scale, self.dense)

    def _unbatch(self) -> None:
        self.compiled = None
        warnings.warn(
            "lockstep chains: the model's log density does not broadcast over a leading chain "
            f"dimension under torch.func.vmap ({self.flat.batched}); evaluating the chains one "
            "after another, uncompiled (correct, slower). Write the model with tensor "
            "operations only (no Python branches or .item() on values) to batch its chains.",
            RuntimeWarning,
            stacklevel=5,
        )

    def __call__(self, w, p, g, step_size: Tensor, whitening: Whitening):
        self.calls += 1
        args = (w, p, g, step_size, *whitening.tensors())
        t0 = time.perf_counter()
        with pyro.validation_enabled(False), torch.no_grad():
            out = self.compiled(*args) if self.compiled is not None else self._step(*args)
        if self.times is not None and len(self.times) < TIMED_STEPS:
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)
            self.times.append(time.perf_counter() - t0)
        return out

    def report(self) -> dict | None:
        if self.compiled is None:
            return None
        return {
            "compiled": self.compiled.failed is None,
            "compile_seconds": self.compiled.compile_seconds,
            "failure": self.compiled.failed,
        }

    def record_costs(self, costs: LeapfrogCompileChoice, steps_per_iteration: float) -> dict | None:
        """Record the run's costs in ``costs`` (its compile, the compiled step's median time
        from :attr:`times` without the first, compiling call); the ``jit_choice`` report."""
        compiled = self.compiled
        if compiled is None or compiled.failed is not None or not compiled.cache_uses:
            return costs.report(steps_per_iteration)
        times = (self.times or [])[1:]
        step_ms = statistics.median(times) * 1e3 if times else None
        return costs.report(
            steps_per_iteration, compiled.compile_seconds, step_ms, compiled.cache_uses[-1]
        )


class _Trajectory:
    """One iteration of every chain: momentum draw, ``steps`` leapfrog steps, Metropolis
    correction. Returns the accepted state and what adaptation needs."""

    def __init__(self, leapfrog: _Leapfrog) -> None:
        self.leapfrog = leapfrog

    def __call__(self, w, u, g, step_size: float, steps: int, whitening: Whitening):
        p0 = torch.randn_like(w)
        energy0 = u + 0.5 * p0.square().sum(-1)
        eps = torch.as_tensor(step_size, dtype=w.dtype, device=w.device)
        w1, p1, u1, g1 = w, p0, u, g
        for _ in range(steps):
            w1, p1, u1, g1 = self.leapfrog(w1, p1, g1, eps, whitening)
        energy1 = u1 + 0.5 * p1.square().sum(-1)
        delta = energy1 - energy0
        finite = torch.isfinite(delta) & torch.isfinite(w1).all(-1) & torch.isfinite(g1).all(-1)
        divergent = ~finite | (delta > DIVERGENCE_ENERGY)
        accept_prob = torch.where(divergent, 0.0, torch.exp(-delta.clamp(min=0.0)))
        accept = torch.rand_like(accept_prob) < accept_prob
        keep = accept.unsqueeze(-1)
        new = (
            torch.where(keep, w1, w),
            torch.where(accept, u1, u),
            torch.where(keep, g1, g),
        )
        energy = torch.where(accept, energy1, energy0)
        proposal = (w1, p1, accept_prob, divergent)
        return new, proposal, energy


class _Adaptation:
    """Step size (dual averaging of the chains' mean acceptance probability) and trajectory
    length (Adam on the ChEES criterion in ``log T``, its moving average over recent
    iterations)."""

    def __init__(self, step_size: float, target_accept_prob: float, max_steps: int) -> None:
        self.target = target_accept_prob
        self.max_steps = max_steps
        self.log_t = -math.inf  # Adam's log T; restart raises it to the average
        self.restart(step_size, step_size)
        self.second_moment = 0.0

    def restart(self, step_size: float, trajectory_length: float) -> None:
        """Start the step size's dual averaging afresh at ``step_size`` and the trajectory
        length's average at ``trajectory_length`` (after a new metric); the trajectory length
        Adam moves is raised to it where it fell below (a tiny first step size would otherwise
        hold it at one leapfrog step for the whole run)."""
        self.dual = DualAveraging(prox_center=math.log(10 * step_size))
        self.step_size = step_size
        self.trajectory_length = trajectory_length
        self.log_t_ma = math.log(trajectory_length)
        self.log_t = max(self.log_t, self.log_t_ma)
        self.t = 1

    def update(self, w0, w1, p1, accept_prob, divergent, jitter: float) -> None:
        ok = ~divergent
        weight = self.t ** (-DECAY)
        # step size: the chains' mean acceptance probability (0 where a chain diverged)
        self.dual.step(self.target - float(accept_prob.mean()))
        log_step = self.dual.get_state()[0]
        if math.isfinite(log_step):
            self.step_size = math.exp(log_step)
        # trajectory: gradient of ChEES in log T (the proposals' spread vs the starts')
        a = torch.where(ok, accept_prob, 0.0)
        if float(a.sum()) > 0:
            safe = torch.where(ok.unsqueeze(-1), w1, w0)
            mean1 = (a.unsqueeze(-1) * safe).sum(0) / a.sum()
            c1, c0 = safe - mean1, w0 - w0.mean(0)
            grads = (c1.square().sum(-1) - c0.square().sum(-1)) * (c1 * p1).sum(-1)
            grads = jitter * self.trajectory_length * torch.where(ok, grads, 0.0)
            grad = float((a * grads).sum() / a.sum())
            if math.isfinite(grad):
                self.second_moment = (
                    TRAJECTORY_BETA2 * self.second_moment + (1 - TRAJECTORY_BETA2) * grad**2
                )
                v_hat = self.second_moment / (1 - TRAJECTORY_BETA2**self.t)
                update = TRAJECTORY_LR * grad / (math.sqrt(v_hat) + 1e-8)
                self.log_t += max(-TRAJECTORY_CLIP, min(TRAJECTORY_CLIP, update))
        self.log_t_ma = (1 - weight) * self.log_t_ma + weight * self.log_t
        self.trajectory_length = self.clipped(math.exp(self.log_t_ma), self.step_size)
        self.t += 1

    def final(self) -> tuple[float, float]:
        """``(step size, trajectory length)`` to sample with: the averaged values."""
        step_size = math.exp(self.dual.get_state()[1])
        if not math.isfinite(step_size):
            step_size = self.step_size
        return step_size, self.clipped(math.exp(self.log_t_ma), step_size)

    def clipped(self, length: float, step_size: float) -> float:
        """``length`` within ``[MIN_STEPS, max_steps]`` steps of ``step_size``."""
        return min(max(length, MIN_STEPS * step_size), self.max_steps * step_size)


def _initial_step_size(trajectory, w, u, g, whitening, start: float = 0.5) -> float:
    """A step size whose one-step acceptance (mean over chains) is near 0.8: halve or double
    ``start`` until it crosses (Stan's heuristic, batched)."""

    def accept(step_size):
        _, (_, _, prob, _), _ = trajectory(w, u, g, step_size, 1, whitening)
        return float(prob.mean())

    step_size = start
    up = accept(step_size) > 0.8
    for _ in range(30):
        new = step_size * (2.0 if up else 0.5)
        if (accept(new) > 0.8) != up:
            return step_size if up else new
        step_size = new
    return step_size


def run_lockstep(
    flat,
    starts: Tensor,
    cov: Tensor,
    num_samples: int,
    warmup_steps: int,
    *,
    target_accept_prob: float = 0.8,
    max_steps: int = 256,
    compile: bool | None = False,
    costs: LeapfrogCompileChoice | None = None,
    state: ChEESState | None = None,
    progress: bool = False,
) -> LockstepRun:
    """Run ``C`` chains of ChEES-HMC in lockstep on a flat potential.

    :param flat: the potential as a function of one flat vector
        (:class:`~.potential.FlatPotential`).
    :param starts: the chains' starting points ``(C, D)`` (potential coordinates); with
        ``state``, ignored (the run continues from ``state.x``).
    :param cov: the starting metric's covariance ``(D, D)`` (dense) or ``(D,)`` (diagonal);
        its kind is the run's. Ignored with ``state`` (its metric is kept).
    :param num_samples: draws per chain after warm-up.
    :param warmup_steps: warm-up iterations (adaptation); ``0`` with ``state``: continue.
    :param target_accept_prob: target of the chains' mean acceptance probability.
    :param max_steps: most leapfrog steps in one iteration.
    :param compile: run the leapfrog step through ``torch.compile`` (``True``), eagerly
        (``False``), or decide from the measured costs after
        :data:`~.compile_choice.PROBE_ITERATIONS` eager iterations, and again every
        :data:`~.compile_choice.RECHECK_ITERATIONS` while eager (``None``; needs ``costs``).
    :param costs: the cost model's records of this run's graph
        (:class:`~.compile_choice.LeapfrogCompileChoice`): with ``compile=None`` it decides;
        in any case the run's steps per iteration and compile costs are recorded.
    :param state: continue a run from its :class:`ChEESState` without adapting again.
    :param progress: show a progress bar.
    :returns: :class:`LockstepRun`.
    """
    if compile is None and costs is None:
        raise ValueError("compile: None (decide from the costs) needs costs, got costs=None")
    dense = (state.cov if state is not None else cov).dim() == 2
    leapfrog = _Leapfrog(flat, dense, compile is True)
    trajectory = _Trajectory(leapfrog)
    if state is not None:
        x, whitening = state.x, state.whitening()
        step_size, length, index = state.step_size, state.trajectory_length, state.halton_index
        warmup_steps = 0
    else:
        x, index = starts, 1
        whitening = Whitening(starts.mean(0), cov)
    w = whitening.to_w(x)
    u, g = leapfrog.value_and_grad(w, whitening)
    if state is None:
        step_size = _initial_step_size(trajectory, w, u, g, whitening)
        adaptation = _Adaptation(step_size, target_accept_prob, max_steps)
        windows = warmup_windows(warmup_steps)
        # without warm-up: the initial step size, the shortest trajectory allowed (warm-up
        # iterations read theirs from the adaptation)
        length = adaptation.clipped(step_size, step_size)
    chains = x.shape[0]
    window, window_acceptance, draws = [], [], []
    warmup_divergences = restarted_chains = 0
    stats = {name: [] for name in ("diverging", "acceptance_rate", "n_steps", "energy", "lp")}
    total = warmup_steps + num_samples
    # (chains that do not batch run eagerly whatever the costs: nothing to decide)
    deciding = compile is None and total > PROBE_ITERATIONS and leapfrog.batched is True
    leapfrog.times = [] if deciding or (compile is True and costs is not None) else None
    iteration_steps = []
    with tqdm(total=total, disable=not progress, desc="MCMC (lockstep chains)", leave=False) as bar:
        for i in range(total):
            warm = i < warmup_steps
            if warm:
                step_size, length = adaptation.step_size, adaptation.trajectory_length
            jitter = halton(index)
            index += 1
            steps = max(1, min(max_steps, math.ceil(jitter * length / step_size)))
            w0 = w
            (w, u, g), (w1, p1, prob, divergent), energy = trajectory(
                w, u, g, step_size, steps, whitening
            )
            iteration_steps.append(steps)
            done = i + 1
            due = (
                PROBE_ITERATIONS <= done < total
                and (done - PROBE_ITERATIONS) % RECHECK_ITERATIONS == 0
            )
            if deciding and due:
                recent = iteration_steps[-RECHECK_ITERATIONS:]
                probe = leapfrog.times if done == PROBE_ITERATIONS else None
                if costs.decide(done, total - done, sum(recent) / len(recent), probe):
                    deciding = False
                    leapfrog.compile_now()
                leapfrog.times = [] if leapfrog.compiled is not None else None
            if warm:
                warmup_divergences += int(divergent.sum())
                adaptation.update(w0, w1, p1, prob, divergent, jitter)
                window.append(whitening.to_x(w))
                window_acceptance.append(prob)
                new_metric = bool(windows) and i + 1 == windows[0]
                if new_metric or i + 1 == warmup_steps:
                    stuck = torch.stack(window_acceptance).mean(0) < STUCK_ACCEPTANCE
                    x_now, moved = move_stuck_chains(whitening.to_x(w), stuck)
                    restarted_chains += moved
                    if new_metric:
                        windows.pop(0)
                        recent = torch.stack(window, 1)
                        whitening = Whitening.estimate(recent[~stuck] if moved else recent, dense)
                    window, window_acceptance = [], []
                    w = whitening.to_w(x_now)
                    u, g = leapfrog.value_and_grad(w, whitening)
                    if new_metric:
                        restart = _initial_step_size(trajectory, w, u, g, whitening, step_size)
                        adaptation.restart(restart, max(adaptation.trajectory_length, restart))
                if i + 1 == warmup_steps:
                    step_size, length = adaptation.final()
            else:
                draws.append(whitening.to_x(w))
                stats["diverging"].append(divergent)
                stats["acceptance_rate"].append(prob)
                stats["n_steps"].append(torch.full((chains,), float(steps), device=w.device))
                stats["energy"].append(energy)
                stats["lp"].append(-u)
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(step_size=f"{step_size:.2e}", steps=steps, refresh=False)
    out_stats = {k: torch.stack(v, 1).double() for k, v in stats.items()}
    out_stats["step_size"] = torch.full_like(out_stats["lp"], step_size)
    divergences = [torch.nonzero(row).flatten().tolist() for row in out_stats["diverging"].bool()]
    final = ChEESState(
        x=whitening.to_x(w),
        step_size=step_size,
        trajectory_length=length,
        loc=whitening.loc,
        cov=whitening.scale @ whitening.scale.T if dense else whitening.scale.square(),
        halton_index=index,
    )
    return LockstepRun(
        draws=torch.stack(draws, 1),
        stats=out_stats,
        divergences=divergences,
        warmup_divergences=warmup_divergences,
        restarted_chains=restarted_chains,
        state=final,
        gradients=leapfrog.calls,
        compile=leapfrog.report(),
        batched=leapfrog.batched,
        jit_choice=None
        if costs is None
        else leapfrog.record_costs(costs, statistics.mean(iteration_steps[warmup_steps:])),
    )
