"""CUDA checks: run on a machine with a GPU (skipped elsewhere).

They show that the factorized paths give the CPU answer on the GPU and what is deterministic
there: with ``torch.use_deterministic_algorithms(True)`` (and ``CUBLAS_WORKSPACE_CONFIG``
set) a fit repeats bit for bit; CPU and GPU agree to float tolerance, not bitwise.
"""

import os

import pytest
import torch
from pyro import poutine

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression

# cuBLAS reads this when its first handle is created: set it before any CUDA work
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _data(device):
    data = make_cp_regression((3, 4, 5), 2, rank=2, num_data=200, noise=0.1, seed=0)
    return [x.to(device) for x in data.inputs], data.y.to(device)


def test_cp_and_xox_forward_match_cpu_float64():
    torch.manual_seed(0)
    cp = bf.CPFusion((3, 4, 5), 2, max_rank=4).double()
    xox = bf.XOXLinear(6, 3, genes=3).double()
    inputs = [torch.randn(7, d, dtype=torch.float64) for d in (3, 4, 5)]
    x = torch.randn(7, 6, dtype=torch.float64)
    with torch.no_grad():
        tr_cp = poutine.trace(cp).get_trace(inputs)
        tr_xox = poutine.trace(xox).get_trace(x)
        want_cp, want_xox = tr_cp.nodes["_RETURN"]["value"], tr_xox.nodes["_RETURN"]["value"]
        cp_gpu = poutine.replay(cp.cuda(), trace=_to(tr_cp, "cuda"))
        xox_gpu = poutine.replay(xox.cuda(), trace=_to(tr_xox, "cuda"))
        got_cp = cp_gpu([v.cuda() for v in inputs]).cpu()
        got_xox = xox_gpu(x.cuda()).cpu()
    torch.testing.assert_close(got_cp, want_cp)
    torch.testing.assert_close(got_xox, want_xox)


def _to(trace, device):
    trace = trace.copy()
    for site in trace.nodes.values():
        if site["type"] == "sample":
            site["value"] = site["value"].to(device)
    return trace


@pytest.mark.parametrize("guide", ["map", "meanfield"])
def test_fit_on_gpu_deterministic_with_deterministic_algorithms(guide):
    inputs, y = _data("cuda")
    torch.use_deterministic_algorithms(True)
    try:
        runs = [
            bf.fit(
                bf.Regressor(bf.CPFusion((3, 4, 5), 2, max_rank=4)).cuda(),
                inputs,
                y,
                guide=guide,
                num_steps=300,
                seed=3,
                progress=False,
            )
            for _ in range(2)
        ]
    finally:
        torch.use_deterministic_algorithms(False)
    assert runs[0].losses == runs[1].losses
    cpu = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4, 5), 2, max_rank=4)),
        *[[x.cpu() for x in inputs], y.cpu()],
        guide=guide,
        num_steps=300,
        seed=3,
        progress=False,
    )
    # same seed, other device: the RNG streams differ, so only the fitted quality is compared
    gpu_pred = runs[0].predict(inputs, num_samples=20)["mean"].cpu()
    cpu_pred = cpu.predict([x.cpu() for x in inputs], num_samples=20)["mean"]
    rmse = lambda p: float((p - y.cpu()).pow(2).mean().sqrt())  # noqa: E731
    assert abs(rmse(gpu_pred) - rmse(cpu_pred)) < 0.05


def test_lockstep_chains_run_on_the_gpu():
    inputs, y = _data("cuda")
    result = bf.fit(
        bf.Regressor(bf.CPFusion((3, 4, 5), 2, max_rank=4)).cuda(),
        inputs,
        y,
        guide="mcmc",
        num_chains=8,
        num_samples=30,
        warmup_steps=100,
        init_steps=200,
        progress=False,
    )
    lam = result.get_samples(group_by_chain=True)["layer.rank_scale"]
    assert lam.shape == (8, 30, 4) and lam.device.type == "cuda"
    assert result.sample_stats["n_steps"].device.type == "cuda"
    rank = bf.rank_posterior(result)["layer"]
    assert rank.hdi[0] <= 2 <= rank.hdi[1]
