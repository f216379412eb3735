"""Simulation-based calibration (SBC, Talts et al. 2018) of the MCMC samplers and a VI guide.

    python benchmarks/sbc.py [--quick] [--replications K] [--first-seed S] [--guides G ...]
        --out DIR
    python benchmarks/sbc.py --from-rows DIR1/sbc_rows.jsonl DIR2/sbc_rows.jsonl --out DIR

Per replication: draw every latent of ``Regressor(CPFusion((3, 4), 1, max_rank=3, eta=0.1))``
from the model's own prior and the targets from its likelihood (the model's ``forward`` under
``poutine.trace``, 100 training rows), fit, and take ``L = 19`` posterior draws (NUTS with the
default MAP start: 2 chains x (200 warm-up + 200 draws), tree depth <= 6, thinned evenly to
about the runs' ESS; ``mcmc``, the lockstep sampler with its defaults (16 chains), its draws
pooled and thinned evenly; a VI guide (2000 steps): independent draws). The replications run in
one process: the lockstep sampler's compiled step is reused from the compile caches. The
*rank* of each true value among its ``L`` draws is recorded for the label-switching-invariant
quantities: the sorted scales lambda and the noise-free predictive mean at 8 held-out rows. If
the posterior is exact, every rank is uniform on ``0..L`` whatever the prior draw, so the
ranks' histogram over replications is flat: a U shape means over-confident intervals, a hump
under-confident ones, a slope a biased posterior. Reported per guide and quantity group: the
test -- a chi-square test of uniformity over 10 bins for each quantity (one rank per
replication), combined by Bonferroni (``m x`` the smallest of the group's ``m`` p-values);
the group's ranks pooled into one histogram (its picture, its outer-10% share, nominal 0.1,
and its chi-square p, which is *not* a valid test: the ranks of one replication are
correlated, and the table gives by how much); the replications whose chains mixed (max r-hat
<= 1.01 over sorted lambda and predictive means), and the histograms (``DIR/sbc.png``, with
the 99% band of a uniform histogram).

``eta = 0.1``: under the default ``eta = 1`` the prior's targets are far from standardized (the
prediction scales as lambda^3, so a HalfCauchy(1) draw of lambda ~ 20 gives targets of std
~3e4 against a noise of ~1); there the posterior is a thin ridge the chains do not reach from
the MAP start in a practical run (two such draws: r-hat inf, 137-165 s per fit), and the SBC
would measure only that. ``eta = 0.1`` keeps most prior draws at the signal-to-noise of
standardized data while the HalfCauchy tail still yields some strong components.
Writes ``DIR/sbc.md``, ``DIR/sbc.json`` and ``DIR/sbc.png``, and each replication's ranks to
``DIR/sbc_rows.jsonl`` as it finishes; ``--first-seed`` lets several processes share the
replications (e.g. seeds 0-49 and 50-99 on two cores) and ``--from-rows`` summarizes their
rows together.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pyro
import scored_section
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

import bayes_fusion as bf

SIZES, OUT, MAX_RANK, TRAIN, HELD_OUT = (3, 4), 1, 3, 100, 8
ETA = 0.1  # rank-prior scale (see the module doc)
DRAWS = 19  # L: ranks take the values 0..L (about the ESS of the NUTS runs, so ~independent)
NUTS_DRAWS, NUTS_DEPTH = 200, 6  # per chain (and as many warm-up steps); tree depth limit
BINS = 10
GUIDES = ("mcmc", "nuts", "meanfield")


def make_model() -> bf.Regressor:
    """The model every replication simulates from and fits."""
    return bf.Regressor(bf.CPFusion(SIZES, OUT, max_rank=MAX_RANK, eta=ETA))


def simulate(seed: int) -> dict:
    """One prior draw: inputs, latents from the prior, targets from the likelihood, and the
    noise-free predictive mean at the held-out rows ``(HELD_OUT, OUT)``."""
    pyro.set_rng_seed(seed)
    inputs = [torch.randn(TRAIN + HELD_OUT, d) for d in SIZES]
    train = [x[:TRAIN] for x in inputs]
    test = [x[TRAIN:] for x in inputs]
    model = make_model()
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(train)
        latents = {
            name: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and name != "obs" and not site_is_subsample(site)
        }
        truth = poutine.condition(model, data=latents)(test)
    scale = model.layer.site_name(model.layer.SCALE_SITE)
    return {
        "y_std": float(trace.nodes["obs"]["value"].std()),
        "train": train,
        "test": test,
        "y": trace.nodes["obs"]["value"],
        "lambda": latents[scale].sort(descending=True).values,
        "pred": truth,
        "scale_site": scale,
    }


def thin(chains: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` draws spread evenly over the draws of every chain: ``(C, D, ...)`` ->
    ``(count, ...)`` (``count`` must be a multiple of ``C``)."""
    per_chain = count // chains.shape[0]
    index = torch.linspace(0, chains.shape[1] - 1, per_chain).round().long()
    return chains[:, index].reshape((count,) + chains.shape[2:])


