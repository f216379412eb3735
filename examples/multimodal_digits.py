"""CP fusion of three digit feature views vs a concatenation baseline and a fixed-rank
deterministic fusion.

The Bayesian fusion carries main effects (``CPFusion(..., main_effects=True)``): the linear
part of the views has its own prior, so the rank prior only has to pay for the interactions
(see ``docs/howto.rst``, "Classify"). It is fitted by mean-field SVI (probabilities with
intervals) and by MAP (the point estimate that matches logistic regression in
``benchmarks/classification.py``).

Views (see :mod:`bayes_fusion.datasets.digits`): Fourier magnitudes, row/column profiles and
image moments. Prints test accuracy, the rank posterior and parameter counts (including the
dense tensor-fusion weight the CP layer never builds)::

    python examples/multimodal_digits.py --out digits_out
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

import bayes_fusion as bf
from bayes_fusion.datasets import load_digits_views

VIEWS = ("fourier", "profile", "moments")


def split(n: int, test_fraction: float, seed: int):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * test_fraction)
    return perm[k:], perm[:k]


def train_torch(module, forward, y, steps: int, lr: float = 0.01, weight_decay: float = 1e-4):
    """Plain cross-entropy training with Adam (full batch)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(forward(), y).backward()
        opt.step()
    return module


def accuracy(logits_or_probs, y) -> float:
    return float((logits_or_probs.argmax(-1) == y).double().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="digits_out")
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.smoke else 3000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    data = load_digits_views(VIEWS)
    y = data.targets["digit"]
    train, test = split(len(y), 0.25, args.seed)
    x_tr = [v[train] for v in data.views]
    x_te = [v[test] for v in data.views]
    sizes = [v.shape[1] for v in data.views]
    classes = 10

    # Bayesian CP fusion with main effects: mean-field SVI and MAP
    def fusion():
        layer = bf.CPFusion(sizes, classes, max_rank=args.max_rank, main_effects=True)
        return bf.Classifier(layer)

    model = fusion()
    result = bf.fit(
        model, x_tr, y[train], guide="meanfield", num_steps=steps, seed=args.seed, progress=False
    )
    pred = result.predict(x_te, num_samples=100)
    acc_bayes = accuracy(pred["probs"], y[test])
    width = float((pred["upper"] - pred["lower"]).gather(1, pred["probs"].argmax(1, True)).mean())
    map_fit = bf.fit(
        fusion(), x_tr, y[train], guide="map", num_steps=steps, seed=args.seed, progress=False
    )
    acc_map = accuracy(map_fit.predict(x_te)["probs"], y[test])
    rp = bf.rank_posterior(result)["layer"]
    pruned = bf.prune(result)
    acc_pruned = accuracy(pruned.module(x_te), y[test])

    # concatenation baseline: multinomial logistic regression on all views side by side
    concat = nn.Linear(sum(sizes), classes)
    x_cat_tr, x_cat_te = torch.cat(x_tr, 1), torch.cat(x_te, 1)
    train_torch(concat, lambda: concat(x_cat_tr), y[train], steps)
    acc_concat = accuracy(concat(x_cat_te), y[test])

    # fixed-rank deterministic CP fusion trained by plain cross-entropy
    det = bf.DeterministicCPFusion(sizes, classes, rank=args.max_rank)
    train_torch(det, lambda: det(x_tr), y[train], steps)
    acc_det = accuracy(det(x_te), y[test])

    dense_params = math.prod(d + 1 for d in sizes) * classes
    cp_params = model.layer.num_parameters()
    print(f"digits: {len(train)} train / {len(test)} test, views {list(VIEWS)} {sizes}")
    info = pruned.layers["layer"]
    table = [
        (f"Bayesian CP fusion (max rank {args.max_rank})", acc_bayes, cp_params),
        ("  same model, MAP", acc_map, cp_params),
        (f"  pruned at rank {info['rank']}", acc_pruned, info["params_after"]),
        (
            "concatenation (logistic regression)",
            acc_concat,
            sum(p.numel() for p in concat.parameters()),
        ),
        (
            f"deterministic CP fusion (rank {args.max_rank})",
            acc_det,
            sum(p.numel() for p in det.parameters()),
        ),
    ]
    print(f"{'model':<38} {'test acc':>8} {'params':>8}")
    for name, acc, params in table:
        print(f"{name:<38} {acc:8.3f} {params:8d}")
    print(f"{'dense tensor fusion weight (not built)':<38} {'-':>8} {dense_params:8d}")
    print(f"CP parameters / dense tensor-fusion parameters: {cp_params / dense_params:.1%}")
    print(f"mean width of the 90% interval of the top class probability: {width:.3f}")
    print("rank posterior:\n" + rp.table())
    print(f"effective rank: mean {rp.mean:.2f}, 90% HDI {list(rp.hdi)}")
    bf.plot_rank_posterior({"fusion": rp}, out / "rank_posterior.png")
    print(f"plot written to {(out / 'rank_posterior.png').resolve()}")
    return {
        "bayes": acc_bayes,
        "map": acc_map,
        "concat": acc_concat,
        "det": acc_det,
        "param_fraction": cp_params / dense_params,
    }


if __name__ == "__main__":
    main()
