"""Data-parallel SVI across processes (and machines) with torch.distributed.

Launch one process per CPU group or GPU with ``torchrun``; every process runs this same
script, holds the same data, evaluates its shard of each global minibatch and applies the
rank-averaged gradient (``fit(..., distributed=True)``). Rank 0 writes the checkpoint, the
plot and the report::

    # one machine, 2 processes (CPU, gloo)
    torchrun --nproc_per_node 2 examples/distributed_fit.py --out dist_out
    # one machine, all GPUs (nccl)
    torchrun --nproc_per_node gpu examples/distributed_fit.py --device cuda --out dist_out
    # two machines, 4 processes each: run on both, with the first machine's address
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d \\
        --rdzv_endpoint HOST0:29500 examples/distributed_fit.py --out dist_out

Started without ``torchrun`` it runs the same fit in one process.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="dist_out")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1000, help="global minibatch")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    rows = args.rows or (2000 if args.smoke else 20000)
    steps = args.steps or (400 if args.smoke else 3000)
    distributed = bf.distributed.launched()
    rank = int(os.environ.get("RANK", 0))
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # every rank builds (or loads) the same data; fit() shards each global batch
    data = make_cp_regression((8, 12, 10), 6, rank=3, num_data=rows, noise=0.1, seed=0)
    inputs = [x.to(device) for x in data.inputs]
    y = data.y.to(device)
    model = bf.Regressor(bf.CPFusion((8, 12, 10), 6, max_rank=12)).to(device)

    t0 = time.perf_counter()
    result = bf.fit(
        model,
        inputs,
        y,
        guide="meanfield",
        num_steps=steps,
        batch_size=args.batch_size,
        seed=0,
        progress=rank == 0,
        distributed=distributed,
        checkpoint_path=out / "fit.pt",
        checkpoint_every=max(1, steps // 4),
    )
    seconds = time.perf_counter() - t0
    if rank != 0:
        return None
    world = result.info.get("distributed", {}).get("world_size", 1)
    print(f"processes: {world}  rows: {rows}  global batch: {args.batch_size}  steps: {steps}")
    print(
        f"fit: {seconds:.1f} s, {1000 * seconds / steps:.2f} ms per step, final loss "
        f"{result.losses[-1]:.1f}"
    )
    rp = bf.rank_posterior(result, num_samples=200)["layer"]
    print("rank posterior (true rank 3):\n" + rp.table())
    pred = result.predict(inputs, num_samples=100)["mean"]
    rmse = float((pred - y).pow(2).mean().sqrt())
    print(f"RMSE {rmse:.3f} (noise 0.1)")
    bf.plot_rank_posterior({"layer": rp}, out / "rank_posterior.png")
    print(f"checkpoint and plot written to {out.resolve()}")
    return {"rank_mode": rp.mode, "rmse": rmse, "world_size": world}


if __name__ == "__main__":
    main()
