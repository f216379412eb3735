"""Many chains in lockstep (guide="mcmc"): the ChEES-HMC kernel on targets with known moments,
its pieces (whitening, warm-up windows, jitter), the diagnostics for many chains, and the fit on
data of known rank (continued, saved, exported)."""

import math
import warnings

import pytest
import torch

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression
from bayes_fusion.infer.compile_cache import CacheUse
from bayes_fusion.infer.compiled import CompiledFunction
from bayes_fusion.infer.jit_choice import CostRecords
from bayes_fusion.infer.mcmc import linear_gaussian
from bayes_fusion.infer.mcmc.chees import Whitening, halton, run_lockstep, warmup_windows
from bayes_fusion.infer.mcmc.compile_choice import (
    DEFAULT_STEPS_PER_ITERATION,
    LeapfrogCompileChoice,
)
from bayes_fusion.infer.mcmc.convergence import nested_r_hat, r_hat_and_ess
from bayes_fusion.infer.mcmc.potential import FlatPotential, Potential
from tests.test_generic_nuts import PoissonFusion


class GaussianPotential(Potential):
    """``x ~ Normal(mean, cov)`` over one site ``x`` ``(D,)``."""

    def __init__(self, mean, cov):
        self.mean, self.precision = mean, torch.linalg.inv(cov)

    def potential(self, params):
        d = params["x"] - self.mean
        return 0.5 * d @ self.precision @ d


def _correlated_gaussian(dim=4):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    cov = a @ a.T / dim + torch.diag(torch.linspace(0.05, 3.0, dim, dtype=torch.float64))
    mean = torch.linspace(-2.0, 2.0, dim, dtype=torch.float64)
    return mean, cov


@pytest.mark.parametrize("dense", [True, False])
def test_lockstep_chains_recover_a_correlated_gaussian(dense):
    mean, cov = _correlated_gaussian()
    flat = FlatPotential(GaussianPotential(mean, cov), {"x": torch.zeros(4, dtype=torch.float64)})
    starts = 3.0 * torch.randn(16, 4, dtype=torch.float64)
    metric = torch.eye(4, dtype=torch.float64) if dense else torch.ones(4, dtype=torch.float64)
    run = run_lockstep(flat, starts, metric, num_samples=150, warmup_steps=200)
    draws = run.draws.reshape(-1, 4)
    assert run.draws.shape == (16, 150, 4)
    assert sum(len(d) for d in run.divergences) == 0
    # 2400 draws: the mean within 0.15 sd, the covariance within 15 %
    sd = cov.diagonal().sqrt()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.15
    assert ((torch.cov(draws.T) - cov).abs() / (sd[:, None] * sd[None, :])).max() < 0.15
    r_hat, ess = r_hat_and_ess(run.draws)
    assert r_hat < 1.05 and ess > 800  # 2400 draws; r-hat of 16 short chains scatters to ~1.03
    # the adapted metric is the posterior's scale: step size near 1 in whitened units
    assert 0.3 < run.state.step_size < 2.5
    assert set(run.stats) == {
        "diverging",
        "acceptance_rate",
        "n_steps",
        "step_size",
        "energy",
        "lp",
    }
    assert all(v.shape == (16, 150) for v in run.stats.values())


def test_a_continued_run_keeps_its_tuning_and_its_target():
    mean, cov = _correlated_gaussian()
    flat = FlatPotential(GaussianPotential(mean, cov), {"x": torch.zeros(4, dtype=torch.float64)})
    starts = torch.randn(8, 4, dtype=torch.float64)
    first = run_lockstep(flat, starts, torch.eye(4, dtype=torch.float64), 20, 150)
    more = run_lockstep(flat, None, None, 200, 0, state=first.state)
    assert more.state.step_size == first.state.step_size
    assert more.state.halton_index == first.state.halton_index + 200
    sd = cov.diagonal().sqrt()
    assert ((more.draws.reshape(-1, 4).mean(0) - mean).abs() / sd).max() < 0.2


def test_a_run_without_warmup_draws_with_its_starting_tuning():
    mean, cov = _correlated_gaussian()
    flat = FlatPotential(GaussianPotential(mean, cov), {"x": torch.zeros(4, dtype=torch.float64)})
    starts = torch.distributions.MultivariateNormal(mean, cov).sample((8,))
    run = run_lockstep(flat, starts, cov, num_samples=150, warmup_steps=0)
    assert run.draws.shape == (8, 150, 4) and run.stats["n_steps"].min() >= 1
    assert run.state.trajectory_length >= 4 * run.state.step_size  # MIN_STEPS steps
    sd = cov.diagonal().sqrt()
    assert ((run.draws.reshape(-1, 4).mean(0) - mean).abs() / sd).max() < 0.3


