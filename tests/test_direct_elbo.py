"""The fast SVI path: DirectELBO (== Trace_ELBO), the compiled loss, the fused optimizer."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation, AutoNormal
from pyro.nn import PyroModule

import bayes_fusion as bf
from bayes_fusion.infer.compiled import CompiledFunction, flatten_tensors, unflatten_tensors
from bayes_fusion.infer.svi.elbo import DirectELBO, _lowrank_draw, _mvn_draw
from bayes_fusion.infer.svi.optim import FusedClippedAdam
from bayes_fusion.infer.svi.step import PriorAnneal

GUIDES = ["map", "meanfield", "lowrank", "full"]


class GroupIntercept(PyroModule):
    """A user model: our layer plus a hierarchical intercept per group (a plate of latents)."""

    def __init__(self, groups=3):
        super().__init__()
        self.layer = bf.CPFusion((3, 4), 2, max_rank=3)
        self.groups = groups

    def forward(self, inputs, group, y=None):
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0, dtype=inputs[0].dtype)))
        with pyro.plate("groups", self.groups):
            alpha = pyro.sample("alpha", dist.Normal(torch.zeros((), dtype=tau.dtype), tau))
        mean = self.layer(inputs) + alpha[..., group].unsqueeze(-1)
        with pyro.plate("data", len(group)):
            pyro.sample("obs", dist.Normal(mean, 0.5).to_event(1), obs=y)
        return mean


def _problem(kind, n=40):
    torch.manual_seed(1)
    x = [torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 4, dtype=torch.float64)]
    if kind == "cp":
        model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)).double()
        return model, (x, torch.randn(n, 2, dtype=torch.float64))
    if kind == "xox":
        layer = bf.XOXLinear(6, 2, genes=3)
        xx = torch.randn(n, 6, dtype=torch.float64)
        return bf.Regressor(layer).double(), (xx, torch.randn(n, 2, dtype=torch.float64))
    if kind == "classifier":
        model = bf.Classifier(bf.CPFusion((3, 4), 3, max_rank=3)).double()
        return model, (x, torch.randint(0, 3, (n,)))
    if kind == "minibatch":  # subsampled likelihood: the obs site carries the N / B scale
        model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3), num_data=5 * n).double()
        return model, (x, torch.randn(n, 2, dtype=torch.float64))
    model = GroupIntercept().double()
    return model, (x, torch.randint(0, 3, (n,)), torch.randn(n, 2, dtype=torch.float64))


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("kind", ["cp", "xox", "classifier", "minibatch", "user"])
def test_direct_elbo_equals_trace_elbo(kind, guide):
    """Same draw (same seed), same loss and the same gradient for every parameter."""
    model, args = _problem(kind)
    g = bf.make_guide(guide, model, *args, init_scale=0.3)
    g(*args)
    direct = DirectELBO(g)
    params = direct.params()
    pyro.set_rng_seed(7)
    expected = Trace_ELBO().differentiable_loss(model, g, *args)
    grads_expected = torch.autograd.grad(expected, params)
    pyro.set_rng_seed(7)
    got = direct.differentiable_loss(model, args)
    grads_got = torch.autograd.grad(got, params)
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-10)
    for a, b in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_direct_elbo_weights_the_guide_by_the_kl_weight():
    """loss = -(log p(y | z) + beta * (log p(z) - log q(z))) under the KL warm-up weight."""
    model, args = _problem("cp")
    g = bf.make_guide("meanfield", model, *args, init_scale=0.3)
    g(*args)
    direct = DirectELBO(g)
    beta = 0.25
    pyro.set_rng_seed(3)
    values, log_q = direct.sample_guide()
    tr = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(*args)
    tr.compute_log_prob()
    sites = [s for s in tr.nodes.values() if s["type"] == "sample"]
    log_lik = sum(s["log_prob_sum"] for s in sites if s["name"] not in values)
    log_prior = sum(s["log_prob_sum"] for s in sites if s["name"] in values)
    expected = -(log_lik + beta * (log_prior - log_q))
    pyro.set_rng_seed(3)
    annealed = PriorAnneal()
    annealed.beta = beta
    loss = direct.differentiable_loss(annealed(model), args, guide_scale=beta)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-10)


def test_unsupported_guides_are_named():
    model, args = _problem("cp")
    assert "has not been run" in DirectELBO.unsupported_reason(AutoNormal(model))
    laplace = AutoLaplaceApproximation(model)
    laplace(*args)
    assert "not one of the preset" in DirectELBO.unsupported_reason(laplace)
    assert not DirectELBO.supports(laplace)
    with pytest.raises(ValueError, match="guide: DirectELBO cannot"):
        DirectELBO(laplace)


def test_guide_in_a_subsampled_plate_is_refused():
    def local_model(y):
        with pyro.plate("data", 100, subsample_size=len(y)) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(len(idx)), 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=y)

    g = AutoNormal(local_model)
    g(torch.randn(10))
    assert "subsampled plate" in DirectELBO.unsupported_reason(g)


@pytest.mark.parametrize("guide", ["map", "meanfield", "lowrank"])
@pytest.mark.parametrize("jit", [None, False])
def test_fit_fast_path_follows_the_pyro_path(guide, jit):
    """Whole fits (minibatches, KL warm-up, fused optimizer): the loss curves agree."""
    model_args = _problem("cp", n=60)[1]
    kw = dict(guide=guide, num_steps=60, batch_size=20, kl_warmup=0.5, progress=False, seed=2)
    losses = {}
    for name, extra in (("pyro", {"direct_elbo": False}), ("fast", {"jit": jit})):
        model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)).double()
        losses[name] = bf.fit(model, *model_args, **kw, **extra).losses
    assert losses["fast"] == pytest.approx(losses["pyro"], rel=1e-9)


def test_fast_path_still_stops_on_nan():
    model, args = _problem("cp")

    def poison(step, loss):
        if step == 5:  # after the first (Pyro) step: the fast path is running
            with torch.no_grad():
                for _, p in pyro.get_param_store().named_parameters():
                    p.fill_(float("nan"))

    with pytest.raises(bf.NonFiniteLossError, match="at step 6"):
        bf.fit(model, *args, guide="meanfield", num_steps=20, callback=poison, progress=False)


# --- compiled functions -------------------------------------------------------------------
def test_flatten_round_trip():
    a, b = torch.randn(2), torch.randn(3)
    obj = ([a, None], {"k": b, "n": 3}, (1.5, "s"))
    tensors, spec = flatten_tensors(obj)
    assert len(tensors) == 2
    back = unflatten_tensors(spec, tensors)
    assert back[0][0] is a and back[0][1] is None and back[1]["k"] is b and back[2] == (1.5, "s")


def test_compiled_function_draws_fresh_numbers_and_recompiles_on_new_shapes():
    fn = CompiledFunction(lambda x: (x * torch.empty_like(x).normal_()).sum())
    x = torch.ones(5)
    torch.manual_seed(0)
    first, second = float(fn(x)), float(fn(x))
    assert first != second and fn.num_compiles == 1 and fn.compile_seconds > 0
    torch.manual_seed(0)
    eager = float((x * torch.empty_like(x).normal_()).sum())
    assert first == pytest.approx(eager, rel=1e-6)  # the same stream as the eager function
    fn(torch.ones(6))
    assert fn.num_compiles == 2
    fn(torch.ones(5))
    assert fn.num_compiles == 2 and fn.failed is None


class _Scaled:
    """A method bound to its own object: every instance is a new guard for dynamo."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x):
        return (x * self.k).sum()


