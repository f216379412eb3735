"""Plumbing shared by the benchmark sections that score predictions instead of timing them
(``classification.py``, ``calibration.py``): command line, run header and output files."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: fit_nuts options of a section's NUTS fits under ``--quick`` (a smoke test): short MAP starts
#: and trees
QUICK_NUTS = {"init_steps": 200, "max_tree_depth": 5}
#: fit_mcmc options of a section's lockstep fits under ``--quick``: short MAP starts, warm-up
#: and draws
QUICK_MCMC = {"init_steps": 200, "warmup_steps": 60, "num_samples": 20}


def parse_args(doc: str, argv, quick_help: str, extra: Callable | None = None):
    """``--quick``, ``--threads`` (set here), ``--out`` (created here) and the section's own
    options (``extra(parser)``)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", required=True, help="output directory")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def table_head(title: str, meta: dict, columns: list[str]) -> list[str]:
    """The first lines of a section's markdown: its title, the run header and the head of its
    table with these ``columns``."""
    return [
        f"## {title}",
        "",
        " | ".join(f"{k}: {v}" for k, v in meta.items()),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]


def write(args, name: str, started: float, markdown: Callable[[dict], str], payload: dict):
    """Write ``OUT/name.md`` (``markdown(meta)``) and ``OUT/name.json`` (``payload`` with the
    run header ``meta`` under ``"machine"``)."""
    meta = {
        "threads": args.threads,
        "quick": args.quick,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    (out / f"{name}.md").write_text(markdown(meta))
    (out / f"{name}.json").write_text(json.dumps({"machine": meta, **payload}, indent=1))
    print(f"wrote {out / f'{name}.md'}")
