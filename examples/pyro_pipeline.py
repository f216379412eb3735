"""A CP-fusion layer inside your own Pyro model, fit with plain ``pyro.infer.SVI``.

The model has its own latent variables (a hierarchical per-group intercept) around the fusion
layer; it is fit with Pyro's SVI loop and a bayes_fusion guide preset, then ``Predictive`` and
ArviZ take over (``FitResult.from_pyro``, PSIS-LOO of the user model). Then the same model with
the layer called inside a subsampled data plate (the common Pyro minibatch idiom), fit with
plain SVI too; and the original model fit by ``bf.fit`` in minibatches (the fit slices the rows
and scales the likelihood) and by NUTS::

    python examples/pyro_pipeline.py --out pipeline_out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

import bayes_fusion as bf
from bayes_fusion.datasets import make_cp_regression


class GroupedFusion(pyro.nn.PyroModule):
    """``y = fusion(x1, x2) + intercept[group] + noise`` with ``intercept ~ N(0, tau)``."""

    def __init__(self, in_features, out_features, num_groups, max_rank):
        super().__init__()
        self.fusion = bf.CPFusion(in_features, out_features, max_rank=max_rank)
        self.num_groups = num_groups

    def forward(self, inputs, group, y=None):
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", self.num_groups):
            intercept = pyro.sample("intercept", dist.Normal(0.0, tau))
        pred = self.fusion(inputs) + intercept[..., group].unsqueeze(-1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", group.shape[0]):
            pyro.sample("obs", dist.Normal(pred, sigma.unsqueeze(-1)).to_event(1), obs=y)
        return pred


class SubsampledFusion(GroupedFusion):
    """The same model, the layer called inside a subsampled data plate: its weights are still
    sampled once (global sites), and the likelihood alone is scaled by N / batch."""

    def __init__(self, *args, batch=100):
        super().__init__(*args)
        self.batch = batch

    def forward(self, inputs, group, y=None):
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", self.num_groups):
            intercept = pyro.sample("intercept", dist.Normal(0.0, tau))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", group.shape[0], subsample_size=self.batch) as idx:
            pred = self.fusion([x[idx] for x in inputs]) + intercept[..., group[idx]].unsqueeze(-1)
            obs = None if y is None else y[idx]
            pyro.sample("obs", dist.Normal(pred, sigma.unsqueeze(-1)).to_event(1), obs=obs)
        return pred


def _rounded(values):
    return [round(v, 2) for v in values.tolist()]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="pipeline_out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    steps = args.steps or (300 if args.smoke else 3000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(0)

    data = make_cp_regression((4, 5), 2, rank=2, num_data=600, noise=0.1, seed=0)
    group = torch.arange(600) % 4
    true_intercepts = torch.tensor([-1.0, -0.3, 0.4, 1.2])
    y = data.y + true_intercepts[group].unsqueeze(-1)

    model = GroupedFusion((4, 5), 2, num_groups=4, max_rank=6)
    guide = bf.make_guide("meanfield", model)  # preset init, any autoguide works
    svi = SVI(
        model, guide, pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO()
    )
    for step in range(steps):
        loss = svi.step(data.inputs, group, y)
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  loss {loss:10.2f}")

    predictive = Predictive(
        model,
        guide=guide,
        num_samples=200,
        parallel=True,
        return_sites=["intercept", "fusion.rank_scale", "obs", "_RETURN"],
    )
    with torch.no_grad():
        samples = predictive(data.inputs, group)
    # Predictive keeps a singleton dim for the data plate on global sites: (S, 1, ...)
    samples = {
        k: v.reshape(200, *v.shape[-1:]) if k != "obs" and k != "_RETURN" else v
        for k, v in samples.items()
    }
    est = samples["intercept"].mean(0)
    print(
        "intercepts: true",
        [round(v, 2) for v in true_intercepts.tolist()],
        "posterior mean",
        [round(v, 2) for v in est.tolist()],
    )
    lam = samples["fusion.rank_scale"].sort(-1, descending=True).values.mean(0)
    print("sorted rank scales (posterior mean):", [round(v, 3) for v in lam.tolist()])

    # the fit in ArviZ (InferenceData on ArviZ 0.x, DataTree on 1.x): every latent site plus the
    # sorted, label-switching-invariant rank summaries of the embedded layer
    import arviz as az

    # (FitResult.from_pyro snapshots Pyro's parameter store, where plain SVI left the guide's
    # parameters; a pyro.infer.MCMC run converts the same way)
    result = bf.FitResult.from_pyro(guide, model, data.inputs, group, y)
    idata = bf.to_inference_data(result, num_samples=200, posterior_predictive=False)
    names = ["intercept", "fusion.rank_scale_sorted", "fusion.effective_rank"]
    print(az.summary(idata, var_names=names, kind="stats").to_string())
    # the user model's observed site has its pointwise log-likelihood: PSIS-LOO works on it
    elpd = bf.loo(idata)
    print(f"PSIS-LOO elpd {elpd.elpd:.1f} (se {elpd.se:.1f})")
    rp = bf.rank_posterior(result, num_samples=200)["fusion"]
    print("fusion layer rank posterior:\n" + rp.table())
    bf.plot_rank_posterior({"fusion": rp}, out / "rank_posterior.png")
    print(f"plot written to {out.resolve() / 'rank_posterior.png'}")

    # the layer inside a subsampled data plate, plain SVI again
    pyro.clear_param_store()
    inside = SubsampledFusion((4, 5), 2, 4, 6)
    guide = bf.make_guide("meanfield", inside)
    svi = SVI(
        inside, guide, pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO()
    )
    for _ in range(steps):
        svi.step(data.inputs, group, y)
    print("inside-plate fit: intercepts", _rounded(guide.median()["intercept"]))

    # bf.fit in minibatches of 100 rows (no num_data in the model: the fit scales its
    # likelihood) and NUTS, on the original model
    batched = bf.fit(model, data.inputs, group, y, batch_size=100, num_steps=steps, progress=False)
    print("bf.fit minibatches: intercepts", _rounded(batched.get_samples(200)["intercept"].mean(0)))
    draws = 20 if args.smoke else 300
    nuts = bf.fit(
        model,
        data.inputs,
        group,
        y,
        guide="nuts",
        num_samples=draws,
        warmup_steps=draws,
        init_steps=100 if args.smoke else 1000,
        max_tree_depth=4 if args.smoke else 8,
        progress=False,
    )
    print(
        f"NUTS ({nuts.info['seconds']:.0f} s): intercepts",
        _rounded(nuts.get_samples()["intercept"].mean(0)),
    )
    return {"intercepts": est, "rank_mode": rp.mode}


if __name__ == "__main__":
    main()
