"""``dual_batchnorm``: train-mode BatchNorm (optionally + ReLU) of a packed primal/tangent pair.

``z`` (2n, C, *spatial) holds the primal x in rows [0, n) and its tangent t in rows [n, 2n).
Per channel, over the n * spatial primal elements (mu, sigma^2 biased batch statistics,
r = 1/sqrt(sigma^2 + eps), xh = (x - mu) r, s = mean(xh t)):

    y  = gamma xh + beta,   yt = gamma r (t - mean(t) - xh s)

then ReLU on both halves (mask y > 0) when ``relu``. The exact engine's autograd Function
(``sgr_ext.engine.dual.batchnorm.DualBatchNorm``) calls the three entry points below; the
math of the backward is written there.

Paths (``impl``):

- ``"triton"``: four fused passes (``sgr_ext.kernels.dual_batchnorm``), float16 / bfloat16 /
  float32, statistics in float32. CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``.
- ``"cpp"``: one C++ op per entry point (``csrc/dual_batchnorm.cpp``), CPU tensors, every
  float dtype; sums and element arithmetic in float64.
- ``"torch"``: torch ops (``sgr_ext.ops._dual_bn_torch``), any device and float dtype.
- ``None``: CUDA tensors of a Triton dtype -> triton (if installed); CPU tensors -> cpp (if
  the C++ library is built); otherwise torch.

Every path centres before multiplying (x - mean, t - mt), so float32 keeps its accuracy when
a channel's |mean| is many times its std.

In eager mode the entry points call the backend directly; under torch.compile they go through
the ``sgr_ext::dual_bn_*`` custom ops (``sgr_ext.ops._dual_bn_ops``).
"""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext import _checks
from sgr_ext._tensor_util import accumulate_dtype
from sgr_ext.ops import _backends
from sgr_ext.ops import _dual_bn_ops

IMPLS = ("torch", "cpp", "triton")
BackendUnavailable = _backends.BackendUnavailable

# dtypes each fused path runs (the torch path runs every float dtype)
SUPPORTED_DTYPES = {"triton": (torch.float16, torch.bfloat16, torch.float32)}


