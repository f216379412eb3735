"""Sections ``scaling`` and ``throughput``: forward time and peak memory against rank, batch
and modalities; rows per second at batch 4096 (compare the CPU and GPU files)."""

from __future__ import annotations

import torch
from harness import Context, fit_step_time, peak_extra_mb, timeit

import bayes_fusion as bf
from bayes_fusion.ops import cp_fusion


def _slope(xs, ys):
    """Log-log slope (growth exponent) of ys against xs."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def scaling(ctx: Context):
    """Forward time and peak memory vs rank, batch and number of modalities."""
    rep, device, quick, out = ctx.rep, ctx.device, ctx.quick, ctx.out
    reps, repeat = (5, 3) if quick else (20, 7)
    curves = {}

    def run(sizes, outf, rank, batch):
        xs = [torch.randn(batch, d, device=device) for d in sizes]
        fs = [torch.randn(d + 1, rank, device=device) for d in sizes]
        fo = torch.randn(outf, rank, device=device)
        with torch.no_grad():
            t = timeit(lambda: cp_fusion(xs, fs, fo), device, reps, repeat)[0]
            mem = peak_extra_mb(lambda: cp_fusion(xs, fs, fo), device)
        return t, mem

    ranks = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64]
    batches = [32, 512, 8192] if quick else [32, 128, 512, 2048, 8192]
    mods = [2, 3, 4, 5]
    curves["rank"] = [(r, *run((128, 32, 32), 128, r, 2048)) for r in ranks]
    curves["batch"] = [(b, *run((128, 32, 32), 128, 16, b)) for b in batches]
    curves["modalities"] = [(m, *run((64,) * m, 128, 16, 2048)) for m in mods]
    for name, points in curves.items():
        xs = [p[0] for p in points]
        half = len(points) // 2  # the upper half: fixed per-call overheads fade out there
        slope_t = _slope(xs[half:], [p[1] for p in points][half:])
        g = f"CP forward scaling vs {name}"
        for x, t, mem in points:
            rep.rows.append(
                {
                    "group": g,
                    "name": f"{name}={x}",
                    "ms": t * 1e3,
                    "spread": 0.0,
                    "ratio": None,
                    "target": None,
                    "note": f"peak +{mem:.1f} MB",
                }
            )
        rep.rows.append(
            {
                "group": g,
                "name": "log-log slope of time (1 = linear)",
                "ms": slope_t,
                "spread": 0.0,
                "ratio": None,
                "target": None,
                "note": "'time' column holds the slope",
            }
        )
        print(f"[{g}] slope {slope_t:.2f}", flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 3, figsize=(12, 6))
        for j, (name, points) in enumerate(curves.items()):
            xs = [p[0] for p in points]
            axes[0, j].loglog(xs, [p[1] * 1e3 for p in points], "o-")
            axes[0, j].set_title(f"time vs {name}")
            axes[0, j].set_ylabel("ms")
            axes[1, j].plot(xs, [p[2] for p in points], "o-")
            axes[1, j].set_title(f"peak extra memory vs {name}")
            axes[1, j].set_ylabel("MB")
            axes[1, j].set_xlabel(name)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=100)
    except ImportError:  # pragma: no cover
        pass


def throughput(ctx: Context):
    """Forward and SVI-step throughput (rows/s) at batch 4096: compare CPU and GPU files."""
    rep, device, quick = ctx.rep, ctx.device, ctx.quick
    sizes, outf, rank, batch = (128, 32, 32), 128, 16, 4096
    reps, repeat = (5, 3) if quick else (20, 7)
    xs = [torch.randn(batch, d, device=device) for d in sizes]
    y = torch.randn(batch, outf, device=device)
    fs = [torch.randn(d + 1, rank, device=device) for d in sizes]
    fo = torch.randn(outf, rank, device=device)
    with torch.no_grad():
        t_fwd = timeit(lambda: cp_fusion(xs, fs, fo), device, reps, repeat)
    model = bf.Regressor(bf.CPFusion(sizes, outf, rank)).to(device)
    t_svi = fit_step_time(model, (xs, y), reps, repeat, warmup=5, guide="meanfield")
    g = f"throughput at batch {batch} on {device.type}"
    for name, (t, spread) in (("CP forward", t_fwd), ("SVI step (meanfield)", t_svi)):
        rep.rows.append(
            {
                "group": g,
                "name": name,
                "ms": t * 1e3,
                "spread": spread,
                "ratio": None,
                "target": None,
                "note": f"{batch / t:,.0f} rows/s",
            }
        )
        print(f"[{g}] {name}: {batch / t:,.0f} rows/s", flush=True)
