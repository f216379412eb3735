"""A CP-fusion model written by hand in NumPyro, sampled by plain NUTS: the reference a user
would try before ``fit(..., guide="nuts")`` (issue 16's ESS/s comparison).

``--likelihood normal`` (default) is the model of ``bf.Regressor(bf.CPFusion(sizes, out,
max_rank))``: append-one factors, ``lambda ~ HalfCauchy(1)``, factor columns
``Normal(0, lambda + 1e-3)``, bias ``Normal(0, 10)``, per-output noise ``HalfNormal(1)``.
``--likelihood categorical`` is ``bf.Classifier(bf.CPFusion(sizes, classes, max_rank))``: the
same layer with one output row per class, plus the main effects ``Normal(0, 1)`` on the
concatenated inputs that ``Classifier`` switches on, and ``y ~ Categorical(logits)``. Written
non-centred (factor = (lambda + eps) * z, ``z ~ Normal(0, 1)``), NUTS with NumPyro's defaults
(diagonal mass matrix unless ``--dense``, target acceptance 0.8), chains in parallel on the CPU's
cores. Reads the data from an ``.npz`` (``x0``, ``x1``, ..., ``y``; optional held-out inputs
``h0``, ``h1``, ...) and prints one JSON line: seconds (compile included, as a user waits),
divergences, and the r-hat / minimum ESS of the sorted lambdas (label-switching invariant) and,
with held-out inputs, of the predictive mean there (class probabilities for ``categorical``)::

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
    dense=False,
    seed: int = 0,
) -> dict | None:
    """Run this script on torch data in a fresh process (JAX's device count is set before it
    starts): ``inputs`` / ``held_out`` M tensors ``(N, d_m)``, ``y`` targets ``(N, P)`` or labels
    ``(N,)``. Returns its JSON record, ``None`` when numpyro is not installed.

    :raises RuntimeError: when the run fails (its stderr's end in the message).
    """
    import numpy as np

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
            "--seed",
            str(seed),
        ]
        proc = subprocess.run(cmd + (["--dense"] if dense else []), capture_output=True, text=True)
    if proc.returncode == MISSING:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"numpyro NUTS baseline failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def twin_model(likelihood: str, rank: int, out: int):
    """The NumPyro model ``model(xs, y)`` (``xs``: M arrays ``(N, d_m)``; ``y``: ``(N, out)``
    targets or ``(N,)`` labels) and its mean ``mean(xs, lam, zs, z_out, bias, main)`` (logits
    for ``categorical``, ``(N, out)``; ``main`` is ``None`` for ``normal``). Sites: ``lam``
    ``(rank,)``, ``z_m`` ``(d_m + 1, rank)``, ``z_out`` ``(out, rank)``, ``bias`` ``(out,)``,
    ``main`` ``(out, sum d_m)`` (``categorical``), ``noise`` ``(out,)`` (``normal``)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    classify = likelihood == "categorical"

    def mean(xs, lam, zs, z_out, bias, main):
        """The layer's output (logits for ``categorical``), ``(N, out)``."""
        std = lam + 1e-3
        h = None
        for x, z in zip(xs, zs, strict=True):
            f = z * std
            p = x @ f[:-1] + f[-1]
            h = p if h is None else h * p
        pred = h @ (z_out * std).T + bias
        if main is not None:
            pred = pred + jnp.concatenate(xs, axis=-1) @ main.T
        return pred

    def model(xs, y):
        lam = numpyro.sample("lam", dist.HalfCauchy(1.0).expand([rank]).to_event(1))
        zs = [
            numpyro.sample(
                f"z_{m}", dist.Normal(0.0, 1.0).expand([x.shape[1] + 1, rank]).to_event(2)
            )
            for m, x in enumerate(xs)
        ]
        z_out = numpyro.sample("z_out", dist.Normal(0.0, 1.0).expand([out, rank]).to_event(2))
        bias = numpyro.sample("bias", dist.Normal(0.0, 10.0).expand([out]).to_event(1))
        main = None
        if classify:
            width = sum(x.shape[1] for x in xs)
            main = numpyro.sample("main", dist.Normal(0.0, 1.0).expand([out, width]).to_event(2))
        pred = mean(xs, lam, zs, z_out, bias, main)
        with numpyro.plate("data", y.shape[0]):
            if classify:
                numpyro.sample("obs", dist.Categorical(logits=pred), obs=y)
            else:
                noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([out]).to_event(1))
                numpyro.sample("obs", dist.Normal(pred, noise).to_event(1), obs=y)

    return model, mean


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--max-rank", type=int, default=4)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="dense mass matrix")
    parser.add_argument("--likelihood", choices=("normal", "categorical"), default="normal")
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
    classify = args.likelihood == "categorical"
    rank = args.max_rank
    out = int(y.max()) + 1 if classify else y.shape[1]

    model, mean = twin_model(args.likelihood, rank, out)

    def predictive_mean(samples):
        """``(chains, draws, N, out)``: the model's mean at the held-out inputs per draw."""
        zs = [samples[f"z_{m}"] for m in range(modalities)]
        one = jax.vmap(mean, in_axes=(None, 0, 0, 0, 0, 0 if classify else None))
        one = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0 if classify else None))
        pred = one(
            held_out, samples["lam"], zs, samples["z_out"], samples["bias"], samples.get("main")
        )
        return jax.nn.softmax(pred, axis=-1) if classify else pred

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
