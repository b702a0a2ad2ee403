"""The dual BatchNorm op: backend calls and torch.library custom ops.

Three ops over the packed dual tensor ``z`` (2n, C, *spatial) on the chosen backend
(``impl`` = "triton", "cpp" or "torch"), each under autocast disabled:

    sgr_ext::dual_bn_fwd(z, weight, bias, eps, relu, impl) -> (out, stats)
    sgr_ext::dual_bn_apply(z, stats, relu, impl) -> out
    sgr_ext::dual_bn_bwd(z, grad, weight, stats, relu, impl) -> (grad_z, grad_weight, grad_bias)

``stats`` (7, C) in the accumulate dtype holds the per-channel statistics and apply
coefficients (mean, rstd, mt, s, a, beta, d; see ``STATS_ROWS``); ``dual_bn_apply`` recomputes the output from them (a caller that does not keep
the output, e.g. a fused BN -> ReLU -> conv, recomputes it in backward). The ops carry no
autograd formula: ``sgr_ext.engine.dual.batchnorm.DualBatchNorm`` is the autograd Function
that pairs forward and backward. ``register_fake`` gives shapes, so torch.compile traces them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sgr_ext.ops import _backends, _dual_bn_torch
from sgr_ext._tensor_util import accumulate_dtype, autocast_off

KERNEL_IMPLS = ("torch", "cpp", "triton")
# The rows of ``stats``: batch mean and inverse std of the primal, mean of the tangent,
# s = mean(xh t), and the centred apply coefficients of y = a (x - mean) + beta,
# yt = a (t - mt) + d (x - mean). Centred, so that float32 loses nothing to cancellation
# when |mean| is many times the std.
STATS_ROWS = ("mean", "rstd", "mt", "s", "a", "beta", "d")


def _triton_module():
    # Imported lazily: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from sgr_ext.kernels import dual_batchnorm as kernels

    return kernels


def _out_like(z: Tensor) -> Tensor:
    """An empty output for z: ``empty_like(z)``, except in NCHW order where z's spatial dims
    do not flatten into one strided dim (a dense H/W-swapped layout): the Triton kernels write
    through a (2n, C, S) view of the output, and a flattening copy would lose the writes."""
    merge = all(z.stride(i) == z.stride(i + 1) * z.shape[i + 1] for i in range(2, z.dim() - 1) if z.shape[i] > 1)
    return torch.empty_like(z) if merge else torch.empty_like(z, memory_format=torch.contiguous_format)


def _check_impl(impl: str) -> None:
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"sgr_ext dual_batchnorm: kernel impl must be one of {KERNEL_IMPLS}, got {impl!r}")


# ------------------------------------------------------------------------- backend calls


def kernel_fwd(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(out like z, stats (7, C) accumulate dtype, rows ``STATS_ROWS``)."""
    _check_impl(impl)
    with autocast_off(z.device.type):
        if impl == "cpp":
            return _backends.cpp_ops().dual_bn_fwd(z, weight, bias, eps, relu)
        if impl == "triton":
            stats = _triton_module().stats_fwd(z, weight, bias, eps)
        else:
            stats = _dual_bn_torch.stats_fwd(z, weight, bias, eps)
        out = kernel_apply(z, stats, relu, impl)
    return out, stats


def kernel_apply(z: Tensor, stats: Tensor, relu: bool, impl: str) -> Tensor:
    """y = a (x - mean) + beta, yt = a (t - mt) + d (x - mean) (then ReLU on both halves,
    mask y > 0): like z."""
    _check_impl(impl)
    with autocast_off(z.device.type):
        if impl == "cpp":
            return _backends.cpp_ops().dual_bn_apply(z, stats, relu)
        out = _out_like(z)
        if impl == "triton":
            _triton_module().apply_fwd(z, out, stats, relu)
        else:
            _dual_bn_torch.apply_fwd(z, out, stats, relu)
    return out


def kernel_bwd(z: Tensor, grad: Tensor, weight: Optional[Tensor], stats: Tensor, relu: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z like z, grad_weight (C,), grad_bias (C,)); the last two in the accumulate dtype."""
    _check_impl(impl)
    with autocast_off(z.device.type):
        if impl == "cpp":
            return _backends.cpp_ops().dual_bn_bwd(z, grad, weight, stats, relu)
        gz = _out_like(z)
        if impl == "triton":
            K = _triton_module()
            coef = K.stats_bwd(z, grad, weight, stats, relu)
            K.apply_bwd(z, grad, gz, stats, coef, relu)
            g_w, g_b = coef[-2], coef[-1]
        else:
            g_w, g_b = _dual_bn_torch.backward(z, grad, gz, weight, stats, relu)
    return gz, g_w, g_b


# ------------------------------------------------------- custom ops (the torch.compile path)


def _fake_stats(z: Tensor) -> Tensor:
    return z.new_empty((len(STATS_ROWS), z.shape[1]), dtype=accumulate_dtype(z.dtype))


@torch.library.custom_op("sgr_ext::dual_bn_fwd", mutates_args=())
def dual_bn_fwd(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(out like z, stats (7, C)); see ``kernel_fwd``."""
    return kernel_fwd(z, weight, bias, eps, relu, impl)


@dual_bn_fwd.register_fake
def _(z, weight, bias, eps, relu, impl):
    return _out_like(z), _fake_stats(z)


@torch.library.custom_op("sgr_ext::dual_bn_apply", mutates_args=())
def dual_bn_apply(z: Tensor, stats: Tensor, relu: bool, impl: str) -> Tensor:
    """The forward output recomputed from ``stats``; see ``kernel_apply``."""
    return kernel_apply(z, stats, relu, impl)


@dual_bn_apply.register_fake
def _(z, stats, relu, impl):
    return _out_like(z)


@torch.library.custom_op("sgr_ext::dual_bn_bwd", mutates_args=())
def dual_bn_bwd(z: Tensor, grad: Tensor, weight: Optional[Tensor], stats: Tensor, relu: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z, grad_weight, grad_bias); see ``kernel_bwd``."""
    gz, g_w, g_b = kernel_bwd(z, grad, weight, stats, relu, impl)
    # the Triton path returns rows of one buffer; a custom op's outputs may not alias
    return gz, g_w.clone(), g_b.clone()


@dual_bn_bwd.register_fake
def _(z, grad, weight, stats, relu, impl):
    return _out_like(z), stats.new_empty(stats.shape[1:]), stats.new_empty(stats.shape[1:])
