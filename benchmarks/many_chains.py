"""The lockstep sampler (``fit(guide="mcmc")``, ChEES-HMC on many chains) on every model of
``nuts_models.py`` plus ``Regressor(CPFusion)``, each fit with its defaults and 3 seeds, against
the NumPyro NUTS twin (``numpyro_nuts.py``: every model, 2 chains x (500 + 500), its own 3
seeds) in the same run.

    python benchmarks/many_chains.py [--quick] [--seeds N] [--only NAME ...] --out DIR

Reported per fit: wall time of the whole fit (MAP starts, chain starts, compile, warm-up and
draws, as a user waits), its compile seconds, batched gradient calls, divergent transitions,
rank-normalized r-hat / bulk ESS of the sorted scales, the sorted relevances and the held-out
predictive mean, the largest nested r-hat, and ESS/s = the smaller ESS of the sorted scales and
the predictive mean per second of the whole fit. ``vs NumPyro``: the median of our ESS/s over
the median of the twin's. Targets (issue 30): r-hat <= 1.01, ESS >= 400, divergences <= 0.1 %
of draws, ESS/s >= 1x the twin. ``--quick``: one model, one seed, short warm-up (a smoke test).
Writes ``DIR/many_chains.md`` and ``DIR/many_chains.json``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpyro_nuts
import nuts_models
import scored_section

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression

#: model name -> its NumPyro twin (``numpyro_nuts.run_twin``'s ``layer`` and ``likelihood``)
TWINS = {**nuts_models.NUMPYRO_TWINS, "Regressor(CPFusion)": dict(likelihood="normal")}
#: draws per chain of the NumPyro twin (2 chains, as many warm-up iterations)
TWIN_DRAWS = 500


def cp_regression_case(train_rows: int = nuts_models.TRAIN) -> tuple:
    """``(model factory, train args, held-out inputs)`` of ``Regressor(CPFusion)`` on planted
    rank-2 data of ``train_rows`` rows (and ``nuts_models.HELD_OUT`` held out)."""
    sizes, n = nuts_models.SIZES, train_rows + nuts_models.HELD_OUT
    train, test = make_cp_regression(sizes, 2, rank=2, num_data=n, noise=0.1, seed=3).split(
        train_rows
    )
    return (
        lambda: bf.Regressor(bf.CPFusion(sizes, 2, max_rank=nuts_models.MAX_RANK)),
        (train.inputs, train.y),
        test.inputs,
    )


def cases() -> dict:
    """name -> (model factory, train args, held-out inputs): nuts_models' and a regression."""
    return {**nuts_models.cases(), "Regressor(CPFusion)": cp_regression_case()}


def run_fit(name: str, factory, args, held_out, seed: int, **options) -> dict:
    """One ``guide="mcmc"`` fit and its diagnostics."""
    model = factory()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diagnostics are reported below
        res = bf.fit(model, *args, guide="mcmc", seed=seed, progress=False, **options)
        seconds = time.perf_counter() - start
        diag = res.diagnostics(held_out)
    pick = {
        label: next(k for k in diag["r_hat"] if k.endswith(suffix))
        for label, suffix in (
            ("lambda", "rank_scale_sorted"),
            ("relevance", "relevance_sorted"),
            ("pred", "predictive_mean"),
        )
    }
    draws = res.sample_stats["lp"].numel()
    row = {
        "model": name,
        "seed": seed,
        "seconds": seconds,
        "compile_seconds": res.info["seconds_breakdown"]["compile"],
        "map_seconds": res.info["seconds_breakdown"]["map_start"],
        "sampling_seconds": res.info["seconds_breakdown"]["sampling"],
        "gradients": res.info["gradients"],
        "draws": draws,
        "chains": res.info["num_chains"],
        "divergences": sum(res.info["divergences"]),
        "nested_r_hat": max(diag.get("nested_r_hat", {1: 1.0}).values()),
        "jit_choice": res.info["jit_choice"],
    }
    for label, key in pick.items():
        row[f"r_hat_{label}"] = diag["r_hat"][key]
        row[f"ess_{label}"] = diag["ess"][key]
    row["ess_per_s"] = min(row["ess_lambda"], row["ess_pred"]) / seconds
    print(f"[many_chains] {row}", flush=True)
    return row


