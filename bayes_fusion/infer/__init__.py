"""Inference. :func:`fit` is the entry point; each method lives in its own module:

* :mod:`.dispatch` -- ``fit()``: checks the guide and the option names, hands over;
* :mod:`.svi` -- :func:`fit_svi` and its loop; :mod:`.svi_step` one step (KL warm-up, the
  loss choice, non-finite gradients); :mod:`.batches` the rows each step sees (minibatches,
  distributed shards);
* :mod:`.nuts` -- :func:`fit_nuts`; :mod:`.mcmc` the generic NUTS path and what the paths
  share (MAP start, chains); :mod:`.potential` its potential, :mod:`.output_marginal` the same
  for a Gaussian regression with the output sites integrated out; :mod:`.mcmc_collapsed` the
  collapsed ``Regressor(CPFusion)`` path;
* :mod:`.result` -- :class:`FitResult` (draws, predict, diagnostics, save) and :func:`load`;
  :mod:`.persist` the checkpoint file format; :mod:`.faults` numerical trouble;
  :mod:`.data` model arguments and seeds.
"""

from .data import model_latent_shapes, sample_guide, slice_rows
from .dispatch import auto_guide, fit
from .faults import NonFiniteLossError
from .mcmc import MAP_RESTARTS
from .nuts import fit_nuts
from .persist import read_state, save_state
from .result import FitResult, load
from .svi import fit_svi

__all__ = [
    "MAP_RESTARTS",
    "FitResult",
    "NonFiniteLossError",
    "auto_guide",
    "fit",
    "fit_nuts",
    "fit_svi",
    "load",
    "model_latent_shapes",
    "read_state",
    "sample_guide",
    "save_state",
    "slice_rows",
]