class BranchingGaussian(GaussianPotential):
    """The same Gaussian, computed through a Python branch on a value: vmap cannot batch it."""

    def potential(self, params):
        d = params["x"] - self.mean
        if bool(d.detach().sum() > 1e9):  # never true, but reads a value
            d = 2 * d
        return 0.5 * d @ self.precision @ d


@pytest.mark.parametrize("compile", [True, None])
def test_a_potential_that_does_not_batch_runs_its_chains_one_by_one(tmp_path, compile):
    # compile=None: nothing to decide (one chain after another runs eagerly whatever the cost)
    mean, cov = _correlated_gaussian(2)
    flat = FlatPotential(BranchingGaussian(mean, cov), {"x": torch.zeros(2, dtype=torch.float64)})
    starts = torch.randn(4, 2, dtype=torch.float64)
    costs = LeapfrogCompileChoice("branching", CostRecords(tmp_path / "costs.json"))
    with pytest.warns(RuntimeWarning, match="does not broadcast over a leading chain dimension"):
        run = run_lockstep(
            flat, starts, torch.ones(2, dtype=torch.float64), 150, 100, compile=compile, costs=costs
        )
    assert isinstance(run.batched, str) and run.compile is None and run.jit_choice is None
    sd = cov.diagonal().sqrt()
    assert ((run.draws.reshape(-1, 2).mean(0) - mean).abs() / sd).max() < 0.3


def test_whitening_round_trip_and_within_chain_estimate():
    mean, cov = _correlated_gaussian(3)
    for metric in (cov, cov.diagonal()):
        white = Whitening(mean, metric)
        x = torch.randn(5, 3, dtype=torch.float64)
        torch.testing.assert_close(white.to_x(white.to_w(x)), x)
    # two chains holding the same Gaussian around far-apart modes (a relabelling): the pooled
    # within-chain covariance is the Gaussian's, not the spread between the modes
    chol = torch.linalg.cholesky(cov)
    draws = torch.randn(2, 4000, 3, dtype=torch.float64) @ chol.T
    draws[1] += 50.0
    est = Whitening.estimate(draws, dense=True)
    est_cov = est.scale @ est.scale.T
    assert ((est_cov - cov).abs() / cov.diagonal().max()).max() < 0.1


def test_warmup_windows_and_jitter():
    windows = warmup_windows(400)
    assert windows == sorted(windows) and windows[-1] == 360 and windows[0] >= 60
    bounds = [60] + windows
    sizes = [bounds[i + 1] - bounds[i] for i in range(len(windows))]
    assert sizes == sorted(sizes) and sizes[0] == 25  # windows doubling from 25
    assert warmup_windows(40) == []
    values = [halton(i) for i in range(1, 65)]
    assert all(0 < v < 1 for v in values) and len(set(values)) == 64
    assert abs(sum(values) / 64 - 0.5) < 0.02  # low discrepancy: evenly spread


def test_nested_r_hat_sees_groups_that_disagree():
    torch.manual_seed(0)
    agree = torch.randn(8, 100, 2)
    assert nested_r_hat(agree, 2) < 1.05
    disagree = agree.clone()
    disagree[4:] += 2.0  # the second group of four chains sits elsewhere
    assert nested_r_hat(disagree, 2) > 1.5
    with pytest.raises(ValueError, match="superchains"):
        nested_r_hat(agree, 3)
    # rank-normalized r-hat is not fooled by heavy tails: Cauchy chains of one target pass
    cauchy = torch.distributions.Cauchy(0.0, 1.0).sample((4, 500, 1))
    assert r_hat_and_ess(cauchy)[0] < 1.02


def test_compiled_function_checks_every_output_of_a_tuple():
    compiled = CompiledFunction(lambda x: (2 * x, x.sum()), name="pair")
    x = torch.arange(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compile or check would warn
        doubled, total = compiled(x)
    torch.testing.assert_close(doubled, 2 * x)
    assert float(total) == 3.0 and compiled.failed is None


def test_a_wild_proposal_gives_a_nan_density_not_an_exception():
    design = torch.full((5, 2), 1e30)
    value = linear_gaussian.log_marginal_likelihood(design, torch.ones(5, 1), torch.tensor([1e-30]))
    assert not math.isfinite(float(value))


@pytest.fixture(scope="module")
def known_rank_fit():
    data = make_cp_regression((3, 4), 2, rank=1, num_data=120, noise=0.1, seed=0)
    model = bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3))
    result = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="mcmc",
        num_chains=8,
        num_samples=60,
        warmup_steps=150,
        init_steps=300,
        jit=False,
        progress=False,
    )
    return data, model, result


