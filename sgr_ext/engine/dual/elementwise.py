"""Closed-form dual rules shared by module and function rules: activations, softmax,
LayerNorm, linear maps and matmul (``t_out`` = the derivative of the op along ``t``)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from sgr_ext.engine.dual.fallback import _fallback
from sgr_ext.engine.dual.value import Dual, _with_bias
from sgr_ext._tensor_util import accumulate_dtype


def _relu(x, inplace: bool = False):
    if not isinstance(x, Dual):
        return torch.relu(x)
    mask = x.primal > 0
    return Dual(x.P.mul_(mask) if inplace else x.P * mask)


def _unary(f: Callable, fprime: Callable):
    """y = f(p), t_out = f'(p) t for an elementwise f; ``fprime(p, y)``."""

    def rule(x, *args, **kwargs):
        if not isinstance(x, Dual):
            return f(x, *args, **kwargs)
        y = f(x.primal, *args, **kwargs)
        return Dual(torch.stack([y, fprime(x.primal, y, *args, **kwargs) * x.tangent]))

    return rule


def _gelu_prime(p, y, approximate: str = "none"):
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (p + 0.044715 * p**3)
        th = torch.tanh(inner)
        return 0.5 * (1 + th) + 0.5 * p * (1 - th * th) * k * (1 + 3 * 0.044715 * p * p)
    cdf = 0.5 * (1 + torch.erf(p * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * p * p) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + p * pdf


_gelu = _unary(F.gelu, _gelu_prime)
_tanh = _unary(torch.tanh, lambda p, y: 1 - y * y)
_sigmoid = _unary(torch.sigmoid, lambda p, y: y * (1 - y))
_silu = _unary(F.silu, lambda p, y: torch.sigmoid(p) * (1 + p * (1 - torch.sigmoid(p))))


def _leaky_relu(x, negative_slope=0.01, inplace=False):
    if not isinstance(x, Dual):
        return F.leaky_relu(x, negative_slope)
    # a 0-dim tensor of the activation's dtype: Python scalars would make a float32 slope
    slope = torch.where(x.primal > 0, x.P.new_ones(()), x.P.new_full((), negative_slope))
    return Dual(x.P * slope)


def _softmax(x, dim=None, _stacklevel=3, dtype=None, *, log=False):
    if not isinstance(x, Dual) or dim is None:
        return _fallback(F.log_softmax if log else F.softmax, (x,), {"dim": dim, "dtype": dtype})
    p, t = x.primal, x.tangent
    if dtype is not None:
        p, t = p.to(dtype), t.to(dtype)
    if log:
        y = torch.log_softmax(p, dim)
        yt = t - (y.exp() * t).sum(dim, keepdim=True)
    else:
        y = torch.softmax(p, dim)
        yt = y * (t - (y * t).sum(dim, keepdim=True))
    return Dual(torch.stack([y, yt]))


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if not isinstance(x, Dual) or isinstance(weight, Dual) or isinstance(bias, Dual):
        return _fallback(F.layer_norm, (x, normalized_shape, weight, bias, eps), {})
    dims = tuple(range(-len(normalized_shape), 0))
    p, t = x.primal, x.tangent
    acc = accumulate_dtype(p.dtype)
    pf, tf = p.to(acc), t.to(acc)
    var, mean = torch.var_mean(pf, dim=dims, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    xh = (pf - mean) * rstd
    tc = tf - tf.mean(dims, keepdim=True)
    yt = (tc - xh * (xh * tc).mean(dims, keepdim=True)) * rstd
    y = xh
    if weight is not None:
        y, yt = y * weight, yt * weight
    if bias is not None:
        y = y + bias
    return Dual(torch.stack([y.to(p.dtype), yt.to(p.dtype)]))


def _linear(x, weight, bias=None):
    if not isinstance(x, Dual) or isinstance(weight, Dual) or isinstance(bias, Dual):
        return _fallback(F.linear, (x, weight, bias), {})
    return Dual(_with_bias(F.linear(x.P, weight), bias, -1))


def _matmul(a, b):
    if isinstance(a, Dual) and isinstance(b, Dual):
        if a.ndim < 2 or b.ndim < 2:
            return _fallback(torch.matmul, (a, b), {})
        first = torch.matmul(a.P[:1], b.P)  # [p_a p_b, p_a t_b]
        return Dual(torch.stack([first[0], first[1] + torch.matmul(a.tangent, b.primal)]))
    if isinstance(a, Dual):
        if b.dim() > a.ndim or a.ndim < 2:
            return _fallback(torch.matmul, (a, b), {})
        return Dual(torch.matmul(a.P, b))
    if a.dim() > b.ndim or b.ndim < 2:
        return _fallback(torch.matmul, (a, b), {})
    return Dual(torch.matmul(a, b.P))
