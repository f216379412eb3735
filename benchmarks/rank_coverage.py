"""The rank posterior of every guide against the truth and against a full-posterior sampler, on
synthetic sets of known rank (issue 31, item 5).

    python benchmarks/rank_coverage.py [--quick] [--reps 10] [--reference-reps 5] [--digits]
        --out DIR

Sets (``(3, 4, 3)`` views): a regression (2 outputs, noise 0.2, 300 rows) and a 3-class
classification (400 rows), each with no interaction (a linear mean / linear logits; main
effects on, true rank 0) and with an append-one CP interaction of rank 2 (main effects off:
with main effects the interaction part of an append-one CP term has another rank). Each
replication draws a new data set (seed = replication). Per set and guide (``map``,
``meanfield``, ``lowrank``, ``full``): the share of replications whose 90 % HDI holds the true
rank (MAP: its point estimate equals it), the mean ``P(true rank)`` and the mean ``m_eff``;
against the full-posterior reference -- ``guide="mcmc"`` with its defaults (16 chains in
lockstep) -- on the first ``--reference-reps`` replications, the mean total-variation distance
between the guide's ``P(rank)`` and the reference's, and the guide's overconfidence: the mass
it puts on its modal rank minus the reference's mass there (positive: more certain than the
full posterior). ``--digits`` adds the digits classifier of ``examples/multimodal_digits.py``
(3 views, 10 classes, max rank 16, main effects; one replication, the data are fixed). Writes
``DIR/rank_coverage.md`` and ``DIR/rank_coverage.json``. Target: the true rank inside every
guide's 90 % HDI in >= 90 % of replications.
"""

from __future__ import annotations

import statistics
import time
import warnings

import scored_section
import torch

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
#: the full-posterior reference: the many-chain sampler with its defaults
REFERENCE = "mcmc"
DIGITS = "digits (3 views, 10 classes), rank unknown"


def problem(likelihood: str, truth: int | None, seed: int):
    """``(model, inputs, y)`` of one replication (``likelihood="digits"``: the digits set)."""
    if likelihood == "digits":
        from bayes_fusion.datasets import load_digits_views

        data = load_digits_views(("fourier", "profile", "moments"))
        train = torch.randperm(
            len(data.targets["digit"]), generator=torch.Generator().manual_seed(0)
        )
        train = train[len(train) // 4 :]  # the example's training rows
        views = [v[train] for v in data.views]
        sizes = [v.shape[1] for v in views]
        model = bf.Classifier(bf.CPFusion(sizes, 10, max_rank=16, main_effects=True))
        return model, views, data.targets["digit"][train]
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
    options = {} if guide == REFERENCE else {"num_steps": 200 if quick else 1500}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diagnostics warnings are reported in the table
        res = bf.fit(model, inputs, y, guide=guide, seed=seed, progress=False, **options)
        rp = bf.rank_posterior(res, num_samples=300)["layer"]
    return rp, time.perf_counter() - started


def run(sets: dict, reps: int, reference_reps: int, quick: bool) -> list[dict]:
    rows = []
    for name, (likelihood, truth) in sets.items():
        reference = {}
        for seed in range(reference_reps):
            model, inputs, y = problem(likelihood, truth, seed)
            reference[seed], _ = rank_of(model, inputs, y, REFERENCE, seed, quick)
        for guide in GUIDES:
            covered, p_true, m_eff, tv, over, seconds = [], [], [], [], [], []
            for seed in range(reps):
                rp, took = rank_of(*problem(likelihood, truth, seed), guide, seed, quick)
                lo, hi = rp.hdi
                if truth is not None:
                    covered.append(lo <= truth <= hi)
                    p_true.append(float(rp.probs[truth]))
                m_eff.append(float(rp.m_eff.mean()) if rp.m_eff is not None else float("nan"))
                seconds.append(took)
                if seed in reference:
                    ref = reference[seed].probs
                    tv.append(0.5 * float((rp.probs - ref).abs().sum()))
                    over.append(float(rp.probs.max() - ref[int(rp.probs.argmax())]))
            rows.append(
                {
                    "set": name,
                    "guide": guide,
                    "criterion": rp.criterion,
                    "reps": reps,
                    "coverage": sum(covered) / reps if covered else None,
                    "p_true": statistics.mean(p_true) if p_true else None,
                    "mode": int(rp.mode),
                    "m_eff": statistics.mean(m_eff),
                    "tv_to_reference": statistics.mean(tv) if tv else None,
                    "overconfidence": statistics.mean(over) if over else None,
                    "reference_reps": len(tv),
                    "fit_seconds": statistics.median(seconds),
                }
            )
            print(rows[-1], flush=True)
        if reference:
            ref = list(reference.values())
            known = truth is not None
            rows.append(
                {
                    "set": name,
                    "guide": f"{REFERENCE} (reference)",
                    "criterion": ref[0].criterion,
                    "reps": len(ref),
                    "coverage": (
                        sum(r.hdi[0] <= truth <= r.hdi[1] for r in ref) / len(ref)
                        if known
                        else None
                    ),
                    "p_true": statistics.mean(float(r.probs[truth]) for r in ref)
                    if known
                    else None,
                    "mode": int(ref[0].mode),
                    "m_eff": statistics.mean(float(r.m_eff.mean()) for r in ref),
                    "tv_to_reference": 0.0,
                    "overconfidence": 0.0,
                    "reference_reps": len(ref),
                    "fit_seconds": None,
                    "diagnostics_failed": sum(bool(r.problems) for r in ref),
                    "problems": [r.problems for r in ref],
                }
            )
            print(rows[-1], flush=True)
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
            "mode (first rep)",
            "mean m_eff",
            "TV to reference",
            "overconfidence",
            "fit s (median)",
        ],
    )
    for r in rows:
        tv = "-" if r["tv_to_reference"] is None else f"{r['tv_to_reference']:.3f}"
        tv += f" ({r['reference_reps']} reps)" if r["reference_reps"] else ""
        over = "-" if r["overconfidence"] is None else f"{r['overconfidence']:+.3f}"
        if "diagnostics_failed" in r:
            tv = f"reference; diagnostics failed in {r['diagnostics_failed']}"
        seconds = "-" if r["fit_seconds"] is None else f"{r['fit_seconds']:.1f}"
        m_eff = "-" if r["m_eff"] != r["m_eff"] else f"{r['m_eff']:.2f}"  # NaN: relative
        coverage = "-" if r["coverage"] is None else f"{r['coverage']:.0%} of {r['reps']}"
        p_true = "-" if r["p_true"] is None else f"{r['p_true']:.3f}"
        lines.append(
            f"| {r['set']} | {r['guide']} | {r['criterion']} | {coverage} | {p_true} | "
            f"{r['mode']} | {m_eff} | {tv} | {over} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def extra(parser):
        parser.add_argument("--reps", type=int, default=10, help="replications per set")
        parser.add_argument(
            "--reference-reps", type=int, default=5, help="replications with the MCMC reference"
        )
        parser.add_argument("--digits", action="store_true", help="add the digits classifier")

    args = scored_section.parse_args(__doc__, argv, "one replication, short fits, no MCMC", extra)
    reps, reference_reps = (1, 0) if args.quick else (args.reps, args.reference_reps)
    started = time.perf_counter()
    rows = run(SETS, reps, min(reference_reps, reps), args.quick)
    if args.digits and not args.quick:
        rows += run({DIGITS: ("digits", None)}, 1, 1, args.quick)
    scored_section.write(
        args, "rank_coverage", started, lambda meta: markdown(rows, meta), {"rows": rows}
    )
    return rows


if __name__ == "__main__":
    main()
