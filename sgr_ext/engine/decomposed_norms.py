"""Normalisation layers decomposed into elementary ops, for the BP-free engine's nested
(second-order) forward-AD pass: PyTorch's fused batch_norm / instance_norm / layer_norm
forward-AD formulas are first-order only, the decompositions differentiate any number of
times. ``_DecomposedNorms()`` is the TorchFunctionMode that routes the three to them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _stat_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _normalize(input, mean, var, eps, weight, bias, shape=None):
    """(input - mean) / sqrt(var + eps), then the optional affine (reshaped to ``shape`` if given)."""
    y = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * (weight.view(shape) if shape is not None else weight)
    if bias is not None:
        y = y + (bias.view(shape) if shape is not None else bias)
    return y


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    shape = _stat_shape(input)
    if training or running_mean is None:
        if training and running_mean is not None:
            raise RuntimeError("grad='forward': BatchNorm running statistics must be frozen in a transformed pass")
        dims = [0] + list(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    return _normalize(input, mean, var, eps, weight, bias, shape)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    shape = _stat_shape(input)
    if use_input_stats:
        if running_mean is not None:
            raise RuntimeError("grad='forward': InstanceNorm running statistics are not supported")
        dims = list(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)
        var = input.var(dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    return _normalize(input, mean, var, eps, weight, bias, shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = list(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    var = input.var(dims, correction=0, keepdim=True)
    return _normalize(input, mean, var, eps, weight, bias)


_DECOMPOSED = {F.batch_norm: _batch_norm, F.instance_norm: _instance_norm, F.layer_norm: _layer_norm}


class _DecomposedNorms(TorchFunctionMode):
    """Route batch_norm / instance_norm / layer_norm to decompositions with correct 2nd-order forward AD."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = _DECOMPOSED.get(func)
        return (impl or func)(*args, **(kwargs or {}))
