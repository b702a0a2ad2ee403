"""Small dtype and shape helpers shared by the fast paths (ops, kernels' callers, engines) and
the plain-torch oracles in ``sgr_ext.reference``, so neither side imports the other's module."""
from __future__ import annotations

import contextlib

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every narrower float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def penalty_dtype(dtype: torch.dtype, distance: str) -> torch.dtype:
    """What ``reconcile`` computes its per-sample sums in: ``accumulate_dtype`` for l2, and
    float64 for cosine, whose |a|^2 leaves float32's range beyond |a| ~ 1e19 (and underflows
    below 1e-19) although the cosine itself does not depend on the scale."""
    return torch.float64 if distance == "cosine" else accumulate_dtype(dtype)


def channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for a (n, C, *spatial) tensor of ``ndim`` dims."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def autocast_off(device_type: str):
    """A context with autocast disabled on ``device_type``: ``torch.autocast(..., enabled=False)``
    where autocast is on, else a no-op context (entering and leaving an autocast context costs
    microseconds, and the dual ops enter one per call, many per step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
