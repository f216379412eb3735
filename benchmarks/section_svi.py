"""Sections ``svi`` and ``numpyro``: per-step cost of real ``bf.fit`` steps against a
hand-written plain-torch loop and against the same model written by hand in NumPyro."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from baselines import HandMAP
from harness import Context, fit_step_time, interleaved, timeit

import bayes_fusion as bf
from bayes_fusion.infer.svi.fused import FUSED_STEPS

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
                model,
                *data,
                guide=guide,
                num_steps=n,
                jit="fused",
                num_threads=threads,
                progress=False,
            )
        if "fused_steps" not in res.info:
            raise RuntimeError("fit(jit='fused') ran step by step")
        compile_s = res.info["compile_seconds"] if compile_s is None else compile_s
        spent.append(res.info["seconds"] - res.info["compile_seconds"])
    return (spent[1] - spent[0]) / (steps[1] - steps[0]) * 1e3, compile_s


def svi(ctx: Context):
    """Per-step cost of ``bf.fit`` vs a hand-written plain-torch MAP loop.

    Every ``fit`` row times real ``fit`` steps (see :func:`fit_step_time`) with Pyro's
    validation at its default (on), as a user's fit runs. The cases are measured in
    interleaved rounds (every case once per round) and the medians over the rounds reported,
    so that the machine's drift slows every case alike. Compiled rows (``jit=True``: with the
    timing callback that is the compiled loss) leave the compile time out of the step and give
    it in the note.
    """
    rep, device, quick = ctx.rep, ctx.device, ctx.quick
    sizes, out, rank, _ = SVI_PROBLEM
    rounds, reps = (3, 10) if quick else (7, 30)
    xs, y = _svi_data(device)
    g = "SVI step (128,32,32)->128 R16 B256"

    hand = HandMAP(sizes, out, rank).to(device)
    opt = torch.optim.Adam(hand.parameters(), lr=0.01)

    def hand_step():
        opt.zero_grad()
        hand.loss(xs, y).backward()
        opt.step()

    cases = [
        ("map", {"jit": False}, "<=1.2x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("meanfield", {"jit": False}, "<=1.5x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("lowrank", {"jit": False}, "<=2.0x", "default: direct ELBO, Pyro-free log joint, eager"),
        ("map", {"direct_elbo": False}, None, "Pyro Trace_ELBO"),
        ("meanfield", {"direct_elbo": False}, None, "Pyro Trace_ELBO"),
    ]
    if not quick:  # each compilation takes seconds
        cases += [
            (guide, {"jit": True}, "<=2.0x" if guide == "lowrank" else None, "compiled loss")
            for guide in ("map", "meanfield", "lowrank")
        ]
    infos = {i: {} for i in range(len(cases))}

    def fit_case(i):
        guide, fit_kw, _, _ = cases[i]
        return _svi_fit_time(device, (xs, y), quick, guide, info_out=infos[i], **fit_kw)[0]

    measures = {"hand": lambda: timeit(hand_step, device, reps, 1)[0]}
    measures.update({i: (lambda i=i: fit_case(i)) for i in range(len(cases))})
    timed = interleaved(measures, rounds)
    t_hand = timed["hand"]
    rep.add(g, "hand-written MAP loop (torch Adam)", *t_hand, note=f"median of {rounds} rounds")
    for i, (guide, _, target, how) in enumerate(cases):
        note = ""
        if infos[i].get("compile_seconds") is not None:
            note = f"compile {infos[i]['compile_seconds']:.1f} s, not in the step"
        rep.add(
            g,
            f"fit step {guide} ({how}) vs hand loop",
            *timed[i],
            baseline=t_hand[0],
            target=target,
            note=note,
        )
    mf_traced = next(
        i for i, c in enumerate(cases) if c[:2] == ("meanfield", {"direct_elbo": False})
    )
    t8 = _svi_fit_time(device, (xs, y), quick, "meanfield", num_particles=8)
    rep.add(
        g,
        "meanfield 8 vectorized particles vs 1 (Pyro Trace_ELBO)",
        *t8,
        baseline=timed[mf_traced][0],
        target="<=3.0x",
    )
    threads = torch.get_num_threads()
    if threads > 1:
        t1 = _svi_fit_time(device, (xs, y), quick, "meanfield", num_threads=1, jit=False)
        rep.add(
            g,
            f"fit step meanfield, 1 thread vs {threads} threads",
            *t1,
            baseline=timed[1][0],
        )


def numpyro(ctx: Context):
    """``fit`` steps vs the same model written by hand in NumPyro (optional: skipped when
    numpyro is not installed), with 1 thread and with the default threads."""
    rep, device, quick = ctx.rep, ctx.device, ctx.quick
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
