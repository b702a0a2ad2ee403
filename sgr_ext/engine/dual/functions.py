"""Dual rules for function calls (``FUNCTION_RULES``: torch / F / operator functions) and for
tensor methods (``METHOD_RULES``) met in a traced graph."""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from sgr_ext.engine.dual.elementwise import (
    _gelu, _layer_norm, _leaky_relu, _linear, _matmul, _relu, _sigmoid, _silu, _softmax, _tanh,
)
from sgr_ext.engine.dual.fallback import _fallback, _fallback_method
from sgr_ext.engine.dual.value import Dual, _align, _const_ok, _has_dual, _is_dual, _pd, _refuse


def _add(a, b, alpha=1, sign=1):
    k = sign * alpha
    if _is_dual(a) and _is_dual(b):
        nd = max(a.ndim, b.ndim)
        Pa, Pb = _align(a.P, nd), _align(b.P, nd)
        return Dual(Pa + Pb if k == 1 else Pa + k * Pb)
    if _is_dual(a):  # dual + constant: the constant shifts the primal only
        if not _const_ok(b, a):
            return _fallback(torch.add, (a, b), {"alpha": k})
        p = a.primal + k * b
        return Dual(torch.stack([p, a.tangent.expand(p.shape)]))
    if not _const_ok(a, b):
        return _fallback(torch.add, (a, b), {"alpha": k})
    p = a + k * b.primal
    return Dual(torch.stack([p, (k * b.tangent).expand(p.shape)]))


def _fn_add(a, b, *, alpha=1, out=None):
    if out is not None:
        return _fallback(torch.add, (a, b), {"alpha": alpha, "out": out})
    return _add(a, b, alpha, 1)


def _fn_sub(a, b, *, alpha=1, out=None):
    if out is not None:
        return _fallback(torch.sub, (a, b), {"alpha": alpha, "out": out})
    return _add(a, b, alpha, -1)


def _fn_rsub(a, b):  # b - a
    return _add(b, a, 1, -1)


def _fn_mul(a, b, *, out=None):
    if out is None and _is_dual(a) and _is_dual(b):
        nd = max(a.ndim, b.ndim)
        Pa, Pb = _align(a.P, nd), _align(b.P, nd)
        p = Pa[0] * Pb[0]
        return Dual(torch.stack([p, Pa[0] * Pb[1] + Pa[1] * Pb[0]]))
    if out is None:
        d, c = (a, b) if _is_dual(a) else (b, a)
        if _const_ok(c, d):
            return Dual(d.P * c)
    return _fallback(torch.mul, (a, b), {} if out is None else {"out": out})


def _fn_div(a, b, *, rounding_mode=None, out=None):
    if out is None and rounding_mode is None and _is_dual(a) and not _is_dual(b) and _const_ok(b, a):
        return Dual(a.P / b)
    kw = {} if rounding_mode is None else {"rounding_mode": rounding_mode}
    if out is not None:
        kw["out"] = out
    return _fallback(torch.div, (a, b), kw)


def _fn_neg(a):
    return Dual(-a.P) if _is_dual(a) else -a


def _fn_relu(x, inplace=False):
    return _relu(x)


def _fn_flatten(x, start_dim=0, end_dim=-1):
    if _is_dual(x) and x.ndim > 0:
        return Dual(x.P.flatten(_pd(start_dim, x.ndim), _pd(end_dim, x.ndim)))
    return _fallback(torch.flatten, (x, start_dim, end_dim), {})


def _fn_cat(tensors, dim=0, *, out=None):
    tensors = list(tensors)
    if out is None and any(_is_dual(t) for t in tensors):
        ref = next(t for t in tensors if _is_dual(t))
        pairs = [t.P if _is_dual(t) else torch.stack([t, torch.zeros_like(t)]) for t in tensors]
        return Dual(torch.cat(pairs, dim=_pd(dim, ref.ndim)))
    return _fallback(torch.cat, (tensors,), {"dim": dim} if out is None else {"dim": dim, "out": out})


def _fn_stack(tensors, dim=0, *, out=None):
    tensors = list(tensors)
    if out is None and any(_is_dual(t) for t in tensors):
        ref = next(t for t in tensors if _is_dual(t))
        pairs = [t.P if _is_dual(t) else torch.stack([t, torch.zeros_like(t)]) for t in tensors]
        return Dual(torch.stack(pairs, dim=dim % (ref.ndim + 1) + 1))
    return _fallback(torch.stack, (tensors,), {"dim": dim} if out is None else {"dim": dim, "out": out})


def _fn_getitem(x, idx):
    if not _is_dual(x):
        return x[idx]
    key = idx if isinstance(idx, tuple) else (idx,)
    if any(_is_dual(k) for k in key):
        return _fallback(operator.getitem, (x, idx), {})
    if any(isinstance(k, bool) for k in key):  # x[True] adds a dim: keep it simple
        return _fallback(operator.getitem, (x, idx), {})
    return Dual(x.P[(slice(None), *key)])


