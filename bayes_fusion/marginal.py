"""NUTS for Gaussian CP-fusion regression with the output factor and bias integrated out.

For ``Regressor(CPFusion(...))`` the targets are linear in the output factor ``U_out`` and the
bias given everything else, and both have Gaussian priors, so they can be integrated out
exactly. Write ``s_r = lambda_r + eps`` and ``Phi = prod_m (x~_m U_m)`` ``(N, R)``; with
``c_o ~ Normal(0, I)`` and the design ``A = [Phi * s, bias_scale * 1]`` ``(N, k)``::

    y_o = A c_o + noise_o,   noise_o ~ Normal(0, sigma_o^2 I)
    =>  y_o ~ Normal(0, A A^T + sigma_o^2 I)          (k = R + 1 columns, Woodbury: O(N k^2))
    c_o | y, rest ~ Normal(K_o^-1 A^T y_o, sigma_o^2 K_o^-1),   K_o = A^T A + sigma_o^2 I

and ``U_out[o, r] = s_r c_o[r]``, ``bias[o] = bias_scale c_o[R]``. NUTS then explores only the
scales, the (non-centred) input factors and the noise: the output factor's scale symmetry with
the input factors and its funnel with ``lambda`` are gone, and the output factor and bias are
drawn from their exact conditional after sampling, so the returned draws are draws of the full
posterior of the original model.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from torch import Tensor

from . import linear_gaussian
from .layers.cp import CPFusion
from .models import Regressor
from .priors import half_normal_log_density


def supports_marginal(model) -> bool:
    """Whether ``model`` is a full-batch ``Regressor`` around a ``CPFusion`` layer without
    main effects (those take the generic path)."""
    return (
        type(model) is Regressor
        and type(model.layer) is CPFusion
        and not model.layer.main_effects
        and getattr(model, "num_data", None) is None
    )


class CPRegressionMarginal:
    """Potential energy and conditional draws for ``Regressor(CPFusion)`` (see module doc).

    The unconstrained coordinates are named after the model's sites: the scale site (through
    the bijection to its prior's support), ``<factor site>_decentered`` (``U_m / s``) for every
    input factor, and the noise site. Instances are picklable (parallel chains).

    :param model: a ``Regressor`` whose layer is a ``CPFusion``.
    :param inputs: list of ``M`` tensors ``(N, d_m)``.
    :param y: targets ``(N, P)`` (or ``(N,)`` when ``P == 1``).
    :param centered: ``(R,)`` in ``[0, 1]``: per component, ``1`` samples the input factors'
        columns as they are (``U = z``, ``z ~ Normal(0, s)``), ``0`` non-centred (``U = s z``,
        ``z ~ Normal(0, 1)``). Components the data determine well mix better centred, weak
        ones non-centred. Default all ``0``.
    """

    def __init__(self, model: Regressor, inputs, y: Tensor, centered: Tensor | None = None) -> None:
        if not supports_marginal(model):
            raise ValueError(
                "model: the marginal NUTS path needs a full-batch Regressor(CPFusion(...)), "
                f"got {type(model).__name__}"
            )
        layer: CPFusion = model.layer
        with torch.no_grad():
            pred = model(inputs)  # validates inputs
        y = Regressor._check_targets(y, pred.shape[-2], pred.shape[-1], pred.dtype)
        ones = [torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device) for x in inputs]
        self.xs = [
            torch.cat([x, one], -1) if layer.append_one else x
            for x, one in zip(inputs, ones, strict=True)
        ]
        self.y = y.detach()
        self.yty = (self.y * self.y).sum(0)
        self.rank = layer.max_rank
        self.eps = layer.scale_floor.detach().clone()
        self.bias_scale = layer.bias_scale.detach().clone() if layer.use_bias else None
        # the scales and the noise are sampled as their logs (the potential's densities
        # include the exp Jacobian: see log_density_unconstrained)
        self.rank_prior = layer.rank_prior
        self.noise_scale = model.noise_prior_scale.to(y.dtype).expand(y.shape[-1]).clone()
        self.scale_site = layer.site_name(layer.SCALE_SITE)
        self.factor_sites = [layer.site_name(f"factor_{m}") for m in range(len(inputs))]
        self.out_site = layer.site_name("out_factor")
        self.bias_site = layer.site_name("bias") if layer.use_bias else None
        self.noise_site = "noise"
        like = self.y
        self.centered = (
            torch.zeros(self.rank, dtype=like.dtype, device=like.device)
            if centered is None
            else torch.as_tensor(centered, dtype=like.dtype, device=like.device)
        )
        entries = sum(x.shape[-1] for x in self.xs) * self.rank
        self._z_const = -0.5 * math.log(2 * math.pi) * entries  # standard-normal constants

    # --- coordinates ---------------------------------------------------------------------
    def to_unconstrained(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Site values (one point) -> unconstrained NUTS coordinates."""
        lam = values[self.scale_site]
        out = {
            self.scale_site: lam.log(),
            self.noise_site: values[self.noise_site].log(),
        }
        for site in self.factor_sites:
            out[f"{site}_decentered"] = values[site] / (lam + self.eps) ** (1 - self.centered)
        return {k: v.detach().clone() for k, v in out.items()}

    def constrain(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unconstrained coordinates (any leading draw dims) -> site values."""
        lam = params[self.scale_site].exp()
        values = {self.scale_site: lam, self.noise_site: params[self.noise_site].exp()}
        s = ((lam + self.eps) ** (1 - self.centered)).unsqueeze(-2)
        for site in self.factor_sites:
            values[site] = params[f"{site}_decentered"] * s
        return values

    # --- densities -----------------------------------------------------------------------
    def _design(self, values: dict[str, Tensor]) -> Tensor:
        """``A = [Phi * s, bias_scale * 1]`` ``(..., N, k)`` at site values (any leading dims)."""
        lam = values[self.scale_site]
        phi = None
        for x, u in zip(self.xs, [values[s] for s in self.factor_sites], strict=True):
            proj = x @ u
            phi = proj if phi is None else phi * proj
        design = phi * (lam + self.eps).unsqueeze(-2)
        if self.bias_scale is not None:
            col = self.bias_scale.expand(design.shape[:-1] + (1,)).to(design.dtype)
            design = torch.cat([design, col], -1)
        return design

    def log_marginal_likelihood(self, values: dict[str, Tensor]) -> Tensor:
        """``log p(y | lambda, U_1..U_M, sigma)`` with ``U_out`` and the bias integrated out.

        :param values: site values with optional leading draw dims.
        :returns: tensor of the leading draw shape.
        """
        return linear_gaussian.log_marginal_likelihood(
            self._design(values), self.y, values[self.noise_site], self.yty
        )

    def __call__(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy (negative log joint density in unconstrained coordinates); see
        :meth:`potential`."""
        return self.potential(params)

    def potential(self, params: dict[str, Tensor]) -> Tensor:
        """Potential energy at one point of the unconstrained coordinates.

        Plain tensor ops throughout (the priors' densities and Jacobians written out, see
        ``log_density_unconstrained`` of the rank priors), so eager autograd is fast without
        ``torch.jit``.
        """
        lam, log_p = self.rank_prior.log_density_unconstrained(params[self.scale_site])
        noise, log_p_noise = half_normal_log_density(self.noise_scale, params[self.noise_site])
        log_p = log_p + log_p_noise + self._z_const
        s = lam + self.eps
        # z ~ Normal(0, s^c) and U = z s^(1-c): c = 0 non-centred, c = 1 centred
        z_scale, u_scale = s**self.centered, (s ** (1 - self.centered)).unsqueeze(-2)
        log_z_scale = self.centered * s.log()
        factors = []
        for site in self.factor_sites:
            z = params[f"{site}_decentered"]
            log_p = log_p - 0.5 * ((z / z_scale) ** 2).sum() - z.shape[-2] * log_z_scale.sum()
            factors.append(z * u_scale)
        values = {self.scale_site: lam, self.noise_site: noise}
        values.update(zip(self.factor_sites, factors, strict=True))
        return -(log_p + self.log_marginal_likelihood(values))

    # --- the integrated-out sites ---------------------------------------------------------
    def _conditional(self, values):
        return linear_gaussian.conditional_mean(
            self._design(values), self.y, values[self.noise_site]
        )

    def _split(self, coef: Tensor, lam: Tensor) -> dict[str, Tensor]:
        """Standardized coefficients ``(..., P, k)`` -> output factor and bias values."""
        out = {self.out_site: coef[..., : self.rank] * (lam + self.eps).unsqueeze(-2)}
        if self.bias_site is not None:
            out[self.bias_site] = coef[..., self.rank] * self.bias_scale.to(coef.dtype)
        return out

    def sample_conditional(self, values: dict[str, Tensor], chunk: int = 256) -> dict[str, Tensor]:
        """Draw ``U_out`` ``(S, P, R)`` and the bias ``(S, P)`` given ``S`` draws of the rest.

        :param values: site values with one leading draw dim ``S``.
        :param chunk: draws processed at once (memory ``chunk * N * k``).
        """
        pieces = []
        total = values[self.scale_site].shape[0]
        for start in range(0, total, chunk):
            part = {k: v[start : start + chunk] for k, v in values.items()}
            coef = linear_gaussian.conditional_draw(
                self._design(part), self.y, part[self.noise_site]
            )
            pieces.append(self._split(coef, part[self.scale_site]))
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    def conditional_log_prob(self, values: dict[str, Tensor], coef_values: dict[str, Tensor]):
        """``log p(U_out, bias | y, rest)`` of given output-factor/bias values (one point)."""
        lam = values[self.scale_site]
        mean, chol, var = self._conditional(values)
        coef = coef_values[self.out_site] / (lam + self.eps)
        if self.bias_site is not None:
            bias = coef_values[self.bias_site] / self.bias_scale.to(coef.dtype)
            coef = torch.cat([coef, bias.unsqueeze(-1)], -1)
        precision = (chol @ chol.transpose(-1, -2)) / var[..., None, None]
        # coefficient density, then the change of variables to U_out = s * c, bias = b_s * c
        log_p = dist.MultivariateNormal(mean, precision_matrix=precision).log_prob(coef).sum(-1)
        jac = (lam + self.eps).log().sum() * coef.shape[-2]
        if self.bias_site is not None:
            jac = jac + self.bias_scale.to(coef.dtype).log() * coef.shape[-2]
        return log_p - jac


def run_chain(
    potential,
    init: dict[str, Tensor],
    num_samples: int,
    warmup_steps: int,
    seed: int,
    kernel_kwargs: dict,
    threads: int | None = None,
    progress: bool = False,
    validate: bool = True,
):
    """Run one NUTS chain on ``potential`` (a picklable callable); also a process entry point.

    :returns: ``(samples, divergences, report)``: unconstrained draws ``name -> (S, ...)``, the
        indices of divergent transitions after warm-up and the potential's ``report()`` (what
        it says of its computation; ``{}`` without one).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    pyro.enable_validation(validate)
    pyro.set_rng_seed(seed)
    if hasattr(potential, "evaluations"):
        potential.evaluations = 0  # this chain's count (a sequential run reuses the potential)
    kernel_kwargs = dict(kernel_kwargs)
    metric = kernel_kwargs.pop("initial_inverse_mass_matrix", None)
    kernel_class = _with_gibbs_block(_nuts_with_initial_metric(metric))
    kernel = kernel_class(potential_fn=potential, **kernel_kwargs)
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        initial_params={k: v.detach().clone() for k, v in init.items()},
        disable_progbar=not progress,
    )
    mcmc.run()
    # the kernel's own record: MCMC.diagnostics() would also compute r-hat / ESS of every
    # site, and fails for fewer than 4 draws
    divergences = mcmc._diagnostics[0].get("divergences", [])
    report = potential.report() if hasattr(potential, "report") else {}
    return {**mcmc.get_samples(), **kernel.block_draws()}, [int(i) for i in divergences], report


def run_chains(
    potential, inits, num_samples, warmup_steps, seeds, kernel_kwargs, parallel, progress
):
    """Run one chain per entry of ``inits`` (its start, unconstrained coordinates), in
    parallel processes (spawned, one thread share each) or one after another.
    :returns: ``(samples name -> (C, S, ...), divergences per chain, the first chain's
    potential report; its ``potential_evaluations``, if any, a list per chain)``."""
    validate = pyro.infer.util.is_validation_enabled()
    jobs = [
        (potential, init, num_samples, warmup_steps, int(s), kernel_kwargs)
        for init, s in zip(inits, seeds, strict=True)
    ]
    if parallel:
        threads = max(1, torch.get_num_threads() // len(jobs))
        runs = _run_in_processes([(*job, threads, False, validate) for job in jobs], threads)
    else:
        runs = [run_chain(*job, None, progress, validate) for job in jobs]
    samples = {k: torch.stack([r[0][k] for r in runs]) for k in runs[0][0]}
    report = dict(runs[0][2])
    if "potential_evaluations" in report:  # per chain
        report["potential_evaluations"] = [r[2]["potential_evaluations"] for r in runs]
    return samples, [r[1] for r in runs], report


def _run_in_processes(jobs: list[tuple], threads: int) -> list:
    """Run ``run_chain(*job)`` for every job in its own fresh Python process.

    Workers are started as ``python -m bayes_fusion._chain_worker IN OUT`` rather than with
    ``multiprocessing``: they never re-import the user's ``__main__`` (no
    ``if __name__ == "__main__"`` guard needed, works from notebooks).
    """
    with tempfile.TemporaryDirectory(prefix="bf-chains-") as tmp:
        procs = []
        # the workers must import this very package, even when it is not installed
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
        for i, job in enumerate(jobs):
            src, dst = Path(tmp) / f"in{i}.pt", Path(tmp) / f"out{i}.pt"
            torch.save(job, src)
            cmd = [sys.executable, "-m", "bayes_fusion._chain_worker", str(src), str(dst)]
            procs.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), dst))
        runs = []
        for i, (proc, dst) in enumerate(procs):
            _, err = proc.communicate()
            if proc.returncode != 0:
                for other, _ in procs:
                    other.kill()
                raise RuntimeError(
                    f"num_chains: chain {i} failed in its worker process (exit code "
                    f"{proc.returncode}):\n{err[-2000:]}"
                )
            runs.append(torch.load(dst, weights_only=False))
    return runs


def flatten_params(params: dict[str, Tensor]):
    """``params`` as one vector in sorted-name order (the order of Pyro's dense mass matrix and
    of :func:`laplace_inverse_mass_matrix`'s metric) and the function mapping such a vector
    back to the dict."""
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        parts = torch.split(flat, sizes)
        return {n: p.reshape(sh) for n, p, sh in zip(names, parts, shapes, strict=True)}

    return torch.cat([params[n].reshape(-1) for n in names]), unflatten


def laplace_inverse_mass_matrix(potential, params: dict[str, Tensor], min_curvature=1.0):
    """Inverse Hessian of ``potential`` at ``params`` (flattened in sorted-name order, as
    Pyro's dense mass matrix), with curvatures clipped below at ``min_curvature`` so flat or
    non-convex directions get unit scale. Starts NUTS's warm-up with a metric that already
    fits the posterior's scales and correlations, instead of the identity.
    """
    flat0, unflatten = flatten_params({k: v.detach() for k, v in params.items()})
    hess = torch.autograd.functional.hessian(lambda f: potential.potential(unflatten(f)), flat0)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    if not bool(torch.isfinite(evals).all()):
        return None
    inv = (evecs / evals.clamp(min=min_curvature)) @ evecs.T
    return {tuple(sorted(params)): 0.5 * (inv + inv.T)}


def _nuts_with_initial_metric(metric):
    """A NUTS class whose warm-up starts from ``metric`` (``None``: Pyro's identity)."""
    if metric is None:
        return NUTS

    class _NUTS(NUTS):
        def _initialize_adapter(self):
            super()._initialize_adapter()
            adapter = self._adapter.mass_matrix_adapter
            if set(adapter.inverse_mass_matrix) == set(metric):
                adapter.inverse_mass_matrix = {k: v.clone() for k, v in metric.items()}
                if self._adapter.adapt_step_size:
                    self._adapter.reset_step_size_adaptation(self._initial_params)

    return _NUTS


def _with_gibbs_block(cls):
    """``cls`` (a NUTS class) with the Gibbs block of its ``potential_fn`` after every NUTS step,
    when it has one (``gibbs_init`` / ``gibbs_update``, e.g. the Polya-Gamma variables of
    :class:`~bayes_fusion.infer.polya_gamma.PolyaGammaPotential`): the potential changes with
    the block's state, so the cached energy is dropped after each update. ``block_draws()``:
    the block's draws after warm-up, name -> ``(S, ...)`` (``{}`` without a block)."""

    class _Gibbs(cls):
        def setup(self, warmup_steps, *args, **kwargs):
            self._block_draws = []
            if hasattr(self.potential_fn, "gibbs_update"):
                self.potential_fn.gibbs_init(self.initial_params)
            super().setup(warmup_steps, *args, **kwargs)

        def sample(self, params):
            z = super().sample(params)
            if hasattr(self.potential_fn, "gibbs_update"):
                draw = self.potential_fn.gibbs_update(z)
                self.clear_cache()
                if self._t > self._warmup_steps:
                    self._block_draws.append(draw)
            return z

        def block_draws(self):
            if not self._block_draws:
                return {}
            return {k: torch.stack([d[k] for d in self._block_draws]) for k in self._block_draws[0]}

    return _Gibbs