def test_mcmc_finds_the_true_rank(known_rank_fit):
    data, model, result = known_rank_fit
    assert result.method == "mcmc" and result.guide is None
    samples = result.get_samples(group_by_chain=True)
    assert samples["layer.rank_scale"].shape == (8, 60, 3)
    assert result.info["superchains"] == 2 and len(result.info["divergences"]) == 8
    assert result.info["batched"] is True
    assert result.info["marginalized"]  # the output sites integrated out
    posterior = bf.rank_posterior(result)["layer"]
    low, high = posterior.hdi
    assert low <= 1 <= high and posterior.mode == 1, posterior.probs.tolist()
    assert posterior.source == "mcmc"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # short chains may warn
        diagnostics = result.diagnostics()
    assert set(diagnostics["nested_r_hat"]) == set(diagnostics["r_hat"])
    assert diagnostics["r_hat"]["layer.relevance_sorted"] < 1.1


def test_mcmc_result_continues_saves_and_exports(known_rank_fit, tmp_path):
    data, model, result = known_rank_fit
    more = bf.fit(
        model,
        data.inputs,
        data.y,
        guide="mcmc",
        num_chains=8,
        num_samples=10,
        resume=result,
        jit=False,
        progress=False,
    )
    assert more.get_samples(group_by_chain=True)["layer.rank_scale"].shape == (8, 70, 3)
    assert more.sample_stats["lp"].shape == (8, 70)
    assert more.info["step_size"] == result.info["step_size"] and more.info["resumed"]
    torch.testing.assert_close(
        more.mcmc_samples["layer.rank_scale"][:, :60], result.mcmc_samples["layer.rank_scale"]
    )
    path = tmp_path / "fit.pt"
    more.save(path)
    loaded = bf.load(path, bf.Regressor(bf.CPFusion((3, 4), 2, max_rank=3)))
    assert loaded.method == "mcmc"
    torch.testing.assert_close(loaded.mcmc_samples["noise"], more.mcmc_samples["noise"])
    idata = bf.to_inference_data(more)
    assert "diverging" in idata.sample_stats and "n_steps" in idata.sample_stats


def test_mcmc_options_are_checked(known_rank_fit):
    data, model, result = known_rank_fit
    args = (model, data.inputs, data.y)
    with pytest.raises(ValueError, match="num_chains"):
        bf.fit(*args, guide="mcmc", num_chains=1)
    with pytest.raises(ValueError, match="superchains"):
        bf.fit(*args, guide="mcmc", num_chains=8, superchains=3)
    with pytest.raises(ValueError, match="target_accept_prob"):
        bf.fit(*args, guide="mcmc", target_accept_prob=1.5)
    with pytest.raises(TypeError, match="max_tree_depth.*fit_nuts"):
        bf.fit(*args, guide="mcmc", max_tree_depth=5)
    svi = bf.fit(*args, guide="map", num_steps=5, progress=False)
    with pytest.raises(ValueError, match="resume: expected a result of guide='mcmc'"):
        bf.fit(*args, guide="mcmc", resume=svi)
    with pytest.raises(ValueError, match="num_chains: the resumed fit has 8 chains"):
        bf.fit(*args, guide="mcmc", num_chains=4, resume=result, jit=False, progress=False)


