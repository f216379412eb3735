"""The CP-fusion regression written by hand in NumPyro: the speed reference for an SVI step.

The same model as ``bf.Regressor(bf.CPFusion(sizes, out, rank))`` (append-one factors,
``lambda ~ HalfCauchy(1)``, factor columns ``~ Normal(0, lambda + 1e-3)``, bias ``~ Normal(0,
10)``, per-output noise ``~ HalfNormal(1)``, Gaussian likelihood), ``AutoDelta`` (map) or
``AutoNormal`` (meanfield), Adam; the steps run as one XLA-compiled ``lax.scan`` of
``svi.update`` (what ``svi.run`` does), compiled once and timed on later calls (best of
three), so the compile time is reported apart from the step.

Run as a script (the benchmark suite does, in a subprocess, so that the thread count can be
fixed before JAX starts)::

    python benchmarks/numpyro_baseline.py --guide meanfield --threads 1

prints one JSON line: ``{"ms_per_step": ..., "compile_s": ..., "numpyro": version}``. Exits with
status 3 when numpyro is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

MISSING = 3


def set_threads(threads: int) -> None:
    """Fix XLA's CPU threads (before JAX starts; 0: JAX's default)."""
    if threads:
        os.environ["XLA_FLAGS"] = (
            "--xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={threads} " + os.environ.get("XLA_FLAGS", "")
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def numpyro_svi(
    guide: str,
    sizes,
    out: int,
    rank: int,
    batch: int,
    lr: float = 0.05,
    data=None,
    decay_steps: int | None = None,
    init_radius: float | None = None,
):
    """The NumPyro twin of ``bf.Regressor(bf.CPFusion(sizes, out, rank))``: ``(svi, xs, y)``
    with ``AutoDelta`` (``guide="map"``) or ``AutoNormal(init_scale=0.01)`` (``"meanfield"``),
    Adam at ``lr``, and ``data`` (``(list of (batch, d) arrays, (batch, out) array)``; ``None``:
    random, JAX key 0). ``decay_steps``: the learning rate decays geometrically to ``lr / 10``
    over that many steps (``bf.fit``'s default schedule; ``None``: constant);
    ``init_radius``: ``init_to_uniform(radius)`` for the guide's locations (``None``: NumPyro's
    default, radius 2). Raises ``ImportError`` without numpyro."""
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO, init_to_uniform
    from numpyro.infer.autoguide import AutoDelta, AutoNormal
    from numpyro.optim import Adam

    def model(xs, y):
        lam = numpyro.sample("lam", dist.HalfCauchy(1.0).expand([rank]).to_event(1))
        std = lam + 1e-3
        h = None
        for m, d in enumerate(sizes):
            f = numpyro.sample(
                f"factor_{m}", dist.Normal(0.0, std).expand([d + 1, rank]).to_event(2)
            )
            p = xs[m] @ f[:-1] + f[-1]
            h = p if h is None else h * p
        f_out = numpyro.sample("out_factor", dist.Normal(0.0, std).expand([out, rank]).to_event(2))
        bias = numpyro.sample("bias", dist.Normal(0.0, 10.0).expand([out]).to_event(1))
        noise = numpyro.sample("noise", dist.HalfNormal(1.0).expand([out]).to_event(1))
        pred = h @ f_out.T + bias
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("obs", dist.Normal(pred, noise).to_event(1), obs=y)

    if data is None:
        keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) + 1)
        xs = [jax.random.normal(k, (batch, d)) for k, d in zip(keys[:-1], sizes, strict=True)]
        y = jax.random.normal(keys[-1], (batch, out))
    else:
        xs, y = [jax.numpy.asarray(x) for x in data[0]], jax.numpy.asarray(data[1])
    init = {} if init_radius is None else {"init_loc_fn": init_to_uniform(radius=init_radius)}
    if guide == "map":
        auto = AutoDelta(model, **init)
    else:
        auto = AutoNormal(model, init_scale=0.01, **init)
    step_size = lr
    if decay_steps:
        step_size = lambda i: lr * 0.1 ** (i / decay_steps)  # noqa: E731
    return SVI(model, auto, Adam(step_size), Trace_ELBO()), xs, y


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guide", choices=("map", "meanfield"), default="meanfield")
    parser.add_argument("--threads", type=int, default=0, help="0: JAX's default")
    parser.add_argument("--sizes", default="128,32,32")
    parser.add_argument("--out", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--long", type=int, default=1200)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
    except ImportError:
        print(json.dumps({"skipped": "numpyro is not installed"}))
        sys.exit(MISSING)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    svi, xs, y = numpyro_svi(args.guide, sizes, args.out, args.rank, args.batch)
    state = svi.init(jax.random.PRNGKey(1), xs, y)

    def loop(steps):
        def body(carry, _):
            carry, loss = svi.update(carry, xs, y)
            return carry, loss

        return jax.jit(lambda s: jax.lax.scan(body, s, None, length=steps))

    compiled = loop(args.long)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state))  # compiles
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _, losses = jax.block_until_ready(compiled(state))
        times.append(time.perf_counter() - t0)
    per_step = min(times) / args.long
    print(
        json.dumps(
            {
                "ms_per_step": per_step * 1e3,
                "compile_s": compile_s,
                "numpyro": numpyro.__version__,
                "jax": jax.__version__,
                "threads": args.threads or "default",
                "loss_finite": bool(jnp.isfinite(losses).all()),
            }
        )
    )


if __name__ == "__main__":
    main()
