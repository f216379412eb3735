"""Benchmark suite: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] --out DIR

Writes ``DIR/results.md`` (table) and ``DIR/results.json``. Times are medians over repeats;
the spread is the inter-quartile range relative to the median.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import section_cp  # noqa: E402
import section_distributed  # noqa: E402
import section_nuts  # noqa: E402
import section_scaling  # noqa: E402
import section_svi  # noqa: E402
import section_xox  # noqa: E402
from harness import Context, Report, machine  # noqa: E402


def scored(name: str) -> Callable[[Context], str]:
    """A section that writes its own table instead of timed rows (``benchmarks/<name>.py``:
    ``svi_end_to_end``, ``classification``, ``calibration``, ``nuts_models``, ``many_chains``,
    ``many_chains_curves``, ``sbc``, ``xox_accuracy`` or ``rank_coverage``): it writes
    ``<name>.md``, which the section returns for ``results.md``."""

    def run(ctx: Context) -> str:
        module = importlib.import_module(name)
        module.main((["--quick"] if ctx.quick else []) + ["--out", str(ctx.out)])
        return (ctx.out / f"{name}.md").read_text()

    return run


#: section name -> its run: timed sections add rows to ``ctx.rep`` (and return ``None``),
#: scored sections return their own markdown table; run in this order
SECTIONS: dict[str, Callable[[Context], str | None]] = {
    "cp_forward": section_cp.cp_forward,
    "cp_memory": section_cp.cp_memory,
    "xox": section_xox.xox,
    "svi": section_svi.svi,
    "numpyro": section_svi.numpyro,
    "svi_end_to_end": scored("svi_end_to_end"),
    "scaling": section_scaling.scaling,
    "throughput": section_scaling.throughput,
    "nuts": section_nuts.nuts,
    "distributed": section_distributed.distributed,
    "classification": scored("classification"),
    "calibration": scored("calibration"),
    "nuts_models": scored("nuts_models"),
    "many_chains": scored("many_chains"),
    "many_chains_curves": scored("many_chains_curves"),
    "sbc": scored("sbc"),
    "xox_accuracy": scored("xox_accuracy"),
    "rank_coverage": scored("rank_coverage"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke/CI)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--only", nargs="*", default=None, choices=list(SECTIONS), help="run these sections only"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ctx = Context(rep=Report(), device=device, quick=args.quick, out=out)
    t0 = time.perf_counter()
    extra = []  # markdown of the scored sections (accuracy, not time)
    for name, run in SECTIONS.items():
        if args.only is None or name in args.only:
            started = time.perf_counter()
            table = run(ctx)
            if table is not None:  # a scored section's markdown
                extra.append(table)
            print(f"section {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    meta = machine(device)
    meta["quick"] = args.quick
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.md").write_text("\n".join([ctx.rep.markdown(meta), *extra]))
    rows = {"machine": meta, "rows": ctx.rep.rows}
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return ctx.rep


if __name__ == "__main__":
    main()
