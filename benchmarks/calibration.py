"""Calibration of posterior intervals: how often the 50% and 90% intervals of the predictive
mean at held-out points hold the true mean, for both MCMC samplers (``mcmc``: the lockstep
sampler with its defaults; ``nuts``: 2 chains x (500 + 500)) and every SVI guide.

    python benchmarks/calibration.py [--quick] [--replications K] --out DIR

Simulated data with a known answer (:func:`bayes_fusion.datasets.make_cp_regression`: CP
fusion (4, 5, 3) -> 2 of rank 2, noise 0.1, 300 training and 200 held-out rows, a new data set
per replication); the model is ``Regressor(CPFusion(..., max_rank=4))``. The true predictive
mean of a held-out row is the noise-free fusion output. A calibrated posterior covers it at the
nominal rate on average over replications (within one data set the held-out points share the
posterior's errors, so single-replication coverage scatters more than binomially). Writes
``DIR/calibration.md`` and ``DIR/calibration.json``.

``--task binary``: the same for a binary ``Classifier(CPFusion(..., max_rank=4))`` on labels
drawn from a rank-2 CP fusion's logits (:func:`bayes_fusion.datasets.make_cp_classification`,
logit std 3); the quantity is the class-1 probability of each held-out row, its truth the
generating model's. Writes ``DIR/calibration_binary.md`` / ``.json``.
"""

from __future__ import annotations

import time
import warnings

import scored_section
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification, make_cp_regression
from bayes_fusion.ops import cp_fusion

SIZES, OUT, RANK, MAX_RANK = (4, 5, 3), 2, 2, 4
LEVELS = (0.5, 0.9)
GUIDES = ("map", "meanfield", "lowrank", "full", "nuts", "mcmc")


def coverage(draws: torch.Tensor, truth: torch.Tensor, level: float) -> float:
    """Fraction of entries of ``truth`` ``(N, P)`` inside the central ``level`` interval of
    ``draws`` ``(S, N, P)``."""
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=draws.dtype)
    lo, hi = torch.quantile(draws, probs, dim=0)
    return float(((lo <= truth) & (truth <= hi)).double().mean())


def problem(task: str, seed: int):
    """One simulated data set of ``task``: ``(model factory, train, test, truth (N, P), pick)``
    with ``pick`` mapping ``predict``'s draws to the quantity's draws ``(S, N, P)``."""
    if task == "binary":
        data = make_cp_classification(SIZES, 2, rank=RANK, num_data=500, seed=seed)
        train, test = data.split(300)
        truth = data.truth["probs"][300:, 1:]
        return (
            lambda: bf.Classifier(bf.CPFusion(SIZES, 2, max_rank=MAX_RANK)),
            train,
            test,
            truth,
            lambda samples: samples[..., 1:],
        )
    data = make_cp_regression(SIZES, OUT, rank=RANK, num_data=500, noise=0.1, seed=seed)
    train, test = data.split(300)
    factors = [data.truth[f"factor_{m}"] for m in range(len(SIZES))]
    truth = cp_fusion(test.inputs, factors, data.truth["out_factor"])
    return (
        lambda: bf.Regressor(bf.CPFusion(SIZES, OUT, max_rank=MAX_RANK)),
        train,
        test,
        truth,
        lambda samples: samples,
    )


def replication(seed: int, guides, quick: bool, task: str = "regression") -> list[dict]:
    """Fit every guide to one simulated data set; coverage of each at each level."""
    factory, train, test, truth, pick = problem(task, seed)
    rows = []
    for guide in guides:
        if guide == "nuts":
            draws = 30 if quick else 500
            options = {"num_samples": draws, "warmup_steps": draws, "num_chains": 2}
            if quick:
                options.update(scored_section.QUICK_NUTS)
        elif guide == "mcmc":
            options = dict(scored_section.QUICK_MCMC) if quick else {}
        else:
            options = {"num_steps": 300 if quick else 3000}
        model = factory()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # short quick runs warn
            result = bf.fit(
                model, train.inputs, train.y, guide=guide, progress=False, seed=seed, **options
            )
        seconds = time.perf_counter() - start
        draws = None if result.is_mcmc else 1000  # MCMC: every draw
        pred = result.predict(test.inputs, num_samples=draws, return_samples=True, seed=seed)
        row = {"seed": seed, "guide": guide, "seconds": seconds}
        row.update(
            {
                f"coverage_{level}": coverage(pick(pred["mean_samples"]), truth, level)
                for level in LEVELS
            }
        )
        rows.append(row)
        print(f"[calibration] {task} seed {seed} {guide}: {row}", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per guide: mean, min and max coverage over replications, mean fit seconds."""
    out = []
    for guide in dict.fromkeys(r["guide"] for r in rows):
        mine = [r for r in rows if r["guide"] == guide]
        entry = {"guide": guide, "replications": len(mine)}
        for level in LEVELS:
            values = [r[f"coverage_{level}"] for r in mine]
            entry[f"coverage_{level}"] = sum(values) / len(values)
            entry[f"range_{level}"] = (min(values), max(values))
        entry["seconds"] = sum(r["seconds"] for r in mine) / len(mine)
        out.append(entry)
    return out


def markdown(summary: list[dict], meta: dict, task: str = "regression") -> str:
    title = "Calibration (coverage of held-out predictive-mean intervals)"
    if task == "binary":
        title = (
            "Calibration, binary classifier (coverage of held-out class-1 probability intervals)"
        )
    lines = scored_section.table_head(
        title,
        meta,
        [
            "guide",
            "replications",
            "50% interval coverage (min-max)",
            "90% interval coverage (min-max)",
            "fit (s)",
            "90% within 85-95%",
        ],
    )
    for s in summary:
        cells = [
            f"{s[f'coverage_{lv}']:.3f} ({s[f'range_{lv}'][0]:.3f}-{s[f'range_{lv}'][1]:.3f})"
            for lv in LEVELS
        ]
        met = "yes" if 0.85 <= s["coverage_0.9"] <= 0.95 else "no"
        lines.append(
            f"| {s['guide']} | {s['replications']} | {cells[0]} | {cells[1]} | "
            f"{s['seconds']:.1f} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def options(parser):
        parser.add_argument("--replications", type=int, default=None, help="data sets (default 4)")
        parser.add_argument("--task", choices=("regression", "binary"), default="regression")

    args = scored_section.parse_args(__doc__, argv, "one replication, short runs", options)
    replications = args.replications or (1 if args.quick else 4)
    start = time.perf_counter()
    rows = [
        r for seed in range(replications) for r in replication(seed, GUIDES, args.quick, args.task)
    ]
    summary = summarize(rows)
    payload = {"rows": rows, "summary": summary, "task": args.task}
    name = "calibration" if args.task == "regression" else f"calibration_{args.task}"
    scored_section.write(
        args, name, start, lambda meta: markdown(summary, meta, args.task), payload
    )
    return summary


if __name__ == "__main__":
    main()
