"""Hand-written forward mode ("jets") for common layers: the fast path of the BP-free engine.

PyTorch's forward-mode AD (dual tensors and ``torch.func.jvp``) represents the missing
tangent of every constant operand (weights, biases, scalars) by an "efficient zero
tensor", and in torch 2.x each operation on one runs its shape computation through a
Python meta function: about 0.1-3 ms of CPU time per layer, independent of tensor size,
which dwarfs the arithmetic of a CIFAR-sized block. Its second-order forward formulas
for batch_norm / layer_norm are also wrong (see ``forward_grad``). This module
propagates the needed derivatives explicitly, for a fixed set of layers.

A ``Jet`` carries a value p and its derivatives along two directions: ``a`` (the input
tangent w of the SGR penalty), ``b`` (the activity tangents) and the mixed second
derivative ``ab``. ``None`` stands for an identically zero component and costs nothing,
so a first-order pass carries (p, b) only.

Supported: ``nn.Sequential`` containers; Linear; Conv1d/2d/3d; BatchNorm1d/2d/3d (batch
statistics or running statistics); LayerNorm; GroupNorm; ReLU, LeakyReLU, Tanh, Sigmoid;
MaxPool1d/2d, AvgPool1d/2d, AdaptiveAvgPool1d/2d, Flatten, Unflatten, Identity, Dropout
in eval mode or with p = 0; cross-entropy. ``supports`` says whether a block qualifies;
the engine falls back to ``torch.func`` for anything else.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _mul(x: Optional[Tensor], y: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None or y is None else x * y


def _add(*xs: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for x in xs:
        if x is not None:
            out = x if out is None else out + x
    return out


class Jet:
    """p with d/da, d/db and d2/(da db); None = zero."""

    __slots__ = ("p", "a", "b", "ab")

    def __init__(self, p: Tensor, a: Optional[Tensor] = None, b: Optional[Tensor] = None,
                 ab: Optional[Tensor] = None):
        self.p, self.a, self.b, self.ab = p, a, b, ab

    def map(self, fn: Callable[[Tensor], Tensor], bias: Optional[Tensor] = None) -> "Jet":
        """A linear map ``fn`` on every component; ``bias`` is added to the value only."""
        p = fn(self.p)
        if bias is not None:
            p = p + bias
        return Jet(p, *(None if t is None else fn(t) for t in (self.a, self.b, self.ab)))

    def unary(self, y: Tensor, d1: Tensor, d2: Optional[Tensor]) -> "Jet":
        """An elementwise f with y = f(p), d1 = f'(p), d2 = f''(p) (None when f is piecewise linear)."""
        ab = _mul(d1, self.ab)
        if d2 is not None and self.a is not None and self.b is not None:
            ab = _add(ab, d2 * self.a * self.b)
        return Jet(y, _mul(d1, self.a), _mul(d1, self.b), ab)

    def __add__(self, other: "Jet") -> "Jet":
        return Jet(self.p + other.p, _add(self.a, other.a), _add(self.b, other.b), _add(self.ab, other.ab))

    def __sub__(self, other: "Jet") -> "Jet":
        def sub(x, y):
            return x if y is None else (-y if x is None else x - y)

        return Jet(self.p - other.p, sub(self.a, other.a), sub(self.b, other.b), sub(self.ab, other.ab))

    def __mul__(self, other: "Jet") -> "Jet":
        return Jet(
            self.p * other.p,
            _add(_mul(self.a, other.p), _mul(self.p, other.a)),
            _add(_mul(self.b, other.p), _mul(self.p, other.b)),
            _add(_mul(self.ab, other.p), _mul(self.a, other.b), _mul(self.b, other.a), _mul(self.p, other.ab)),
        )

    def mean(self, dims, keepdim: bool = True) -> "Jet":
        return self.map(lambda t: t.mean(dims, keepdim=keepdim))

    def rsqrt_eps(self, eps: float) -> "Jet":
        y = torch.rsqrt(self.p + eps)
        y3 = y * y * y
        return self.unary(y, -0.5 * y3, 0.75 * y3 * y * y)


# ----------------------------------------------------------------------------- layers


