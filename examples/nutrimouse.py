"""Small-data fusion on nutrimouse: mean-field vs NUTS rank posteriors side by side.

With 40 mice the rank of the gene x lipid interaction is genuinely uncertain; this script fits
the same ``Classifier(CPFusion)`` (views reduced to principal components) to the genotype by
mean-field SVI and by NUTS and prints both rank posteriors and held-out accuracies::

    python examples/nutrimouse.py --out nutrimouse_out
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import bayes_fusion as bf
from bayes_fusion.datasets import load_nutrimouse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import pca, stratified_split  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="nutrimouse_out")
    parser.add_argument("--target", default="diet", choices=["diet", "genotype"])
    parser.add_argument("--max-rank", type=int, default=4)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, draws, depth = (200, 10, 4) if args.smoke else (3000, 300, 6)

    data = load_nutrimouse()
    y = data.targets[args.target]
    train, test = stratified_split(y, per_class=2, seed=0)
    reduced = [pca(v[train], v[test], k) for v, k in zip(data.views, (6, 4), strict=True)]
    x_train, x_test = [r[0] for r in reduced], [r[1] for r in reduced]
    classes = len(data.classes[args.target])

    posteriors, rows = {}, []
    for method in ("meanfield", "nuts"):
        model = bf.Classifier(
            bf.CPFusion((6, 4), classes, max_rank=args.max_rank, main_effects=False)
        )
        t0 = time.perf_counter()
        if method == "nuts":
            res = bf.fit(
                model,
                x_train,
                y[train],
                guide="nuts",
                num_samples=draws,
                warmup_steps=draws,
                num_chains=1,
                max_tree_depth=6,
                progress=False,
            )
        else:
            res = bf.fit(model, x_train, y[train], num_steps=steps, progress=False)
        seconds = time.perf_counter() - t0
        rp = bf.rank_posterior(res)["layer"]
        probs = res.predict(x_test)["probs"]
        acc = float((probs.argmax(-1) == y[test]).double().mean())
        posteriors[method] = rp
        rows.append((method, seconds, acc, rp))

    print(
        f"nutrimouse, target {args.target} ({classes} classes, chance {1 / classes:.2f}), "
        f"{len(train)} train / {len(test)} held out"
    )
    print(f"{'rank':>4} " + " ".join(f"{m:>10}" for m in posteriors))
    for r in range(args.max_rank + 1):
        print(f"{r:>4} " + " ".join(f"{float(p.probs[r]):10.3f}" for p in posteriors.values()))
    for method, seconds, acc, rp in rows:
        print(
            f"{method:>9}: {seconds:6.1f} s, held-out accuracy {acc:.2f}, "
            f"rank mean {rp.mean:.2f}, 90% HDI {list(rp.hdi)}"
        )
    bf.plot_rank_posterior({f"{k}": v for k, v in posteriors.items()}, out / "rank_posteriors.png")
    print(f"plot written to {(out / 'rank_posteriors.png').resolve()}")
    return rows


if __name__ == "__main__":
    main()
