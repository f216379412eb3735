"""Baselines our users would otherwise run, implemented here only for comparison."""

from __future__ import annotations

import math

import torch
from torch import nn


class SeedLowRankFusion(nn.Module):
    """The seed notebook's ``LowRankFusion``: tensorly-torch CP factors + a Python loop.

    (No append-one, CP weights ignored -- exactly as the seed did.)
    """

    def __init__(self, input_sizes, output_size, rank, dtype=torch.float32):
        super().__init__()
        import tltorch

        self.weight_tensor = tltorch.FactorizedTensor.new(
            tuple(input_sizes) + (output_size,), rank, factorization="CP", dtype=dtype
        )
        tltorch.tensor_init(self.weight_tensor)

    def forward(self, inputs):
        output = 1.0
        for x, factor in zip(inputs, self.weight_tensor.factors[:-1], strict=False):
            output = output * (x @ factor)
        return output @ self.weight_tensor.factors[-1].T


def bare_cp_matmuls(inputs, factors, out_factor):
    """Only the products the CP contraction needs (no append-one, no checks): the floor."""
    h = inputs[0] @ factors[0]
    for x, f in zip(inputs[1:], factors[1:], strict=True):
        h = h * (x @ f)
    return h @ out_factor.T


def dense_tensor_fusion(inputs, dense):
    """TFN-style: contract the full weight tensor with the inputs."""
    letters = "abcdefgh"[: len(inputs)]
    subs = ",".join(f"n{c}" for c in letters) + f",{letters}p->np"
    return torch.einsum(subs, *inputs, dense)


class HandMAP(nn.Module):
    """Hand-written MAP: plain torch parameters and the seed's ``get_log_prior`` log joint.

    log p = sum Normal(y | fusion(x), sigma) + sum HalfCauchy(lambda | eta)
            + sum_m sum Normal(U_m | 0, lambda)
    """

    def __init__(self, sizes, out, rank, eta=1.0):
        super().__init__()
        rows = [d + 1 for d in sizes]
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(r, rank) / math.sqrt(r)) for r in rows]
        )
        self.out_factor = nn.Parameter(torch.randn(out, rank) / math.sqrt(rank))
        self.bias = nn.Parameter(torch.zeros(out))
        self.log_lam = nn.Parameter(torch.zeros(rank))
        self.log_sigma = nn.Parameter(torch.zeros(out))
        self.eta = eta

    def loss(self, inputs, y, scale=1.0):
        h = None
        for x, f in zip(inputs, self.factors, strict=True):
            p = x @ f[:-1] + f[-1]
            h = p if h is None else h * p
        pred = h @ self.out_factor.T + self.bias
        sigma = self.log_sigma.exp()
        lam = self.log_lam.exp()
        loglik = torch.distributions.Normal(pred, sigma).log_prob(y).sum() * scale
        log_prior = torch.distributions.HalfCauchy(self.eta).log_prob(lam).sum()
        prior = torch.distributions.Normal(0.0, lam + 1e-3)
        for f in list(self.factors) + [self.out_factor]:
            log_prior = log_prior + prior.log_prob(f).sum()
        return -(loglik + log_prior)
