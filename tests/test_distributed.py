"""Data-parallel SVI on torch.distributed (gloo, localhost): 2 processes vs 1."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import bayes_fusion as bf
from bayes_fusion.infer.svi.distributed import ShardPlan

from . import distributed_worker as worker

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, *argv: str) -> list[subprocess.Popen]:
    """Start ``world`` ranks with the environment torchrun gives them."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait(procs, timeout):
    outs = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    procs = _launch(2, str(tmp_path), "match")
    results = _wait(procs, timeout=600)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # (a) identical parameters on both ranks after every step
    assert r0["trace"].shape == r1["trace"].shape and len(r0["trace"]) == 60
    assert torch.equal(r0["trace"], r1["trace"]) and r0["losses"] == r1["losses"]
    # (b) the 1-process fit with the same seed and global batch: equal up to summation order
    losses, trace = worker.short_fit(False)
    torch.testing.assert_close(r0["trace"], trace, rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(losses), rtol=1e-9, atol=0)
    # (c) the same effective rank as the 1-process fit, and the true one
    assert r0["rank"] == r1["rank"] == worker.long_fit(False) == 2
    # checkpoints come from rank 0 only, and load
    assert r0["saves"] and not r1["saves"]
    loaded = bf.load(tmp_path / "fit.pt", worker.model())
    assert len(loaded.losses) == 3000


def test_killed_peer_makes_the_other_fail_clearly(tmp_path):
    t0 = time.monotonic()
    procs = _launch(2, str(tmp_path), "die", "30")
    (code0, _, err0), (code1, _, _) = _wait(procs, timeout=120)
    assert code1 == 3
    assert code0 != 0
    assert "DistributedError" in err0 and "rank 0/2 failed during" in err0, err0[-3000:]
    assert time.monotonic() - t0 < 90


def test_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    procs = _launch(2, str(tmp_path), "nan")
    results = _wait(procs, timeout=120)
    for code, out, err in results:
        assert code == 4, err[-3000:]
        assert "stopped: " in out and "step 11" in out, out
    assert "rank 0" in results[0][1] and "rank 1" in results[1][1]


def test_hung_peer_makes_the_other_time_out_clearly(tmp_path):
    t0 = time.monotonic()
    procs = _launch(2, str(tmp_path), "hang", "5")
    try:
        code0, _, err0 = _wait(procs[:1], timeout=120)[0]
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code0 != 0
    assert "DistributedError" in err0 and "rank 0/2 failed during" in err0, err0[-3000:]
    assert time.monotonic() - t0 < 90


@pytest.fixture
def single_process_group(monkeypatch):
    """A world of one gloo process inside the test process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_world_of_one_equals_plain_fit(single_process_group):
    dist_losses, dist_trace = worker.short_fit(True, steps=20)
    losses, trace = worker.short_fit(False, steps=20)
    assert dist.get_backend() == "gloo"
    torch.testing.assert_close(dist_trace, trace, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(dist_losses), torch.tensor(losses))


def test_global_batch_smaller_than_world_refused(single_process_group, monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    inputs, y = worker.data()
    with pytest.raises(
        ValueError, match=r"batch_size: expected at least one row per process \(4\)"
    ):
        bf.fit(worker.model(), inputs, y, batch_size=3, distributed=True, progress=False)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [4, 7, 100])
def test_shards_partition_the_batch_and_weights_average_to_one(world, size):
    rows = torch.randperm(size)
    plans = [ShardPlan(r, world) for r in range(world)]
    shards = [p.local_rows(rows) for p in plans]
    assert sorted(torch.cat(shards).tolist()) == sorted(rows.tolist())
    # mean over ranks of weight * (N / b_r) * sum_r == (N / B) * sum over the global batch
    for p, shard in zip(plans, shards, strict=True):
        assert p.likelihood_weight(size) * size / world == pytest.approx(len(shard))


def test_bad_distributed_arguments(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    inputs, y = worker.data()
    with pytest.raises(RuntimeError, match=r"distributed: expected a torchrun launch"):
        bf.fit(worker.model(), inputs, y, distributed=True, progress=False)
    with pytest.raises(TypeError, match=r"distributed: expected True or False, got 'yes'"):
        bf.fit(worker.model(), inputs, y, distributed="yes")
    with pytest.raises(ValueError, match=r"distributed: guide=.nuts. runs on one process"):
        bf.fit(worker.model(), inputs, y, guide="nuts", distributed=True)
    plain = bf.CPFusion((4, 5, 3), 2, max_rank=4)
    with pytest.raises(ValueError, match=r"distributed: this model has no num_data"):
        bf.fit(plain, inputs, distributed=True)