def test_many_compiled_functions_in_one_process_all_compile():
    # one shared code object would hit dynamo's recompile limit (8) and stop compiling
    for k in range(10):
        fn = CompiledFunction(_Scaled(float(k)), name=f"scaled {k}")
        assert float(fn(torch.ones(3))) == 3.0 * k
        assert fn.failed is None and fn.num_compiles == 1


def test_compiled_function_falls_back_when_the_graph_disagrees():
    calls = []

    def counting(x):
        # state changed by every call: the compiled graph keeps the value of its own call
        calls.append(1)
        return x.sum() + len(calls)

    fn = CompiledFunction(counting, name="counting")
    with pytest.warns(RuntimeWarning, match="counting: the compiled graph gives 4.0 where the"):
        out = fn(torch.ones(3))
    assert float(out) == 3.0 + len(calls)  # the eager value of the latest call
    assert float(fn(torch.ones(3))) == 3.0 + len(calls) and fn.num_compiles == 1  # eager now
    assert "compiled graph gives" in fn.failed


def _cancelling(x):
    """~0 from terms of 1e4: one unit in the last place of ``x`` moves it by ~0.1. Draws one
    random number (unused), to check the random state the check leaves."""
    return (x * 1e4).sum() - 1e4 * x.numel() + 0.0 * torch.rand(())


def _plain(x):
    return x.sum() + 0.0 * torch.rand(())