def _fn_getattr(x, name, *default):
    if not _is_dual(x):
        return getattr(x, name, *default)
    if name == "shape":
        return x.shape
    if name == "ndim":
        return x.ndim
    if name in ("mT", "mH") and x.ndim >= 2 and not x.P.is_complex():
        return Dual(x.P.transpose(-2, -1))
    if name in ("T", "H") and not x.P.is_complex():  # reverses every dimension
        return Dual(x.P.permute(0, *range(x.ndim, 0, -1)))
    if name == "real" and not x.P.is_complex():
        return x
    value = getattr(x.primal, name, *default)
    if isinstance(value, torch.Tensor) or callable(value):  # a value or a bound method of the primal alone
        _refuse(f"the activation attribute .{name}")
    return value  # metadata (dtype, device, is_cuda, ...): the same for primal and tangent


def _per_sample_fn(fn):
    """Functional ops that act on each sample separately and linearly (pools, ...)."""

    def rule(x, *args, **kwargs):
        if _is_dual(x) and not _has_dual((args, kwargs)):
            return Dual.from_z(fn(x.z, *args, **kwargs))
        return _fallback(fn, (x, *args), kwargs)

    return rule


def _fn_reduce(fn_name):
    def rule(x, dim=None, keepdim=False, *, dtype=None):
        if not _is_dual(x):
            return getattr(torch, fn_name)(x, dim=dim, keepdim=keepdim, dtype=dtype)
        kw = {} if dtype is None else {"dtype": dtype}
        if dim is None:
            flat = x.P.flatten(1)
            dims = (1,)
        else:
            flat = x.P
            dims = tuple(_pd(d, x.ndim) for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
        out = flat.sum(dims, keepdim=keepdim if dim is not None else False, **kw)
        if fn_name == "mean":  # sum * (1/N): backward is an expanded view, not a new tensor
            out = out * (1.0 / math.prod(flat.shape[d] for d in dims))
        return Dual(out)

    return rule


def _fn_transpose(x, d0, d1):
    return Dual(x.P.transpose(_pd(d0, x.ndim), _pd(d1, x.ndim)))


def _fn_permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return Dual(x.P.permute(0, *(_pd(d, x.ndim) for d in dims)))


def _fn_softmax(x, dim=None, _stacklevel=3, dtype=None):
    return _softmax(x, dim, dtype=dtype)


def _fn_log_softmax(x, dim=None, _stacklevel=3, dtype=None):
    return _softmax(x, dim, dtype=dtype, log=True)


FUNCTION_RULES: dict[Any, Callable] = {
    operator.add: lambda a, b: _add(a, b),
    operator.iadd: lambda a, b: _add(a, b),
    torch.add: _fn_add,
    operator.sub: lambda a, b: _add(a, b, 1, -1),
    operator.isub: lambda a, b: _add(a, b, 1, -1),
    torch.sub: _fn_sub,
    operator.mul: lambda a, b: _fn_mul(a, b),
    operator.imul: lambda a, b: _fn_mul(a, b),
    torch.mul: _fn_mul,
    operator.truediv: lambda a, b: _fn_div(a, b),
    operator.itruediv: lambda a, b: _fn_div(a, b),
    torch.div: _fn_div,
    operator.neg: _fn_neg,
    torch.neg: _fn_neg,
    operator.matmul: _matmul,
    torch.matmul: _matmul,
    torch.bmm: _matmul,
    torch.relu: _fn_relu,
    F.relu: _fn_relu,
    F.gelu: lambda x, approximate="none": _gelu(x, approximate=approximate),
    torch.tanh: _tanh,
    F.tanh: _tanh,
    torch.sigmoid: _sigmoid,
    F.sigmoid: _sigmoid,
    F.silu: lambda x, inplace=False: _silu(x),
    F.leaky_relu: _leaky_relu,
    torch.softmax: _fn_softmax,
    F.softmax: _fn_softmax,
    torch.log_softmax: _fn_log_softmax,
    F.log_softmax: _fn_log_softmax,
    F.layer_norm: _layer_norm,
    F.linear: _linear,
    torch.flatten: _fn_flatten,
    torch.cat: _fn_cat,
    torch.concat: _fn_cat,
    torch.stack: _fn_stack,
    torch.transpose: _fn_transpose,
    torch.permute: _fn_permute,
    torch.sum: _fn_reduce("sum"),
    torch.mean: _fn_reduce("mean"),
    operator.getitem: _fn_getitem,
    builtins.getattr: _fn_getattr,
    F.adaptive_avg_pool1d: _per_sample_fn(F.adaptive_avg_pool1d),
    F.adaptive_avg_pool2d: _per_sample_fn(F.adaptive_avg_pool2d),
    F.adaptive_avg_pool3d: _per_sample_fn(F.adaptive_avg_pool3d),
    F.avg_pool1d: _per_sample_fn(F.avg_pool1d),
    F.avg_pool2d: _per_sample_fn(F.avg_pool2d),
    F.avg_pool3d: _per_sample_fn(F.avg_pool3d),
}


# --------------------------------------------------------------------------- methods


def _shape_arg(args) -> Optional[tuple]:
    shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
    if not all(isinstance(s, int) for s in shape):
        return None
    return tuple(shape)


def _m_view(x, *args):
    shape = _shape_arg(args)
    if shape is None:
        return _fallback_method(x, "view", args, {})
    try:
        return Dual(x.P.view(2, *shape))
    except RuntimeError:  # the primal's own view would fail too; keep reshape's semantics
        return _fallback_method(x, "view", args, {})


def _m_reshape(x, *args):
    shape = _shape_arg(args)
    if shape is None:
        return _fallback_method(x, "reshape", args, {})
    return Dual(x.P.reshape(2, *shape))


def _m_expand(x, *args):
    shape = _shape_arg(args)
    if shape is None:
        return _fallback_method(x, "expand", args, {})
    return Dual(x.P.expand(2, *shape))


def _m_size(x, dim=None):
    return x.shape if dim is None else x.shape[dim]


def _m_unsqueeze(x, dim):
    return Dual(x.P.unsqueeze(dim % (x.ndim + 1) + 1))


def _m_squeeze(x, dim=None):
    if dim is None:
        dims = tuple(i + 1 for i, s in enumerate(x.shape) if s == 1)
        return Dual(x.P.squeeze(dims)) if dims else x
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return Dual(x.P.squeeze(tuple(_pd(d, x.ndim) for d in dims)))


def _m_split(name):
    def rule(x, arg, dim=0):
        return tuple(Dual(o) for o in getattr(x.P, name)(arg, dim=_pd(dim, x.ndim)))

    return rule


def _m_unbind(x, dim=0):
    return tuple(Dual(o) for o in x.P.unbind(_pd(dim, x.ndim)))


def _m_passthrough(name):
    def rule(x, *args, **kwargs):
        return Dual(getattr(x.P, name)(*args, **kwargs))

    return rule


def _m_binary(fn):
    def rule(x, other, *args, **kwargs):
        return fn(x, other, *args, **kwargs)

    return rule


METHOD_RULES: dict[str, Callable] = {
    "size": _m_size,
    "dim": lambda x: x.ndim,
    "ndimension": lambda x: x.ndim,
    "numel": lambda x: x.primal.numel(),
    "view": _m_view,
    "reshape": _m_reshape,
    "expand": _m_expand,
    "flatten": lambda x, start_dim=0, end_dim=-1: _fn_flatten(x, start_dim, end_dim),
    "permute": _fn_permute,
    "transpose": _fn_transpose,
    "swapaxes": _fn_transpose,
    "unsqueeze": _m_unsqueeze,
    "squeeze": _m_squeeze,
    "chunk": _m_split("chunk"),
    "split": _m_split("split"),
    "unbind": _m_unbind,
    "sum": lambda x, dim=None, keepdim=False, dtype=None: _fn_reduce("sum")(x, dim, keepdim, dtype=dtype),
    "mean": lambda x, dim=None, keepdim=False, dtype=None: _fn_reduce("mean")(x, dim, keepdim, dtype=dtype),
    "contiguous": _m_passthrough("contiguous"),
    "float": _m_passthrough("float"),
    "double": _m_passthrough("double"),
    "half": _m_passthrough("half"),
    "bfloat16": _m_passthrough("bfloat16"),
    "clone": _m_passthrough("clone"),
    "to": _m_passthrough("to"),
    "type_as": _m_passthrough("type_as"),
    "relu": lambda x: _relu(x),
    "relu_": lambda x: _relu(x),
    "tanh": lambda x: _tanh(x),
    "sigmoid": lambda x: _sigmoid(x),
    "softmax": lambda x, dim=None, dtype=None: _softmax(x, dim, dtype=dtype),
    "log_softmax": lambda x, dim=None, dtype=None: _softmax(x, dim, dtype=dtype, log=True),
    "add": lambda x, o, alpha=1: _add(x, o, alpha, 1),
    "add_": lambda x, o, alpha=1: _add(x, o, alpha, 1),
    "__add__": lambda x, o: _add(x, o),
    "__radd__": lambda x, o: _add(o, x),
    "__iadd__": lambda x, o: _add(x, o),
    "sub": lambda x, o, alpha=1: _add(x, o, alpha, -1),
    "sub_": lambda x, o, alpha=1: _add(x, o, alpha, -1),
    "__sub__": lambda x, o: _add(x, o, 1, -1),
    "__rsub__": lambda x, o: _add(o, x, 1, -1),
    "mul": _fn_mul,
    "mul_": _fn_mul,
    "__mul__": _fn_mul,
    "__rmul__": _fn_mul,
    "div": lambda x, o: _fn_div(x, o),
    "div_": lambda x, o: _fn_div(x, o),
    "__truediv__": lambda x, o: _fn_div(x, o),
    "matmul": _matmul,
    "__matmul__": _matmul,
    "neg": _fn_neg,
}


def _method(x: Dual, name: str, args, kwargs):
    rule = METHOD_RULES.get(name)
    if rule is not None:
        try:
            return rule(x, *args, **kwargs)
        except TypeError:  # an unexpected signature: let forward AD handle it
            pass
    return _fallback_method(x, name, args, kwargs)
