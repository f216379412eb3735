"""The effective rank's information criterion: its pieces against dense computations (float64),
known answers for every guide and likelihood (no interaction -> rank 0, known CP rank / XOX
genes -> that rank), summaries that say what they are, and pruning that agrees with them."""

import pyro
import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_classification, make_cp_regression, make_xox_regression
from bayes_fusion.infer import FitResult
from bayes_fusion.rank import _ablation_information, component_information

SIZES = (3, 4, 3)
GUIDES = ["meanfield", "lowrank", "full"]


def _draws(layer, count, seed=0):
    """Random draws of a layer's sites (short names), ``(count, *event)``, float64."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for short, shape in layer.site_shapes().items():
        out[short] = torch.randn((count,) + shape, generator=g, dtype=torch.float64)
    out[layer.SCALE_SITE] = out[layer.SCALE_SITE].abs()
    return out


@pytest.mark.parametrize("main_effects", [False, True])
def test_cp_component_terms_add_up_to_the_layer(main_effects):
    layer = bf.CPFusion(SIZES, 2, max_rank=3, main_effects=main_effects).double()
    values = _draws(layer, 4)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(7, d, generator=g, dtype=torch.float64) for d in SIZES]
    scores, loadings = layer.component_terms(values, inputs)
    assert scores.shape == (4, 7, 3) and loadings.shape == (4, 2, 3)
    terms = torch.einsum("snk,spk->snp", scores, loadings) + values["bias"].unsqueeze(-2)
    if main_effects:  # the main effects are not components: add them back densely
        x = torch.cat(inputs, -1)
        terms = terms + torch.einsum("nd,spd->snp", x, values["main_effects"])
    torch.testing.assert_close(terms, layer.apply(values, inputs))


def test_xox_component_terms_are_the_singular_directions_of_the_dense_weight():
    layer = bf.XOXLinear(6, 4, genes=3).double()
    values = _draws(layer, 5)
    x = torch.randn(9, 6, dtype=torch.float64)
    scores, loadings = layer.component_terms(values, x)
    assert scores.shape == (5, 9, 3) and loadings.shape == (5, 4, 3)
    dense = layer.output_scale * values["x_out"] @ values["core"] @ values["x_in"].mT  # (S, 4, 6)
    torch.testing.assert_close(
        torch.einsum("snk,spk->snp", scores, loadings), torch.einsum("nd,spd->snp", x, dense)
    )
    # direction k is the rank-one term s_k u_k v_k^T of W: its norm is the k-th singular value
    term = torch.einsum("spk,sdk->skpd", loadings, torch.linalg.pinv(x) @ scores)
    singular = torch.linalg.svdvals(dense)[:, :3]
    torch.testing.assert_close(torch.linalg.matrix_norm(term), singular)


def _dense_information(layer, values, inputs, deviance):
    """Per draw and component, ``deviance(s, full, without)`` between the layer's output and
    its output with the component's output column zeroed (both computed densely)."""
    s_count = next(iter(values.values())).shape[0]
    full = layer.apply(values, inputs)
    out = torch.zeros(s_count, layer.max_rank, dtype=torch.float64)
    for k in range(layer.max_rank):
        without = dict(values)
        without["out_factor"] = values["out_factor"].clone()
        without["out_factor"][..., k] = 0.0
        dropped = layer.apply(without, inputs)  # (S, N, P)
        for s in range(s_count):
            out[s, k] = deviance(s, full[s], dropped[s])
    return out


def test_information_is_the_expected_deviance_without_the_component():
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(11, d, generator=g, dtype=torch.float64) for d in SIZES]
    regressor = bf.Regressor(bf.CPFusion(SIZES, 2, max_rank=3)).double()
    values = _draws(regressor.layer, 3)
    noise = torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.2
    samples = {f"layer.{k}": v for k, v in values.items()} | {"noise": noise}

    def gaussian(s, full, dropped):  # 2 KL(N(full, sigma) || N(dropped, sigma)), row by row
        return sum(((f - d) / noise[s]).pow(2).sum() for f, d in zip(full, dropped, strict=True))

    torch.testing.assert_close(
        component_information(regressor, regressor.layer, samples, inputs),
        _dense_information(regressor.layer, values, inputs, gaussian),
    )
    classifier = bf.Classifier(bf.CPFusion(SIZES, 4, max_rank=3)).double()
    values = _draws(classifier.layer, 3)

    def categorical(_, full, dropped):
        kl = torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=full),
            torch.distributions.Categorical(logits=dropped),
        )
        return 2.0 * kl.sum()

    samples = {f"layer.{k}": v for k, v in values.items()}
    info = component_information(classifier, classifier.layer, samples, inputs)
    torch.testing.assert_close(
        info, _dense_information(classifier.layer, values, inputs, categorical)
    )
    # to second order the Fisher-weighted change (a small component: the expansion holds)
    small = dict(values, out_factor=values["out_factor"] * 1e-3)
    samples = {f"layer.{k}": v for k, v in small.items()}
    probs = classifier.layer.apply(small, inputs).softmax(-1)
    scores, loadings = classifier.layer.component_terms(small, inputs)
    fisher = probs @ loadings.pow(2) - (probs @ loadings).pow(2)  # w^T (diag(p) - p p^T) w
    torch.testing.assert_close(
        component_information(classifier, classifier.layer, samples, inputs),
        (scores.pow(2) * fisher).sum(-2),
        rtol=1e-2,
        atol=0,
    )


