"""The CP-fusion regression written by hand in NumPyro, sampled by plain NUTS: the reference a
user would try before ``fit(..., guide="nuts")`` (issue 16's ESS/s comparison).

The model of ``bf.Regressor(bf.CPFusion(sizes, out, max_rank))`` (append-one factors,
``lambda ~ HalfCauchy(1)``, factor columns ``Normal(0, lambda + 1e-3)``, bias ``Normal(0, 10)``,
per-output noise ``HalfNormal(1)``), written non-centred (factor = (lambda + eps) * z,
``z ~ Normal(0, 1)``), NUTS with NumPyro's defaults (diagonal mass matrix, target acceptance
0.8), chains in parallel on the CPU's cores. Reads the data from an ``.npz`` (``x0``, ``x1``,
..., ``y``) and prints one JSON line: seconds (compile included, as a user waits), divergences,
and the r-hat / minimum ESS of the sorted lambdas (label-switching invariant)::

    python benchmarks/numpyro_nuts.py --data data.npz --max-rank 4 --draws 500 --chains 2

Exits with status 3 when numpyro is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MISSING = 3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-rank", type=int, default=4)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="dense mass matrix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.chains} " + os.environ.get("XLA_FLAGS", "")
    )
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import numpyro
        import numpyro.distributions as dist
        from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
        from numpyro.infer import MCMC, NUTS
    except ImportError:
        print(json.dumps({"skipped": "numpyro is not installed"}))
        sys.exit(MISSING)

    data = np.load(args.data)
    xs = [jnp.asarray(data[f"x{m}"]) for m in range(len(data.files) - 1)]
    y = jnp.asarray(data["y"])
    rank, out = args.max_rank, y.shape[1]

    def model(xs, y):
        lam = numpyro.sample("lam", dist.HalfCauchy(1.0).expand([rank]).to_event(1))
        std = lam + 1e-3
        h = None
        for m, x in enumerate(xs):
            shape = [x.shape[1] + 1, rank]
            f = numpyro.sample(f"z_{m}", dist.Normal(0.0, 1.0).expand(shape).to_event(2)) * std
            p = x @ f[:-1] + f[-1]
            h = p if h is None else h * p
        z_out = numpyro.sample("z_out", dist.Normal(0.0, 1.0).expand([out, rank]).to_event(2))
        bias = numpyro.sample("bias", dist.Normal(0.0, 10.0).expand([out]).to_event(1))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([out]).to_event(1))
        pred = h @ (z_out * std).T + bias
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("obs", dist.Normal(pred, noise).to_event(1), obs=y)

    kernel = NUTS(model, dense_mass=args.dense)
    mcmc = MCMC(
        kernel,
        num_warmup=args.draws,
        num_samples=args.draws,
        num_chains=args.chains,
        chain_method="parallel",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(args.seed), xs, y, extra_fields=("diverging",))
    lam = mcmc.get_samples(group_by_chain=True)["lam"]
    jax.block_until_ready(lam)
    seconds = time.perf_counter() - start
    lam_sorted = np.sort(np.asarray(lam), axis=-1)[..., ::-1]
    ess = effective_sample_size(lam_sorted)
    rhat = split_gelman_rubin(lam_sorted)
    diverging = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "min_ess_sorted_lambda": float(np.min(ess)),
                "max_rhat_sorted_lambda": float(np.max(rhat)),
                "divergences": diverging,
                "numpyro": numpyro.__version__,
                "dense_mass": args.dense,
            }
        )
    )


if __name__ == "__main__":
    main()
