"""The same data under map / meanfield / lowrank / full / nuts.

Synthetic CP regression with a known rank; for every inference method prints the rank
posterior (P of the true rank and the mode), the held-out log predictive density and the
time, as a table::

    python examples/guides_compared.py --out guides_out
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression
from bayes_fusion.summary import pointwise_log_likelihood


def held_out_lpd(result, test) -> float:
    """Mean over test rows of log (1/S sum_s p(y_n | theta_s))."""
    samples = result.posterior_draws(200)  # MCMC: every draw
    ll = pointwise_log_likelihood(result, samples, test.inputs, test.y)
    return float((torch.logsumexp(ll, 0) - math.log(ll.shape[0])).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="guides_out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, draws = (150, 10) if args.smoke else (3000, 300)

    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=500, noise=0.1, seed=0)
    train, test = data.split(300)
    rows, posteriors = [], {}
    for method in ("map", "meanfield", "lowrank", "full", "nuts"):
        model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=5))
        kw = (
            dict(num_samples=draws, warmup_steps=draws, max_tree_depth=6, init_steps=steps)
            if method == "nuts"
            else dict(num_steps=steps)
        )
        t0 = time.perf_counter()
        res = bf.fit(model, train.inputs, train.y, guide=method, progress=False, **kw)
        seconds = time.perf_counter() - t0
        rp = bf.rank_posterior(res)["layer"]
        posteriors[method] = rp
        rows.append(
            (method, float(rp.probs[data.true_rank]), rp.mode, held_out_lpd(res, test), seconds)
        )
    print(
        f"synthetic CP regression, true rank {data.true_rank}, {300} train / "
        f"{len(test.y)} test rows"
    )
    print(f"{'method':<10} {'P(true rank)':>12} {'mode':>5} {'held-out lpd':>13} {'seconds':>8}")
    for method, p_true, mode, lpd, seconds in rows:
        print(f"{method:<10} {p_true:12.3f} {mode:5d} {lpd:13.3f} {seconds:8.1f}")
    bf.plot_rank_posterior(posteriors, out / "rank_posteriors.png")
    print(f"plot written to {(out / 'rank_posteriors.png').resolve()}")
    return rows


if __name__ == "__main__":
    main()