def test_the_compile_choice_weighs_the_predicted_costs(tmp_path):
    """``jit="auto"``'s cost model: the steps left are the iterations left times the larger of
    the fit's recent steps per iteration and this graph's record (a default without one);
    compile when the compile plus the compiled steps beat the eager steps; a later check with
    longer trajectories can still compile; a compiled run's costs are recorded."""
    records = CostRecords(tmp_path / "costs.json")
    choice = LeapfrogCompileChoice("graph", records)
    # nothing on record: 20 s compile, ratio 0.2, 30 steps per iteration
    assert choice.decide(10, 1000, 4.0, [0.005] * 9 + [1.0])  # 150 s eager vs 50 s
    assert choice.choice.remaining == 1000 * DEFAULT_STEPS_PER_ITERATION
    short = LeapfrogCompileChoice("graph", records)
    assert not short.decide(10, 50, 4.0, [0.005] * 10)  # 7.5 s eager vs 21.5 s
    report = short.report(steps_per_iteration=4.0)
    assert report["chosen"] == "eager" and report["steps_per_iteration"]["after_warmup"] == 4.0
    assert "actual" not in report and report["checks"] == 1
    assert records.steps_per_iteration("graph") == 4.0
    # the record says 4 steps per iteration: 1000 iterations of 4 do not pay a 20 s compile ...
    again = LeapfrogCompileChoice("graph", CostRecords(tmp_path / "costs.json"))
    assert not again.decide(10, 1000, 4.0, [0.005] * 10)
    assert again.choice.remaining == 4000
    # ... until this fit's trajectories have grown to 40 steps: the second check compiles
    assert again.decide(35, 975, 40.0) and again.checks == 2
    assert again.choice.remaining == 975 * 40 and again.decided_after == 35
    with pytest.raises(ValueError, match="eager_step_seconds"):
        LeapfrogCompileChoice("graph", records).decide(10, 100, 4.0)
    # a compiled run records its compile (cold) and its step ratio
    choice.report(30.0, compile_s=12.0, compiled_step_ms=1.0, cache=CacheUse(True, 0, 3))
    entry = CostRecords(tmp_path / "costs.json").entries["graph"]
    assert entry["cold_s"] == 12.0 and entry["step_ratio"] == pytest.approx(0.2)
    assert entry["engine"] == "leapfrog" and entry["steps_per_iteration"] == 30.0


@pytest.mark.parametrize("cheap", [False, True])
def test_a_run_is_compiled_from_its_probe_on_only_where_it_pays(tmp_path, cheap):
    """``compile=None``: the first iterations run eagerly and are timed; the step compiles
    from then on where this machine's records make the compile cheap, and stays eager where
    they make it dear; both runs sample the target and report the choice."""
    mean, cov = _correlated_gaussian()
    flat = FlatPotential(GaussianPotential(mean, cov), {"x": torch.zeros(4, dtype=torch.float64)})
    records = CostRecords(tmp_path / "costs.json")
    records.entries["gauss"] = (
        {"engine": "leapfrog", "cold_s": 0.0, "step_ratio": 0.01}
        if cheap
        else {"engine": "leapfrog", "cold_s": 1e6, "step_ratio": 0.9}
    )
    costs = LeapfrogCompileChoice("gauss", records)
    starts = torch.distributions.MultivariateNormal(mean, cov).sample((8,))
    run = run_lockstep(flat, starts, cov, 40, 60, compile=None, costs=costs)
    assert run.jit_choice["chosen"] == ("compiled leapfrog" if cheap else "eager")
    assert run.jit_choice["remaining_steps"] > 0 and run.jit_choice["eager_step_ms"] > 0
    assert (run.compile is not None) == cheap
    if cheap:
        assert run.compile["compiled"] and run.jit_choice["actual"]["compile_s"] > 0
    saved = CostRecords(tmp_path / "costs.json").entries["gauss"]
    assert saved["steps_per_iteration"] == pytest.approx(float(run.stats["n_steps"].mean()))
    sd = cov.diagonal().sqrt()
    assert ((run.draws.reshape(-1, 4).mean(0) - mean).abs() / sd).max() < 0.5
    with pytest.raises(ValueError, match="compile: None"):
        run_lockstep(flat, starts, cov, 5, 5, compile=None)


def test_a_user_models_leapfrog_step_is_compiled_traced():
    """torch.compile cannot follow Pyro's handlers: the user model's batched step is traced
    (make_fx) and that graph compiled -- checked against eager on its first call (a failure
    would warn, an error here) -- and the chains still find the rates."""
    data = make_cp_regression((3, 2), 1, rank=1, num_data=80, noise=0.01, seed=0)
    counts = torch.poisson((0.7 * data.y[:, 0]).exp(), generator=torch.Generator().manual_seed(0))
    model = PoissonFusion(bf.CPFusion((3, 2), 1, max_rank=2))
    res = bf.fit(
        model,
        data.inputs,
        counts,
        guide="mcmc",
        jit=True,
        num_chains=8,
        warmup_steps=60,
        num_samples=50,
        init_steps=150,
        seed=0,
        progress=False,
    )
    assert res.info["batched"] is True
    assert res.info["compiled"]["compiled"] and res.info["compiled"]["failure"] is None
    log_rate = res.predict(data.inputs)["mean"][:, 0]
    truth = 0.7 * data.y[:, 0]
    assert float(torch.corrcoef(torch.stack([log_rate, truth]))[0, 1]) > 0.9
