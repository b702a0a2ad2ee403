"""Primal + tangent ("dual") forward of a module, batched.

A *dual value* holds one tensor ``P`` of shape ``(2, *shape)``: ``P[0]`` is the primal
activation and ``P[1]`` its tangent (the directional derivative along an input tangent).
Where the batch is the leading dimension, ``P`` is one ``2n``-row batch in memory
(``Dual.z``), so a convolution or a linear layer runs ONCE on primal and tangent together.
Every op is differentiable by ordinary autograd, so one ``backward`` of a function of the
primal and the tangent gives the parameter gradients of both: this is what the lean exact
SGR engine (``sgr_ext.engine.tangent``) needs.

Rules (``p`` primal, ``t`` tangent):

- conv / linear / matmul with a constant: the same op on the pair without bias, the bias
  added to the primal only (``t_out = W t``). One kernel for both halves.
- linear, shape and per-sample ops (pooling by averages, flatten/reshape/permute, indexing,
  sums and means, residual adds, cat): applied to the pair directly.
- ReLU: ``t_out = t * (p > 0)``; only a bool mask is saved for backward.
- BatchNorm in train mode (batch statistics): ``DualBatchNorm``, an autograd Function with a
  hand-written backward that saves only its input and per-channel statistics (fused with
  a following ReLU, whose mask it recomputes). LayerNorm, softmax, GELU, tanh, sigmoid,
  products of two dual values: closed-form tangents written with differentiable torch ops.
- anything else: ``torch.autograd.forward_ad`` on the two halves (exact, slower, one copy).

A module is traced once with ``torch.fx``; a module that cannot be traced runs whole under
forward-mode AD. BatchNorm running statistics are never updated here (the caller's plain
forward already did that once).

Files: ``value`` (the dual value), ``program`` (tracer and interpreter, the dual loss,
``frozen_norm_stats``), ``modules`` (rules for module calls), ``functions`` (rules for functions
and tensor methods), ``elementwise`` (closed-form rules both share), ``batchnorm`` and ``conv``
(the autograd Functions of BatchNorm and convolutions), ``fallback`` (forward-mode AD).
Every name stays importable from this package (``from sgr_ext.engine import dual``).
"""
from __future__ import annotations

from sgr_ext.engine.dual.value import (  # noqa: F401
    Dual, pack, _pd, _with_bias, _is_dual, _tree_map, _has_dual, _align, _const_ok, UnsupportedOpError, _refuse,
)
from sgr_ext.engine.dual.fallback import (  # noqa: F401
    _norm_affine, _batch_norm_composite, _layer_norm_composite, _group_norm_composite,
    _softmax_composite, _SOFTMAX, _LOG_SOFTMAX, _SafeForwardAD, _fallback, _fallback_method,
)
from sgr_ext.engine.dual.elementwise import (  # noqa: F401
    _relu, _unary, _gelu_prime, _gelu, _tanh, _sigmoid, _silu, _leaky_relu, _softmax,
    _layer_norm, _linear, _matmul,
)
from sgr_ext.engine.dual.conv import (  # noqa: F401
    _std, _cpu_1x1_strided, _conv_backward, _conv_dtype, _fusable_conv, _rule_conv,
    DualInputConv,
)
from sgr_ext.engine.dual.batchnorm import (  # noqa: F401
    _triton_forced, _impl, DualBatchNorm, _bn_bwd, DualBNReLUConv, _batch_stats,
    _rule_batchnorm,
)
from sgr_ext.engine.dual.modules import (  # noqa: F401
    _rule_linear, _rule_per_sample, _global_avg, _rule_dropout, _rule_sequential,
    _rule_layernorm, MODULE_RULES, _module_rule, _call_module,
)
from sgr_ext.engine.dual.functions import (  # noqa: F401
    _add, _fn_add, _fn_sub, _fn_rsub, _fn_mul, _fn_div, _fn_neg, _fn_relu, _fn_flatten, _fn_cat,
    _fn_stack, _fn_getitem, _fn_getattr, _per_sample_fn, _fn_reduce, _fn_transpose, _fn_permute,
    _fn_softmax, _fn_log_softmax, FUNCTION_RULES, _shape_arg, _m_view, _m_reshape, _m_expand,
    _m_size, _m_unsqueeze, _m_squeeze, _m_split, _m_unbind, _m_passthrough, _m_binary,
    METHOD_RULES, _method,
)
from sgr_ext.engine.dual.program import (  # noqa: F401
    _bn_relu_conv, _RELU_FUNCS, _is_relu_node, _Program, _PROGRAMS, _program, _attr, run_module,
    dual_loss, _NORMS, _norms, frozen_norm_stats,
)

_TRITON_FORCE = False  # tests: run the Triton kernels on CPU tensors (TRITON_INTERPRET=1)

__all__ = ["Dual", "pack", "run_module", "dual_loss", "DualBatchNorm", "frozen_norm_stats"]
