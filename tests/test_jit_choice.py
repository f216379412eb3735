"""fit(jit=None)'s cost-based choice, the compile-cost records and the on-disk compile cache."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.infer import compile_cache, jit_choice
from bayes_fusion.infer.jit_choice import CostRecords, Prediction, choose


def test_cache_switch_and_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    assert compile_cache.cache_dir() == tmp_path / "ind"
    assert compile_cache.costs_path() == tmp_path / "compile_costs.json"  # conftest's own file
    monkeypatch.delenv(compile_cache.COSTS_ENV)
    assert compile_cache.costs_path() == tmp_path / "ind" / "bayes_fusion" / "compile_costs.json"
    import torch._inductor.config as inductor_config

    for value, enabled in (("0", False), ("off", False), ("No", False), ("1", True)):
        monkeypatch.setenv(compile_cache.CACHE_ENV, value)
        assert compile_cache.cache_enabled() is enabled
        with compile_cache.caching() as counting:
            assert inductor_config.fx_graph_cache is enabled
        assert counting.use() == compile_cache.CacheUse(enabled, 0, 0)
    assert compile_cache.CacheUse(True, 3, 0).state == "warm"
    assert compile_cache.CacheUse(True, 0, 2).state == "cold"
    assert compile_cache.CacheUse(True, 1, 1).state == "partly warm"
    assert compile_cache.CacheUse(False, 0, 2).state == "off"


def test_records_predict_from_what_this_machine_measured(tmp_path):
    path = tmp_path / "costs.json"
    records = CostRecords(path)
    nothing = records.predict("g1", "steps", cache_on=True)
    assert nothing.compile_s == jit_choice.DEFAULT_COLD_COMPILE_S
    assert nothing.step_ratio == jit_choice.DEFAULT_STEP_RATIO["steps"]
    cold = compile_cache.CacheUse(True, 0, 1)
    records.record("g1", "steps", 12.0, cold, 0.1)
    records.record("g2", "steps", 18.0, cold, None)
    again = CostRecords(path)  # read back from the file
    own = again.predict("g1", "steps", cache_on=True)
    assert own.compile_s == pytest.approx(12.0 * jit_choice.WARM_FRACTION) and own.step_ratio == 0.1
    assert again.predict("g1", "steps", cache_on=False).compile_s == 12.0
    fused = again.predict("g8", "steps x8", cache_on=True)  # no fused compile on record
    assert fused.compile_s == jit_choice.DEFAULT_FUSED_COLD_COMPILE_S
    assert fused.step_ratio == jit_choice.DEFAULT_STEP_RATIO["fused"]
    again.record("g8", "steps x8", 80.0, cold, 0.02)  # jit="fused": not one step per call
    other = again.predict("g3", "steps", cache_on=True)  # unseen graph: the machine's median
    assert other.compile_s == pytest.approx(15.0) and other.step_ratio == 0.1
    assert again.predict("g3", "loss", cache_on=True).compile_s == 20.0  # no loss compiles yet
    again.record("g1", "steps", 2.5, compile_cache.CacheUse(True, 2, 0), None)
    assert CostRecords(path).predict("g1", "steps", cache_on=True).compile_s == 2.5
    path.write_text("{not json")
    assert CostRecords(path).entries == {}


def test_choose_compiles_only_when_the_compile_pays():
    pred = Prediction(compile_s=10.0, step_ratio=0.2, basis="test")
    # eager 4 ms/step: 10 s of compile is repaid after 10 / (0.0032) = 3125 steps
    assert not choose(3000, 4.0, "steps", pred).compile
    long = choose(3300, 4.0, "steps", pred)
    assert long.compile
    report = long.report(9.0, 0.7, compile_cache.CacheUse(True, 0, 1))
    assert report["chosen"] == "compiled steps" and report["actual"]["cache"] == "cold"
    assert report["predicted"]["eager_s"] == pytest.approx(13.2)
    assert report["predicted"]["compiled_s"] == pytest.approx(10.0 + 3300 * 0.0008)


def _problem(dtype):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(60, d, generator=gen, dtype=dtype) for d in (3, 4)]
    y = (xs[0][:, :2] * xs[1][:, 1:3]).sum(-1, keepdim=True) + 0.1 * torch.randn(
        60, 1, generator=gen, dtype=dtype
    )
    return xs, y


def _fit(num_steps, dtype=torch.float32, **kw):
    xs, y = _problem(dtype)
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=3)).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return bf.fit(model, xs, y, guide="map", num_steps=num_steps, progress=False, **kw)


def test_default_stays_eager_where_the_compile_would_not_pay(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    res = _fit(60)
    choice = res.info["jit_choice"]
    assert choice["chosen"] == "eager" and res.info["loss_engine"] == "direct"
    assert choice["remaining_steps"] == 60 - 1 - jit_choice.PROBE_STEPS
    assert choice["predicted"]["compiled_s"] > choice["predicted"]["eager_s"]
    assert choice["predicted"]["basis"] == "the default (nothing on record)"
    assert "jit_choice" not in _fit(jit_choice.PROBE_STEPS + 1).info  # too short to probe
    assert "jit_choice" not in _fit(60, jit=False).info


@pytest.mark.slow
@pytest.mark.parametrize("fused_cheaper", [False, True])
def test_default_compiles_when_the_prediction_says_it_pays(monkeypatch, tmp_path, fused_cheaper):
    # as if this machine had this graph's warm compile on record: a 100-step fit compiles,
    # one whole step per call -- or 2 per call (jit="fused", 2 unrolled here to keep the
    # compile short) where those are predicted faster still
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("bayes_fusion.infer.svi.compilation.FUSED_STEPS", 2)
    eager = _fit(100, torch.float64, jit=False)
    fused_ratio = 0.01 if fused_cheaper else 0.1

    def predict(self, sig, engine, cache_on=None):
        return Prediction(0.0, fused_ratio if engine == "steps x2" else 0.05, "test")

    monkeypatch.setattr(CostRecords, "predict", predict)
    res = _fit(100, torch.float64)
    per_call = 2 if fused_cheaper else 1
    assert res.info["loss_engine"] == "compiled steps" and res.info["fused_steps"] == per_call
    choice = res.info["jit_choice"]
    assert choice["chosen"] == ("compiled steps x2" if fused_cheaper else "compiled steps")
    assert set(choice["candidates"]) == {"steps", "steps x2"}
    assert (choice["candidates"]["steps x2"] < choice["candidates"]["steps"]) == fused_cheaper
    actual = choice["actual"]
    assert actual["compile_s"] > 0 and actual["compiled_step_ms"] > 0
    assert actual["cache"] == "cold"
    # the compiled steps continue the eager ones: the same losses
    torch.testing.assert_close(
        torch.tensor(res.losses), torch.tensor(eager.losses), rtol=1e-6, atol=1e-6
    )
    # the compile is recorded for the next fit's prediction
    (entry,) = json.loads(compile_cache.costs_path().read_text()).values()
    assert entry["engine"] == ("steps x2" if fused_cheaper else "steps")
    assert entry["cold_s"] > 0 and entry["step_ratio"] > 0


_SECOND_PROCESS = textwrap.dedent(
    """
    import json, warnings, torch, bayes_fusion as bf
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, d, generator=gen) for d in (3, 2)]
    y = torch.randn(40, 1, generator=gen)
    model = bf.Regressor(bf.CPFusion((3, 2), 1, max_rank=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = bf.fit(model, xs, y, guide="map", num_steps=5, jit=True, progress=False)
    print(json.dumps({k: res.info[k] for k in ("compile_cache", "compile_seconds")}))
    """
)


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_step_from_the_disk_cache(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop(compile_cache.CACHE_ENV, None)
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _SECOND_PROCESS],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["compile_cache"] == "cold" and runs[1]["compile_cache"] == "warm"
    assert runs[1]["compile_seconds"] < runs[0]["compile_seconds"]
