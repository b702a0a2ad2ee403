"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(right kind, wrong value) with a message that names the argument and says what
was expected, so that bad input never reaches a kernel.
"""
from __future__ import annotations

import torch

# the plain-value checks live in a torch-free module (the command line uses them before importing torch)
from sgr_ext._options import choice, distance, nonneg_finite, positive_int  # noqa: F401  (re-exported)

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
        label_range(name, num_classes, lo, hi)
    return y


def label_range(name: str, num_classes: int, lo: int, hi: int) -> None:
    """Class labels whose smallest is ``lo`` and largest ``hi`` must lie in [0, num_classes)."""
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got values in [{lo}, {hi}]")


def first_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The first module a ``Sequential`` chain applies (descending into nested ``Sequential``s);
    ``module`` itself when it is not a ``Sequential``."""
    while isinstance(module, torch.nn.Sequential) and len(module):
        module = module[0]
    return module


_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def layer_input(name: str, x: torch.Tensor, layer: torch.nn.Module, owner: str) -> None:
    """``x`` must suit ``layer``, the first layer of ``owner``: a floating-point tensor (not raw
    uint8 pixels) for a Conv or Linear, channels first for a Conv, features last for a Linear."""
    if not isinstance(layer, _CONVS + (torch.nn.Linear,)):
        return
    if not (x.is_floating_point() or x.is_complex()):
        hint = " (images: x.float() / 255, then normalise)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name}: expected a floating-point tensor ({owner} starts with {layer}), got dtype "
                        f"{x.dtype}{hint}")
    if isinstance(layer, torch.nn.Linear):
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"{name}: expected (B, ..., {layer.in_features}) inputs ({owner} starts with {layer}), "
                             f"got shape {tuple(x.shape)}")
        return
    dims, layout = next((d, lay) for conv, d, lay in zip(_CONVS, (3, 4, 5), ("B, C, L", "B, C, H, W", "B, C, D, H, W"))
                        if isinstance(layer, conv))
    c = layer.in_channels
    if x.dim() != dims or x.shape[1] != c:
        hint = " (channels last? use x.movedim(-1, 1))" if x.dim() == dims and x.shape[-1] == c else ""
        raise ValueError(f"{name}: expected ({layout}) inputs with C = {c} channels first ({owner} starts with "
                         f"{layer}), got shape {tuple(x.shape)}{hint}")