def thin_pooled(chains: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` draws spread evenly over all draws of all chains (chain-major): ``(C, D, ...)``
    -> ``(count, ...)``, for more chains than draws wanted."""
    pooled = chains.reshape((-1,) + chains.shape[2:])
    index = torch.linspace(0, pooled.shape[0] - 1, count).round().long()
    return pooled[index]


def rank_statistic(draws: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """SBC rank: how many of the ``L`` ``draws`` ``(L, ...)`` are below ``truth`` ``(...)``
    (ties, e.g. collapsed scales, split at random); flattened, values in ``0..L``."""
    below = (draws < truth).sum(0)
    ties = (draws == truth).sum(0)
    return (below + (torch.rand(ties.shape) * (ties + 1)).floor().long()).reshape(-1)


def fit_draws(guide: str, sim: dict, seed: int, quick: bool) -> tuple[dict, dict]:
    """Fit ``guide`` to one simulated data set; ``DRAWS`` posterior draws of the sorted scales
    ``(L, R)`` and the held-out predictive mean ``(L, HELD_OUT, OUT)``, and run info."""
    model = make_model()
    if guide == "nuts":
        n = 20 if quick else NUTS_DRAWS  # quick: 2 x 20 draws still thin to DRAWS + 1
        options = {
            "num_samples": n,
            "warmup_steps": n,
            "num_chains": 2,
            "max_tree_depth": NUTS_DEPTH,
        }
        if quick:
            options.update(scored_section.QUICK_NUTS)
    elif guide == "mcmc":
        options = dict(scored_section.QUICK_MCMC) if quick else {}
    else:
        options = {"num_steps": 300 if quick else 2000}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diagnostics are recorded instead
        result = bf.fit(
            model, sim["train"], sim["y"], guide=guide, progress=False, seed=seed, **options
        )
    info = {"seconds": time.perf_counter() - start}
    if result.is_mcmc:
        chains = result.mcmc_samples[sim["scale_site"]]
        pred = result.predict(sim["test"], return_samples=True)["mean_samples"]
        pred = pred.reshape(chains.shape[:2] + pred.shape[1:])
        # L draws: L + 1 spread evenly over the chains (pooled when they are many), less the
        # first
        spread = thin if (DRAWS + 1) % chains.shape[0] == 0 else thin_pooled
        lam, pred = spread(chains, DRAWS + 1)[1:], spread(pred, DRAWS + 1)[1:]
        info["divergences"] = sum(result.info["divergences"])
        info["marginalized"] = result.info["marginalized"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r_hat = result.diagnostics(sim["test"])["r_hat"]
        info["r_hat"] = max(r_hat[k] for k in r_hat if "sorted" in k or "predictive" in k)
    else:
        lam = result.posterior_samples(DRAWS, seed=seed)[sim["scale_site"]]
        pred = result.predict(sim["test"], num_samples=DRAWS, return_samples=True, seed=seed)
        pred = pred["mean_samples"]
    lam = lam.sort(-1, descending=True).values
    return {"lambda": lam, "pred": pred}, info


def replication(seed: int, guides, quick: bool) -> list[dict]:
    """Ranks of every quantity for every guide on one prior draw."""
    sim = simulate(seed)
    rows = []
    for guide in guides:
        draws, info = fit_draws(guide, sim, seed, quick)
        row = {"seed": seed, "guide": guide, "y_std": sim["y_std"], **info}
        for name in ("lambda", "pred"):
            row[f"ranks_{name}"] = rank_statistic(draws[name], sim[name]).tolist()
        rows.append(row)
        print(f"[sbc] seed {seed} {guide}: {info}", flush=True)
    return rows


def uniformity(ranks: list[int], draws: int = DRAWS, bins: int = BINS) -> dict:
    """Histogram of ``ranks`` (values ``0..draws``) in ``bins`` equal bins, the chi-square
    test of uniformity (p-value) and the fraction of ranks in the outer 10%."""
    from scipy import stats

    values = torch.tensor(ranks, dtype=torch.float64)
    counts = torch.histc(values, bins=bins, min=0, max=draws + 1).long()
    outer = float(((values < 0.05 * (draws + 1)) | (values >= 0.95 * (draws + 1))).double().mean())
    p_value = float(stats.chisquare(counts.numpy()).pvalue) if len(ranks) else float("nan")
    return {"counts": counts.tolist(), "p_value": p_value, "outer_10": outer}


def per_quantity_uniformity(rank_rows: list[list[int]], draws: int = DRAWS, bins: int = BINS):
    """The calibration test of a group of quantities (e.g. the 8 held-out predictive means):
    one chi-square test of uniformity per quantity over the replications (one rank each, so
    the ranks of a test are independent), combined by Bonferroni: ``p = min(1, m * min p_j)``
    for ``m`` quantities, valid whatever the dependence between them.

    Pooling the group's ranks into one histogram is not a test: the ranks of one replication
    are correlated (the 8 predictive means share one posterior of the function), so the
    pooled chi-square counts ``m`` times the evidence there is, and rejects a calibrated
    posterior. ``rank_correlation`` (the mean pairwise correlation of the group's ranks over
    replications) says how much.

    :param rank_rows: per replication, its ranks of the group's quantities (``m`` each).
    :returns: ``{"p_bonferroni", "p_each" (list of m), "rank_correlation"}`` (the last
        ``None`` where undefined: one quantity, two replications or fewer, constant ranks).
    """
    matrix = torch.tensor(rank_rows, dtype=torch.float64)  # (replications, m)
    p_each = [uniformity(col.long().tolist(), draws, bins)["p_value"] for col in matrix.T]
    m = len(p_each)
    corr = None  # undefined for one quantity, too few replications or constant ranks
    if m > 1 and matrix.shape[0] > 2:
        off = torch.corrcoef(matrix.T)[~torch.eye(m, dtype=torch.bool)]
        if torch.isfinite(off).any():
            corr = float(off[torch.isfinite(off)].mean())
    return {
        "p_bonferroni": min(1.0, m * min(p_each)) if p_each else float("nan"),
        "p_each": p_each,
        "rank_correlation": corr,
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Per guide and quantity group: the per-quantity test
    (:func:`per_quantity_uniformity`) and the pooled histogram (:func:`uniformity`, for the
    picture and the outer share); per guide, mean fit time and divergences."""
    out = []
    for guide in dict.fromkeys(r["guide"] for r in rows):
        mine = [r for r in rows if r["guide"] == guide]
        for name in ("lambda", "pred"):
            ranks = [v for r in mine for v in r[f"ranks_{name}"]]
            entry = {"guide": guide, "quantity": name, "replications": len(mine)}
            entry.update(uniformity(ranks))
            entry.update(per_quantity_uniformity([r[f"ranks_{name}"] for r in mine]))
            entry["seconds"] = sum(r["seconds"] for r in mine) / len(mine)
            entry["divergences"] = sum(r.get("divergences", 0) for r in mine)
            mixed = [r["r_hat"] <= 1.01 for r in mine if "r_hat" in r]
            entry["mixed"] = f"{sum(mixed)}/{len(mixed)}" if mixed else "-"
            out.append(entry)
    return out


def plot(summary: list[dict], path) -> None:
    """Rank histograms, one panel per guide and quantity, with the 99% band of a uniform
    histogram of the same size (binomial per bin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    fig, axes = plt.subplots(1, len(summary), figsize=(3.2 * len(summary), 2.8), squeeze=False)
    for ax, s in zip(axes[0], summary, strict=True):
        total = sum(s["counts"])
        lo, hi = stats.binom.ppf([0.005, 0.995], total, 1 / BINS)
        ax.axhspan(lo, hi, color="0.85", label="99% if uniform")
        ax.bar(range(BINS), s["counts"], width=0.9, color="C0")
        ax.set_title(
            f"{s['guide']}: {s['quantity']} (pooled)\np = {s['p_bonferroni']:.2g} per quantity",
            fontsize=9,
        )
        ax.set_xticks([])
        ax.set_xlabel("rank (binned)")
    axes[0][0].set_ylabel("count")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


QUANTITIES = {
    "lambda": f"sorted lambda ({MAX_RANK})",
    "pred": f"held-out predictive mean ({HELD_OUT})",
}


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: list[dict], meta: dict) -> str:
    lines = scored_section.table_head(
        f"Simulation-based calibration (ranks of the truth among {DRAWS} posterior draws)",
        meta,
        [
            "guide",
            "quantity",
            "replications",
            "ranks",
            "chi-square p per quantity (Bonferroni: m x min)",
            "pooled chi-square p (not a test: correlated ranks)",
            "rank correlation within a replication",
            "outer 10% of ranks (nominal 0.10)",
            "pooled histogram (10 bins)",
            "fit (s)",
            "divergences",
            "replications with r-hat <= 1.01",
        ],
    )
    for s in summary:
        lines.append(
            f"| {s['guide']} | {QUANTITIES[s['quantity']]} | {s['replications']} | "
            f"{sum(s['counts'])} | {s['p_bonferroni']:.3g} | {s['p_value']:.3g} | "
            f"{_number(s['rank_correlation'], '.2f')} | {s['outer_10']:.3f} | "
            f"{' '.join(map(str, s['counts']))} | "
            f"{s['seconds']:.1f} | {s['divergences']} | {s['mixed']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def options(parser):
        parser.add_argument("--replications", type=int, default=None, help="default 100")
        parser.add_argument("--guides", nargs="*", default=list(GUIDES), help="guides to check")
        parser.add_argument(
            "--first-seed", type=int, default=0, help="seed of the first replication (default 0)"
        )
        parser.add_argument(
            "--from-rows",
            nargs="*",
            default=None,
            help="summarize these sbc_rows.jsonl files (runs over other seeds) instead of fitting",
        )

    args = scored_section.parse_args(__doc__, argv, "2 replications, short runs", options)
    replications = args.replications or (2 if args.quick else 100)
    start = time.perf_counter()
    if args.from_rows is not None:
        lines = [line for f in args.from_rows for line in Path(f).read_text().splitlines()]
        rows = [json.loads(line) for line in lines if line.strip()]
    else:
        # each replication's rows as they come: a run cut short keeps what it did
        rows_file = Path(args.out) / "sbc_rows.jsonl"
        rows_file.write_text("")
        rows = []
        for seed in range(args.first_seed, args.first_seed + replications):
            new_rows = replication(seed, args.guides, args.quick)
            with rows_file.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new_rows)
            rows += new_rows
    summary = summarize(rows)
    plot(summary, f"{args.out}/sbc.png")
    payload = {"rows": rows, "summary": summary}
    scored_section.write(args, "sbc", start, lambda meta: markdown(summary, meta), payload)
    return summary


if __name__ == "__main__":
    main()
