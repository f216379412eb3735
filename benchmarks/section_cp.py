"""Sections ``cp_forward`` and ``cp_memory``: the CP contraction against the seed layer, bare
matmuls and dense tensor fusion, and its peak memory (the dense weight is never built)."""

from __future__ import annotations

import torch
from baselines import SeedLowRankFusion, bare_cp_matmuls, dense_tensor_fusion
from harness import Context, peak_extra_mb, timeit

import bayes_fusion as bf
from bayes_fusion.ops import cp_fusion


def cp_forward(ctx: Context):
    rep, device, quick = ctx.rep, ctx.device, ctx.quick
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


def cp_memory(ctx: Context):
    rep, device = ctx.rep, ctx.device
    g = "CP forward memory (512,512,512)->64 R16 B256"
    sizes, out, rank, batch = (512, 512, 512), 64, 16, 256
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, d, generator=gen).to(device) for d in sizes]
    fs = [torch.randn(d + 1, rank, generator=gen).to(device) for d in sizes]
    fo = torch.randn(out, rank, generator=gen).to(device)
    with torch.no_grad():
        cp_fusion([x[:2] for x in xs], fs, fo)  # warm up the kernels on tiny inputs
        peak_mb = peak_extra_mb(lambda: cp_fusion(xs, fs, fo), device)
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
