"""Dual rules for ``nn.Module`` calls: ``MODULE_RULES`` maps module types to rules, and
``_call_module`` dispatches a call (forward AD for modules without a rule)."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

from torch import nn

from sgr_ext.engine.dual.batchnorm import _rule_batchnorm
from sgr_ext.engine.dual.conv import _rule_conv
from sgr_ext.engine.dual.elementwise import _gelu, _layer_norm, _leaky_relu, _linear, _relu, _sigmoid, _silu, _softmax, _tanh
from sgr_ext.engine.dual.fallback import _fallback
from sgr_ext.engine.dual.value import Dual, _has_dual, _pd


def _rule_linear(m, x):
    if not isinstance(x, Dual):
        return m(x)
    return _linear(x, m.weight, m.bias)


def _rule_per_sample(m, x, *args, **kwargs):
    """Per-sample linear modules (pooling by averages, flatten, identity): apply to the pack."""
    if not isinstance(x, Dual) or args or kwargs:
        return _fallback(m, (x, *args), kwargs)
    if isinstance(m, nn.Identity):
        return x
    if isinstance(m, nn.Flatten):
        return Dual(x.P.flatten(_pd(m.start_dim, x.ndim), _pd(m.end_dim, x.ndim)))
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        k = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(m)]
        size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,) * k
        if all(o == 1 for o in size) and x.ndim == k + 2:
            return _global_avg(x, k)
    return Dual.from_z(m(x.z))


def _global_avg(x: "Dual", k: int) -> "Dual":
    """Mean over the last k dims, keepdim, as sum * (1/N): the backward of a sum is an
    expanded view, so the layer before gets a stride-0 gradient instead of a new tensor."""
    dims = tuple(range(x.P.dim() - k, x.P.dim()))
    count = math.prod(x.P.shape[-k:])
    return Dual(x.P.sum(dims, keepdim=True) * (1.0 / count))


def _rule_dropout(m, x):
    if not m.training or m.p == 0:
        return x
    return _fallback(m, (x,), {})


def _rule_sequential(m, x):
    for child in m:
        x = _call_module(child, (x,), {})
    return x


def _rule_layernorm(m, x):
    return _layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


MODULE_RULES: list[tuple[Any, Callable]] = [
    (nn.Sequential, _rule_sequential),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _rule_conv),
    (nn.Linear, _rule_linear),
    (nn.modules.batchnorm._BatchNorm, _rule_batchnorm),
    (nn.LayerNorm, _rule_layernorm),
    (nn.ReLU, lambda m, x: _relu(x)),
    (nn.GELU, lambda m, x: _gelu(x, approximate=m.approximate)),
    (nn.Tanh, lambda m, x: _tanh(x)),
    (nn.Sigmoid, lambda m, x: _sigmoid(x)),
    (nn.SiLU, lambda m, x: _silu(x)),
    (nn.LeakyReLU, lambda m, x: _leaky_relu(x, m.negative_slope)),
    (nn.Softmax, lambda m, x: _softmax(x, m.dim)),
    (nn.LogSoftmax, lambda m, x: _softmax(x, m.dim, log=True)),
    (
        (
            nn.Identity,
            nn.Flatten,
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AvgPool1d,
            nn.AvgPool2d,
            nn.AvgPool3d,
        ),
        _rule_per_sample,
    ),
    (nn.modules.dropout._DropoutNd, _rule_dropout),
]


_RULE_CACHE: dict = {}  # module type -> (the MODULE_RULES it was looked up in, rule)


def _module_rule(m: nn.Module) -> Optional[Callable]:
    """The first MODULE_RULES entry ``m`` is an instance of; cached per type (it is looked up
    per node, per step), and looked up again when MODULE_RULES is replaced."""
    cls = type(m)
    hit = _RULE_CACHE.get(cls)
    if hit is not None and hit[0] is MODULE_RULES:
        return hit[1]
    rule = next((r for types, r in MODULE_RULES if issubclass(cls, types)), None)
    _RULE_CACHE[cls] = (MODULE_RULES, rule)
    return rule


def _call_module(m: nn.Module, args, kwargs):
    if not _has_dual((args, kwargs)):
        return m(*args, **kwargs)
    rule = _module_rule(m)
    if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], Dual):
        return rule(m, args[0])
    return _fallback(m, args, kwargs)
