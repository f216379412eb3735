"""Accuracy against parameter count of MLPs whose linear layers are ``nn.Linear``, XOX layers
(``DeterministicXOXLinear`` at several gene counts, two initializations) or plain low-rank
linear layers (two thin matrices) of the same parameter count, 3 seeds each.

    python benchmarks/xox_accuracy.py [--quick] --out DIR

Tasks (scikit-learn's bundled 8x8 digits, one 75/25 split per seed): ``digits`` -- the MLP
64-128-128-10 with ReLU, Adam 1e-3, 50 epochs of batches of 32; ``digits-784`` -- the same
images upsampled to 28x28 (bilinear) and the MLP 784-256-256-10, 30 epochs. Every linear layer
of a row is of the row's kind; a low-rank row's rank makes each layer's parameter count the
XOX row's of the same gene count. Writes ``DIR/xox_accuracy.md`` and ``DIR/xox_accuracy.json``.
Targets (issue 34): at equal parameter count XOX at least as accurate as the low-rank layer; on
digits within 1 point of ``nn.Linear`` at >= 2x compression.
"""

from __future__ import annotations

import statistics
import time
import warnings

import scored_section
import torch
from torch import nn

import bayes_fusion as bf
from bayes_fusion.ops import xox_num_parameters

SEEDS = (0, 1, 2)
TASKS = {  # name -> (hidden width, epochs)
    "digits": (128, 50),
    "digits-784": (256, 30),
}
GENES = (4, 8, 16, 32)
INITS = ("kaiming", "linear")


class LowRankLinear(nn.Module):
    """``x -> (x A) B^T + b`` with ``A`` ``(in, k)`` and ``B`` ``(out, k)``: the plain low-rank
    linear layer, ``nn.Linear``'s default init on each factor."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    def forward(self, x):
        return self.up(self.down(x))


def low_rank_matching(in_features: int, out_features: int, genes: int) -> int:
    """The rank whose low-rank layer has about as many weights as an XOX layer of ``genes``."""
    xox = xox_num_parameters(in_features, out_features, genes, bias=False)
    return max(1, round(xox / (in_features + out_features)))


def make_layer(kind: str, size: int | None, init: str, in_features: int, out_features: int):
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "lowrank":
        return LowRankLinear(
            in_features, out_features, low_rank_matching(in_features, out_features, size)
        )
    with warnings.catch_warnings():  # a 10-output layer with many genes is over the budget
        warnings.simplefilter("ignore", bf.ParameterBudgetWarning)
        return bf.DeterministicXOXLinear(in_features, out_features, genes=size, init=init)


def mlp(widths: list[int], kind: str, size: int | None, init: str) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(make_layer(kind, size, init, a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def data(task: str, seed: int):
    """Standardized train / test features and labels of one 75/25 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    if task == "digits-784":
        images = x.reshape(-1, 1, 8, 8)
        x = nn.functional.interpolate(images, size=(28, 28), mode="bilinear").reshape(-1, 784)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = len(y) // 4
    test, train = perm[:cut], perm[cut:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def train_and_score(net: nn.Module, split, epochs: int, seed: int) -> float:
    x_tr, y_tr, x_te, y_te = split
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y_tr), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_tr[batch]), y_tr[batch]).backward()
            opt.step()
    with torch.no_grad():
        return float((net(x_te).argmax(-1) == y_te).double().mean())


def variants(quick: bool):
    """(kind, size, init) of every row."""
    genes = (8,) if quick else GENES
    rows = [("linear", None, "-")]
    rows += [("xox", g, init) for g in genes for init in (INITS[:1] if quick else INITS)]
    rows += [("lowrank", g, "-") for g in genes]
    return rows


def run(quick: bool) -> list[dict]:
    tasks = {"digits": (128, 3)} if quick else TASKS
    seeds = SEEDS[:1] if quick else SEEDS
    rows = []
    for task, (hidden, epochs) in tasks.items():
        splits = {seed: data(task, seed) for seed in seeds}
        widths = [splits[seeds[0]][0].shape[1], hidden, hidden, 10]
        dense = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
        for kind, size, init in variants(quick):
            accs = []
            for seed in seeds:
                torch.manual_seed(seed)
                net = mlp(widths, kind, size, init)
                accs.append(train_and_score(net, splits[seed], epochs, seed))
            params = sum(p.numel() for p in net.parameters())
            row = {
                "task": task,
                "layer": kind,
                "genes / rank": size if kind != "lowrank" else f"~G={size}",
                "init": init,
                "params": params,
                "compression": dense / params,
                "accuracy": statistics.mean(accs),
                "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "per_seed": accs,
            }
            rows.append(row)
            print(f"[xox_accuracy] {row}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    columns = [
        "task",
        "layer",
        "genes (rank: matched to G)",
        "init",
        "params",
        "compression",
        "accuracy (mean +- sd, 3 seeds)",
        "per seed",
    ]
    lines = scored_section.table_head("XOX layers: accuracy against parameter count", meta, columns)
    for r in rows:
        seeds = " / ".join(f"{a:.3f}" for a in r["per_seed"])
        lines.append(
            f"| {r['task']} | {r['layer']} | {r['genes / rank'] or '-'} | {r['init']} | "
            f"{r['params']} | {r['compression']:.1f}x | {r['accuracy']:.3f} +- {r['sd']:.3f} | "
            f"{seeds} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = scored_section.parse_args(__doc__, argv, "one seed, 3 epochs, one gene count")
    started = time.perf_counter()
    rows = run(args.quick)
    scored_section.write(
        args, "xox_accuracy", started, lambda meta: markdown(rows, meta), {"rows": rows}
    )
    return rows


if __name__ == "__main__":
    main()
