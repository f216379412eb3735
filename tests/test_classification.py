"""Classifier predictions on data with known class probabilities: calibrated probabilities,
intervals that hold the truth, and the synthetic generator itself."""

import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification

SIZES = (4, 5, 3)


@pytest.fixture(scope="module")
def data():
    return make_cp_classification(SIZES, 3, rank=2, num_data=900, logit_scale=4.0, seed=1)


def test_make_cp_classification_labels_follow_the_true_probabilities():
    d = make_cp_classification(SIZES, 4, rank=3, num_data=4000, seed=0)
    assert d.y.dtype == torch.int64 and d.y.shape == (4000,) and d.true_rank == 3
    probs = d.truth["probs"]
    torch.testing.assert_close(probs.sum(-1), torch.ones(4000), atol=1e-5, rtol=0)
    # label frequencies match the mean true probabilities (binomial error ~0.008)
    freq = torch.bincount(d.y, minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs.mean(0), atol=0.03, rtol=0)
    # the truth reproduces the probabilities through a CP fusion of the stored factors
    logits = bf.ops.cp_fusion(
        d.inputs, [d.truth[f"factor_{m}"] for m in range(3)], d.truth["out_factor"]
    )
    torch.testing.assert_close(logits.softmax(-1), probs, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="logit_scale"):
        make_cp_classification(logit_scale=0.0)


def test_meanfield_probabilities_are_calibrated_and_intervals_cover(data):
    train, test = data.split(600)
    model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4))
    result = bf.fit(model, train.inputs, train.y, num_steps=1000, progress=False)
    pred = result.predict(test.inputs, num_samples=300, seed=0)
    truth = data.truth["probs"][600:]
    for key in ("probs", "mean", "std", "lower", "upper"):
        assert pred[key].shape == (300, 3), key
    torch.testing.assert_close(pred["probs"].sum(-1), torch.ones(300), atol=1e-5, rtol=0)
    assert (pred["lower"] >= 0).all() and (pred["upper"] <= 1).all()
    assert (pred["lower"] <= pred["upper"]).all() and (pred["std"] > 0).all()
    # close to the true probabilities: mean total-variation distance (chance level ~0.4)
    tv = 0.5 * (pred["probs"] - truth).abs().sum(-1).mean()
    assert tv < 0.1, float(tv)
    # the 90% intervals of p(y = c | x) hold the true probability most of the time
    coverage = ((pred["lower"] <= truth) & (truth <= pred["upper"])).float().mean()
    assert 0.75 <= coverage <= 1.0, float(coverage)
    # held-out log-loss within 0.05 nats of the Bayes optimum; the rank is found
    nll = -pred["probs"].clamp_min(1e-12).log().gather(1, test.y[:, None]).mean()
    best = -truth.log().gather(1, test.y[:, None]).mean()
    assert nll < best + 0.05, (float(nll), float(best))
    assert bf.rank_posterior(result)["layer"].mode == 2


def test_map_intervals_collapse_onto_the_point_prediction(data):
    train, test = data.split(600)
    model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4, main_effects=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a collapsed fit is not the point
        result = bf.fit(model, train.inputs, train.y, guide="map", num_steps=100, progress=False)
    pred = result.predict(test.inputs)
    torch.testing.assert_close(pred["lower"], pred["probs"])
    torch.testing.assert_close(pred["upper"], pred["probs"])
