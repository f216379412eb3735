"""The rank posterior of every guide against the truth and against a full-posterior sampler, on
synthetic sets of known rank (issue 31, item 5).

    python benchmarks/rank_coverage.py [--quick] [--reps 10] [--reference-reps 3] --out DIR

Sets (``(3, 4, 3)`` views): a regression (2 outputs, noise 0.2, 300 rows) and a 3-class
classification (400 rows), each with no interaction (a linear mean / linear logits; main
effects on, true rank 0) and with an append-one CP interaction of rank 2 (main effects off:
with main effects the interaction part of an append-one CP term has another rank). Each
replication draws a new data set (seed = replication). Per set and guide (``map``,
``meanfield``, ``lowrank``, ``full``): the share of replications whose 90 % HDI holds the true
rank (MAP: its point estimate equals it), the mean ``P(true rank)`` and the mean ``m_eff``;
against the reference -- ``guide="nuts"`` (2 chains x (300 + 300)), until the many-chain
sampler lands -- on the first ``--reference-reps`` replications, the mean total-variation
distance between the guide's ``P(rank)`` and the reference's. Writes ``DIR/rank_coverage.md``
and ``DIR/rank_coverage.json``. Target: the true rank inside every guide's 90 % HDI in >= 90 %
of replications.
"""

from __future__ import annotations

import statistics
import time
import warnings

import scored_section

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification, make_cp_regression

SIZES = (3, 4, 3)
GUIDES = ("map", "meanfield", "lowrank", "full")
#: set name -> (likelihood, true rank)
SETS = {
    "regression, no interaction": ("gaussian", 0),
    "regression, rank 2": ("gaussian", 2),
    "classification, no interaction": ("categorical", 0),
    "classification, rank 2": ("categorical", 2),
}
REFERENCE = {"num_samples": 300, "warmup_steps": 300, "num_chains": 2}


def problem(likelihood: str, truth: int, seed: int):
    """``(model, inputs, y)`` of one replication."""
    main_effects = truth == 0
    if likelihood == "gaussian":
        data = make_cp_regression(SIZES, 2, rank=truth, num_data=300, noise=0.2, seed=seed)
        model = bf.Regressor(bf.CPFusion(SIZES, 2, max_rank=4, main_effects=main_effects))
    else:
        scale = 4.0 if truth else 3.0
        data = make_cp_classification(SIZES, 3, truth, num_data=400, logit_scale=scale, seed=seed)
        model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4, main_effects=main_effects))
    return model, data.inputs, data.y


def rank_of(model, inputs, y, guide: str, seed: int, quick: bool):
    """The layer's rank posterior after a fit with ``guide``, and the fit's seconds."""
    options = REFERENCE if guide == "nuts" else {"num_steps": 200 if quick else 1500}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diagnostics warnings are reported in the table
        res = bf.fit(model, inputs, y, guide=guide, seed=seed, progress=False, **options)
        rp = bf.rank_posterior(res, num_samples=300)["layer"]
    return rp, time.perf_counter() - started


def run(reps: int, reference_reps: int, quick: bool) -> list[dict]:
    rows = []
    for name, (likelihood, truth) in SETS.items():
        reference = {}
        for seed in range(reference_reps):
            reference[seed], _ = rank_of(*problem(likelihood, truth, seed), "nuts", seed, quick)
        for guide in GUIDES:
            covered, p_true, m_eff, tv, seconds = [], [], [], [], []
            for seed in range(reps):
                rp, took = rank_of(*problem(likelihood, truth, seed), guide, seed, quick)
                lo, hi = rp.hdi
                covered.append(lo <= truth <= hi)
                p_true.append(float(rp.probs[truth]))
                m_eff.append(float(rp.m_eff.mean()) if rp.m_eff is not None else float("nan"))
                seconds.append(took)
                if seed in reference:
                    tv.append(0.5 * float((rp.probs - reference[seed].probs).abs().sum()))
            rows.append(
                {
                    "set": name,
                    "guide": guide,
                    "criterion": rp.criterion,
                    "reps": reps,
                    "coverage": sum(covered) / reps,
                    "p_true": statistics.mean(p_true),
                    "m_eff": statistics.mean(m_eff),
                    "tv_to_reference": statistics.mean(tv) if tv else None,
                    "reference_reps": len(tv),
                    "fit_seconds": statistics.median(seconds),
                }
            )
            print(rows[-1], flush=True)
        if reference:
            ref = list(reference.values())
            rows.append(
                {
                    "set": name,
                    "guide": "nuts (reference)",
                    "criterion": ref[0].criterion,
                    "reps": len(ref),
                    "coverage": sum(r.hdi[0] <= truth <= r.hdi[1] for r in ref) / len(ref),
                    "p_true": statistics.mean(float(r.probs[truth]) for r in ref),
                    "m_eff": statistics.mean(float(r.m_eff.mean()) for r in ref),
                    "tv_to_reference": 0.0,
                    "reference_reps": len(ref),
                    "fit_seconds": None,
                    "diagnostics_failed": sum(bool(r.problems) for r in ref),
                }
            )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = scored_section.table_head(
        "Rank posterior: coverage of the true rank and distance to the reference sampler",
        meta,
        [
            "set",
            "guide",
            "criterion",
            "true rank in 90% HDI",
            "mean P(true rank)",
            "mean m_eff",
            "TV to reference",
            "fit s (median)",
        ],
    )
    for r in rows:
        tv = "-" if r["tv_to_reference"] is None else f"{r['tv_to_reference']:.3f}"
        tv += f" ({r['reference_reps']} reps)" if r["reference_reps"] else ""
        if "diagnostics_failed" in r:
            tv = f"reference; diagnostics failed in {r['diagnostics_failed']}"
        seconds = "-" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}"
        m_eff = "-" if r["m_eff"] != r["m_eff"] else f"{r['m_eff']:.2f}"  # NaN: relative
        lines.append(
            f"| {r['set']} | {r['guide']} | {r['criterion']} | "
            f"{r['coverage']:.0%} of {r['reps']} | {r['p_true']:.3f} | {m_eff} | "
            f"{tv} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def extra(parser):
        parser.add_argument("--reps", type=int, default=10, help="replications per set")
        parser.add_argument(
            "--reference-reps", type=int, default=3, help="replications with the NUTS reference"
        )

    args = scored_section.parse_args(__doc__, argv, "one replication, short fits, no NUTS", extra)
    reps, reference_reps = (1, 0) if args.quick else (args.reps, args.reference_reps)
    started = time.perf_counter()
    rows = run(reps, min(reference_reps, reps), args.quick)
    scored_section.write(
        args, "rank_coverage", started, lambda meta: markdown(rows, meta), {"rows": rows}
    )
    return rows


if __name__ == "__main__":
    main()
