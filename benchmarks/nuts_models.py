"""NUTS on every model of the inference issue (generic path), with its diagnostics.

    python benchmarks/nuts_models.py [--quick] [--draws N] [--only NAME ...] --out DIR

(``--quick``: one model, 20 draws, short MAP starts and trees: a smoke test.)

Small instances ((4, 5, 3) inputs or 12 features, max_rank / genes 4, 300 training rows, 100
held-out rows): ``Classifier(CPFusion)`` with 2 and 3 classes, ``Regressor(XOXLinear)``,
``Classifier(XOXLinear)`` and a user PyroModule (a CP fusion layer under a Poisson likelihood).
2 chains x (N warm-up + N draws) each; reported: wall time, divergences, and max r-hat / min
ESS of the sorted scales and of the held-out predictive means (the issue's targets: r-hat <=
1.01, ESS >= 400, 0 divergences, < 3 min with N = 500). Every model is also written by
hand in NumPyro and sampled by its plain NUTS (``numpyro_nuts.py``, diagonal mass matrix, same
data, draws and chains; skipped cleanly when numpyro is not installed): the ``vs NumPyro`` column
is our ESS/s over its ESS/s, ESS the smaller of the sorted scales' and the held-out predictive
means' (the issue's target: >= 10x). Writes ``DIR/nuts_models.md`` and ``DIR/nuts_models.json``.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpyro_nuts
import pyro
import pyro.distributions as dist
import scored_section
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification, make_cp_regression, make_xox_regression
from bayes_fusion.models import check_data_inputs

SIZES, MAX_RANK, TRAIN, HELD_OUT = (4, 5, 3), 4, 300, 100
#: what --quick runs: a smoke test of the section (20 draws, short MAP starts)
QUICK_MODELS = ("Regressor(XOXLinear)",)
#: model name -> its NumPyro twin (``numpyro_nuts.run_twin``'s ``layer`` and ``likelihood``)
NUMPYRO_TWINS = {
    **{f"Classifier(CPFusion), {c} classes": dict(likelihood="categorical") for c in (2, 3)},
    "Regressor(XOXLinear)": dict(layer="xox", likelihood="normal"),
    "Classifier(XOXLinear), 3 classes": dict(layer="xox", likelihood="categorical"),
    "user model: CPFusion + Poisson": dict(likelihood="poisson"),
}


class PoissonFusion(pyro.nn.PyroModule):
    """A user model: counts ``~ Poisson(exp(CPFusion(inputs)))``, one count per row."""

    def __init__(self, layer: bf.CPFusion) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, inputs, y=None):
        check_data_inputs(inputs)
        log_rate = self.layer(inputs).squeeze(-1)
        with pyro.plate("data", log_rate.shape[-1]):
            pyro.sample("obs", dist.Poisson(log_rate.exp()), obs=y)
        return log_rate.exp().unsqueeze(-1)


def _labels(logits: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def cp_classifier_case(classes: int, train_rows: int = TRAIN) -> tuple:
    """``(model factory, train args, held-out inputs)`` of the CP classifier with ``classes``
    classes on planted rank-2 data of ``train_rows`` rows (and ``HELD_OUT`` held out)."""
    data = make_cp_classification(SIZES, classes, rank=2, num_data=train_rows + HELD_OUT, seed=0)
    train, test = data.split(train_rows)
    return (
        lambda: bf.Classifier(bf.CPFusion(SIZES, classes, max_rank=MAX_RANK)),
        (train.inputs, train.y),
        test.inputs,
    )


def cases() -> dict:
    """name -> (model factory, train args, held-out inputs)."""
    n = TRAIN + HELD_OUT
    out = {f"Classifier(CPFusion), {c} classes": cp_classifier_case(c) for c in (2, 3)}
    xox = make_xox_regression(12, 2, genes=2, num_data=n, noise=0.1, seed=0)
    train, test = xox.split(TRAIN)
    out["Regressor(XOXLinear)"] = (
        lambda: bf.Regressor(bf.XOXLinear(12, 2, genes=MAX_RANK)),
        (train.inputs, train.y),
        test.inputs,
    )
    logits = make_xox_regression(12, 3, genes=2, num_data=n, noise=0.01, seed=1)
    labels = _labels(3 * logits.y, seed=1)
    out["Classifier(XOXLinear), 3 classes"] = (
        lambda: bf.Classifier(bf.XOXLinear(12, 3, genes=MAX_RANK)),
        (logits.inputs[:TRAIN], labels[:TRAIN]),
        logits.inputs[TRAIN:],
    )
    cp = make_cp_regression(SIZES, 1, rank=2, num_data=n, noise=0.01, seed=2)
    gen = torch.Generator().manual_seed(2)
    counts = torch.poisson((0.7 * cp.y[:, 0]).exp(), generator=gen)
    train, test = cp.split(TRAIN)
    out["user model: CPFusion + Poisson"] = (
        lambda: PoissonFusion(bf.CPFusion(SIZES, 1, max_rank=MAX_RANK)),
        (train.inputs, counts[:TRAIN]),
        test.inputs,
    )
    return out


def run_case(name: str, factory, args, held_out, draws: int, **options) -> dict:
    """Fit one model with NUTS (``options``: more :func:`bayes_fusion.fit_nuts` options); its
    diagnostics."""
    model = factory()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diagnostics are reported below
        res = bf.fit(
            model,
            *args,
            guide="nuts",
            num_samples=draws,
            warmup_steps=draws,
            num_chains=2,
            progress=False,
            seed=0,
            **options,
        )
        seconds = time.perf_counter() - start
        diag = res.diagnostics(held_out)
    scale = next(k for k in diag["r_hat"] if k.endswith("rank_scale_sorted"))
    row = {
        "model": name,
        "draws": draws,
        "seconds": seconds,
        "divergences": sum(diag["divergences"]),
        "parallel": res.info["parallel"],
        "compiled": res.info["compiled_potential"],
        "marginalized": res.info["marginalized"],
        "steps_per_iteration": res.info.get("steps_per_iteration"),
    }
    relevance = next(k for k in diag["r_hat"] if k.endswith("relevance_sorted"))
    for label, key in (("lambda", scale), ("relevance", relevance), ("pred", "predictive_mean")):
        row[f"r_hat_{label}"] = diag["r_hat"][key]
        row[f"ess_{label}"] = diag["ess"][key]
    print(f"[nuts_models] {row}", flush=True)
    return row


def ess_per_second(ess_lambda: float, ess_pred: float, seconds: float) -> float:
    """The smaller ESS of the two diagnosed quantities per second of wall time."""
    return min(ess_lambda, ess_pred) / seconds


def markdown(rows: list[dict], meta: dict) -> str:
    lines = scored_section.table_head(
        "NUTS on every model (generic path), 2 chains",
        meta,
        [
            "model",
            "integrated out",
            "warm-up + draws",
            "wall (s)",
            "steps / iteration",
            "divergences",
            "r-hat / ESS sorted lambda",
            "r-hat / ESS sorted relevance",
            "r-hat / ESS held-out predictive mean",
            "targets met",
            "NumPyro twin",
            "vs NumPyro",
        ],
    )
    for r in rows:
        met = (
            r["divergences"] == 0
            and max(r["r_hat_lambda"], r["r_hat_pred"]) <= 1.01
            and min(r["ess_lambda"], r["ess_pred"]) >= 400
            and r["seconds"] < 180
        )
        twin, versus = "-", "-"
        steps = "/".join(f"{v:.0f}" for v in r.get("steps_per_iteration") or []) or "-"
        if r.get("numpyro"):
            n = r["numpyro"]
            twin = (
                f"{n['seconds']:.0f} s, {n['steps_per_draw']:.0f} steps / draw, "
                f"{n['divergences']} div., lambda "
                f"{n['max_rhat_sorted_lambda']:.3f} / {n['min_ess_sorted_lambda']:.0f}, pred. "
                f"{n['max_rhat_pred']:.3f} / {n['min_ess_pred']:.0f}"
            )
            versus = f"{r['vs_numpyro']:.3g}x"
        lines.append(
            f"| {r['model']} | {', '.join(r['marginalized']) or '-'} | "
            f"{r['draws']} + {r['draws']} | {r['seconds']:.0f} | {steps} | "
            f"{r['divergences']} | {r['r_hat_lambda']:.3f} / {r['ess_lambda']:.0f} | "
            f"{r['r_hat_relevance']:.3f} / {r['ess_relevance']:.0f} | "
            f"{r['r_hat_pred']:.3f} / {r['ess_pred']:.0f} | {'yes' if met else 'no'} | "
            f"{twin} | {versus} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    def options(parser):
        parser.add_argument("--draws", type=int, default=None, help="per chain (default 500)")
        parser.add_argument("--only", nargs="*", default=None, help="model name substrings")
        parser.add_argument("--no-numpyro", action="store_true", help="skip the NumPyro twins")

    args = scored_section.parse_args(__doc__, argv, "a smoke test: one model, 20 draws", options)
    draws = args.draws or (20 if args.quick else 500)
    quick = scored_section.QUICK_NUTS if args.quick else {}
    only = args.only or (QUICK_MODELS if args.quick else None)
    # the user model must be importable by the chains' worker processes
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p
    )
    if __name__ == "__main__":
        sys.path.insert(0, here)
        import nuts_models  # the classes under their importable name

        return nuts_models.main(argv)
    start = time.perf_counter()
    rows = []
    for name, (factory, train_args, held_out) in cases().items():
        if only and not any(s in name for s in only):
            continue
        row = run_case(name, factory, train_args, held_out, draws, **quick)
        if name in NUMPYRO_TWINS and not args.no_numpyro:
            twin = numpyro_nuts.run_twin(
                *train_args,
                held_out,
                max_rank=MAX_RANK,
                draws=draws,
                **NUMPYRO_TWINS[name],
            )
            print(f"[nuts_models] NumPyro twin: {twin or 'skipped (no numpyro)'}", flush=True)
            if twin is not None:
                ours = ess_per_second(row["ess_lambda"], row["ess_pred"], row["seconds"])
                theirs = ess_per_second(
                    twin["min_ess_sorted_lambda"], twin["min_ess_pred"], twin["seconds"]
                )
                row["numpyro"] = twin
                row["vs_numpyro"] = ours / max(theirs, 1e-12)
        rows.append(row)
    payload = {"rows": rows}
    scored_section.write(args, "nuts_models", start, lambda meta: markdown(rows, meta), payload)
    return rows


if __name__ == "__main__":
    main()
