"""Numerical faults, determinism and checkpoints (kill + resume)."""

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pyro
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression

GUIDES = ["map", "meanfield", "lowrank", "full"]


@pytest.fixture
def small():
    return make_cp_regression((3, 4), 2, rank=2, num_data=100, noise=0.1, seed=2)


def _model():
    return bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))


def _finite_posterior(res):
    return all(bool(torch.isfinite(v).all()) for v in res.posterior_samples(20).values())


@pytest.mark.parametrize("guide", GUIDES)
def test_same_seed_bit_identical_different_seed_different(small, guide):
    a = bf.fit(_model(), small.inputs, small.y, guide=guide, num_steps=40, seed=7, progress=False)
    b = bf.fit(_model(), small.inputs, small.y, guide=guide, num_steps=40, seed=7, progress=False)
    c = bf.fit(_model(), small.inputs, small.y, guide=guide, num_steps=40, seed=8, progress=False)
    assert a.losses == b.losses and a.losses != c.losses
    da, db = a.posterior_samples(5, seed=1), b.posterior_samples(5, seed=1)
    for k in da:
        assert torch.equal(da[k], db[k])


def test_exploding_learning_rate_stops_or_completes_cleanly(small):
    try:
        res = bf.fit(_model(), small.inputs, small.y, lr=1e4, num_steps=100, progress=False)
    except bf.NonFiniteLossError as exc:
        assert "step" in str(exc)
    else:
        assert all(math.isfinite(v) for v in res.losses) and _finite_posterior(res)


def test_constant_target_completes(small):
    y = torch.full_like(small.y, 3.0)
    res = bf.fit(_model(), small.inputs, y, num_steps=200, progress=False)
    assert all(math.isfinite(v) for v in res.losses) and _finite_posterior(res)


def test_huge_inputs_stop_or_complete_cleanly(small):
    inputs = [x * 1e6 for x in small.inputs]
    with warnings.catch_warnings(record=True):  # a collapse warning is an acceptable outcome
        warnings.simplefilter("always")
        try:
            res = bf.fit(_model(), inputs, small.y, num_steps=100, progress=False)
        except bf.NonFiniteLossError as exc:
            assert "step" in str(exc)
            return
    assert all(math.isfinite(v) for v in res.losses) and _finite_posterior(res)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_get_a_clear_error(small, dtype):
    inputs = [x.to(dtype) for x in small.inputs]
    with pytest.raises(
        TypeError,
        match=rf"inputs\[0\]: expected dtype torch.float32 .*got "
        rf"{dtype}",
    ):
        bf.fit(_model(), inputs, small.y.to(dtype), num_steps=2, progress=False)


def test_device_mismatch_gets_a_clear_error():
    layer = bf.XOXLinear(4, 2, 2)
    with pytest.raises(ValueError, match="x: expected a tensor on cpu .*got meta"):
        layer(torch.empty(3, 4, device="meta"))


def test_failed_save_keeps_the_good_file(tmp_path, small, monkeypatch):
    res = bf.fit(_model(), small.inputs, small.y, num_steps=5, progress=False)
    path = tmp_path / "fit.pt"
    res.save(path)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        res.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["fit.pt"]


def test_checkpoint_from_other_version_is_refused(tmp_path, small):
    res = bf.fit(_model(), small.inputs, small.y, num_steps=5, progress=False)
    state = res.state()
    state["version"] = "9.9.0"
    path = tmp_path / "old.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="written by bayes_fusion 9.9.0"):
        bf.load(path, _model())


KILLED_RUN = textwrap.dedent("""
    import os, sys
    import bayes_fusion as bf
    from bayes_fusion.datasets import make_cp_regression
    data = make_cp_regression((3, 4), 2, rank=2, num_data=100, noise=0.1, seed=2)
    model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
    def die(step, loss):
        if step == 49:
            os._exit(17)  # killed mid-training, after the checkpoint at step 40
    bf.fit(model, data.inputs, data.y, num_steps=100, seed=5, progress=False,
           checkpoint_path=sys.argv[1], checkpoint_every=20, callback=die)
""")


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, small):
    ckpt = tmp_path / "ckpt.pt"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(ckpt)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert ckpt.exists()
    full = bf.fit(_model(), small.inputs, small.y, num_steps=100, seed=5, progress=False)
    resumed = bf.fit(
        _model(), small.inputs, small.y, num_steps=100, seed=5, progress=False, resume=ckpt
    )
    assert len(resumed.losses) == 100
    assert resumed.losses[:40] == full.losses[:40]
    assert resumed.losses[40:] == pytest.approx(full.losses[40:], rel=1e-5, abs=1e-4)
    a = full.predict(small.inputs, num_samples=10, seed=3)["mean"]
    b = resumed.predict(small.inputs, num_samples=10, seed=3)["mean"]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lambda_collapse_under_map_is_reported():
    # nutrimouse raw views: 40 rows, ~1200 parameters; MAP without the warm-up switches every
    # component off, and fit says so (the pure CP model: with main effects, rank 0 is an answer)
    from bayes_fusion.datasets import load_nutrimouse

    data = load_nutrimouse()
    model = bf.Classifier(bf.CPFusion((120, 21), 5, max_rank=6, main_effects=False))
    with pytest.warns(RuntimeWarning, match=r"collapsed \(effective rank 0\).*raise eta"):
        bf.fit(model, data.views, data.targets["diet"], guide="map", kl_warmup=0.0, progress=False)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(interval=1.5), ValueError, r"interval: expected a number in \(0, 1\), got 1.5"),
        (dict(chunk_size=0), ValueError, r"chunk_size: expected an integer >= 1, got 0"),
        (dict(num_samples=0), ValueError, r"num_samples: expected an integer >= 1, got 0"),
    ],
)
def test_predict_bad_arguments(small, kwargs, exc, match):
    res = bf.fit(_model(), small.inputs, small.y, num_steps=5, progress=False)
    with pytest.raises(exc, match=match):
        res.predict(small.inputs, **kwargs)


