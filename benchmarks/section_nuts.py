"""Section ``nuts``: NUTS on the inference issue's instance, effective samples per second of
the sorted scales, against the same regression by hand in NumPyro."""

from __future__ import annotations

import time
import warnings

import scored_section
from harness import Context

import bayes_fusion as bf


def _numpyro_nuts_rows(rep, group, data, draws, ours_ess_per_s):
    """The same regression by hand in NumPyro, plain NUTS (benchmarks/numpyro_nuts.py), with a
    diagonal and a dense mass matrix; the ratio is our collapsed path's ESS/s over NumPyro's
    (issue 16 target: >= 10x). Skipped cleanly without numpyro."""
    import numpyro_nuts

    for dense in (False, True):
        r = numpyro_nuts.run_twin(data.inputs, data.y, max_rank=4, draws=draws, dense=dense)
        if r is None:
            print("[nuts] NumPyro baseline skipped: numpyro is not installed", flush=True)
            return
        ess_per_s = r["min_ess_sorted_lambda"] / r["seconds"]
        metric = "dense" if dense else "diagonal"
        rep.rows.append(
            {
                "group": group,
                "name": f"NumPyro NUTS by hand, non-centred, {metric} mass matrix, {draws} "
                f"warm-up + {draws} draws per chain (collapsed ESS/s vs NumPyro's)",
                "ms": r["seconds"] * 1e3,
                "spread": 0.0,
                "ratio": ours_ess_per_s / max(ess_per_s, 1e-12),
                "target": ">=10x",
                "note": f"min ESS sorted lambda {r['min_ess_sorted_lambda']:.0f}, r-hat "
                f"{r['max_rhat_sorted_lambda']:.3f}, {ess_per_s:.2f} ESS/s, "
                f"{r['divergences']} divergences, {r['seconds']:.0f} s",
            }
        )
        print(f"[nuts] NumPyro ({metric}): {r}", flush=True)


def nuts(ctx: Context):
    """NUTS on the inference issue's instance: effective samples per second of the sorted
    lambdas, per lever (generic non-centred NUTS vs the collapsed CP path)."""
    rep, device, quick = ctx.rep, ctx.device, ctx.quick

    from bayes_fusion.datasets import make_cp_regression

    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=300, noise=0.1, seed=0)
    g = "NUTS (4,5,3)->2, max_rank 4, N=300, 2 chains"
    draws = 30 if quick else 500
    cases = [("collapsed (default): out factor + bias integrated out", {})]
    if not quick:
        # the generic path is far slower per effective sample: a shorter run suffices
        cases.append(
            ("generic path (marginalize=False), 150 draws", dict(marginalize=False, draws=150))
        )
    results = {}
    for name, kw in cases:
        kw = dict(kw)
        n = kw.pop("draws", draws)
        if quick:
            kw.update(scored_section.QUICK_NUTS)
        model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=4)).to(device)
        inputs = [x.to(device) for x in data.inputs]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bf.fit(
                model,
                inputs,
                data.y.to(device),
                guide="nuts",
                num_samples=n,
                warmup_steps=n,
                num_chains=2,
                progress=False,
                **kw,
            )
            diag = res.diagnostics()
        seconds = time.perf_counter() - t0
        ess = diag["ess"]["layer.rank_scale_sorted"]
        rhat = diag["r_hat"]["layer.rank_scale_sorted"]
        results[name] = ess / seconds
        rep.rows.append(
            {
                "group": g,
                "name": f"{name}, {n} warm-up + {n} draws per chain",
                "ms": seconds * 1e3,
                "spread": 0.0,
                "ratio": None,
                "target": None,
                "note": f"min ESS sorted lambda {ess:.0f}, r-hat {rhat:.3f}, "
                f"{ess / seconds:.2f} ESS/s, {sum(diag['divergences'])} divergences, "
                f"{seconds:.0f} s",
            }
        )
        print(
            f"[{g}] {name}: {seconds:.1f} s, ESS {ess:.0f}, {ess / seconds:.2f} ESS/s", flush=True
        )
    if device.type == "cpu":
        _numpyro_nuts_rows(
            rep, g, data, draws, results["collapsed (default): out factor + bias integrated out"]
        )
