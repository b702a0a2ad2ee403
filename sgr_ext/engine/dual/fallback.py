"""The general dual rule: ``torch.autograd.forward_ad`` on the two halves of every dual
argument (exact, slower, one copy), with composites for the ops whose forward-AD formulas
do not survive a later reverse pass."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sgr_ext.engine.dual.value import Dual, _tree_map, pack


def _norm_affine(y, weight, bias, shape):
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _batch_norm_composite(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if not training and running_mean is not None and running_var is not None:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    if training and running_mean is not None:  # not reached under frozen_norm_stats
        with torch.no_grad():
            n = x.numel() / x.shape[1]
            p_mean, p_var = fwAD.unpack_dual(mean)[0].flatten(), fwAD.unpack_dual(var)[0].flatten()
            running_mean.mul_(1 - momentum).add_(momentum * p_mean)
            running_var.mul_(1 - momentum).add_(momentum * p_var * n / max(n - 1, 1))
    return _norm_affine(xc * torch.rsqrt(var + eps), weight, bias, [1, -1] + [1] * (x.dim() - 2))


def _layer_norm_composite(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(dims, keepdim=True)
    return _norm_affine(xc * torch.rsqrt(var + eps), weight, bias, list(normalized_shape))


def _group_norm_composite(x, num_groups, weight=None, bias=None, eps=1e-5):
    n, c = x.shape[:2]
    g = x.reshape(n, num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    gc = g - mean
    var = (gc * gc).mean(-1, keepdim=True)
    y = (gc * torch.rsqrt(var + eps)).reshape(x.shape)
    return _norm_affine(y, weight, bias, [1, -1] + [1] * (x.dim() - 2))


def _instance_norm_composite(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                             momentum=0.1, eps=1e-5):
    """Never updates running statistics: the dual pass recomputes a forward the caller ran."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if use_input_stats:
        dims = tuple(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        xc = x - mean
        y = xc * torch.rsqrt((xc * xc).mean(dims, keepdim=True) + eps)
    else:
        y = (x - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    return _norm_affine(y, weight, bias, shape)


def _softmax_composite(x, dim, dtype=None, log=False):
    if dtype is not None:
        x = x.to(dtype)
    shifted = x - x.detach().amax(dim, keepdim=True)
    logp = shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))
    return logp if log else torch.exp(logp)


_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_LOG_SOFTMAX = {torch.log_softmax, F.log_softmax, torch.Tensor.log_softmax}


class _SafeForwardAD(TorchFunctionMode):
    """Inside the forward-AD fallback, route ops whose forward-AD formulas do not survive a
    later reverse pass to composites of elementary ops:

    - batch_norm (batch statistics), instance_norm, layer_norm, group_norm: their tangent formulas use the
      saved mean / inverse std, which are non-differentiable outputs, so a backward through
      the tangent silently misses the statistics' dependence on the input (wrong gradients);
    - softmax / log_softmax: their formulas update a saved output in place (backward fails).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm_composite(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm_composite(*args, **kwargs)
        if func is F.group_norm:
            return _group_norm_composite(*args, **kwargs)
        if func is F.instance_norm:
            return _instance_norm_composite(*args, **kwargs)
        if func in _SOFTMAX or func in _LOG_SOFTMAX:
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None:
                return func(*args, **kwargs)
            return _softmax_composite(x, dim, kwargs.get("dtype"), log=func in _LOG_SOFTMAX)
        return func(*args, **kwargs)


def _fallback(fn, args, kwargs):
    """Forward-mode AD on the two halves of every dual argument; outputs re-stacked."""
    with fwAD.dual_level(), _SafeForwardAD():

        def to_dual(v):
            return fwAD.make_dual(v.primal, v.tangent) if isinstance(v, Dual) else v

        out = fn(*_tree_map(to_dual, tuple(args)), **_tree_map(to_dual, dict(kwargs)))

        def from_dual(v):
            if isinstance(v, torch.Tensor):
                p, t = fwAD.unpack_dual(v)
                return p if t is None else pack(p, t)
            return v

        return _tree_map(from_dual, out)


def _fallback_method(x, name, args, kwargs):
    return _fallback(lambda s, *a, **k: getattr(s, name)(*a, **k), (x, *args), kwargs)