def _normalize(j: Jet, dims, eps: float) -> tuple[Jet, Tensor]:
    """(x - mean) / sqrt(var + eps) over ``dims`` (biased variance); also returns the value's mean."""
    mu = j.mean(dims)
    xc = j - mu
    var = (xc * xc).mean(dims)
    return xc * var.rsqrt_eps(eps), mu.p


def _channel_view(t: Optional[Tensor], ndim: int) -> Optional[Tensor]:
    return None if t is None else t.view([1, -1] + [1] * (ndim - 2))


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, j: Jet, stats: Optional[list]) -> Jet:
    nd = j.p.dim()
    use_batch = m.training or m.running_mean is None
    if use_batch:
        dims = [0] + list(range(2, nd))
        y, mu = _normalize(j, dims, m.eps)
        if stats is not None and m.training and m.track_running_stats and m.running_mean is not None:
            n = j.p.numel() // j.p.shape[1]
            var = j.p.var(dims, correction=1 if n > 1 else 0)
            stats.append((m, mu.reshape(-1), var))
    else:
        scale = torch.rsqrt(m.running_var + m.eps)
        y = j.map(lambda t: t * _channel_view(scale, nd), bias=_channel_view(-m.running_mean * scale, nd))
    if m.weight is not None:
        w = _channel_view(m.weight, nd)
        y = y.map(lambda t: t * w, bias=_channel_view(m.bias, nd))
    elif m.bias is not None:
        y = Jet(y.p + _channel_view(m.bias, nd), y.a, y.b, y.ab)
    return y


def update_running_stats(stats: list) -> None:
    """Apply the running-statistics update a train-mode forward would have made (once)."""
    with torch.no_grad():
        for m, mean, var in stats:
            m.num_batches_tracked.add_(1)
            f = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            m.running_mean.mul_(1 - f).add_(mean.to(m.running_mean.dtype), alpha=f)
            m.running_var.mul_(1 - f).add_(var.to(m.running_var.dtype), alpha=f)


def _layer_norm(m: nn.LayerNorm, j: Jet) -> Jet:
    dims = list(range(-len(m.normalized_shape), 0))
    y, _ = _normalize(j, dims, m.eps)
    if m.weight is not None:
        y = y.map(lambda t: t * m.weight, bias=m.bias)
    elif m.bias is not None:
        y = Jet(y.p + m.bias, y.a, y.b, y.ab)
    return y


def _group_norm(m: nn.GroupNorm, j: Jet) -> Jet:
    shape = j.p.shape
    g = j.map(lambda t: t.reshape(shape[0], m.num_groups, -1))
    y, _ = _normalize(g, [2], m.eps)
    y = y.map(lambda t: t.reshape(shape))
    if m.affine:
        y = y.map(lambda t: t * _channel_view(m.weight, len(shape)), bias=_channel_view(m.bias, len(shape)))
    return y


def _max_pool(m, j: Jet, nd: int) -> Jet:
    fn = F.max_pool1d if nd == 1 else F.max_pool2d
    out, idx = fn(j.p, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True)
    flat_idx = idx.flatten(2)

    def pick(t):
        return None if t is None else t.flatten(2).gather(2, flat_idx).view(out.shape)

    return Jet(out, pick(j.a), pick(j.b), pick(j.ab))


def _relu(m, j: Jet) -> Jet:
    mask = (j.p > 0).to(j.p.dtype)
    return j.unary(torch.relu(j.p), mask, None)


def _leaky(m: nn.LeakyReLU, j: Jet) -> Jet:
    slope = torch.where(j.p > 0, torch.ones_like(j.p), torch.full_like(j.p, m.negative_slope))
    return j.unary(F.leaky_relu(j.p, m.negative_slope), slope, None)


def _tanh(m, j: Jet) -> Jet:
    y = torch.tanh(j.p)
    d1 = 1 - y * y
    return j.unary(y, d1, -2 * y * d1)


def _sigmoid(m, j: Jet) -> Jet:
    y = torch.sigmoid(j.p)
    d1 = y * (1 - y)
    return j.unary(y, d1, d1 * (1 - 2 * y))


def _linear_layer(m: nn.Linear, j: Jet) -> Jet:
    return j.map(lambda t: F.linear(t, m.weight), bias=m.bias)