@pytest.mark.parametrize(
    "fn, offset, accepted",
    [(_cancelling, 5e-3, True), (_cancelling, 5e-2, False), (_plain, 5e-3, False)],
    ids=["rounding-sized", "beyond-1%-of-scale", "well-conditioned"],
)
def test_compiled_check_allows_what_rounding_alone_does(monkeypatch, fn, offset, accepted):
    """A compiled output off by more than ``rtol`` passes where the eager function's own change
    under one-ulp moves of its inputs is as large (float32 after cancellation), up to 1 % of
    the output's scale; off a well-conditioned function by as much it fails."""

    def compile_off_by_offset(graph, **options):  # the "compiled" graph: eager + offset
        return lambda *args: graph(*args) + offset

    monkeypatch.setattr(torch, "compile", compile_off_by_offset)
    x = torch.ones(10)
    torch.manual_seed(0)
    fn(x)
    after_one_call = torch.rand(())
    torch.manual_seed(0)
    compiled = CompiledFunction(fn, name="off")
    with warnings.catch_warnings():
        warnings.simplefilter("error" if accepted else "ignore", RuntimeWarning)
        out = compiled(x)
    assert (compiled.failed is None) == accepted
    if accepted:
        assert float(out) == pytest.approx(float(fn(x)) + offset, abs=1e-6)
        torch.manual_seed(0)
        compiled_again = CompiledFunction(fn, name="off")
        compiled_again(x)
        # the check's extra eager calls leave the random state as one call of fn leaves it
        assert torch.equal(torch.rand(()), after_one_call)
    else:
        assert "compiled graph gives" in compiled.failed


def test_compiled_function_falls_back_when_compilation_fails():
    def branchy(x):  # Python control flow on a tensor value: not one graph
        return x.sum() if x.sum().item() > 0 else -x.sum()

    fn = CompiledFunction(branchy, name="branchy")
    with pytest.warns(RuntimeWarning, match="branchy: torch.compile failed .*running it eagerly"):
        out = fn(torch.ones(3))
    assert float(out) == 3.0 and float(fn(-torch.ones(2))) == 2.0


# --- fused optimizer ------------------------------------------------------------------------
ARGS = {"lr": 0.05, "lrd": 0.99, "clip_norm": 2.0, "betas": (0.9, 0.99)}
OPTIMIZERS = {"pyro": pyro.optim.ClippedAdam, "fused": FusedClippedAdam}


def _optimize(first, then=None, swap_at=20, steps=40, dtypes=(torch.float32,), late=()):
    """Optimize a quartic; at ``swap_at`` a ``then`` optimizer resumes from the state. The
    parameters' dtypes cycle through ``dtypes``; those in ``late`` join at step 10 (their step
    counts, so their step sizes, lag the others')."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    params = [
        pyro.param(
            f"p{i}", torch.randn(3 + 3 * i, 2, dtype=dtypes[i % len(dtypes)])
        ).unconstrained()
        for i in range(4)
    ]
    opt = OPTIMIZERS[first](ARGS)
    for t in range(steps):
        if then is not None and t == swap_at:
            state = opt.get_state()
            opt = OPTIMIZERS[then](ARGS)
            opt.set_state(state)
        active = [p for i, p in enumerate(params) if t >= 10 or i not in late]
        loss = sum(((p - 1.5) ** 4).sum() * (i + 1) for i, p in enumerate(active))
        loss.backward()
        opt(active)
        for p in params:
            p.grad = None
    return [p.detach().clone() for p in params]


def test_fused_clipped_adam_is_pyro_clipped_adam():
    for a, b in zip(_optimize("fused"), _optimize("pyro"), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "dtypes", [(torch.float32,), (torch.float32, torch.float64)], ids=["one", "mixed"]
)
def test_fused_clipped_adam_steps_each_parameter_at_its_own_step_size(dtypes):
    """Parameters that joined late (a smaller step count, another step size), and parameters
    of several dtypes (no shared flat buffers): still Pyro's numbers, bit for bit."""
    got = _optimize("fused", dtypes=dtypes, late=(1, 3))
    for a, b in zip(got, _optimize("pyro", dtypes=dtypes, late=(1, 3)), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first,then", [("pyro", "fused"), ("fused", "pyro"), ("fused", "fused")])
def test_fused_clipped_adam_state_is_interchangeable(first, then):
    expected = _optimize("pyro")
    for a, b in zip(_optimize(first, then), expected, strict=True):
        assert torch.equal(a, b)


def test_fused_clipped_adam_refuses_unknown_arguments():
    with pytest.raises(ValueError, match="optim_args: unknown keys \\['weight_decay'\\]"):
        FusedClippedAdam({"lr": 0.1, "weight_decay": 0.1})
    with pytest.raises(TypeError, match="optim_args: expected a dict"):
        FusedClippedAdam(0.1)


def test_default_optimizer_resumes_exactly():
    model, args = _problem("cp")
    kw = dict(guide="meanfield", progress=False, seed=5)
    fresh = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)).double()
    full = bf.fit(fresh, *args, num_steps=40, **kw)
    # stopped half-way on the 40-step schedule (KL warm-up, learning-rate decay), then resumed
    part = bf.fit(model, *args, num_steps=40, callback=lambda step, loss: step == 19, **kw)
    assert len(part.losses) == 20
    resumed = bf.fit(model, *args, num_steps=40, resume=part, **kw)
    assert resumed.losses[:20] == part.losses
    assert resumed.losses == pytest.approx(full.losses, rel=1e-9)
    assert math.isfinite(resumed.losses[-1])


