"""CP (low-rank multimodal) fusion as pure torch contractions.

No Pyro, no state. Every function broadcasts over arbitrary leading *particle* dims on the
factors (as produced by ``vectorize_particles``, ``Predictive(parallel=True)`` or NUTS), so a
factor of shape ``(S, d, R)`` combined with inputs of shape ``(B, d)`` gives outputs of shape
``(S, B, P)``.

Notation: M modalities, inputs ``x_m`` of shape ``(..., B, d_m)``; with ``append_one`` the
augmented input is ``x~_m = [x_m, 1]`` of size ``d~_m = d_m + 1``; factors ``U_m`` of shape
``(..., d~_m, R)``; output factor ``U_out`` of shape ``(..., P, R)``; optional CP weights
``w`` of shape ``(..., R)`` and bias ``b`` of shape ``(..., P)``::

    y = ((prod_m x~_m U_m) * w) U_out^T + b

The dense weight tensor ``W = [[w; U_1, ..., U_M, U_out]]`` of shape ``(d~_1, ..., d~_M, P)`` is
only ever built by :func:`cp_to_dense`, which exists for tests and export.

Optional *main effects* ``V = [V_1, ..., V_M]`` of shape ``(..., P, sum_m d_m)`` add a plain
linear term ``sum_m x_m V_m^T`` (:func:`cp_main_effects`); with ``append_one`` they are the
entries of ``W`` where every mode but one sits on the constant row
(:func:`embed_main_effects`).
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "cp_project",
    "cp_scores",
    "cp_fusion",
    "cp_main_effects",
    "cp_to_dense",
    "embed_main_effects",
    "cp_dense_fusion",
    "cp_component_norms",
]


def cp_project(x: Tensor | None, factor: Tensor, append_one: bool = True) -> Tensor:
    """Project one modality onto the rank axis: ``x~ U``.

    With ``append_one`` the constant 1 is not concatenated to ``x``; instead the last row of
    ``factor`` is added, which is the same number without copying the batch. A missing modality
    (``x is None``) is replaced by its *mean* input: ``[0, ..., 0, 1]`` with append-one (giving
    the last row of ``factor``), or the zero vector without it.

    :param x: input of shape ``(..., B, d)`` or ``None`` for a missing modality.
    :param factor: factor of shape ``(..., d + append_one, R)``.
    :param append_one: whether ``factor`` has an extra last row for the constant input.
    :returns: tensor of shape ``(..., B, R)`` (or ``(..., 1, R)`` for a missing modality).
    """
    if x is None:
        if append_one:
            return factor[..., -1:, :]
        return factor.new_zeros(factor.shape[:-2] + (1, factor.shape[-1]))
    if append_one:
        return torch.matmul(x, factor[..., :-1, :]) + factor[..., -1:, :]
    return torch.matmul(x, factor)


def cp_scores(
    inputs: Sequence[Tensor | None], factors: Sequence[Tensor], append_one: bool = True
) -> Tensor:
    """The rank-axis activations ``prod_m (x~_m U_m)``: component ``r``'s score per row.

    :param inputs: M tensors ``(..., B, d_m)`` or ``None`` (see :func:`cp_project`).
    :param factors: M factors ``(..., d_m + append_one, R)``.
    :returns: ``(..., B, R)``.
    """
    scores = None
    for x, factor in zip(inputs, factors, strict=False):
        proj = cp_project(x, factor, append_one)
        scores = proj if scores is None else scores * proj
    return scores


def cp_fusion(
    inputs: Sequence[Tensor | None],
    factors: Sequence[Tensor],
    out_factor: Tensor,
    weights: Tensor | None = None,
    bias: Tensor | None = None,
    append_one: bool = True,
) -> Tensor:
    """Fuse M modalities through a CP-factorized weight tensor without building it.

    Cost ``O(B R (sum_m d~_m + P))``.

    :param inputs: M tensors of shape ``(..., B, d_m)``; entries may be ``None`` (missing
        modality, see :func:`cp_project`), but not all of them.
    :param factors: M factors of shape ``(..., d_m + append_one, R)``.
    :param out_factor: output factor of shape ``(..., P, R)``.
    :param weights: optional CP weights of shape ``(..., R)``.
    :param bias: optional bias of shape ``(..., P)``.
    :param append_one: whether every factor carries the constant row.
    :returns: tensor of shape ``(..., B, P)`` (leading dims broadcast between inputs and factors).
    """
    if len(inputs) != len(factors):
        raise ValueError(
            f"inputs: expected {len(factors)} modalities (one per factor), got {len(inputs)}"
        )
    hidden = cp_scores(inputs, factors, append_one)
    if weights is not None:
        hidden = hidden * weights.unsqueeze(-2)
    out = torch.matmul(hidden, out_factor.transpose(-1, -2))
    if bias is not None:
        out = out + bias.unsqueeze(-2)
    return out


def cp_main_effects(
    inputs: Sequence[Tensor | None], weight: Tensor, in_features: Sequence[int]
) -> Tensor:
    """The linear main-effects term ``sum_m x_m V_m^T``.

    A missing modality (``None``) contributes nothing: its mean input (zero for standardized
    inputs), as in :func:`cp_project`.

    :param inputs: M tensors of shape ``(..., B, d_m)`` or ``None``, not all ``None``.
    :param weight: ``V`` of shape ``(..., P, sum_m d_m)``, the columns of modality ``m`` at
        ``sum_{k<m} d_k`` onwards.
    :param in_features: ``(d_1, ..., d_M)``.
    :returns: tensor of shape ``(..., B, P)``.
    """
    if weight.shape[-1] != sum(in_features):
        raise ValueError(
            f"weight: expected {sum(in_features)} columns (sum of in_features "
            f"{tuple(in_features)}), got shape {tuple(weight.shape)}"
        )
    out, start = None, 0
    for x, d in zip(inputs, in_features, strict=True):
        if x is not None:
            term = torch.matmul(x, weight[..., start : start + d].transpose(-1, -2))
            out = term if out is None else out + term
        start += d
    if out is None:
        raise ValueError("inputs: expected at least one modality that is not None, got none")
    return out


def embed_main_effects(dense: Tensor, weight: Tensor, in_features: Sequence[int]) -> Tensor:
    """Add main effects ``V`` ``(..., P, sum_m d_m)`` to a dense append-one fusion tensor
    ``(..., d~_1, ..., d~_M, P)``: ``V_m[p, i]`` goes to the entry with index ``i`` on mode
    ``m`` and the constant row on every other mode (tests and export only).

    :returns: a new tensor of the shape of ``dense``.
    """
    m = len(in_features)
    out, start = dense.clone(), 0
    for k, d in enumerate(in_features):
        index = [-1] * m
        index[k] = slice(0, d)
        sub = (Ellipsis, *index, slice(None))
        out[sub] = out[sub] + weight[..., start : start + d].transpose(-1, -2)
        start += d
    return out


def cp_to_dense(
    factors: Sequence[Tensor], out_factor: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Reconstruct the dense weight tensor ``[[w; U_1, ..., U_M, U_out]]``.

    For tests and export only: the size is ``prod_m d~_m * P``.

    :param factors: M factors of shape ``(..., d~_m, R)``.
    :param out_factor: output factor of shape ``(..., P, R)``.
    :param weights: optional CP weights of shape ``(..., R)``.
    :returns: tensor of shape ``(..., d~_1, ..., d~_M, P)``.
    """
    mats = list(factors) + [out_factor]
    if len(mats) + 1 > len(string.ascii_lowercase):
        raise ValueError(f"factors: at most 24 modalities supported, got {len(factors)}")
    letters = string.ascii_lowercase[: len(mats)]
    operands = list(mats)
    subs = [f"...{c}z" for c in letters]
    if weights is not None:
        operands.append(weights)
        subs.append("...z")
    return torch.einsum(",".join(subs) + f"->...{letters}", *operands)