def resolve_impl(impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The path the dual BatchNorm takes for tensors on ``device`` of ``dtype``.

    Raises BackendUnavailable when a path asked for explicitly cannot run here.
    """
    if impl is None:
        if device.type == "cuda" and dtype in SUPPORTED_DTYPES["triton"] and _backends.triton_installed_constant():
            return "triton"
        if device.type == "cpu" and _backends.cpp_built_constant():
            return "cpp"
        return "torch"
    _checks.choice("impl", impl, IMPLS)
    if impl == "torch":
        return impl
    if impl == "cpp":
        _backends.require_cpp("dual_batchnorm", device)
        return impl
    _backends.require_triton("dual_batchnorm", device, "impl=None or 'torch'")
    if dtype not in SUPPORTED_DTYPES["triton"]:
        raise BackendUnavailable(f"dual_batchnorm(impl='triton') does not support dtype {dtype}; use impl='torch'")
    return impl


def _check_packed(z: torch.Tensor) -> int:
    """z: a float (2n, C, *spatial) tensor, n >= 1; returns C."""
    _checks.tensor("z", z, floating=True, min_dim=2)
    if z.shape[0] == 0 or z.shape[0] % 2:
        raise ValueError(f"z: expected an even, non-zero number of rows (primal then tangent), got shape {tuple(z.shape)}")
    return z.shape[1]


def _check_channel(name: str, v: Optional[torch.Tensor], C: int) -> None:
    if v is not None:
        _checks.tensor(name, v, floating=True)
        if v.shape != (C,):
            raise ValueError(f"{name}: expected shape ({C},) (one value per channel of z), got {tuple(v.shape)}")


def _check_stats(stats: torch.Tensor, z: torch.Tensor) -> None:
    _checks.tensor("stats", stats, floating=True)
    want = (len(_dual_bn_ops.STATS_ROWS), z.shape[1])
    if stats.shape != want or stats.dtype != accumulate_dtype(z.dtype):
        raise ValueError(f"stats: expected shape {want} and dtype {accumulate_dtype(z.dtype)} as dual_batchnorm_forward "
                         f"returns them for z, got {tuple(stats.shape)} {stats.dtype}")


def _dispatch(op: str, kernel, *args):
    """The backend call in eager mode; the ``sgr_ext::`` custom op under torch.compile."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.sgr_ext, op)(*args)
    return kernel(*args)


def trusted_forward(z, weight, bias, eps: float, relu: bool, impl: str):
    """``dual_batchnorm_forward`` without the argument checks, for the exact engine, whose
    inputs are packed by construction and whose ``impl`` is resolved (checks are per call,
    several per layer, a measurable share of a small-batch step)."""
    return _dispatch("dual_bn_fwd", _dual_bn_ops.kernel_fwd, z, weight, bias, float(eps), bool(relu), impl)


def trusted_apply(z, stats, relu: bool, impl: str):
    """``dual_batchnorm_apply`` without the argument checks (see ``trusted_forward``)."""
    return _dispatch("dual_bn_apply", _dual_bn_ops.kernel_apply, z, stats, bool(relu), impl)


def trusted_backward(z, grad, weight, stats, relu: bool, impl: str):
    """``dual_batchnorm_backward`` without the argument checks (see ``trusted_forward``)."""
    return _dispatch("dual_bn_bwd", _dual_bn_ops.kernel_bwd, z, grad, weight, stats, bool(relu), impl)


def dual_batchnorm_forward(
    z: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    relu: bool = False,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, stats): ``out`` like ``z`` (dtype and memory format); ``stats`` (7, C) float32
    (float64 for float64 ``z``): per channel mean, rstd, mt = mean(t), s, and the apply
    coefficients a, beta, d of y = a (x - mean) + beta, yt = a (t - mt) + d (x - mean).

    Args: z (2n, C, *spatial) any float dtype; weight, bias (C,) or None; eps >= 0; relu.
    """
    C = _check_packed(z)
    _check_channel("weight", weight, C)
    _check_channel("bias", bias, C)
    eps = _checks.nonneg_finite("eps", eps)
    path = resolve_impl(impl, z.device, z.dtype)
    return _dispatch("dual_bn_fwd", _dual_bn_ops.kernel_fwd, z, weight, bias, eps, bool(relu), path)


def dual_batchnorm_apply(z: torch.Tensor, stats: torch.Tensor, relu: bool = False, *, impl: str | None = None) -> torch.Tensor:
    """The forward output recomputed from ``stats`` (as ``dual_batchnorm_forward`` returned them)."""
    _check_packed(z)
    _check_stats(stats, z)
    path = resolve_impl(impl, z.device, z.dtype)
    return _dispatch("dual_bn_apply", _dual_bn_ops.kernel_apply, z, stats, bool(relu), path)


def dual_batchnorm_backward(
    z: torch.Tensor,
    grad: torch.Tensor,
    weight: Optional[torch.Tensor],
    stats: torch.Tensor,
    relu: bool = False,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z like z, grad_weight (C,), grad_bias (C,)) for the incoming gradient ``grad``
    (shape of z) of the forward output; grad_weight / grad_bias in the dtype of ``stats``
    (computed whether or not weight / bias exist)."""
    C = _check_packed(z)
    _checks.tensor("grad", grad, floating=True)
    if grad.shape != z.shape:
        raise ValueError(f"grad: expected the shape of z {tuple(z.shape)}, got {tuple(grad.shape)}")
    _check_channel("weight", weight, C)
    _check_stats(stats, z)
    path = resolve_impl(impl, z.device, z.dtype)
    return _dispatch("dual_bn_bwd", _dual_bn_ops.kernel_bwd, z, grad, weight, stats, bool(relu), path)
