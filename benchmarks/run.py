"""Benchmark suite: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/run.py [--quick] [--device cpu|cuda] --out DIR

Writes ``DIR/results.md`` (table) and ``DIR/results.json``. Times are medians over repeats;
the spread is the inter-quartile range relative to the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scored_section  # noqa: E402
from baselines import (  # noqa: E402
    HandMAP,
    SeedLowRankFusion,
    bare_cp_matmuls,
    dense_tensor_fusion,
)

import bayes_fusion as bf  # noqa: E402
from bayes_fusion.infer.svi.fused import FUSED_STEPS  # noqa: E402
from bayes_fusion.ops import cp_fusion, xox_choose_order, xox_linear  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, repeat, warmup=3):
    """Median seconds per call of ``fn`` and the relative IQR over ``repeat`` batches."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t0) / reps)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    return med, (q[-1] - q[0]) / med


def fit_step_time(model, args, reps, repeat, warmup=20, info_out=None, **fit_kw):
    """Median seconds per step of a real ``bf.fit`` run and the relative IQR, like timeit.

    The steps are timed from inside ``fit`` (a callback stamps the clock after each step), so
    everything a user's fit pays per step is in: batching, the KL weight, the loss, the
    NaN/inf checks, the optimizer. The first ``warmup`` steps (setup, tracing) are left out.
    """
    stamps = []
    steps = warmup + reps * repeat + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # collapse warnings on random data
        res = bf.fit(
            model,
            *args,
            num_steps=steps,
            progress=False,
            callback=lambda step, loss: stamps.append(time.perf_counter()),
            **fit_kw,
        )
    if info_out is not None:
        info_out.update(res.info)
    stamps = stamps[warmup:]
    times = [(stamps[(i + 1) * reps] - stamps[i * reps]) / reps for i in range(repeat)]
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    return med, (q[-1] - q[0]) / med


