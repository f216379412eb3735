"""ESS per second of the lockstep sampler (``fit(guide="mcmc")``) against the number of chains
and against the number of training rows, with the NumPyro NUTS twin beside the second curve.

    python benchmarks/many_chains_curves.py [--quick] [--curve chains|rows|both]
        [--chains 2 8 16 64 256 1024] [--rows 300 3000 30000] [--warmup W] --out DIR

* ``chains``: ``Classifier(CPFusion)``, 2 classes, 300 rows (``nuts_models.py``'s instance), one
  seed per chain count; 4000 draws shared by the chains (:func:`~bayes_fusion.infer.mcmc
  .many_chains.default_draws`, at least 50 per chain) after ``--warmup`` iterations (default:
  the fit's 500). Reported beside ESS/s: milliseconds per batched gradient (sampling seconds
  less the compile, over batched calls) and per chain, i.e. what one more chain costs. The
  counts in ``--cost-only`` (default 1024: a whole fit takes ~20 min on a 2-core CPU) get a
  short compiled run that measures that cost only.
* ``rows``: ``Classifier(CPFusion)`` (2 classes) and ``Regressor(CPFusion)`` at each row count
  (fresh planted data of that size, 100 held-out rows), ``bf.fit`` defaults, one seed, the
  NumPyro twin (2 chains x (500 + 500), XLA compile included) on the same data right after.

ESS/s counts the whole fit (MAP starts, chain starts, compile, warm-up, draws): the smaller
bulk ESS of the sorted scales and the held-out predictive mean over the fit's wall time.
``--quick``: 4 chains, then the classifier at 300 rows, short fits, no twin (a smoke test).
Writes ``DIR/many_chains_curves.md`` and ``DIR/many_chains_curves.json``.
"""

from __future__ import annotations

import time

import many_chains
import nuts_models
import scored_section

#: the model of the chain-count curve
CHAINS_MODEL = "Classifier(CPFusion), 2 classes"
#: draws of a cost-only run (``--cost-only``)
COST_DRAWS = 5


def rows_cases(rows: int) -> dict:
    """name -> (model factory, train args, held-out inputs) at ``rows`` training rows: the two
    CP models of ``many_chains.py`` on planted data of that size."""
    return {
        "Classifier(CPFusion), 2 classes": nuts_models.cp_classifier_case(2, rows),
        "Regressor(CPFusion)": many_chains.cp_regression_case(rows),
    }


def chains_curve(counts: list[int], warmup: int | None, quick: dict, cost_only: list[int]):
    """One fit per chain count of ``CHAINS_MODEL``; for the counts in ``cost_only`` a short
    compiled run (no warm-up, ``COST_DRAWS`` draws) that measures the cost of a batched
    gradient only (its ESS means nothing)."""
    factory, args, held_out = nuts_models.cases()[CHAINS_MODEL]
    out = []
    for chains in counts:
        options = {"num_chains": chains, **quick}
        if chains in cost_only:
            options.update(warmup_steps=0, num_samples=COST_DRAWS, jit=True)
        elif warmup is not None:
            options["warmup_steps"] = warmup
        row = many_chains.run_fit(CHAINS_MODEL, factory, args, held_out, 0, **options)
        row["cost_only"] = chains in cost_only
        out.append(row)
    return out


def ms_per_gradient(row: dict) -> float:
    """Milliseconds per batched gradient: sampling seconds less the compile, per call."""
    return 1e3 * (row["sampling_seconds"] - row["compile_seconds"]) / row["gradients"]


def rows_curve(sizes: list[int], twins: bool, quick: dict, models: int | None = None) -> list[dict]:
    """One fit per model (the first ``models`` of :func:`rows_cases`, all by default) and row
    count, each followed by its NumPyro twin when ``twins``."""
    out = []
    for rows in sizes:
        for name, (factory, args, held_out) in list(rows_cases(rows).items())[:models]:
            row = many_chains.run_fit(name, factory, args, held_out, 0, **quick)
            row["rows"] = rows
            if twins:
                row["twin"] = many_chains.run_twin(name, args, held_out, 0)
            out.append(row)
    return out