def cp_dense_fusion(
    inputs: Sequence[Tensor | None],
    dense: Tensor,
    bias: Tensor | None = None,
    append_one: bool = True,
) -> Tensor:
    """Contract a dense fusion tensor with the (augmented) inputs (TFN-style reference).

    :param inputs: M tensors of shape ``(B, d_m)`` (``None``: mean input, as in
        :func:`cp_project`).
    :param dense: weight tensor of shape ``(..., d~_1, ..., d~_M, P)``.
    :param bias: optional bias of shape ``(..., P)``.
    :param append_one: whether to append the constant 1 to each input.
    :returns: tensor of shape ``(..., B, P)``.
    """
    m = len(inputs)
    sizes = dense.shape[-m - 1 : -1]
    batch = next(x.shape[-2] for x in inputs if x is not None)
    aug = []
    for x, size in zip(inputs, sizes, strict=False):
        if x is None:
            x = dense.new_zeros(batch, size - int(append_one))
        if append_one:
            x = torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)
        aug.append(x)
    letters = string.ascii_lowercase[:m]
    subs = ",".join(f"B{c}" for c in letters) + f",...{letters}P->...BP"
    out = torch.einsum(subs, *aug, dense)
    if bias is not None:
        out = out + bias.unsqueeze(-2)
    return out


def cp_component_norms(
    factors: Sequence[Tensor], out_factor: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Frobenius norm of each rank-one component of the CP tensor.

    ``||w_r u_1r o ... o u_Mr o u_out,r||_F = |w_r| prod_m ||u_mr|| * ||u_out,r||`` exactly, so
    this is the size of what dropping component ``r`` removes from the weight tensor.

    :returns: tensor of shape ``(..., R)``.
    """
    norms = out_factor.norm(dim=-2)
    for factor in factors:
        norms = norms * factor.norm(dim=-2)
    if weights is not None:
        norms = norms * weights.abs()
    return norms
