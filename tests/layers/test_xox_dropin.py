"""The XOX layers as drop-ins for ``nn.Linear``: default genes from a parameter budget, a
warning when the factors outgrow the dense weight, a read-only materialized weight, dtypes like
``nn.Linear``'s, input checks that compile whole, and pruning that never forms ``W``."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.ops import default_genes, xox_compact, xox_num_parameters, xox_to_dense

D = torch.float64


@pytest.mark.parametrize("sizes", [(64, 128), (128, 10), (4096, 4096), (3, 2), (1, 1)])
def test_default_genes_is_the_largest_within_a_quarter_of_the_dense_weights(sizes):
    i, o = sizes
    g = default_genes(i, o)
    assert 1 <= g <= min(i, o)
    if g > 1:  # one gene is the floor even when it is over budget
        assert xox_num_parameters(i, o, g, bias=False) <= i * o / 4
    if g < min(i, o):  # one more gene would be over the budget
        assert xox_num_parameters(i, o, g + 1, bias=False) > i * o / 4


def test_genes_are_optional_and_max_rank_is_bounded_by_the_sizes():
    layer = bf.DeterministicXOXLinear(64, 128)
    assert layer.genes == default_genes(64, 128) == 10
    bayes = bf.XOXLinear(64, 128)
    assert bayes.genes == 10 and bayes.max_rank == 10
    with pytest.warns(bf.ParameterBudgetWarning, match=r"2464 factored weights.*1280"):
        small = bf.XOXLinear(128, 10, genes=16)
    assert small.rank == 16 and small.max_rank == 10
    with pytest.warns(bf.ParameterBudgetWarning, match="DeterministicXOXLinear"):
        bf.DeterministicXOXLinear(128, 10, genes=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf.DeterministicXOXLinear(128, 10, genes=4)  # 552 < 1280 weights: no warning


def test_rank_posterior_of_xox_counts_at_most_min_genes_in_out():
    data = bf.datasets.make_xox_regression(12, 3, genes=2, num_data=60, seed=0)
    model = bf.Regressor(bf.XOXLinear(12, 3, genes=6))
    res = bf.fit(model, data.inputs, data.y, guide="map", num_steps=50, progress=False)
    rp = bf.rank_posterior(res)["layer"]
    assert rp.max_rank == 3 and rp.probs.shape == (4,)


def test_weight_is_materialized_read_only_and_assignment_raises():
    layer = bf.DeterministicXOXLinear(6, 4, genes=2, dtype=D)
    want = xox_to_dense(layer.x_in, layer.core, layer.x_out, layer.scale)
    torch.testing.assert_close(layer.weight, want)
    torch.testing.assert_close(layer.dense_weight(), want)
    x = torch.randn(5, 6, dtype=D)
    torch.testing.assert_close(layer(x), x @ want.T + layer.bias)
    with pytest.raises(AttributeError, match="weight: DeterministicXOXLinear has no weight"):
        layer.weight = torch.nn.Parameter(torch.zeros(4, 6, dtype=D))
    # nn.init on the factors changes the layer; the dense weight follows
    torch.nn.init.zeros_(layer.core)
    assert float(layer.weight.detach().abs().max()) == 0.0


def test_dtypes_like_nn_linear_and_a_clear_error_for_a_mismatch():
    layer = bf.DeterministicXOXLinear(6, 4, genes=2)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32 .* got torch.float64"):
        layer(torch.randn(3, 6, dtype=D))
    bayes = bf.XOXLinear(6, 4, genes=2, dtype=D)
    assert bayes.output_scale.dtype == D
    assert all(v.dtype == D for v in bayes.init_values().values())
    assert bayes(torch.randn(3, 6, dtype=D)).dtype == D


@pytest.mark.parametrize("kind", ["deterministic", "bayesian-apply"])
def test_input_checks_compile_whole(kind):
    """``torch.compile(fullgraph=True)`` traces through the layers' input checks (the value
    check that reads the data is skipped while compiling)."""
    torch._dynamo.reset()
    if kind == "deterministic":
        layer = bf.DeterministicXOXLinear(6, 4, genes=2)
        fn = layer
    else:
        layer = bf.XOXLinear(6, 4, genes=2)
        values = {k.split(".")[-1]: v for k, v in layer.init_values().items()}

        def fn(x):
            layer._check_input(x)
            return layer.apply(values, x)

    x = torch.randn(3, 6)
    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_compact_factors_are_the_truncated_svd_without_the_dense_matrix(rank):
    torch.manual_seed(rank)
    layer = bf.XOXLinear(7, 5, genes=4).double()
    values = {k.split(".")[-1]: v for k, v in layer.init_values().items()}
    values["core"] = torch.randn(4, 4, dtype=D)
    compact = layer.compact_factors(values, rank)
    w = xox_to_dense(values["x_in"], values["core"], values["x_out"], layer.output_scale)
    u, s, vh = torch.linalg.svd(w)
    k = min(rank, 4, 5)
    truncated = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    got = xox_to_dense(compact["x_in"], compact["core"], compact["x_out"], compact["scale"])
    torch.testing.assert_close(got, truncated, atol=1e-10, rtol=1e-10)
    assert compact["x_in"].shape == (7, k) and compact["x_out"].shape == (5, k)


def test_compact_at_4096_stays_below_the_dense_matrix_in_memory():
    """Peak extra resident memory of pruning one 4096 x 4096 layer (64 genes) stays below the
    64 MB of its dense float32 weight (measured in a fresh process: VmHWM after a reset)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS reset needs Linux /proc")
    script = textwrap.dedent(
        """
        import re, torch
        from pathlib import Path
        from bayes_fusion.ops import xox_compact

        def rss(key):
            text = Path("/proc/self/status").read_text()
            return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) / 1024

        torch.manual_seed(0)
        n, g = 4096, 64
        x_in, core, x_out = torch.randn(n, g), torch.randn(g, g), torch.randn(n, g)
        xox_compact(x_in[:8], core, x_out[:8], 1.0, 8)  # load the kernels
        Path("/proc/self/clear_refs").write_text("5")
        before = rss("VmRSS")
        a, b = xox_compact(x_in, core, x_out, 1.0, 32)
        print(max(0.0, rss("VmHWM") - before), a.shape[1])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    peak_mb, kept = proc.stdout.split()
    dense_mb = 4096 * 4096 * 4 / 2**20
    assert int(kept) == 32
    assert float(peak_mb) < dense_mb / 4, (peak_mb, dense_mb)


def test_xox_compact_keeps_leading_singular_values():
    x_in, core, x_out = torch.randn(30, 6, dtype=D), torch.randn(6, 6, dtype=D), torch.randn(20, 6)
    x_out = x_out.double()
    a, b = xox_compact(x_in, core, x_out, 0.5, 3)
    s_full = torch.linalg.svdvals(xox_to_dense(x_in, core, x_out, 0.5))
    torch.testing.assert_close(torch.linalg.svdvals(b @ a.T)[:3], s_full[:3])
