"""Section ``distributed``: per-step time of ``fit(distributed=True)`` with 2 processes
against 1 process (same global batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from harness import Context


def distributed(ctx: Context):
    """Per-step time of fit(distributed=True) with 2 processes vs 1 process (same global batch).

    On a CPU machine both sides use all cores: 1 process with every thread vs 2 processes with
    half the threads each; the 1-process-1-thread row shows what one rank computes alone.
    """
    rep, device, quick, out = ctx.rep, ctx.device, ctx.quick, ctx.out
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