class Report:
    def __init__(self):
        self.rows = []

    def add(self, group, name, seconds, spread, baseline=None, target=None, note=""):
        ratio = None if baseline is None else seconds / baseline
        self.rows.append(
            {
                "group": group,
                "name": name,
                "ms": seconds * 1e3,
                "spread": spread,
                "ratio": ratio,
                "target": target,
                "note": note,
            }
        )
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        print(
            f"[{group}] {name}: {seconds * 1e3:.3f} ms (+-{spread:.0%}) ratio {shown} {note}",
            flush=True,
        )

    def markdown(self, meta):
        lines = [
            "# bayes_fusion benchmarks",
            "",
            "Ratios are against the baseline named in the case, measured in the same run.",
            "The memory row's 'time' column is MB.",
            "",
            "| " + " | ".join(f"{k}: {v}" for k, v in meta.items()) + " |",
            "",
            "| group | case | time (ms) | spread | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            target = r["target"] or "-"
            met = "-"
            if r["target"] and r["ratio"] is not None:
                at_least = r["target"].startswith(">=")  # a speed-up; otherwise an upper bound
                bound = float(r["target"].lstrip("<>=").rstrip("x"))
                ok = r["ratio"] >= bound if at_least else r["ratio"] <= bound
                met = "yes" if ok else f"no ({r['ratio'] / bound - 1:+.0%})"
            name = r["name"] + (f" ({r['note']})" if r["note"] else "")
            lines.append(
                f"| {r['group']} | {name} | {r['ms']:.3f} | {r['spread']:.0%} | "
                f"{ratio} | {target} | {met} |"
            )
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def bench_cp_forward(rep, device, quick):
    sizes, out, rank, batch = (128, 32, 32), 128, 16, 256
    reps, repeat = (20, 5) if quick else (100, 15)
    kw = {"device": device}
    xs = [torch.randn(batch, d, **kw) for d in sizes]
    seed = SeedLowRankFusion(sizes, out, rank).to(device)
    factors = [f.detach() for f in seed.weight_tensor.factors[:-1]]
    out_f = seed.weight_tensor.factors[-1].detach()
    ones = [torch.randn(d + 1, rank, **kw) for d in sizes]
    det = bf.DeterministicCPFusion(sizes, out, rank, append_one=False, bias=False).to(device)
    with torch.no_grad():
        t_seed = timeit(lambda: seed(xs), device, reps, repeat)
        t_bare = timeit(lambda: bare_cp_matmuls(xs, factors, out_f), device, reps, repeat)
        t_op = timeit(lambda: cp_fusion(xs, factors, out_f, append_one=False), device, reps, repeat)
        t_op1 = timeit(lambda: cp_fusion(xs, ones, out_f), device, reps, repeat)
        t_det = timeit(lambda: det(xs), device, reps, repeat)
    g = "CP forward (128,32,32)->128 R16 B256"
    rep.add(g, "seed LowRankFusion", *t_seed)
    rep.add(g, "bare matmuls", *t_bare)
    rep.add(g, "ops.cp_fusion vs seed", *t_op, baseline=t_seed[0], target="<=1.0x")
    rep.add(g, "ops.cp_fusion vs bare", *t_op, baseline=t_bare[0], target="<=1.3x")
    rep.add(
        g,
        "ops.cp_fusion append_one vs seed",
        *t_op1,
        baseline=t_seed[0],
        note="more work: constant rows",
    )
    rep.add(
        g,
        "DeterministicCPFusion vs seed",
        *t_det,
        baseline=t_seed[0],
        target="<=1.0x",
        note="input checks incl.",
    )
    if not quick:
        dense = torch.randn(*sizes, out, **kw)
        with torch.no_grad():
            t_dense = timeit(lambda: dense_tensor_fusion(xs, dense), device, 3, 5)
        rep.add(
            g,
            "dense tensor fusion (TFN) vs ops",
            *t_dense,
            baseline=t_op[0],
            note="the dense weight has 16.8M entries",
        )

    # forward + backward
    fparams = [f.clone().requires_grad_() for f in factors]
    oparam = out_f.clone().requires_grad_()

    def fb_op():
        cp_fusion(xs, fparams, oparam, append_one=False).sum().backward()

    def fb_seed():
        seed(xs).sum().backward()

    def fb_bare():
        bare_cp_matmuls(xs, fparams, oparam).sum().backward()

    t_seed = timeit(fb_seed, device, reps, repeat)
    t_bare = timeit(fb_bare, device, reps, repeat)
    t_op = timeit(fb_op, device, reps, repeat)
    g = "CP forward+backward (128,32,32)->128 R16 B256"
    rep.add(g, "seed LowRankFusion", *t_seed)
    rep.add(g, "ops.cp_fusion vs seed", *t_op, baseline=t_seed[0], target="<=1.0x")
    rep.add(g, "ops.cp_fusion vs bare", *t_op, baseline=t_bare[0], target="<=1.3x")


MEMORY_SNIPPET = r"""
import re, torch
from bayes_fusion.ops import cp_fusion

def rss(key):  # MB, from /proc/self/status (VmHWM = peak resident set since last reset)
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) / 1024

torch.manual_seed(0)
sizes, out, rank, batch = (512, 512, 512), 64, 16, 256
xs = [torch.randn(batch, d) for d in sizes]
fs = [torch.randn(d + 1, rank) for d in sizes]
fo = torch.randn(out, rank)
with torch.no_grad():
    cp_fusion([x[:2] for x in xs], fs, fo)  # warm up kernels on tiny inputs
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS counter
    before = rss("VmRSS")
    y = cp_fusion(xs, fs, fo)
    print(max(0.0, rss("VmHWM") - before))  # RSS can drop below the baseline read
"""


def bench_cp_memory(rep, device):
    g = "CP forward memory (512,512,512)->64 R16 B256"
    if device.type == "cuda":
        sizes, out, rank, batch = (512, 512, 512), 64, 16, 256
        xs = [torch.randn(batch, d, device=device) for d in sizes]
        fs = [torch.randn(d + 1, rank, device=device) for d in sizes]
        fo = torch.randn(out, rank, device=device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            cp_fusion(xs, fs, fo)
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        proc = subprocess.run(
            [sys.executable, "-c", MEMORY_SNIPPET], capture_output=True, text=True, check=True
        )
        peak_mb = float(proc.stdout.split()[0])
    dense_gb = 513**3 * 64 * 4 / 2**30
    rep.rows.append(
        {
            "group": g,
            "name": "peak extra memory (MB)",
            "ms": peak_mb,
            "spread": 0.0,
            "ratio": peak_mb / 200.0,
            "target": "<=1.0x",
            "note": f"ratio vs the 200 MB budget; dense weight would be {dense_gb:.0f} GB",
        }
    )
    print(f"[{g}] peak {peak_mb:.3f} MB (dense weight {dense_gb:.0f} GB)", flush=True)


def bench_xox(rep, device, quick):
    i = o = 1024
    genes, batch = 64, 256
    reps, repeat = (20, 5) if quick else (100, 15)
    kw = {"device": device}
    x = torch.randn(batch, i, **kw)
    lin = torch.nn.Linear(i, o).to(device)
    x_in, core, x_out = (
        torch.randn(i, genes, **kw),
        torch.randn(genes, genes, **kw),
        torch.randn(o, genes, **kw),
    )
    bias = torch.randn(o, **kw)
    g = "XOX forward 1024->1024 G64 B256"
    with torch.no_grad():
        t_lin = timeit(lambda: lin(x), device, reps, repeat)
        rep.add(g, "nn.Linear", *t_lin)
        for order in ("factored", "dense", "auto"):
            t = timeit(
                lambda order=order: xox_linear(x, x_in, core, x_out, 1.0, bias, order),
                device,
                reps,
                repeat,
            )
            note = f"auto picks {xox_choose_order(batch, i, o, genes)}" if order == "auto" else ""
            rep.add(
                g,
                f"xox {order} vs nn.Linear",
                *t,
                baseline=t_lin[0],
                target="<=1.0x" if order == "auto" else None,
                note=note,
            )


SVI_PROBLEM = ((128, 32, 32), 128, 16, 256)  # sizes, out, rank, batch


def _svi_data(device):
    sizes, out, _, batch = SVI_PROBLEM
    xs = [torch.randn(batch, d, device=device) for d in sizes]
    return xs, torch.randn(batch, out, device=device)


def _svi_fit_time(device, data, quick, guide, info_out=None, **fit_kw):
    """Per-step time of real ``fit`` steps on :data:`SVI_PROBLEM` (median, relative IQR)."""
    sizes, out, rank, _ = SVI_PROBLEM
    reps, repeat = (10, 5) if quick else (30, 9)
    torch.manual_seed(0)
    model = bf.Regressor(bf.CPFusion(sizes, out, rank)).to(device)
    return fit_step_time(model, data, reps, repeat, guide=guide, info_out=info_out, **fit_kw)


def bench_svi(rep, device, quick):
    """Per-step cost of ``bf.fit`` vs a hand-written plain-torch MAP loop.

    Every ``fit`` row times real ``fit`` steps (see :func:`fit_step_time`) with Pyro's
    validation at its default (on), as a user's fit runs. Compiled rows (``jit=True``) leave
    the compile time out of the step and give it in the note.
    """
    sizes, out, rank, _ = SVI_PROBLEM
    reps, repeat = (10, 5) if quick else (30, 9)
    xs, y = _svi_data(device)
    g = "SVI step (128,32,32)->128 R16 B256"

    hand = HandMAP(sizes, out, rank).to(device)
    opt = torch.optim.Adam(hand.parameters(), lr=0.01)

    def hand_step():
        opt.zero_grad()
        hand.loss(xs, y).backward()
        opt.step()

    t_hand = timeit(hand_step, device, reps, repeat)
    rep.add(g, "hand-written MAP loop (torch Adam)", *t_hand)
    cases = [
        ("map", {}, "<=1.2x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("meanfield", {}, "<=1.5x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("lowrank", {}, "<=2.0x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("map", {"direct_elbo": False}, None, "Pyro Trace_ELBO"),
        ("meanfield", {"direct_elbo": False}, None, "Pyro Trace_ELBO"),
    ]
    if not quick:  # each compilation takes seconds
        cases += [
            (guide, {"jit": True}, "<=2.0x" if guide == "lowrank" else None, "compiled")
            for guide in ("map", "meanfield", "lowrank")
        ]
    results = {}
    for guide, fit_kw, target, how in cases:
        info = {}
        t = _svi_fit_time(device, (xs, y), quick, guide, info_out=info, **fit_kw)
        results[(guide, tuple(fit_kw.items()))] = t
        note = ""
        if info.get("compile_seconds") is not None:
            note = f"compile {info['compile_seconds']:.1f} s, not in the step"
        rep.add(
            g,
            f"fit step {guide} ({how}) vs hand loop",
            *t,
            baseline=t_hand[0],
            target=target,
            note=note,
        )
    t8 = _svi_fit_time(device, (xs, y), quick, "meanfield", num_particles=8)
    rep.add(
        g,
        "meanfield 8 vectorized particles vs 1 (Pyro Trace_ELBO)",
        *t8,
        baseline=results[("meanfield", (("direct_elbo", False),))][0],
        target="<=3.0x",
    )
    threads = torch.get_num_threads()
    if threads > 1:
        t1 = _svi_fit_time(device, (xs, y), quick, "meanfield", num_threads=1)
        rep.add(
            g,
            f"fit step meanfield, 1 thread vs {threads} threads",
            *t1,
            baseline=results[("meanfield", ())][0],
        )


def _numpyro_step(guide, threads, quick):
    """The NumPyro twin's timing record (benchmarks/numpyro_baseline.py: ``ms_per_step``,
    ``compile_s``, versions), ``None`` when numpyro is not installed."""
    long = 300 if quick else 1200
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parent / "numpyro_baseline.py"),
        "--guide",
        guide,
        "--threads",
        str(threads),
        "--long",
        str(long),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 3:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"numpyro baseline failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_numpyro(rep, device, quick):
    """``fit`` steps vs the same model written by hand in NumPyro (optional: skipped when
    numpyro is not installed), with 1 thread and with the default threads."""
    if device.type != "cpu":
        print("[numpyro] skipped: the NumPyro baseline runs on the CPU here")
        return
    g = "SVI step vs NumPyro (128,32,32)->128 R16 B256"
    data = _svi_data(device)
    default = torch.get_num_threads()
    for threads in (1, default) if default > 1 else (1,):
        label = f"{threads} thread" + ("s" if threads > 1 else "")
        for guide in ("map", "meanfield"):
            base = _numpyro_step(guide, threads, quick)
            if base is None:
                print("[numpyro] skipped: numpyro is not installed (pip install numpyro)")
                return
            seconds = base["ms_per_step"] / 1e3
            note = f"XLA-compiled lax.scan; compile {base['compile_s']:.1f} s"
            rep.add(g, f"NumPyro {guide} ({label})", seconds, 0.0, note=note)
            for jit, how in ((False, "eager"), (True, "compiled"), ("fused", "fused")):
                if jit and quick:
                    continue
                if jit == "fused":
                    ms, compile_s = _fused_step_time(device, data, guide, threads)
                    rep.add(
                        g,
                        f"fit step {guide} fused ({label}) vs NumPyro",
                        ms / 1e3,
                        0.0,
                        baseline=seconds,
                        target="<=1.0x",
                        note=f"{FUSED_STEPS} steps per compiled call; compile "
                        f"{compile_s:.1f} s, not in the step",
                    )
                    continue
                info = {}
                t = _svi_fit_time(
                    device, data, quick, guide, info_out=info, jit=jit, num_threads=threads
                )
                note = ""
                if info.get("compile_seconds") is not None:
                    note = f"compile {info['compile_seconds']:.1f} s, not in the step"
                rep.add(
                    g,
                    f"fit step {guide} {how} ({label}) vs NumPyro",
                    *t,
                    baseline=seconds,
                    target="<=1.0x",
                    note=note,
                )


def _fused_step_time(device, data, guide, threads, steps=(600, 2400)):
    """``fit(..., jit="fused")`` per-step milliseconds on :data:`SVI_PROBLEM`: the difference
    of two fits' step time (compile left out) over their difference in steps, so the fixed
    costs (the first, validated step) cancel. Returns ``(ms per step, compile seconds of the
    first fit)``."""
    sizes, out, rank, _ = SVI_PROBLEM
    spent, compile_s = [], None
    for n in steps:
        torch.manual_seed(0)
        model = bf.Regressor(bf.CPFusion(sizes, out, rank)).to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = bf.fit(
                model, *data, guide=guide, num_steps=n, jit="fused", num_threads=threads,
                progress=False,
            )  # fmt: skip
        if "fused_steps" not in res.info:
            raise RuntimeError("fit(jit='fused') ran step by step")
        compile_s = res.info["compile_seconds"] if compile_s is None else compile_s
        spent.append(res.info["seconds"] - res.info["compile_seconds"])
    return (spent[1] - spent[0]) / (steps[1] - steps[0]) * 1e3, compile_s


def _rss_mb(key):
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) / 1024


def _peak_extra_mb(fn, device):
    """Peak extra memory of one call (CUDA: allocator peak; CPU: VmHWM after a reset)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_mb("VmRSS")
        fn()
        return max(0.0, _rss_mb("VmHWM") - base)
    except OSError:  # not Linux: no peak-RSS reset
        return float("nan")


def _slope(xs, ys):
    """Log-log slope (growth exponent) of ys against xs."""
    import math

    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def bench_scaling(rep, device, quick, out):
    """Forward time and peak memory vs rank, batch and number of modalities."""
    reps, repeat = (5, 3) if quick else (20, 7)
    curves = {}

    def run(sizes, outf, rank, batch):
        xs = [torch.randn(batch, d, device=device) for d in sizes]
        fs = [torch.randn(d + 1, rank, device=device) for d in sizes]
        fo = torch.randn(outf, rank, device=device)
        with torch.no_grad():
            t = timeit(lambda: cp_fusion(xs, fs, fo), device, reps, repeat)[0]
            mem = _peak_extra_mb(lambda: cp_fusion(xs, fs, fo), device)
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
    return curves


def bench_throughput(rep, device, quick):
    """Forward and SVI-step throughput (rows/s) at batch 4096: compare CPU and GPU files."""
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


def bench_nuts(rep, device, quick):
    """NUTS on the inference issue's instance: effective samples per second of the sorted
    lambdas, per lever (generic non-centred NUTS vs the collapsed CP path)."""
    import warnings

    from bayes_fusion.datasets import make_cp_regression

    data = make_cp_regression((4, 5, 3), 2, rank=2, num_data=300, noise=0.1, seed=0)
    g = "NUTS (4,5,3)->2, max_rank 4, N=300, 2 chains"
    draws = 30 if quick else 500
    cases = [("collapsed (default): out factor + bias integrated out", {})]
    if not quick:
        # the generic path is far slower per effective sample: a shorter run suffices
        cases.append(("generic path (marginalize=False), 150 draws",
                      dict(marginalize=False, draws=150)))  # fmt: skip
    results = {}
    for name, kw in cases:
        kw = dict(kw)
        n = kw.pop("draws", draws)
        if quick:
            kw.update(scored_section.QUICK_NUTS)
        model = bf.Regressor(bf.CPFusion((4, 5, 3), 2, max_rank=4)).to(device)
        inputs = [x.to(device) for x in data.inputs]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bf.fit(
                model,
                inputs,
                data.y.to(device),
                guide="nuts",
                num_samples=n,
                warmup_steps=n,
                num_chains=2,
                progress=False,
                **kw,
            )
            diag = res.diagnostics()
        seconds = time.perf_counter() - t0
        ess = diag["ess"]["layer.rank_scale_sorted"]
        rhat = diag["r_hat"]["layer.rank_scale_sorted"]
        results[name] = ess / seconds
        rep.rows.append(
            {
                "group": g,
                "name": f"{name}, {n} warm-up + {n} draws per chain",
                "ms": seconds * 1e3,
                "spread": 0.0,
                "ratio": None,
                "target": None,
                "note": f"min ESS sorted lambda {ess:.0f}, r-hat {rhat:.3f}, "
                f"{ess / seconds:.2f} ESS/s, {sum(diag['divergences'])} divergences, "
                f"{seconds:.0f} s",
            }
        )
        print(
            f"[{g}] {name}: {seconds:.1f} s, ESS {ess:.0f}, {ess / seconds:.2f} ESS/s", flush=True
        )
    if device.type == "cpu":
        _numpyro_nuts_rows(rep, g, data, draws, results["collapsed (default): out factor + bias "
                           "integrated out"])  # fmt: skip


def _numpyro_nuts_rows(rep, group, data, draws, ours_ess_per_s):
    """The same regression by hand in NumPyro, plain NUTS (benchmarks/numpyro_nuts.py), with a
    diagonal and a dense mass matrix; the ratio is our collapsed path's ESS/s over NumPyro's
    (issue 16 target: >= 10x). Skipped cleanly without numpyro."""
    import numpyro_nuts

    for dense in (False, True):
        r = numpyro_nuts.run_twin(data.inputs, data.y, max_rank=4, draws=draws, dense=dense)
        if r is None:
            print("[nuts] NumPyro baseline skipped: numpyro is not installed", flush=True)
            return
        ess_per_s = r["min_ess_sorted_lambda"] / r["seconds"]
        metric = "dense" if dense else "diagonal"
        rep.rows.append(
            {
                "group": group,
                "name": f"NumPyro NUTS by hand, non-centred, {metric} mass matrix, {draws} "
                f"warm-up + {draws} draws per chain (collapsed ESS/s vs NumPyro's)",
                "ms": r["seconds"] * 1e3,
                "spread": 0.0,
                "ratio": ours_ess_per_s / max(ess_per_s, 1e-12),
                "target": ">=10x",
                "note": f"min ESS sorted lambda {r['min_ess_sorted_lambda']:.0f}, r-hat "
                f"{r['max_rhat_sorted_lambda']:.3f}, {ess_per_s:.2f} ESS/s, "
                f"{r['divergences']} divergences, {r['seconds']:.0f} s",
            }
        )
        print(f"[nuts] NumPyro ({metric}): {r}", flush=True)


def bench_distributed(rep, device, quick, out):
    """Per-step time of fit(distributed=True) with 2 processes vs 1 process (same global batch).

    On a CPU machine both sides use all cores: 1 process with every thread vs 2 processes with
    half the threads each; the 1-process-1-thread row shows what one rank computes alone.
    """
    script = Path(__file__).resolve().parent / "distributed_step.py"
    cores = os.cpu_count() or 1
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        print("[distributed] skipped: needs 2 GPUs (one per process)", flush=True)
        return
    steps = 40 if quick else 300
    for size in ("small",) if quick else ("small", "large"):
        times = {}
        for label, procs, threads in (
            ("1 process, all threads", 1, cores),
            ("1 process, 1 thread", 1, 1),
            ("2 processes (torchrun, gloo)", 2, max(1, cores // 2)),
        ):
            if device.type == "cuda" and procs == 1 and threads == 1:
                continue
            path = out / f"distributed_{size}_{procs}_{threads}.json"
            cmd = [sys.executable, str(script), "--size", size, "--steps", str(steps)]
            cmd += ["--device", device.type, "--json", str(path)]
            if procs > 1:
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(procs),
                    *cmd[1:],
                ]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run(cmd, check=True, env=env, timeout=900, capture_output=True)
            times[label] = json.loads(path.read_text())
            path.unlink()
        sizes_, outf, rank, rows, batch = __import__("distributed_step").SIZES[size]
        g = f"distributed SVI step {size}: {sizes_}->{outf} R{rank}, global batch {batch}"
        base = times["1 process, all threads"]["seconds_per_step"]
        for label, info in times.items():
            t = info["seconds_per_step"]
            rep.add(
                g,
                f"{label} vs 1 process",
                t,
                0.0,
                baseline=base,
                note=f"{info['threads']} threads per process",
            )


def bench_scored(name, quick, out):
    """A section that scores predictions instead of timing them (``benchmarks/<name>.py``:
    ``classification``, ``calibration``, ``nuts_models`` or ``sbc``) writes its own table,
    ``<name>.md``; returns it."""
    import importlib

    importlib.import_module(name).main((["--quick"] if quick else []) + ["--out", str(out)])
    return (out / f"{name}.md").read_text()


def machine(device):
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke/CI)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="subset: cp_forward cp_memory xox svi numpyro scaling throughput nuts distributed "
        "classification calibration nuts_models sbc",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rep = Report()
    t0 = time.perf_counter()
    q = args.quick
    extra = []  # markdown of sections with their own table (accuracy, not time)
    sections = {  # name -> run; in this order
        "cp_forward": lambda: bench_cp_forward(rep, device, q),
        "cp_memory": lambda: bench_cp_memory(rep, device),
        "xox": lambda: bench_xox(rep, device, q),
        "svi": lambda: bench_svi(rep, device, q),
        "numpyro": lambda: bench_numpyro(rep, device, q),
        "scaling": lambda: bench_scaling(rep, device, q, out),
        "throughput": lambda: bench_throughput(rep, device, q),
        "nuts": lambda: bench_nuts(rep, device, q),
        "distributed": lambda: bench_distributed(rep, device, q, out),
        "classification": lambda: extra.append(bench_scored("classification", q, out)),
        "calibration": lambda: extra.append(bench_scored("calibration", q, out)),
        "nuts_models": lambda: extra.append(bench_scored("nuts_models", q, out)),
        "sbc": lambda: extra.append(bench_scored("sbc", q, out)),
    }
    for name, run in sections.items():
        if args.only is None or name in args.only:
            started = time.perf_counter()
            run()
            print(f"section {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    meta = machine(device)
    meta["quick"] = args.quick
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.md").write_text("\n".join([rep.markdown(meta), *extra]))
    (out / "results.json").write_text(json.dumps({"machine": meta, "rows": rep.rows}, indent=1))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return rep


if __name__ == "__main__":
    main()
