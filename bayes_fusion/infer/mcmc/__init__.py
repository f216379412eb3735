"""Markov chain Monte Carlo, one module per piece:

* :mod:`.many_chains` -- :func:`~bayes_fusion.fit_mcmc` (``guide="mcmc"``): many chains in
  lockstep on the same potentials; :mod:`.chees` its sampler (ChEES-HMC on a ``(chains, dim)``
  state: batched, compiled leapfrog steps, adaptation across chains); :mod:`.compile_choice`
  whether its leapfrog step compiles (``jit="auto"``: from the measured costs);
* :mod:`.nuts` -- :func:`~bayes_fusion.fit_nuts`: picks the potential, runs the chains, builds
  the result (one path, one ``info`` schema, for every model);
* :mod:`.potential` -- the potential protocol (:class:`~.potential.Potential`: value and
  gradient at flat unconstrained points batched over leading chain dims, optional Gibbs block)
  and :class:`~.potential.ModelPotential`, any model's log density in coordinates that suit
  rank layers;
* :mod:`.output_marginal` / :mod:`.polya_gamma` -- potentials with a layer's output sites
  integrated out (Gaussian regression; binary classification through Polya-Gamma variables);
  :mod:`.linear_gaussian` the Bayesian linear regression both build on;
* :mod:`.starts` -- the MAP start, which components to centre, the chains' starting points;
* :mod:`.chains` -- running chains (Pyro's NUTS on the flat potential, worker processes,
  the Laplace metric); :mod:`.worker` a chain's worker process;
* :mod:`.diagnostics` -- the label-switching-invariant quantities diagnosed;
  :mod:`.convergence` -- rank-normalized r-hat, bulk ESS, nested r-hat and their thresholds.

This package's ``__init__`` imports nothing: import from the modules (or from
:mod:`bayes_fusion`), so that no import runs in a circle through it.
"""
