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
    # the model the data were drawn from: pure CP (no main effects), mean-field
    model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4, main_effects=False))
    result = bf.fit(model, train.inputs, train.y, guide="meanfield", num_steps=1000, progress=False)
    pred = result.predict(test.inputs, num_samples=300, seed=0)
    truth = data.truth["probs"][600:]
    for key in ("probs", "mean", "std", "lower", "upper"):
        assert pred[key].shape == (300, 3), key
    torch.testing.assert_close(pred["probs"].sum(-1), torch.ones(300), atol=1e-5, rtol=0)
    assert (pred["lower"] >= 0).all() and (pred["upper"] <= 1).all()
    assert (pred["lower"] <= pred["upper"]).all() and (pred["std"] >= 0).all()
    assert (pred["std"].amax(-1) > 0).all()  # float32: a probability ~1e-9 may have std 0
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


def test_classifier_defaults_main_effects_and_map():
    """A CPFusion left at main_effects=None gets main effects inside a Classifier (and only
    there); fit's guide="auto" is MAP for such a classifier, mean-field otherwise."""
    model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4))
    assert model.layer.main_effects and "main_effects" in model.layer.site_shapes()
    assert bf.infer.auto_guide(model) == "map"
    pure = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=4, main_effects=False))
    assert not pure.layer.main_effects and bf.infer.auto_guide(pure) == "meanfield"
    assert not bf.CPFusion(SIZES, 3, max_rank=4).main_effects  # a bare layer: off
    regressor = bf.Regressor(bf.CPFusion(SIZES, 3, max_rank=4))
    assert not regressor.layer.main_effects and bf.infer.auto_guide(regressor) == "meanfield"
    xox = bf.Classifier(bf.XOXLinear(6, 3, genes=2))
    assert bf.infer.auto_guide(xox) == "meanfield"
    with pytest.raises(ValueError, match="guide"):
        bf.fit(model, [torch.randn(5, d) for d in SIZES], torch.zeros(5).long(), guide="mape")


@pytest.mark.slow
def test_default_classifier_matches_logistic_regression_on_nutrimouse():
    """The issue-19 reference on bundled real data: the defaults (main effects, MAP) against
    scikit-learn's L2 logistic regression (C = 1: the same N(0, 1) prior on the weights) on the
    concatenated views, every mouse held out once (4-fold CV)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from bayes_fusion.datasets import load_nutrimouse

    mice = load_nutrimouse()
    views, y = mice.views, mice.targets["diet"]
    probs, ref = torch.zeros(len(y), 5, dtype=torch.float64), torch.zeros(len(y), 5)
    folds = StratifiedKFold(n_splits=4, shuffle=True, random_state=0)
    x = torch.cat(views, 1).numpy()
    for train, test in folds.split(torch.zeros(len(y)), y):
        tr, te = torch.as_tensor(train), torch.as_tensor(test)
        model = bf.Classifier(bf.CPFusion([v.shape[1] for v in views], 5, max_rank=8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = bf.fit(model, [v[tr] for v in views], y[tr], num_steps=1500, progress=False)
        assert result.method == "map"
        probs[te] = result.predict([v[te] for v in views])["probs"].double()
        lr = LogisticRegression(max_iter=5000).fit(x[train], y[tr].numpy())
        ref[te] = torch.as_tensor(lr.predict_proba(x[test]), dtype=ref.dtype)
    accuracy = (probs.argmax(1) == y).double().mean()
    ref_accuracy = (ref.argmax(1) == y).double().mean()
    assert accuracy >= ref_accuracy - 0.051, (float(accuracy), float(ref_accuracy))  # 2 mice
    log_loss = -probs.clamp_min(1e-12).log().gather(1, y[:, None]).mean()
    ref_loss = -ref.double().log().gather(1, y[:, None]).mean()
    assert log_loss < ref_loss + 0.05, (float(log_loss), float(ref_loss))
