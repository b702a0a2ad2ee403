"""Plain PyTorch implementations of every op: the oracle and the portable fallback.

Nothing here is fused or clever on purpose. Fast paths (Triton, C++) are tested
against these functions run in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sgr_ext._tensor_util import accumulate_dtype, penalty_dtype


def reconcile_per_sample(a: torch.Tensor, d: torch.Tensor, distance: str, eps: float) -> torch.Tensor:
    """dist(a_i, d_i) for every sample i.

    a, d: (B, *) of one floating dtype. Returns (B,) in ``penalty_dtype`` (float32 for l2 and
    l2_rel of half/single types, float64 for float64 and for cosine). Differentiable (any order)
    in ``a``; ``d`` is treated as a constant. l2_rel is ``||a_i - d_i||^2 / (||d_i||^2 + eps)``.
    """
    acc = penalty_dtype(a.dtype, distance)
    a2 = a.reshape(a.shape[0], -1).to(acc)
    d2 = d.detach().reshape(d.shape[0], -1).to(acc)
    if distance == "l2":
        return (a2 - d2).pow(2).sum(dim=1)
    if distance == "l2_rel":
        return (a2 - d2).pow(2).sum(dim=1) / (d2.pow(2).sum(dim=1) + eps)
    dot = (a2 * d2).sum(dim=1)
    return 1.0 - dot / (a2.norm(dim=1) * d2.norm(dim=1) + eps)


def reconcile_torch(a: torch.Tensor, d: torch.Tensor, distance: str, eps: float) -> torch.Tensor:
    """(1/B) * sum_i dist(a_i, d_i) as a 0-dim tensor in the accumulate dtype."""
    return reconcile_per_sample(a, d, distance, eps).mean().to(accumulate_dtype(a.dtype))


def linear_cross_entropy_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """cross_entropy(x @ weight.T + bias, target), logits accumulated in float32 or float64.

    x: (N, H), weight: (V, H), bias: (V,) or None, target: (N,) int64.
    Returns a 0-dim tensor (reduction "mean"/"sum") or (N,) for "none".
    """
    acc = accumulate_dtype(x.dtype)
    logits = F.linear(x, weight, bias).to(acc)
    return F.cross_entropy(logits, target, reduction=reduction, ignore_index=ignore_index)
