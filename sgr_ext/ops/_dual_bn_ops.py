"""The dual BatchNorm op: backend calls and torch.library custom ops.

Three ops over the packed dual tensor ``z`` (2n, C, *spatial) on the chosen backend
(``impl`` = "triton" or "torch"), each under autocast disabled:

    sgr_ext::dual_bn_fwd(z, weight, bias, eps, relu, impl) -> (out, stats)
    sgr_ext::dual_bn_apply(z, stats, relu, impl) -> out
    sgr_ext::dual_bn_bwd(z, grad, weight, stats, relu, impl) -> (grad_z, grad_weight, grad_bias)

``stats`` (8, C) in the accumulate dtype holds the per-channel statistics and apply
coefficients; ``dual_bn_apply`` recomputes the output from them (a caller that does not keep
the output, e.g. a fused BN -> ReLU -> conv, recomputes it in backward). The ops carry no
autograd formula: ``sgr_ext.engine.dual.batchnorm.DualBatchNorm`` is the autograd Function
that pairs forward and backward. ``register_fake`` gives shapes, so torch.compile traces them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sgr_ext.ops import _dual_bn_torch
from sgr_ext._tensor_util import accumulate_dtype

KERNEL_IMPLS = ("torch", "triton")


def _triton_module():
    # Imported lazily: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from sgr_ext.kernels import dual_batchnorm as kernels

    return kernels


def _check_impl(impl: str) -> None:
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"sgr_ext dual_batchnorm: kernel impl must be one of {KERNEL_IMPLS}, got {impl!r}")


# ------------------------------------------------------------------------- backend calls


def kernel_fwd(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(out like z, stats (8, C) accumulate dtype): mean, rstd, mt, s, a, b, d, e per channel
    (batch mean and inverse std of the primal, mean of the tangent, s = mean(xh t), and the
    apply coefficients of y = a x + b, yt = a t + d x + e)."""
    _check_impl(impl)
    with torch.autocast(z.device.type, enabled=False):
        if impl == "triton":
            stats = _triton_module().stats_fwd(z, weight, bias, eps)
        else:
            stats = _dual_bn_torch.stats_fwd(z, weight, bias, eps)
        out = kernel_apply(z, stats, relu, impl)
    return out, stats


def kernel_apply(z: Tensor, stats: Tensor, relu: bool, impl: str) -> Tensor:
    """y = a x + b, yt = a t + d x + e (then ReLU on both halves, mask y > 0): like z."""
    _check_impl(impl)
    a, b, d, e = stats[4:]
    out = _triton_module().kernel_out(z) if impl == "triton" else torch.empty_like(z)
    with torch.autocast(z.device.type, enabled=False):
        if impl == "triton":
            _triton_module().apply_fwd(z, out, a, b, d, e, relu)
        else:
            _dual_bn_torch.apply_fwd(z, out, a, b, d, e, relu)
    return out


def kernel_bwd(z: Tensor, grad: Tensor, weight: Optional[Tensor], stats: Tensor, relu: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z like z, grad_weight (C,), grad_bias (C,)); the last two in the accumulate dtype."""
    _check_impl(impl)
    mean, a, b = stats[0], stats[4], stats[5]
    with torch.autocast(z.device.type, enabled=False):
        gz = _triton_module().kernel_out(z) if impl == "triton" else torch.empty_like(z)
        if impl == "triton":
            K = _triton_module()
            k1, k2, k3, kx, k0, k7, k8, g_w, g_b = K.stats_bwd(z, grad, weight, stats, relu)
            K.apply_bwd(z, grad, gz, mean, a, b, k1, k2, k3, kx, k0, k7, k8, relu)
        else:
            g_w, g_b = _dual_bn_torch.backward(z, grad, gz, weight, stats, relu)
    return gz, g_w, g_b


# ------------------------------------------------------- custom ops (the torch.compile path)


def _fake_stats(z: Tensor) -> Tensor:
    return z.new_empty((8, z.shape[1]), dtype=accumulate_dtype(z.dtype))


@torch.library.custom_op("sgr_ext::dual_bn_fwd", mutates_args=())
def dual_bn_fwd(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, relu: bool, impl: str) -> tuple[Tensor, Tensor]:
    """(out like z, stats (8, C)); see ``kernel_fwd``."""
    return kernel_fwd(z, weight, bias, eps, relu, impl)


@dual_bn_fwd.register_fake
def _(z, weight, bias, eps, relu, impl):
    return torch.empty_like(z), _fake_stats(z)


@torch.library.custom_op("sgr_ext::dual_bn_apply", mutates_args=())
def dual_bn_apply(z: Tensor, stats: Tensor, relu: bool, impl: str) -> Tensor:
    """The forward output recomputed from ``stats``; see ``kernel_apply``."""
    return kernel_apply(z, stats, relu, impl)


@dual_bn_apply.register_fake
def _(z, stats, relu, impl):
    return torch.empty_like(z)


@torch.library.custom_op("sgr_ext::dual_bn_bwd", mutates_args=())
def dual_bn_bwd(z: Tensor, grad: Tensor, weight: Optional[Tensor], stats: Tensor, relu: bool, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_z, grad_weight, grad_bias); see ``kernel_bwd``."""
    gz, g_w, g_b = kernel_bwd(z, grad, weight, stats, relu, impl)
    # the Triton path returns rows of one buffer; a custom op's outputs may not alias
    return gz, g_w.clone(), g_b.clone()


@dual_bn_bwd.register_fake
def _(z, grad, weight, stats, relu, impl):
    return torch.empty_like(z), stats.new_empty(stats.shape[1:]), stats.new_empty(stats.shape[1:])