def run_twin(name: str, args, held_out, seed: int) -> dict | None:
    """The NumPyro NUTS twin of model ``name`` (``TWINS``; ``None`` without numpyro)."""
    twin = numpyro_nuts.run_twin(
        *args,
        held_out,
        max_rank=nuts_models.MAX_RANK,
        draws=TWIN_DRAWS,
        seed=seed,
        **TWINS[name],
    )
    if twin is not None:
        twin["ess_per_s"] = (
            min(twin["min_ess_sorted_lambda"], twin["min_ess_pred"]) / twin["seconds"]
        )
        print(f"[many_chains] NumPyro twin {name} seed {seed}: {twin}", flush=True)
    return twin


def markdown(rows: list[dict], twins: dict, meta: dict) -> str:
    lines = scored_section.table_head(
        "Many chains in lockstep (guide='mcmc', defaults) vs the NumPyro NUTS twin",
        meta,
        [
            "model",
            "seed",
            "chains x draws",
            "wall (s)",
            "compile / MAP (s)",
            "batched gradients",
            "divergences",
            "r-hat / ESS sorted lambda",
            "r-hat / ESS sorted relevance",
            "r-hat / ESS predictive mean",
            "nested r-hat",
            "ESS/s",
            "targets met",
        ],
    )
    for r in rows:
        met = (
            r["divergences"] <= 0.001 * r["draws"]
            and max(r["r_hat_lambda"], r["r_hat_pred"]) <= 1.01
            and min(r["ess_lambda"], r["ess_pred"]) >= 400
        )
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['chains']} x {r['draws'] // r['chains']} | "
            f"{r['seconds']:.0f} | {r['compile_seconds']:.0f} / {r['map_seconds']:.0f} | "
            f"{r['gradients']} | {r['divergences']} | "
            f"{r['r_hat_lambda']:.3f} / {r['ess_lambda']:.0f} | "
            f"{r['r_hat_relevance']:.3f} / {r['ess_relevance']:.0f} | "
            f"{r['r_hat_pred']:.3f} / {r['ess_pred']:.0f} | {r['nested_r_hat']:.3f} | "
            f"{r['ess_per_s']:.1f} | {'yes' if met else 'no'} |"
        )
    lines += [
        "",
        "| model | NumPyro twin per seed: wall (s), div., r-hat / ESS lambda, "
        "r-hat / ESS pred., ESS/s | ours vs NumPyro (median ESS/s) |",
        "|---|---|---|",
    ]
    for name, runs in twins.items():
        ours = [r["ess_per_s"] for r in rows if r["model"] == name]
        cells = "; ".join(
            f"{t['seconds']:.0f}, {t['divergences']}, {t['max_rhat_sorted_lambda']:.3f} / "
            f"{t['min_ess_sorted_lambda']:.0f}, {t['max_rhat_pred']:.3f} / "
            f"{t['min_ess_pred']:.0f}, {t['ess_per_s']:.1f}"
            for t in runs
        )
        ratio = statistics.median(ours) / max(
            statistics.median(t["ess_per_s"] for t in runs), 1e-12
        )
        lines.append(f"| {name} | {cells} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    def options(parser):
        parser.add_argument("--seeds", type=int, default=3, help="seeds per model")
        parser.add_argument("--only", nargs="*", default=None, help="model name substrings")
        parser.add_argument("--no-numpyro", action="store_true", help="skip the NumPyro twins")

    args = scored_section.parse_args(__doc__, argv, "a smoke test: one model, one seed", options)
    seeds = 1 if args.quick else args.seeds
    quick = dict(scored_section.QUICK_MCMC) if args.quick else {}
    only = args.only or (["Regressor(CPFusion)"] if args.quick else None)
    start = time.perf_counter()
    rows, twins = [], {}
    for name, (factory, train_args, held_out) in cases().items():
        if only and not any(s in name for s in only):
            continue
        for seed in range(seeds):  # ours and the twin interleaved, seed by seed
            rows.append(run_fit(name, factory, train_args, held_out, seed, **quick))
            if name in TWINS and not args.no_numpyro and not args.quick:
                twin = run_twin(name, train_args, held_out, seed)
                if twin is not None:
                    twins.setdefault(name, []).append(twin)
    payload = {"rows": rows, "twins": twins}
    scored_section.write(
        args, "many_chains", start, lambda meta: markdown(rows, twins, meta), payload
    )
    return rows


if __name__ == "__main__":
    main()
