"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(right kind, wrong value) with a message that names the argument and says what
was expected, so that bad input never reaches a kernel.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

DISTANCES = ("l2", "l2_rel", "cosine")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, *, floating: bool = False, min_dim: int = 0) -> torch.Tensor:
    """Check that ``value`` is a tensor (optionally real floating point, with at least ``min_dim`` dims)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a real floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    return value


def batch(name: str, value: torch.Tensor) -> int:
    """Check that the first dimension (the batch) is non-empty and return its size."""
    if value.dim() == 0 or value.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch along dimension 0, got shape {tuple(value.shape)}")
    return value.shape[0]


def same_shape(name_a: str, a: torch.Tensor, name_d: str, d: torch.Tensor) -> None:
    if a.shape != d.shape:
        raise ValueError(
            f"{name_d}: expected the same shape as {name_a} {tuple(a.shape)}, got {tuple(d.shape)}"
        )
    if a.dtype != d.dtype:
        raise TypeError(f"{name_d}: expected the same dtype as {name_a} ({a.dtype}), got {d.dtype}")
    if a.device != d.device:
        raise ValueError(f"{name_d}: expected the same device as {name_a} ({a.device}), got {d.device}")


def choice(name: str, value, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def distance(value) -> str:
    return choice("distance", value, DISTANCES)


def nonneg_finite(name: str, value) -> float:
    """A real number >= 0 that is not NaN or infinite (lam, eps, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name}: expected a finite number >= 0, got an int with {len(str(value))} digits") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return value


def positive_int(name: str, value, *, at_most: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name}: expected at most {at_most}{what}, got {value}")
    return value


def module_input(name: str, x: torch.Tensor, param: torch.Tensor, owner: str) -> None:
    """``x`` must be on ``param``'s device and, when both are floating point and autocast is
    off, have its dtype (``owner`` names the module the parameter belongs to)."""
    if x.device != param.device:
        raise ValueError(f"{name}: expected a tensor on {param.device} (where {owner}'s parameters are), got {x.device}")
    if (
        x.is_floating_point()
        and param.is_floating_point()
        and x.dtype != param.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        raise TypeError(
            f"{name}: expected dtype {param.dtype} (the dtype of {owner}'s parameters; or enable autocast), "
            f"got {x.dtype}"
        )


def labels(name: str, y, batch_size: int, num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels of shape (B,), each in [0, num_classes)."""
    tensor(name, y)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch_size:
        raise ValueError(f"{name}: expected shape ({batch_size},) to match the batch, got {tuple(y.shape)}")
    if num_classes is not None and y.numel():
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host sync
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got values in [{lo}, {hi}]")
    return y