def _known_answer_data(likelihood, truth, seed=0):
    """``(model, inputs, y)``: no interaction (``truth = 0``: a linear mean / linear logits, main
    effects on -- the linear term is theirs) or an append-one CP fusion of rank ``truth`` (main
    effects off: with them the interaction part of an append-one CP term has another rank)."""
    if likelihood == "gaussian":
        data = make_cp_regression(SIZES, 2, rank=truth, num_data=300, noise=0.2, seed=seed)
        layer = bf.CPFusion(SIZES, 2, max_rank=4, main_effects=truth == 0)
        return bf.Regressor(layer), data.inputs, data.y
    data = make_cp_classification(
        SIZES, 3, rank=truth, num_data=400, logit_scale=4.0 if truth else 3.0, seed=seed
    )
    layer = bf.CPFusion(SIZES, 3, max_rank=4, main_effects=truth == 0)
    return bf.Classifier(layer), data.inputs, data.y


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("truth", [0, 2])
@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_cp_rank_posterior_holds_the_true_rank(likelihood, truth, guide):
    model, views, y = _known_answer_data(likelihood, truth)
    res = bf.fit(model, views, y, guide=guide, num_steps=1000, progress=False)
    samples = res.posterior_draws(200)
    rp = bf.rank_posterior(res, samples=samples)["layer"]
    lo, hi = rp.hdi
    assert rp.criterion == "information" and rp.source == "variational"
    assert lo <= truth <= hi, f"{guide}: P(rank) {rp.probs.tolist()}, true rank {truth}"
    assert abs(float(rp.m_eff.mean()) - truth) < 0.75, float(rp.m_eff.mean())
    pruned = bf.prune(res, samples=samples)
    info = pruned.layers["layer"]
    assert info["rank"] == rp.mode and lo <= info["rank"] <= hi
    assert info["params_after"] <= info["params_before"]
    assert pruned.module.rank == info["rank"]
    with torch.no_grad():  # the dropped components carried next to nothing at the point pruned
        full = pyro.poutine.condition(res.model.layer, pruned.values)(views)
        small = pruned.module(views)
    # (components called inactive still fit a little noise: 2.3 % of the predictions' scale
    # for the full guide without interaction on an Intel Xeon, under 2 % on an AMD EPYC; an
    # active component dropped changes them by tens of %)
    assert float((small - full).pow(2).mean().sqrt() / full.pow(2).mean().sqrt()) < 0.05


@pytest.mark.parametrize("guide", GUIDES)
def test_xox_rank_posterior_holds_the_true_genes(guide):
    data = make_xox_regression(12, 8, genes=2, num_data=300, noise=0.1, seed=0)
    model = bf.Regressor(bf.XOXLinear(12, 8, genes=6))
    res = bf.fit(model, data.inputs, data.y, guide=guide, num_steps=1500, progress=False)
    samples = res.posterior_draws(200)
    rp = bf.rank_posterior(res, samples=samples)["layer"]
    lo, hi = rp.hdi
    assert lo <= 2 <= hi and rp.mode == 2, f"{guide}: P(rank) {rp.probs.tolist()}"
    pruned = bf.prune(res, samples=samples).layers["layer"]
    assert pruned["rank"] == 2 and pruned["params_after"] < pruned["params_before"]
    # the old relative criterion, kept as an option, on the same draws
    relative = bf.rank_posterior(res, samples=samples, criterion="relative")["layer"]
    assert relative.criterion == "relative" and relative.m_eff is None


