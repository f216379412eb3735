"""Section ``xox``: the XOX linear layer against ``nn.Linear`` at 1024 -> 1024."""

from __future__ import annotations

import torch
from harness import Context, timeit

from bayes_fusion.ops import xox_choose_order, xox_linear


def xox(ctx: Context):
    rep, device, quick = ctx.rep, ctx.device, ctx.quick
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