def markdown(chain_rows: list[dict], size_rows: list[dict], meta: dict) -> str:
    lines = scored_section.table_head(
        "Many chains in lockstep: ESS/s against chains and against training rows",
        meta,
        [
            "curve",
            "model",
            "rows",
            "chains x draws",
            "wall (s)",
            "compile / MAP (s)",
            "batched gradients",
            "ms per gradient (per chain)",
            "divergences",
            "r-hat / ESS sorted lambda",
            "r-hat / ESS predictive mean",
            "ESS/s",
            "NumPyro twin: wall (s), r-hat / ESS lambda, r-hat / ESS pred., ESS/s",
            "ours vs NumPyro",
        ],
    )
    for curve, rows in (("chains", chain_rows), ("rows", size_rows)):
        for r in rows:
            per_gradient = ms_per_gradient(r)
            twin, twin_cell, ratio = r.get("twin"), "-", "-"
            if twin:
                twin_cell = (
                    f"{twin['seconds']:.0f}, {twin['max_rhat_sorted_lambda']:.3f} / "
                    f"{twin['min_ess_sorted_lambda']:.0f}, {twin['max_rhat_pred']:.3f} / "
                    f"{twin['min_ess_pred']:.0f}, {twin['ess_per_s']:.2f}"
                )
                ratio = f"{r['ess_per_s'] / max(twin['ess_per_s'], 1e-12):.2f}x"
            quality = (
                "cost only | - | - | -"
                if r.get("cost_only")
                else f"{r['divergences']} | {r['r_hat_lambda']:.3f} / {r['ess_lambda']:.0f} | "
                f"{r['r_hat_pred']:.3f} / {r['ess_pred']:.0f} | {r['ess_per_s']:.2f}"
            )
            lines.append(
                f"| {curve} | {r['model']} | {r.get('rows', nuts_models.TRAIN)} | "
                f"{r['chains']} x {r['draws'] // r['chains']} | {r['seconds']:.0f} | "
                f"{r['compile_seconds']:.0f} / {r['map_seconds']:.0f} | {r['gradients']} | "
                f"{per_gradient:.2f} ({per_gradient / r['chains']:.4f}) | {quality} | "
                f"{twin_cell} | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def options(parser):
        parser.add_argument("--curve", choices=("chains", "rows", "both"), default="both")
        parser.add_argument("--chains", type=int, nargs="*", default=[2, 8, 16, 64, 256, 1024])
        parser.add_argument("--rows", type=int, nargs="*", default=[300, 3000, 30000])
        parser.add_argument("--warmup", type=int, default=None, help="chain curve's warm-up")
        parser.add_argument(
            "--cost-only",
            type=int,
            nargs="*",
            default=[1024],
            help="chain counts measured for the cost of a batched gradient only",
        )
        parser.add_argument("--no-numpyro", action="store_true", help="skip the NumPyro twins")

    args = scored_section.parse_args(__doc__, argv, "a smoke test: short fits, no twin", options)
    quick = dict(scored_section.QUICK_MCMC) if args.quick else {}
    counts = [4] if args.quick else args.chains
    sizes = [300] if args.quick else args.rows
    start = time.perf_counter()
    chain_rows = size_rows = []
    if args.curve in ("chains", "both"):
        chain_rows = chains_curve(counts, args.warmup, quick, [] if args.quick else args.cost_only)
    if args.curve in ("rows", "both"):
        twins = not (args.quick or args.no_numpyro)
        size_rows = rows_curve(sizes, twins, quick, models=1 if args.quick else None)
    payload = {"chains": chain_rows, "rows": size_rows}
    scored_section.write(
        args,
        "many_chains_curves",
        start,
        lambda meta: markdown(chain_rows, size_rows, meta),
        payload,
    )
    return payload


if __name__ == "__main__":
    main()
