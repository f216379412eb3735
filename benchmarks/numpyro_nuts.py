"""The library's models written by hand in NumPyro, sampled by plain NUTS: the reference a user
would try before ``fit(..., guide="nuts")`` or ``fit(..., guide="mcmc")`` (the ESS/s comparisons
of issues 16 and 30).

``--layer cp`` (default) is ``bf.CPFusion(sizes, out, max_rank)``: append-one factors, ``lambda ~
HalfCauchy(1)``, factor columns ``Normal(0, lambda + 1e-3)``, bias ``Normal(0, 10)``.
``--layer xox`` is ``bf.XOXLinear(in, out, genes=max_rank)`` on one input: ``W = X_out O X_in^T /
G``, columns of ``X_in`` / ``X_out`` ``Normal(0, lambda + 1e-3)``, the core ``O_gh ~ Normal(0,
sqrt((lambda_g + 1e-3)(lambda_h + 1e-3)))``, bias ``Normal(0, 10)``. The likelihood:

* ``--likelihood normal`` (default): ``bf.Regressor``, per-output noise ``HalfNormal(1)``;
* ``--likelihood categorical``: ``bf.Classifier``, ``y ~ Categorical(logits)``; around a CP layer
  with the main effects ``Normal(0, 1)`` on the concatenated inputs that ``Classifier`` switches
  on;
* ``--likelihood poisson``: the benchmarks' user model ``PoissonFusion`` (``nuts_models.py``): one
  output, counts ``~ Poisson(exp(layer))``.

Written non-centred (factor = (lambda + eps) * z, ``z ~ Normal(0, 1)``), NUTS with NumPyro's
defaults (diagonal mass matrix unless ``--dense``, target acceptance 0.8), chains in parallel on the
CPU's cores. Reads the data from an ``.npz`` (``x0``, ``x1``, ..., ``y``; optional held-out inputs
``h0``, ``h1``, ...) and prints one JSON line: seconds (compile included, as a user waits),
divergences, and the r-hat / minimum ESS of the sorted lambdas (label-switching invariant) and,
with held-out inputs, of the predictive mean there (class probabilities for ``categorical``,
rates for ``poisson``)::

    python benchmarks/numpyro_nuts.py --data data.npz --max-rank 4 --draws 500 --chains 2

Exits with status 3 when numpyro is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MISSING = 3


def run_twin(
    inputs,
    y,
    held_out=None,
    *,
    max_rank: int,
    draws: int,
    likelihood="normal",
    layer="cp",
    dense=False,
    seed: int = 0,
) -> dict | None:
    """Run this script on torch data in a fresh process (JAX's device count is set before it
    starts): ``inputs`` / ``held_out`` M tensors ``(N, d_m)`` (or one tensor: ``layer="xox"``),
    ``y`` targets ``(N, P)``, labels ``(N,)`` or counts ``(N,)``. Returns its JSON record,
    ``None`` when numpyro is not installed.

    :raises RuntimeError: when the run fails (its stderr's end in the message).
    """
    import numpy as np
    import torch

    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    if isinstance(held_out, torch.Tensor):
        held_out = [held_out]
    arrays = {f"x{m}": x.double().numpy() for m, x in enumerate(inputs)}
    arrays.update({f"h{m}": x.double().numpy() for m, x in enumerate(held_out or [])})
    target = y.double().numpy() if y.is_floating_point() else y.numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        np.savez(path, y=target, **arrays)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--data",
            str(path),
            "--max-rank",
            str(max_rank),
            "--draws",
            str(draws),
            "--likelihood",
            likelihood,
            "--layer",
            layer,
            "--seed",
            str(seed),
        ]
        proc = subprocess.run(cmd + (["--dense"] if dense else []), capture_output=True, text=True)
    if proc.returncode == MISSING:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"numpyro NUTS baseline failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def twin_model(layer: str, likelihood: str, rank: int, out: int):
    """The NumPyro model ``model(xs, y)`` (``xs``: M arrays ``(N, d_m)``, one for ``"xox"``;
    ``y``: ``(N, out)`` targets, ``(N,)`` labels or ``(N,)`` counts) and its mean ``mean(xs,
    sites)`` (``sites``: one draw's site values by name; logits for ``categorical``, log rates
    for ``poisson``; ``(N, out)``). Sites: ``lam`` ``(rank,)``; ``z_m`` ``(d_m + 1, rank)`` (CP)
    or ``z_in`` ``(d, rank)`` and ``z_core`` ``(rank, rank)`` (XOX); ``z_out`` ``(out, rank)``,
    ``bias`` ``(out,)``; ``main`` ``(out, sum d_m)`` (a CP ``categorical``), ``noise`` ``(out,)``
    (``normal``)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    with_main = layer == "cp" and likelihood == "categorical"

    def mean(xs, sites):
        """The layer's output, ``(N, out)``."""
        std = sites["lam"] + 1e-3
        if layer == "xox":
            (x,) = xs
            core = sites["z_core"] * jnp.sqrt(std)[:, None] * jnp.sqrt(std)[None, :]
            hidden = (x @ (sites["z_in"] * std)) @ core.T / rank
            return hidden @ (sites["z_out"] * std).T + sites["bias"]
        h = None
        for m, x in enumerate(xs):
            f = sites[f"z_{m}"] * std
            p = x @ f[:-1] + f[-1]
            h = p if h is None else h * p
        pred = h @ (sites["z_out"] * std).T + sites["bias"]
        if with_main:
            pred = pred + jnp.concatenate(xs, axis=-1) @ sites["main"].T
        return pred

    def standard(name, shape):
        return numpyro.sample(name, dist.Normal(0.0, 1.0).expand(list(shape)).to_event(len(shape)))

    def model(xs, y):
        sites = {"lam": numpyro.sample("lam", dist.HalfCauchy(1.0).expand([rank]).to_event(1))}
        if layer == "xox":
            sites["z_in"] = standard("z_in", (xs[0].shape[1], rank))
            sites["z_core"] = standard("z_core", (rank, rank))
        else:
            for m, x in enumerate(xs):
                sites[f"z_{m}"] = standard(f"z_{m}", (x.shape[1] + 1, rank))
        sites["z_out"] = standard("z_out", (out, rank))
        sites["bias"] = numpyro.sample("bias", dist.Normal(0.0, 10.0).expand([out]).to_event(1))
        if with_main:
            sites["main"] = standard("main", (out, sum(x.shape[1] for x in xs)))
        pred = mean(xs, sites)
        if likelihood == "normal":
            noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([out]).to_event(1))
        with numpyro.plate("data", y.shape[0]):
            if likelihood == "categorical":
                numpyro.sample("obs", dist.Categorical(logits=pred), obs=y)
            elif likelihood == "poisson":
                numpyro.sample("obs", dist.Poisson(jnp.exp(pred[:, 0])), obs=y)
            else:
                numpyro.sample("obs", dist.Normal(pred, noise).to_event(1), obs=y)

    return model, mean


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-rank", type=int, default=4)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="dense mass matrix")
    parser.add_argument(
        "--likelihood", choices=("normal", "categorical", "poisson"), default="normal"
    )
    parser.add_argument("--layer", choices=("cp", "xox"), default="cp")
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
        from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
        from numpyro.infer import MCMC, NUTS
    except ImportError:
        print(json.dumps({"skipped": "numpyro is not installed"}))
        sys.exit(MISSING)

    data = np.load(args.data)
    modalities = sum(1 for k in data.files if k.startswith("x"))
    xs = [jnp.asarray(data[f"x{m}"]) for m in range(modalities)]
    held_out = [jnp.asarray(data[f"h{m}"]) for m in range(modalities)] if "h0" in data else None
    y = jnp.asarray(data["y"])
    out = {"categorical": int(y.max()) + 1, "poisson": 1}.get(args.likelihood)
    rank = args.max_rank
    model, mean = twin_model(args.layer, args.likelihood, rank, out or y.shape[1])

    def predictive_mean(samples):
        """``(chains, draws, N, out)``: the model's mean at the held-out inputs per draw
        (class probabilities, rates or the regression's mean)."""
        pred = jax.vmap(jax.vmap(lambda sites: mean(held_out, sites)))(samples)
        if args.likelihood == "categorical":
            return jax.nn.softmax(pred, axis=-1)
        return jnp.exp(pred) if args.likelihood == "poisson" else pred

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
    mcmc.run(jax.random.PRNGKey(args.seed), xs, y, extra_fields=("diverging", "num_steps"))
    samples = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(samples["lam"])
    seconds = time.perf_counter() - start
    lam_sorted = np.sort(np.asarray(samples["lam"]), axis=-1)[..., ::-1]
    record = {
        "seconds": seconds,
        "min_ess_sorted_lambda": float(np.min(effective_sample_size(lam_sorted))),
        "max_rhat_sorted_lambda": float(np.max(split_gelman_rubin(lam_sorted))),
        "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
        # leapfrog steps per draw after warm-up (bayes_fusion's steps_per_iteration counts
        # warm-up too)
        "steps_per_draw": float(np.asarray(mcmc.get_extra_fields()["num_steps"]).mean()),
        "numpyro": numpyro.__version__,
        "dense_mass": args.dense,
        "likelihood": args.likelihood,
        "layer": args.layer,
    }
    if held_out is not None:
        pred = np.asarray(predictive_mean(samples), dtype=np.float64)
        pred = pred.reshape(pred.shape[:2] + (-1,))
        # entries constant over every draw (a probability saturated at 1 in float32) have no
        # variance to diagnose: left out, as bayes_fusion's diagnostics do
        pred = pred[..., (pred != pred[:1, :1]).any(axis=(0, 1))]
        record["min_ess_pred"] = float(np.min(effective_sample_size(pred)))
        record["max_rhat_pred"] = float(np.max(split_gelman_rubin(pred)))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
