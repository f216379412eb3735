import pytest
import torch

from bayes_fusion.ops import cp_component_norms, cp_dense_fusion, cp_fusion, cp_to_dense

D = torch.float64


def _make(sizes, out, rank, append_one, lead=()):
    rows = [d + int(append_one) for d in sizes]
    factors = [torch.randn(*lead, r, rank, dtype=D) for r in rows]
    out_factor = torch.randn(*lead, out, rank, dtype=D)
    return factors, out_factor


@pytest.mark.parametrize("append_one", [True, False])
@pytest.mark.parametrize("sizes", [(3, 4), (2, 3, 4), (2, 3, 2, 3)])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_cp_fusion_matches_dense(sizes, append_one, lead):
    factors, out_factor = _make(sizes, 4, 3, append_one, lead)
    weights = torch.randn(*lead, 3, dtype=D)
    bias = torch.randn(*lead, 4, dtype=D)
    inputs = [torch.randn(6, d, dtype=D) for d in sizes]
    got = cp_fusion(inputs, factors, out_factor, weights, bias, append_one)
    dense = cp_to_dense(factors, out_factor, weights)
    assert dense.shape == (*lead, *[d + int(append_one) for d in sizes], 4)
    want = cp_dense_fusion(inputs, dense, bias, append_one)
    assert got.shape == (*lead, 6, 4)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_cp_fusion_missing_modality_equals_mean_input():
    factors, out_factor = _make((3, 4, 2), 2, 5, True)
    x1, x3 = torch.randn(7, 3, dtype=D), torch.randn(7, 2, dtype=D)
    got = cp_fusion([x1, None, x3], factors, out_factor)
    want = cp_fusion([x1, torch.zeros(7, 4, dtype=D), x3], factors, out_factor)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    dense = cp_dense_fusion([x1, None, x3], cp_to_dense(factors, out_factor))
    torch.testing.assert_close(got, dense, atol=1e-10, rtol=0)


def test_cp_fusion_particle_inputs_broadcast():
    # inputs carrying particle dims (e.g. the output of a previous Bayesian layer)
    factors, out_factor = _make((3, 2), 2, 4, True, lead=(5,))
    inputs = [torch.randn(5, 6, 3, dtype=D), torch.randn(6, 2, dtype=D)]
    got = cp_fusion(inputs, factors, out_factor)
    for s in range(5):
        one = cp_fusion([inputs[0][s], inputs[1]], [f[s] for f in factors], out_factor[s])
        torch.testing.assert_close(got[s], one, atol=1e-12, rtol=0)


def test_component_norms_are_frobenius_norms_of_rank_one_terms():
    factors, out_factor = _make((3, 4), 2, 3, True)
    weights = torch.randn(3, dtype=D)
    norms = cp_component_norms(factors, out_factor, weights)
    for r in range(3):
        one = cp_to_dense(
            [f[:, r : r + 1] for f in factors], out_factor[:, r : r + 1], weights[r : r + 1]
        )
        torch.testing.assert_close(norms[r], one.norm(), atol=1e-12, rtol=0)


def test_cp_fusion_wrong_modality_count():
    factors, out_factor = _make((3, 4), 2, 3, True)
    with pytest.raises(ValueError, match="inputs: expected 2 modalities"):
        cp_fusion([torch.randn(2, 3, dtype=D)], factors, out_factor)
