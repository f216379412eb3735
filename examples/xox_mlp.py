"""An MLP whose hidden layer is a Bayesian ``XOXLinear``, on the 8x8 digits.

Compares with a dense MLP of the same shape: accuracy, parameter counts (compression ratio)
and how many genes of each XOX layer survive (their rank posteriors)::

    python examples/xox_mlp.py --out xox_out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import torch
from torch import nn

import bayes_fusion as bf


class XOXMLP(pyro.nn.PyroModule):
    """``x -> XOX(in, hidden) -> tanh -> XOX(hidden, classes)``."""

    def __init__(self, in_features, hidden, classes, genes_hidden, genes_out):
        super().__init__()
        self.hidden = bf.XOXLinear(in_features, hidden, genes=genes_hidden)
        self.out = bf.XOXLinear(hidden, classes, genes=genes_out)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="xox_out")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--genes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (200 if args.smoke else 3000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:450], perm[450:]

    net = XOXMLP(64, args.hidden, 10, args.genes, 8)
    result = bf.fit(bf.Classifier(net), x[train], y[train], num_steps=steps, progress=False)
    acc_xox = float((result.predict(x[test])["probs"].argmax(-1) == y[test]).double().mean())

    dense = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    opt = torch.optim.Adam(dense.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(dense(x[train]), y[train]).backward()
        opt.step()
    acc_dense = float((dense(x[test]).argmax(-1) == y[test]).double().mean())

    dense_params = sum(p.numel() for p in dense.parameters())
    xox_params = net.hidden.num_parameters() + net.out.num_parameters()
    pruned = bf.prune(result)  # each layer at its rank posterior's mode
    rps = pruned.posteriors
    pruned_params = sum(info["params_after"] for info in pruned.layers.values())
    with torch.no_grad():
        hidden, head = pruned.modules["layer.hidden"], pruned.modules["layer.out"]
        logits = head(torch.tanh(hidden(x[test])))
    acc_pruned = float((logits.argmax(-1) == y[test]).double().mean())
    print(f"digits 8x8: {len(train)} train / {len(test)} test")
    print(f"dense MLP      : accuracy {acc_dense:.3f}, {dense_params} parameters")
    print(
        f"XOX MLP        : accuracy {acc_xox:.3f}, {xox_params} parameters "
        f"(compression {dense_params / xox_params:.1f}x)"
    )
    print(
        f"XOX MLP pruned : accuracy {acc_pruned:.3f}, {pruned_params} parameters "
        f"(compression {dense_params / pruned_params:.1f}x)"
    )
    for path, rp in rps.items():
        print(
            f"layer {path!r}: genes surviving mode {rp.mode} of {rp.max_rank}, "
            f"90% HDI {list(rp.hdi)}, pruned to {pruned.layers[path]['rank']} "
            f"({rp.criterion} criterion)"
        )
    bf.plot_rank_posterior(rps, out / "genes_posterior.png")
    print(f"plot written to {(out / 'genes_posterior.png').resolve()}")
    return {"xox": acc_xox, "dense": acc_dense, "pruned": acc_pruned}


if __name__ == "__main__":
    main()
