"""``reconcile``: the SGR penalty (1/B) * sum_i dist(a_i, d_i) between two boundary gradients."""
from __future__ import annotations

import torch

from sgr_ext import _checks
from sgr_ext.reference import reconcile_torch

IMPLS = ("torch",)


def reconcile(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    distance: str = "l2",
    eps: float = 1e-8,
    impl: str | None = None,
) -> torch.Tensor:
    """Mean distance between per-sample gradients ``a`` and a constant target ``d``.

    Args:
        a: (B, *) float16/bfloat16/float32/float64. Usually ``B * dl_k/du_k``; when it came
            from ``torch.autograd.grad(..., create_graph=True)`` the result backpropagates
            (twice differentiable) to the parameters that produced it.
        d: same shape, dtype and device as ``a``; treated as a constant (no gradient).
        distance: ``"l2"`` (squared L2, ``||a_i - d_i||^2``) or ``"cosine"``
            (``1 - <a_i, d_i> / (|a_i| |d_i| + eps)``), over each flattened sample.
        eps: >= 0, only used by ``"cosine"``.
        impl: ``None`` (fastest available) or ``"torch"``.

    Returns:
        0-dim tensor, float32 for half/single inputs, float64 for float64.
    """
    _checks.tensor("a", a, floating=True, min_dim=1)
    _checks.tensor("d", d, floating=True, min_dim=1)
    _checks.batch("a", a)
    _checks.same_shape("a", a, "d", d)
    distance = _checks.distance(distance)
    eps = _checks.nonneg_finite("eps", eps)
    if impl is not None:
        _checks.choice("impl", impl, IMPLS)
    return reconcile_torch(a, d, distance, eps)