def test_dense_gaussian_draw_scores_itself_from_its_noise():
    """The full guide's draw and log-density: the draw ``rsample`` makes (same RNG use) and
    ``log_prob`` of it (float64, well conditioned), but computed from ``eps`` -- in float32 with
    scales spanning 1e-3..1 the triangular solve of ``log_prob`` is off by orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    tril = torch.randn(6, 6, generator=g, dtype=torch.float64).tril(-1) * 0.3
    tril = tril + torch.diag(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    q = dist.MultivariateNormal(torch.randn(6, generator=g, dtype=torch.float64), scale_tril=tril)
    torch.manual_seed(3)
    latent, log_q = _mvn_draw(q)
    torch.manual_seed(3)
    torch.testing.assert_close(latent, q.rsample())
    torch.testing.assert_close(log_q, q.log_prob(latent))
    scales = torch.logspace(-3, 0, 60)
    tril = torch.eye(60) + torch.randn(60, 60, generator=g).tril(-1)  # float32, unit lower
    q = dist.MultivariateNormal(torch.zeros(60), scale_tril=scales.unsqueeze(-1) * tril)
    torch.manual_seed(5)
    latent, log_q = _mvn_draw(q)
    torch.manual_seed(5)
    eps = torch.empty(60).normal_().double()  # the same draw, carried out in float64
    q64 = dist.MultivariateNormal(torch.zeros(60).double(), scale_tril=q.scale_tril.double())
    exact = float(q64.log_prob(q64.scale_tril @ eps))
    assert abs(float(log_q) - exact) < 1e-4 * abs(exact)
    assert abs(float(q.log_prob(latent)) - exact) > 10 * abs(float(log_q) - exact)


def test_lowrank_draw_is_the_dense_gaussians_draw_and_density():
    """The low-rank guide's draw (the one ``LowRankMultivariateNormal.rsample`` makes, same RNG
    use) and its Woodbury log-density against the dense ``N(loc, S (C C^T + I) S)`` (float64),
    with its gradients, for scales spanning 1e-3..1."""
    g = torch.Generator().manual_seed(0)
    dim, rank = 40, 6
    loc = torch.randn(dim, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.logspace(-3, 0, dim, dtype=torch.float64).requires_grad_()
    factor = torch.randn(dim, rank, generator=g, dtype=torch.float64).requires_grad_()
    torch.manual_seed(4)
    latent, log_q = _lowrank_draw(loc, scale, factor)
    torch.manual_seed(4)
    lowrank = dist.LowRankMultivariateNormal(loc, factor * scale.unsqueeze(-1), scale.square())
    reference = lowrank.rsample()
    torch.testing.assert_close(latent, reference)
    cov = scale.unsqueeze(-1) * (factor @ factor.T + torch.eye(dim, dtype=torch.float64)) * scale
    dense = dist.MultivariateNormal(loc, covariance_matrix=cov).log_prob(reference)
    torch.testing.assert_close(log_q, dense, rtol=1e-10, atol=1e-8)
    weights = torch.randn(dim, generator=g, dtype=torch.float64)  # the draw's path as well
    got = torch.autograd.grad(log_q + latent @ weights, (loc, scale, factor))
    want = torch.autograd.grad(dense + reference @ weights, (loc, scale, factor))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-6)


@pytest.mark.parametrize("guide", GUIDES)
def test_direct_elbo_reads_parameters_given_in_place_of_the_guides(guide):
    """``params=`` (the inputs of a compiled loss) replaces the guide's own tensors."""
    model, args = _problem("cp")
    g = bf.make_guide(guide, model, *args, init_scale=0.3)
    g(*args)
    direct = DirectELBO(g)
    given = [p.detach().clone().requires_grad_() for p in direct.params()]
    pyro.set_rng_seed(4)
    own = direct.differentiable_loss(model, args)
    pyro.set_rng_seed(4)
    loss = direct.differentiable_loss(model, args, params=given)
    assert float(loss.detach()) == pytest.approx(float(own.detach()), rel=1e-12)
    grads = torch.autograd.grad(loss, given)
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        given[0].add_(0.5)
    pyro.set_rng_seed(4)
    moved = direct.differentiable_loss(model, args, params=given)
    assert float(moved.detach()) != float(own.detach())
