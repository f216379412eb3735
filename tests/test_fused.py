"""fit(..., jit=True / "fused"): whole SVI steps compiled, one or several per call, with the
step-by-step loop's semantics (same losses, the optimizer state written back, NaN/inf stops at
its step)."""

import json
import warnings

import pyro
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.infer.compile_cache import costs_path

pytestmark = pytest.mark.slow  # each fused fit compiles (seconds; tens of seconds cold)

#: whole steps per call of ``jit="fused"`` here: fewer than the library's 8 (whose unrolled
#: graph takes 30-90 s to compile cold), still several, so the unrolled loop and its partial
#: last chunk are what is tested
UNROLLED = 3


@pytest.fixture(autouse=True)
def _fewer_unrolled_steps(monkeypatch):
    import bayes_fusion.infer.svi.compilation as compilation

    monkeypatch.setattr(compilation, "FUSED_STEPS", UNROLLED)


def _problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(60, d, generator=gen, dtype=dtype) for d in (3, 4)]
    y = (xs[0][:, :2] * xs[1][:, 1:3]).sum(-1, keepdim=True) + 0.1 * torch.randn(
        60, 1, generator=gen, dtype=dtype
    )
    return xs, y


def _fit(guide, jit, num_steps=45, **kw):
    xs, y = _problem()
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # collapse warnings: not the point
        return bf.fit(model, xs, y, guide=guide, num_steps=num_steps, jit=jit, progress=False, **kw)


@pytest.mark.parametrize(
    ("guide", "jit"), [("map", "fused"), ("meanfield", "fused"), ("meanfield", True)]
)
def test_fused_steps_follow_the_step_by_step_loop(guide, jit):
    # 44 steps = the validated first step + 14 full chunks of 3 + a partial chunk of 1 (fused;
    # a chunk of one step of an unrolled graph once fell back to step-by-step and crashed)
    options = dict(num_steps=44, kl_warmup=0.5)
    eager, fused = _fit(guide, False, **options), _fit(guide, jit, **options)
    assert len(fused.losses) == len(eager.losses) == 44
    steps = UNROLLED if jit == "fused" else 1
    assert fused.info["fused_steps"] == steps and fused.info["compile_seconds"] > 0
    assert fused.info["loss_engine"] == "compiled steps"
    # recorded for jit=None's predictions, the unrolled steps apart from one step per call
    (entry,) = json.loads(costs_path().read_text()).values()
    assert entry["engine"] == (f"steps x{UNROLLED}" if jit == "fused" else "steps")
    # the same draws (fallback_random) and the same update: the same losses, float64
    torch.testing.assert_close(
        torch.tensor(fused.losses), torch.tensor(eager.losses), rtol=1e-6, atol=1e-6
    )
    # parameters and optimizer state are written back where the loop would leave them
    for name, value in eager.guide.median().items():
        with fused.param_scope():
            got = fused.guide.median()[name]
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    steps = {s["state"][0]["step"] for s in fused.optim_state.values()}
    lrs = {round(s["param_groups"][0]["lr"], 12) for s in fused.optim_state.values()}
    want_lrs = {round(s["param_groups"][0]["lr"], 12) for s in eager.optim_state.values()}
    assert steps == {44} and lrs == want_lrs


@pytest.mark.parametrize("jit", ["fused", True])
def test_fused_steps_stop_at_a_non_finite_loss(jit):
    # a learning rate that blows the factors up at the first compiled step (jit=True: one
    # step per call; a non-finite step in a later call of a run is the test below)
    with pytest.raises(bf.NonFiniteLossError, match="non-finite loss") as err:
        _fit("map", jit, num_steps=200, lr=1e6, kl_warmup=0.0)
    assert "step" in str(err.value)
    # the step-by-step loop stops at the same step
    with pytest.raises(bf.NonFiniteLossError) as ref:
        _fit("map", False, num_steps=200, lr=1e6, kl_warmup=0.0)
    assert str(err.value).split(";")[0] == str(ref.value).split(";")[0]


def test_fused_steps_need_options_that_let_the_loop_run_on():
    xs, y = _problem()
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=3)).double()
    with pytest.warns(RuntimeWarning, match="jit='fused' runs step by step: callback"):
        res = bf.fit(
            model,
            xs,
            y,
            guide="map",
            num_steps=5,
            jit="fused",
            progress=False,
            callback=lambda step, loss: False,
        )
    assert "fused_steps" not in res.info and len(res.losses) == 5
    with pytest.raises(ValueError, match="jit: expected None, True, False or 'fused', got 'x'"):
        _fit("map", "x")
    pyro.clear_param_store()


def test_a_failed_compile_falls_back_to_eager_steps_with_the_guide_intact(monkeypatch):
    import bayes_fusion.infer.svi.fused as fused

    def broken(fn, **kw):
        def call(*args):
            raise RuntimeError("boom")

        return call

    monkeypatch.setattr(fused.torch, "compile", broken)
    eager = _fit("map", False, num_steps=12)
    xs, y = _problem()
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=3)).double()
    with pytest.warns(RuntimeWarning, match="jit runs step by step: RuntimeError: boom"):
        res = bf.fit(model, xs, y, guide="map", num_steps=12, jit=True, progress=False)
    assert res.info["loss_engine"] == "direct" and res.info["compile_seconds"] is None
    assert res.losses == eager.losses  # every step ran eagerly, from where the guide was
    for name, value in eager.guide.median().items():
        with res.param_scope():
            torch.testing.assert_close(res.guide.median()[name], value)


@pytest.mark.parametrize("steps", [1, 3])
def test_a_run_of_several_calls_stops_at_the_first_non_finite_step(steps):
    from bayes_fusion.infer.svi.fused import FusedSteps

    # the bookkeeping of FusedSteps.run over several compiled calls, with the compiled call
    # replaced by one whose 8th step (global index 7) is not finite
    calls = []

    def compiled(theta, lr, active, batch):
        first = len(calls) * steps
        calls.append(int(active))
        losses = torch.arange(first, first + steps, dtype=torch.float64)
        finite = losses != 7
        if steps == 1:
            losses, finite = losses[0], finite[0]
        return theta + int(active), lr, losses, finite

    fused = FusedSteps.__new__(FusedSteps)
    fused.steps, fused._checked, fused._compiled = steps, True, compiled
    fused._state, fused._constants = [torch.zeros(()), torch.ones(())], ()
    fused._active = {n: torch.tensor(n) for n in range(1, steps + 1)}
    losses, bad = fused.run((), 20)
    assert bad == 7 and losses == [float(k) for k in range(8)]
    assert len(calls) == 8 // steps + (8 % steps > 0)
    # a run without trouble takes n steps in calls of `steps`, the last one shorter
    calls.clear()
    losses, bad = fused.run((), 5)
    assert bad == -1 and len(losses) == 5 and calls == ([1] * 5 if steps == 1 else [3, 2])
