"""Property-based tests (hypothesis) of the contractions against dense reconstructions."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayes_fusion.ops import (
    cp_dense_fusion,
    cp_fusion,
    cp_to_dense,
    xox_linear,
    xox_to_dense,
)

D = torch.float64
small = st.integers(min_value=1, max_value=4)
lead_dims = st.lists(st.integers(min_value=1, max_value=3), min_size=0, max_size=2)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(small, min_size=2, max_size=4),
    out=small,
    rank=small,
    batch=small,
    lead=lead_dims,
    append_one=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cp_fusion_equals_dense(sizes, out, rank, batch, lead, append_one, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [d + int(append_one) for d in sizes]
    factors = [torch.randn(*lead, r, rank, generator=g, dtype=D) for r in rows]
    out_factor = torch.randn(*lead, out, rank, generator=g, dtype=D)
    inputs = [torch.randn(batch, d, generator=g, dtype=D) for d in sizes]
    got = cp_fusion(inputs, factors, out_factor, append_one=append_one)
    want = cp_dense_fusion(inputs, cp_to_dense(factors, out_factor), append_one=append_one)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(small, min_size=2, max_size=4),
    rank=small,
    batch=small,
    missing=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_missing_modality_is_the_mean_input(sizes, rank, batch, missing, seed):
    missing = missing % len(sizes)
    g = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d + 1, rank, generator=g, dtype=D) for d in sizes]
    out_factor = torch.randn(2, rank, generator=g, dtype=D)
    inputs = [torch.randn(batch, d, generator=g, dtype=D) for d in sizes]
    zeros = list(inputs)
    zeros[missing] = torch.zeros(batch, sizes[missing], dtype=D)
    nones = list(inputs)
    nones[missing] = None
    torch.testing.assert_close(
        cp_fusion(nones, factors, out_factor),
        cp_fusion(zeros, factors, out_factor),
        atol=1e-12,
        rtol=0,
    )


@settings(max_examples=60, deadline=None)
@given(i=small, o=small, g=small, batch=small, lead=lead_dims, seed=st.integers(0, 2**16))
def test_xox_orders_agree_with_dense(i, o, g, batch, lead, seed):
    gen = torch.Generator().manual_seed(seed)
    x_in = torch.randn(*lead, i, g, generator=gen, dtype=D)
    core = torch.randn(*lead, g, g, generator=gen, dtype=D)
    x_out = torch.randn(*lead, o, g, generator=gen, dtype=D)
    x = torch.randn(batch, i, generator=gen, dtype=D)
    want = torch.matmul(x, xox_to_dense(x_in, core, x_out, 0.5).transpose(-1, -2))
    for order in ("factored", "dense", "auto"):
        got = xox_linear(x, x_in, core, x_out, 0.5, order=order)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
