"""CPFusion's optional main effects: the same function as a dense append-one fusion tensor
(float64), in the Bayesian layer, its log joint, the deterministic twin, pruning and the
interaction terms."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import bayes_fusion as bf
from bayes_fusion.contributions import interaction_terms
from bayes_fusion.ops import (
    cp_dense_fusion,
    cp_fusion,
    cp_main_effects,
    cp_to_dense,
    embed_main_effects,
)

D = torch.float64
SIZES = (3, 4, 2)


def _inputs(sizes=SIZES, batch=6):
    return [torch.randn(batch, d, dtype=D) for d in sizes]


@pytest.mark.parametrize("lead", [(), (5,)])
@pytest.mark.parametrize("sizes", [(3, 4), SIZES])
def test_main_effects_equal_the_constant_rows_of_a_dense_tensor(sizes, lead):
    rows = [d + 1 for d in sizes]
    factors = [torch.randn(*lead, r, 3, dtype=D) for r in rows]
    out_factor = torch.randn(*lead, 2, 3, dtype=D)
    weight = torch.randn(*lead, 2, sum(sizes), dtype=D)
    xs = _inputs(sizes)
    got = cp_fusion(xs, factors, out_factor) + cp_main_effects(xs, weight, sizes)
    dense = embed_main_effects(cp_to_dense(factors, out_factor), weight, sizes)
    torch.testing.assert_close(got, cp_dense_fusion(xs, dense), atol=1e-10, rtol=1e-10)
    # a missing modality is its (zero) mean input, for the main effects too
    xs_missing = [None] + xs[1:]
    got = cp_fusion(xs_missing, factors, out_factor) + cp_main_effects(xs_missing, weight, sizes)
    torch.testing.assert_close(got, cp_dense_fusion(xs_missing, dense), atol=1e-10, rtol=1e-10)


def test_main_effects_weight_shape_is_checked():
    with pytest.raises(ValueError, match=r"weight: expected 9 columns .* got shape \(2, 8\)"):
        cp_main_effects(_inputs(), torch.zeros(2, 8, dtype=D), SIZES)


def test_layer_site_prior_and_dense_reconstruction():
    layer = bf.CPFusion(SIZES, 2, max_rank=4, main_effects=True, main_effects_scale=0.5).to(D)
    xs = _inputs()
    tr = poutine.trace(layer).get_trace(xs)
    site = tr.nodes["main_effects"]
    assert site["value"].shape == (2, 9)
    assert isinstance(site["fn"].base_dist, dist.Normal)
    torch.testing.assert_close(site["fn"].base_dist.scale, torch.full((2, 9), 0.5, dtype=D))
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    dense = cp_to_dense([v[f"factor_{m}"] for m in range(3)], v["out_factor"])
    dense = embed_main_effects(dense, v["main_effects"], SIZES)
    want = cp_dense_fusion(xs, dense, v["bias"])
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], want, atol=1e-10, rtol=1e-10)
    assert layer.num_parameters() == 4 * (4 + 5 + 3 + 2) + 2 + 2 * 9
    assert set(layer.init_values()) == set(layer.site_names().values())


def test_log_joint_matches_pyro_with_main_effects():
    model = bf.Classifier(bf.CPFusion(SIZES, 3, max_rank=2, main_effects=True)).to(D)
    xs, y = _inputs(), torch.tensor([0, 1, 2, 0, 1, 2])
    tr = poutine.trace(model).get_trace(xs, y)
    values = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample" and n != "obs"}
    assert model.has_log_joint
    torch.testing.assert_close(
        model.log_joint(values, xs, y), tr.log_prob_sum(), atol=1e-10, rtol=0
    )


def test_particle_dims_match_per_particle():
    layer = bf.CPFusion((3, 2), 2, 4, main_effects=True).to(D)
    xs = _inputs((3, 2))
    with pyro.plate("particles", 4, dim=-2):
        tr = poutine.trace(layer).get_trace(xs)
    out = tr.nodes["_RETURN"]["value"]
    v = {n: s["value"] for n, s in tr.nodes.items() if s["type"] == "sample"}
    for s in range(4):
        one = poutine.condition(layer, {k: val[s, 0] for k, val in v.items()})(xs)
        torch.testing.assert_close(out[s], one, atol=1e-10, rtol=1e-10)


def test_deterministic_twin_matches_dense_and_refuses_cp_export():
    layer = bf.DeterministicCPFusion(SIZES, 2, rank=3, dtype=D, main_effects=True)
    with torch.no_grad():
        layer.main_effects.normal_()
    xs = _inputs()
    want = cp_dense_fusion(xs, layer.to_dense(), layer.bias)
    torch.testing.assert_close(layer(xs), want, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="main effects"):
        layer.to_tltorch()
    no_one = bf.DeterministicCPFusion(SIZES, 2, rank=3, append_one=False, main_effects=True)
    with pytest.raises(ValueError, match="append_one=True"):
        no_one.to_dense()


def test_interaction_terms_add_up_with_main_effects():
    factors = [torch.randn(d + 1, 3, dtype=D) for d in SIZES]
    out_factor, weight = torch.randn(2, 3, dtype=D), torch.randn(2, 9, dtype=D)
    xs = _inputs()
    terms = interaction_terms(xs, factors, out_factor, weight)
    const = cp_fusion([torch.zeros(6, d, dtype=D) for d in SIZES], factors, out_factor)
    total = sum(terms.values()) + const
    want = cp_fusion(xs, factors, out_factor) + cp_main_effects(xs, weight, SIZES)
    torch.testing.assert_close(total, want, atol=1e-10, rtol=1e-10)


def test_prune_keeps_the_main_effects():
    torch.manual_seed(0)
    xs = [torch.randn(40, d) for d in (3, 4)]
    y = (xs[0][:, 0] + xs[1][:, 1] > 0).long()
    model = bf.Classifier(bf.CPFusion((3, 4), 2, max_rank=3, main_effects=True))
    result = bf.fit(model, xs, y, guide="map", num_steps=200, progress=False)
    pruned = bf.prune(result)
    layer, module = result.model.layer, pruned.module
    torch.testing.assert_close(module.main_effects, pruned.values["layer.main_effects"])
    # the pruned module is the layer with the dropped components' output columns zeroed
    values = layer.short_values(pruned.values)
    dropped = [r for r in range(3) if r not in pruned.layers["layer"]["kept"]]
    values["out_factor"] = values["out_factor"].clone()
    values["out_factor"][:, dropped] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(module(xs), layer.apply(values, xs), atol=1e-5, rtol=1e-5)


def test_nuts_integrates_the_main_effects_out_with_the_output_factor():
    model = bf.Regressor(bf.CPFusion((3, 4), 1, max_rank=2, main_effects=True))
    xs, y = [torch.randn(10, 3), torch.randn(10, 4)], torch.randn(10)
    res = bf.fit(
        model,
        xs,
        y,
        guide="nuts",
        marginalize=True,
        num_samples=2,
        warmup_steps=2,
        init_steps=20,
        progress=False,
    )
    assert res.info["marginalized"] == ["layer.bias", "layer.main_effects", "layer.out_factor"]
    assert res.mcmc_samples["layer.main_effects"].shape == (1, 2, 1, 7)


def test_modality_contributions_count_the_main_effects():
    torch.manual_seed(1)
    xs = [torch.randn(60, d) for d in (3, 4)]
    y = (2 * xs[0][:, 0] > xs[1][:, 1]).long()
    model = bf.Classifier(bf.CPFusion((3, 4), 2, max_rank=2, main_effects=True))
    result = bf.fit(model, xs, y, guide="meanfield", num_steps=100, progress=False)
    contrib = bf.modality_contributions(result, xs, num_samples=20, modality_names=["a", "b"])
    assert contrib.names == ["a", "b", "a x b"]
    torch.testing.assert_close(contrib.shares.sum(-1), torch.ones(20), atol=1e-5, rtol=0)