def _conv(m: nn.modules.conv._ConvNd, j: Jet) -> Jet:
    bias = None if m.bias is None else _channel_view(m.bias, j.p.dim())
    return j.map(lambda t: m._conv_forward(t, m.weight, None), bias=bias)


def _module_map(m, j: Jet) -> Jet:
    return j.map(m)


_LINEAR_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten,
                   nn.Unflatten, nn.Identity)


def _layer_fn(m: nn.Module):
    """The jet implementation of one leaf module, or None when it is not supported."""
    if isinstance(m, nn.Linear):
        return _linear_layer
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
        return None  # needs the statistics list; handled in ``run``
    if isinstance(m, nn.LayerNorm):
        return _layer_norm
    if isinstance(m, nn.GroupNorm):
        return _group_norm
    if isinstance(m, nn.ReLU):
        return _relu
    if isinstance(m, nn.LeakyReLU):
        return _leaky
    if isinstance(m, nn.Tanh):
        return _tanh
    if isinstance(m, nn.Sigmoid):
        return _sigmoid
    if isinstance(m, nn.MaxPool1d):
        return lambda mod, j: _max_pool(mod, j, 1)
    if isinstance(m, nn.MaxPool2d):
        return lambda mod, j: _max_pool(mod, j, 2)
    if isinstance(m, _LINEAR_MODULES):
        return _module_map
    if isinstance(m, nn.Dropout) and (not m.training or m.p == 0):
        return _module_map
    return None


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)


def _supported_module(m: nn.Module) -> bool:
    if type(m) is nn.Sequential:
        return all(_supported_module(c) for c in m)
    if m._forward_hooks or m._forward_pre_hooks:
        return False  # user hooks would be skipped by the jet interpreter
    return _is_bn(m) or _layer_fn(m) is not None


def supports(block: nn.Module, loss_fn) -> bool:
    """Whether ``block`` (module and head) and the loss run on jets."""
    return loss_fn is F.cross_entropy and _supported_module(block.module) and _supported_module(block.head)


def layer(m: nn.Module, j: Jet, stats: Optional[list] = None) -> Jet:
    """One supported leaf module on a jet (differentiable in the module's parameters)."""
    if _is_bn(m):
        return _batch_norm(m, j, stats)
    return _layer_fn(m)(m, j)


def run(m: nn.Module, j: Jet, site_hook=None, stats: Optional[list] = None) -> Jet:
    """Run a supported module tree on a jet; ``site_hook(module, jet_in, jet_out) -> jet_out``
    is called for every leaf module with trainable parameters of its own."""
    if type(m) is nn.Sequential:
        for c in m:
            j = run(c, j, site_hook, stats)
        return j
    out = layer(m, j, stats)
    if site_hook is not None and any(p.requires_grad for p in m.parameters(recurse=False)):
        out = site_hook(m, j, out)
    return out


def cross_entropy(j: Jet, y: Tensor, per_sample: bool) -> Jet:
    """Per-sample cross-entropy (mean over any positions after the class dimension) of logits ``j``,
    or its sum over the batch (= B * batch-mean loss) when ``per_sample`` is False."""
    logits = j.p
    pi = torch.softmax(logits, dim=1)
    idx = y.unsqueeze(1)

    def at_y(t):
        return t.gather(1, idx).squeeze(1)

    def expect(t):
        return (pi * t).sum(1)

    value = torch.logsumexp(logits, 1) - at_y(logits)
    ea = None if j.a is None else expect(j.a)
    eb = None if j.b is None else expect(j.b)
    a = None if j.a is None else ea - at_y(j.a)
    b = None if j.b is None else eb - at_y(j.b)
    ab = None
    if j.ab is not None:
        ab = expect(j.ab) - at_y(j.ab)
    if j.a is not None and j.b is not None:
        ab = _add(ab, expect(j.a * j.b) - ea * eb)
    out = Jet(value, a, b, ab)
    if out.p.dim() > 1:
        out = out.map(lambda t: t.reshape(t.shape[0], -1).mean(1))
    if not per_sample:
        out = out.map(lambda t: t.sum())
    return out
