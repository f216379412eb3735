"""Inference: everything that fits a model, and nothing else. :func:`fit` is the entry point.

* :mod:`.dispatch` -- ``fit()``: checks the guide and the option names, hands over;
* :mod:`.svi` -- :func:`fit_svi` and everything it runs on (loop, step, ELBO engines, fused
  steps, optimizer, guide presets, minibatches, distributed);
* :mod:`.mcmc` -- :func:`fit_mcmc` (many chains in lockstep), :func:`fit_nuts` and everything
  they run on (the potential protocol and the potentials, chain starts, running chains,
  diagnostics);
* :mod:`.result` -- :class:`FitResult` (draws, prediction, diagnostics, save) and :func:`load`,
  one result type for every method; :mod:`.persist` the checkpoint file format;
* shared by both: :mod:`.data` (model arguments, seeds), :mod:`.faults` (numerical trouble),
  :mod:`.log_joint` (a model's log density read off as it runs), :mod:`.compiled`
  (``torch.compile`` with an eager fallback), :mod:`.compile_cache` (inductor's on-disk cache:
  where, on/off, hits), :mod:`.jit_choice` (compile or not, per fit, from this machine's
  measured costs: SVI's ``jit=None``, the lockstep sampler's ``jit="auto"``), :mod:`.seams`
  (every private attribute of Pyro and torch the package uses).
"""

from .data import model_latent_shapes, sample_guide, seeded, slice_rows
from .dispatch import auto_guide, fit
from .faults import NonFiniteLossError
from .mcmc.many_chains import fit_mcmc
from .mcmc.nuts import fit_nuts
from .mcmc.starts import MAP_RESTARTS
from .persist import read_state, save_state
from .result import FitResult, load
from .svi.loop import fit_svi

__all__ = [
    "MAP_RESTARTS",
    "FitResult",
    "NonFiniteLossError",
    "auto_guide",
    "fit",
    "fit_mcmc",
    "fit_nuts",
    "fit_svi",
    "load",
    "model_latent_shapes",
    "read_state",
    "sample_guide",
    "save_state",
    "seeded",
    "slice_rows",
]