def test_predict_wrong_inputs(small):
    res = bf.fit(_model(), small.inputs, small.y, num_steps=5, progress=False)
    for call in (res.predict, res.predictive):
        with pytest.raises(ValueError, match=r"inputs\[1\]: expected 4 features") as info:
            call([small.inputs[0], small.inputs[0]])
        assert "Trace Shapes" not in str(info.value)


def _with_nan(x, row=3):
    x = x.clone()
    x[row] = float("nan")
    return x


#: a user's mistakes with the data: (what, args from the data, error, the whole message)
DATA_MISTAKES = [
    (
        "numpy y",
        lambda d: (d.inputs, d.y.numpy()),
        TypeError,
        "y: expected a torch.Tensor of shape (100, 2), got ndarray (convert NumPy arrays with "
        "torch.as_tensor(y, dtype=torch.float32))",
    ),
    (
        "NaN in an input",
        lambda d: ([_with_nan(d.inputs[0]), d.inputs[1]], d.y),
        ValueError,
        "inputs[0]: expected finite values, got 3 NaN/inf entries",
    ),
    (
        "NaN in y",
        lambda d: (d.inputs, _with_nan(d.y)),
        ValueError,
        "y: expected finite values, got 2 NaN/inf entries",
    ),
    (
        "y of the wrong shape",
        lambda d: (d.inputs, d.y[:, :1]),
        ValueError,
        "y: expected shape (100, 2), got (100, 1)",
    ),
    (
        "a missing modality",
        lambda d: ([d.inputs[0]], d.y),
        ValueError,
        "inputs: expected 2 modalities with feature sizes (3, 4), got 1",
    ),
    (
        "a 1-D input",
        lambda d: ([d.inputs[0][:, 0], d.inputs[1]], d.y),
        ValueError,
        "inputs[0]: expected a 2-D tensor (N, d), got shape (100,)",
    ),
]


@pytest.mark.parametrize("guide", ["meanfield", "nuts"])
@pytest.mark.parametrize(
    "what,make_args,exc,message", DATA_MISTAKES, ids=[m[0] for m in DATA_MISTAKES]
)
def test_data_mistakes_get_our_message_alone(small, guide, what, make_args, exc, message):
    """Each message names the argument as the user wrote it, and Pyro's shape table is not
    appended to it (it is to a user model's own errors, where it helps)."""
    options = {"num_steps": 2} if guide != "nuts" else {"num_samples": 2, "warmup_steps": 2}
    with pytest.raises(exc) as info:
        bf.fit(_model(), *make_args(small), guide=guide, progress=False, **options)
    assert str(info.value) == message


def test_a_user_models_own_error_keeps_pyros_shape_table(small):
    def model(inputs, y):
        scale = pyro.sample("scale", pyro.distributions.HalfNormal(1.0))
        raise ValueError(f"my model: bad scale {float(scale) * 0:.0f}")

    with pytest.raises(ValueError, match="my model: bad scale 0") as info:
        bf.fit(model, small.inputs, small.y, num_steps=2, progress=False)
    assert "Trace Shapes" in str(info.value)


def test_more_chains_than_cpus_is_refused(small, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(
        ValueError, match=r"num_chains: expected at most the CPU count \(2\), got 3"
    ):
        bf.fit(_model(), small.inputs, small.y, guide="nuts", num_chains=3, progress=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    for marginalize in ("auto", False):  # every potential runs its chains the same way
        with pytest.raises(ValueError, match=r"expected at most the CPU count \(1\), got 2"):
            bf.fit(
                _model(),
                small.inputs,
                small.y,
                guide="nuts",
                num_chains=2,
                chain_method="parallel",
                marginalize=marginalize,
                progress=False,
            )
    with pytest.raises(ValueError, match=r"chain_method: expected one of"):
        bf.fit(_model(), small.inputs, small.y, guide="nuts", chain_method="fast")


def test_explicit_sequential_chains_may_exceed_cpus(small, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    res = bf.fit(
        _model(),
        small.inputs,
        small.y,
        guide="nuts",
        num_samples=5,
        warmup_steps=5,
        num_chains=2,
        chain_method="sequential",
        init_steps=20,
        progress=False,
    )
    assert res.posterior_samples(group_by_chain=True)["layer.rank_scale"].shape[:2] == (2, 5)