@pytest.fixture(scope="module")
def rank_two_fits():
    model, views, y = _known_answer_data("gaussian", 2)
    fits = {}
    for guide in ("map", "meanfield"):
        fits[guide] = bf.fit(model, views, y, guide=guide, num_steps=1000, progress=False)
    return fits


def test_a_map_fit_reports_a_point_estimate(rank_two_fits, tmp_path):
    res = rank_two_fits["map"]
    rp = bf.rank_posterior(res)["layer"]
    assert rp.is_point and rp.source == "point"
    text = bf.rank_summary(res, print_it=False)
    assert "MAP point estimate" in text and "P(rank)" not in text
    assert f"rank (point estimate): {rp.mode}" in text
    fig, axes = bf.plot_rank_posterior(res, tmp_path / "rank.png")
    assert "MAP point estimate" in axes[0][0].get_title(loc="left")


def test_a_variational_fit_is_labelled_as_its_guides(rank_two_fits):
    text = bf.rank_summary(rank_two_fits["meanfield"], print_it=False)
    assert "variational posterior (meanfield guide's approximation)" in text
    assert "P(rank)" in text and "information criterion" in text
    assert "pruned (rank 2)" in text and "m_eff" in text


def test_failed_chain_diagnostics_reach_the_summary_and_the_plot(rank_two_fits):
    """Two 'chains' that disagree on the rank (the second lost a component): the rank posterior,
    the printed summary and the plot's title say that the diagnostics fail."""
    svi = rank_two_fits["meanfield"]
    first = svi.posterior_draws(100)
    second = {k: v.clone() for k, v in svi.posterior_draws(100).items()}
    strongest = bf.prune(svi, samples=first).layers["layer"]["kept"][0]
    second["layer.out_factor"][..., strongest] = 0.0
    draws = {k: torch.stack([first[k], second[k]]) for k in first}
    mcmc = FitResult(
        svi.model, None, "nuts", svi.args, mcmc_samples=draws, info={"divergences": [0, 3]}
    )
    rp = bf.rank_posterior(mcmc)["layer"]
    assert rp.source == "mcmc" and rp.warning is not None
    assert "3 divergent transitions" in rp.warning and "r-hat" in rp.warning
    assert rp.table().splitlines()[0] == rp.warning  # the table printed alone says it too
    text = bf.rank_summary(mcmc, print_it=False)
    assert text.count("WARNING: MCMC diagnostics fail") == 1
    fig, axes = bf.plot_rank_posterior(mcmc)
    assert any("WARNING" in t.get_text() for t in axes[0][0].texts)


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_ablating_a_component_is_its_closed_form_information(likelihood):
    """Running the model without each component (how a layer inside the model is weighed)
    gives the closed form's information on the layer that makes the predictions."""
    model, views, y = _known_answer_data(likelihood, 2)
    res = bf.fit(model, views, y, guide="meanfield", num_steps=50, progress=False)
    samples = res.posterior_draws(30)
    closed = component_information(res.model, res.model.layer, samples, views)
    ablated = _ablation_information(res, res.model.layer, samples, views, chunk_size=16)
    torch.testing.assert_close(ablated, closed, rtol=1e-3, atol=1e-3)


class _TwoXOX(pyro.nn.PyroModule):
    """``x -> XOX(12, 8) -> tanh -> XOX(8, 4)``: a hidden rank layer."""

    def __init__(self):
        super().__init__()
        self.hidden = bf.XOXLinear(12, 8, genes=6)
        self.out = bf.XOXLinear(8, 4, genes=4)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_a_hidden_xox_layer_is_weighed_by_what_it_changes_in_the_predictions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g)
    hidden = torch.randn(8, 2, generator=g) @ torch.randn(2, 12, generator=g) / 12**0.5  # rank 2
    y = torch.tanh(x @ hidden.T) @ (torch.randn(8, 4, generator=g) / 8**0.5)
    y = y / y.std() + 0.1 * torch.randn(400, 4, generator=g)
    with pytest.warns(bf.ParameterBudgetWarning):
        model = bf.Regressor(_TwoXOX())
    res = bf.fit(model, x, y, num_steps=2000, progress=False)
    rps = bf.rank_posterior(res, num_samples=100)
    assert rps["layer.hidden"].criterion == "information"
    assert rps["layer.hidden"].mode == 2 and rps["layer.hidden"].hdi[0] == 2
    summary = bf.rank_summary(res, num_samples=100, print_it=False)
    assert "pruned (rank 2)" in summary
