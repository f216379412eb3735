"""Per-step time of a data-parallel fit: run under torchrun (or alone for one process).

    torchrun --nproc_per_node 2 benchmarks/distributed_step.py --size large --steps 300 \\
        --json OUT.json

Rank 0 writes ``{"seconds_per_step", "world_size", "threads", ...}`` to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bayes_fusion as bf  # noqa: E402

SIZES = {
    # (in sizes, out, max_rank, rows, global batch)
    "small": ((8, 12, 10), 6, 12, 20000, 1000),
    "large": ((128, 32, 32), 128, 16, 32768, 8192),
}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    sizes, out, rank, rows, batch = SIZES[args.size]
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, d, generator=gen).to(device) for d in sizes]
    y = torch.randn(rows, out, generator=gen).to(device)
    model = bf.Regressor(bf.CPFusion(sizes, out, max_rank=rank)).to(device)
    distributed = bf.distributed.launched()
    res = bf.fit(
        model,
        inputs,
        y,
        num_steps=args.steps,
        batch_size=batch,
        progress=False,
        distributed=distributed,
    )
    if int(os.environ.get("RANK", 0)) == 0:
        info = {
            "seconds_per_step": res.info["seconds"] / res.info["steps"],
            "world_size": res.info.get("distributed", {}).get("world_size", 1),
            "threads": torch.get_num_threads(),
            "size": args.size,
            "global_batch": batch,
        }
        Path(args.json).write_text(json.dumps(info))


if __name__ == "__main__":
    main()
