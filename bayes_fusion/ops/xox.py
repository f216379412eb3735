"""XOX ("genomic bottleneck") linear map as pure torch contractions.

The weight ``W = s * X_out O X_in^T`` (shape ``(out, in)``) is built from ``X_in`` of shape
``(..., in, G)``, the core ``O`` of shape ``(..., G, G)`` and ``X_out`` of shape ``(..., out, G)``
with ``G`` "genes". ``y = x W^T + b``. Two evaluation orders give the same numbers:

* ``"factored"``: ``s * ((x X_in) O^T) X_out^T`` -- cost ``N G (in + G + out)`` for ``N`` rows;
* ``"dense"``: form ``W`` first, then ``x W^T`` -- cost ``out G (G + in) + N in out``
  (per particle).

:func:`xox_linear` picks the cheaper one by FLOP count unless told otherwise. Leading particle
dims on the factors broadcast against the input's leading dims.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_COMPRESSION",
    "INIT_TARGETS",
    "default_genes",
    "xox_compact",
    "xox_num_parameters",
    "xox_flops",
    "xox_choose_order",
    "xox_linear",
    "xox_to_dense",
    "xox_gene_norms",
    "xox_singular_values",
    "xox_init_scale",
    "ORDERS",
]

ORDERS = ("auto", "factored", "dense")

#: the weight-std targets of :func:`xox_init_scale`
INIT_TARGETS = ("kaiming", "xavier", "linear")

#: parameter budget of :func:`default_genes`: the factors hold at most ``1 / DEFAULT_COMPRESSION``
#: of the dense weight's entries
DEFAULT_COMPRESSION = 4.0


def xox_num_parameters(in_features: int, out_features: int, genes: int, bias: bool = True) -> int:
    """Weights of an XOX layer: ``G (in + out + G)`` factor entries (+ ``out`` bias entries)."""
    return genes * (in_features + out_features + genes) + (out_features if bias else 0)


def default_genes(
    in_features: int, out_features: int, compression: float = DEFAULT_COMPRESSION
) -> int:
    """The default number of genes: the largest ``G`` whose factors hold at most
    ``in * out / compression`` entries (``G (in + out + G)``), at least 1 and at most
    ``min(in, out)`` (the largest rank ``W`` can have).

    :param compression: how many times fewer factor entries than dense weights (``> 0``).
    """
    budget = in_features * out_features / compression
    span = in_features + out_features
    # the positive root of G^2 + span G = budget
    genes = int((math.sqrt(span * span + 4 * budget) - span) / 2)
    return max(1, min(genes, in_features, out_features))


def xox_flops(
    rows: int, in_features: int, out_features: int, genes: int, particles: int = 1
) -> dict[str, int]:
    """Multiply-add counts of both evaluation orders.

    :param rows: number of input rows ``N`` (product of the input's leading dims, batch incl.).
    :param particles: number of distinct weight matrices (product of the factors' particle dims).
    :returns: ``{"factored": ..., "dense": ...}``.
    """
    g, i, o = genes, in_features, out_features
    return {
        "factored": rows * g * (i + g + o),
        "dense": particles * o * g * (g + i) + rows * i * o,
    }


def xox_choose_order(
    rows: int, in_features: int, out_features: int, genes: int, particles: int = 1
) -> str:
    """Return ``"factored"`` or ``"dense"``, whichever needs fewer FLOPs (ties: factored)."""
    flops = xox_flops(rows, in_features, out_features, genes, particles)
    return "factored" if flops["factored"] <= flops["dense"] else "dense"


def xox_to_dense(x_in: Tensor, core: Tensor, x_out: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Dense weight ``W = s X_out O X_in^T`` of shape ``(..., out, in)``."""
    return scale * torch.matmul(torch.matmul(x_out, core), x_in.transpose(-1, -2))


def xox_linear(
    x: Tensor,
    x_in: Tensor,
    core: Tensor,
    x_out: Tensor,
    scale: Tensor | float = 1.0,
    bias: Tensor | None = None,
    order: str = "auto",
) -> Tensor:
    """Apply the XOX linear map ``y = s ((x X_in) O^T) X_out^T + b``.

    :param x: input of shape ``(..., in)``.
    :param x_in: input factor of shape ``(..., in, G)``.
    :param core: core of shape ``(..., G, G)``.
    :param x_out: output factor of shape ``(..., out, G)``.
    :param scale: scalar (or tensor broadcastable to ``(..., 1, 1)``) output scale ``s``.
    :param bias: optional bias of shape ``(..., out)``.
    :param order: ``"auto"`` (cheaper by FLOPs), ``"factored"`` or ``"dense"``.
    :returns: tensor of shape ``(..., out)``.
    """
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if order == "auto":
        batch_dims = x.shape[:-2] if x.dim() > 2 else ()
        lead = torch.broadcast_shapes(batch_dims, x_in.shape[:-2])
        rows = math.prod(lead) * (x.shape[-2] if x.dim() > 1 else 1)
        particles = math.prod(x_in.shape[:-2])
        order = xox_choose_order(rows, x_in.shape[-2], x_out.shape[-2], x_in.shape[-1], particles)
    if order == "factored":
        hidden = torch.matmul(torch.matmul(x, x_in), core.transpose(-1, -2))
        out = torch.matmul(hidden * scale, x_out.transpose(-1, -2))
    else:
        weight = xox_to_dense(x_in, core, x_out, scale)
        if weight.dim() == 2:
            out = torch.nn.functional.linear(x, weight)
        else:
            out = torch.matmul(x, weight.transpose(-1, -2))
    if bias is not None:
        out = out + bias.unsqueeze(-2) if bias.dim() > 1 else out + bias
    return out


def xox_gene_norms(x_in: Tensor, core: Tensor, x_out: Tensor) -> Tensor:
    """Frobenius norm of everything gene ``g`` contributes to ``W = X_out O X_in^T``.

    Zeroing column ``g`` of ``X_in`` and ``X_out`` removes
    ``W_g = a b^T + c' d^T`` with ``a = X_out[:, g]``, ``b = X_in O[g, :]^T``,
    ``d = X_in[:, g]``, ``c' = X_out O[:, g] - O[g, g] a``; its norm is computed without forming
    any ``out x in`` matrix: ``|a|^2 |b|^2 + |c'|^2 |d|^2 + 2 (a.c')(b.d)``.

    :returns: tensor of shape ``(..., G)``.
    """
    a = x_out  # (..., out, G): column g is a
    b = torch.matmul(x_in, core.transpose(-1, -2))  # (..., in, G): column g is X_in O[g,:]^T
    d = x_in
    diag = torch.diagonal(core, dim1=-2, dim2=-1).unsqueeze(-2)  # (..., 1, G)
    c = torch.matmul(x_out, core) - diag * a  # column g is X_out O[:, g] - O[g,g] a
    sq = (
        a.pow(2).sum(-2) * b.pow(2).sum(-2)
        + c.pow(2).sum(-2) * d.pow(2).sum(-2)
        + 2 * (a * c).sum(-2) * (b * d).sum(-2)
    )
    return sq.clamp_min(0).sqrt()


def xox_singular_values(x_in: Tensor, core: Tensor, x_out: Tensor) -> Tensor:
    """Singular values of ``W = X_out O X_in^T`` (descending) without forming ``W``.

    With thin QR factorizations ``X = Q R``, ``W = Q_out (R_out O R_in^T) Q_in^T`` and the
    ``G x G`` middle matrix has the same singular values as ``W``. Invariant to every
    invertible re-mixing of the genes (``X_in A^{-T}``, ``A O``...), unlike per-gene norms.

    :returns: tensor of shape ``(..., min(G, in, out))``.
    """
    r_in = torch.linalg.qr(x_in, mode="r").R
    r_out = torch.linalg.qr(x_out, mode="r").R
    middle = torch.matmul(torch.matmul(r_out, core), r_in.transpose(-1, -2))
    return torch.linalg.svdvals(middle)


def xox_compact(
    x_in: Tensor, core: Tensor, x_out: Tensor, scale: Tensor | float, rank: int
) -> tuple[Tensor, Tensor]:
    """Factors of the rank-``rank`` truncated SVD of ``W = s X_out O X_in^T``, without forming
    ``W``: ``W ~ U_k S_k V_k^T = (U_k S_k^{1/2}) (V_k S_k^{1/2})^T``.

    With thin QR factorizations ``X = Q R``, ``W = Q_out (s R_out O R_in^T) Q_in^T``, so the SVD
    of the ``G x G`` middle matrix gives ``W``'s: ``U = Q_out U_m``, ``V = Q_in V_m``. Time and
    memory ``O((in + out) G^2)``; exact when ``rank >= rank(W)``.

    :param x_in: ``(in, G)``. :param core: ``(G, G)``. :param x_out: ``(out, G)``.
    :param scale: the output scale ``s``.
    :param rank: genes to keep, ``1 <= rank``; at most ``min(G, in, out)`` are meaningful.
    :returns: ``(x_in_k, x_out_k)``, ``(in, k)`` and ``(out, k)`` with ``k = min(rank, G, in,
        out)``, such that ``x_out_k x_in_k^T`` is the truncated ``W`` (identity core, scale 1).
    """
    q_in, r_in = torch.linalg.qr(x_in)
    q_out, r_out = torch.linalg.qr(x_out)
    middle = scale * torch.matmul(torch.matmul(r_out, core), r_in.transpose(-1, -2))
    u, s, vh = torch.linalg.svd(middle)
    k = min(rank, s.shape[-1])
    root = s[..., :k].sqrt()
    x_out_k = torch.matmul(q_out, u[..., :k]) * root.unsqueeze(-2)
    x_in_k = torch.matmul(q_in, vh[..., :k, :].transpose(-1, -2)) * root.unsqueeze(-2)
    return x_in_k, x_out_k


def xox_init_scale(
    in_features: int,
    out_features: int,
    genes: int,
    std_in: float,
    std_core: float,
    std_out: float,
    target: str = "kaiming",
    gain: float | None = None,
) -> float:
    """Closed-form scale ``s`` so that ``std(s X_out O X_in^T)`` matches a target init.

    For independent zero-mean entries, ``W_ij = sum_{g,h} X_out[i,g] O[g,h] X_in[j,h]`` is a sum
    of ``G^2`` uncorrelated terms, so ``std(W_ij) = G std_out std_core std_in``; the target std
    is ``gain / sqrt(in)`` for Kaiming-normal (fan-in; default gain ``sqrt(2)``, ReLU),
    ``gain * sqrt(2 / (in + out))`` for Xavier-normal (default gain 1), or ``gain / sqrt(3 in)``
    for ``"linear"`` (default gain 1: the std of ``nn.Linear``'s default init, uniform on
    ``+-1 / sqrt(in)``).

    :param target: one of :data:`INIT_TARGETS`.
    :returns: the scale ``s`` as a float.
    """
    if target == "kaiming":
        gain = math.sqrt(2.0) if gain is None else gain
        target_std = gain / math.sqrt(in_features)
    elif target == "xavier":
        gain = 1.0 if gain is None else gain
        target_std = gain * math.sqrt(2.0 / (in_features + out_features))
    elif target == "linear":
        gain = 1.0 if gain is None else gain
        target_std = gain / math.sqrt(3.0 * in_features)
    else:
        raise ValueError(f"target: expected one of {INIT_TARGETS}, got {target!r}")
    return target_std / (genes * std_out * std_core * std_in)
