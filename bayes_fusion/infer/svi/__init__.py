"""Stochastic variational inference, one module per piece:

* :mod:`.loop` -- :func:`~bayes_fusion.fit_svi`: the training loop, early stopping, KL warm-up,
  checkpoints;
* :mod:`.step` -- one step: the fit's one loss engine (the direct ELBO, compiled or eager, or
  Pyro's ``Trace_ELBO``) and the refusal to apply non-finite gradients;
* :mod:`.elbo` -- the direct ELBO of the preset guides (no traces recorded);
* :mod:`.fused` -- whole steps compiled, one (``jit=True``) or several (``jit="fused"``) per call;
* :mod:`.compilation` -- what ``jit`` runs, and when ``jit=None`` switches to compiled steps
  (the cost model: :mod:`bayes_fusion.infer.jit_choice`);
* :mod:`.optim` -- the clipped Adam update (one function, used eagerly and inside fused steps);
* :mod:`.guides` -- the guide presets (``make_guide``, ``GUIDES``);
* :mod:`.batches` -- the rows each step sees; :mod:`.distributed` -- data-parallel SVI.

This package's ``__init__`` imports nothing: import from the modules (or from
:mod:`bayes_fusion`), so that no import runs in a circle through it.
"""
