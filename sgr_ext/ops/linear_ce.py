"""``linear_cross_entropy``: fused linear layer + softmax cross-entropy, twice differentiable.

    loss = cross_entropy(x @ weight.T + bias, target, reduction, ignore_index)

Paths (``impl``):

* ``"torch"``  plain PyTorch (``sgr_ext.reference.linear_cross_entropy_torch``): materialises
  the (N, V) logits; native autograd, any order.
* ``"triton"`` CUDA (or CPU under ``TRITON_INTERPRET=1``): rows in chunks; per chunk one
  cuBLAS GEMM for the logits (bias fused), one Triton pass for loss, log-sum-exp and (for
  "mean"/"sum") the logits gradient, in place, then the two gradient GEMMs. The gradient is
  computed during the forward; the backward only rescales it in place, and skips even that
  when the incoming gradient is 1 (no host sync). No (N, V) buffer ever exists: the extra
  memory is one (rows, V) chunk (rows ~ N*H/V, Liger-Kernel's budget) plus the gradients.
  Precision: GEMMs accumulate in float32, the softmax pass runs in float32, the loss is
  summed in float64; dW of a large half-precision weight is summed across chunks in its own
  dtype (one rounding per chunk, as Liger does: a float32 buffer would cost 2 more bytes per
  weight than Liger's whole peak), in float32 when that buffer is <= FP32_DW_MAX_BYTES.
  reduction="none" (per-row incoming gradients) saves the lse and recomputes in backward.
* ``"cpp"``    CPU, ``csrc/linear_ce.cpp``: rows in chunks of 256, classes in chunks of 2048;
  each logits tile is one BLAS product in float (double for double), the online
  log-sum-exp and gradient passes run with OpenMP over rows; the backward recomputes the
  tiles from the saved lse.

Files: ``_linear_ce_fused`` (the chunked forward/backward of the fused paths),
``_linear_ce_double_backward``, ``_linear_ce_ops`` (custom-op registration and autograd).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from sgr_ext import _checks
from sgr_ext.ops import _backends
from sgr_ext.ops._linear_ce_fused import _check_target_range, fused_forward  # noqa: F401  (public here)
from sgr_ext.ops._linear_ce_ops import _forward_op
from sgr_ext.reference import linear_cross_entropy_torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("torch", "cpp", "triton")

# impl=None on CUDA: the fused path pays off once the logits are big; below this many
# logits (N * V) plain torch is faster (CIFAR-size heads, DESIGN.md section 4).
FUSED_MIN_LOGITS = 1 << 22

# impl=None on CUDA: the fused path pays off once the logits are big; below this many
# logits (N * V) plain torch is faster (CIFAR-size heads, DESIGN.md section 4).


@torch.compiler.assume_constant_result
def _cpp_available() -> bool:
    return _backends.cpp_ops() is not None


@torch.compiler.assume_constant_result
def _triton_available(device_type: str) -> bool:
    return _backends.triton_runs_on(torch.device(device_type))


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED and not torch.compiler.is_compiling():
        _WARNED.add(msg)
        warnings.warn(f"sgr_ext: {msg}", RuntimeWarning, stacklevel=3)


def _resolve_impl(impl: Optional[str], device: torch.device, n: int, v: int) -> str:
    if impl == "torch":
        return "torch"
    if impl == "cpp":
        if device.type != "cpu":
            raise _backends.BackendUnavailable(
                f"linear_cross_entropy(impl='cpp'): the C++ kernels run on CPU tensors, got device {device}")
        if not _cpp_available():
            raise _backends.BackendUnavailable(
                "linear_cross_entropy(impl='cpp'): the C++ library is not built on this machine (see sgr_ext.info())")
        return "cpp"
    if impl == "triton":
        if not _triton_available(device.type):
            raise _backends.BackendUnavailable(
                f"linear_cross_entropy(impl='triton'): Triton cannot run on device {device} here "
                "(needs a CUDA GPU, or CPU tensors with TRITON_INTERPRET=1)")
        return "triton"
    if device.type == "cuda":
        if not _triton_available("cuda"):
            _warn_once("Triton is not installed: linear_cross_entropy uses the plain torch path on CUDA "
                       "(the (N, V) logits are materialised)")
            return "torch"
        return "triton" if n * v >= FUSED_MIN_LOGITS else "torch"
    if device.type == "cpu" and _cpp_available():
        return "cpp"
    return "torch"


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")

def _validate(x, weight, target, bias, reduction, ignore_index, impl):
    reduction = _checks.choice("reduction", reduction, REDUCTIONS)
    if impl is not None:
        _checks.choice("impl", impl, IMPLS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: expected an int64 value, got {ignore_index}")
    _checks.tensor("x", x, floating=True)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor (N, H), got shape {tuple(x.shape)}")
    _checks.batch("x", x)
    if x.shape[1] == 0:
        raise ValueError(f"x: expected H >= 1 features, got shape {tuple(x.shape)}")
    _checks.tensor("weight", weight, floating=True)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected shape (V, {x.shape[1]}) with V >= 1, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected the same device as x ({x.device}), got {weight.device}")
    v = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, floating=True)
        if bias.shape != (v,):
            raise ValueError(f"bias: expected shape ({v},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected the same device as x ({x.device}), got {bias.device}")
    _checks.tensor("target", target)
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of class indices, got dtype {target.dtype}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target: expected shape ({x.shape[0]},) to match x, got {tuple(target.shape)}")
    if target.device != x.device:
        raise ValueError(f"target: expected the same device as x ({x.device}), got {target.device}")
    return reduction


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    impl: Optional[str] = None,
) -> Tensor:
    """``cross_entropy(x @ weight.T + bias, target)`` without materialising the logits.

    Args:
        x: (N, H) float16/bfloat16/float32/float64.
        weight: (V, H), x's dtype and device.
        target: (N,) integer class indices in [0, V), or ``ignore_index`` (such rows count
            neither in the loss nor in the "mean" denominator).
        bias: optional (V,), x's dtype.
        reduction: "mean" (over non-ignored rows) | "sum" | "none" ((N,) per-row losses,
            0 on ignored rows).
        ignore_index: target value to skip.
        impl: None (fastest for the device and size: CUDA -> "triton" when N*V >= 2**22,
            else "torch"; CPU -> "cpp" if built, else "torch"), "torch", "cpp" (CPU) or
            "triton" (CUDA, or CPU under TRITON_INTERPRET=1). An explicit impl that cannot
            run here raises ``BackendUnavailable``.

    Returns:
        The loss in float32 (float64 for float64 inputs): 0-dim, or (N,) for "none".
        Differentiable twice in x, weight and bias (the backward is itself an op with an
        exact backward), as the SGR penalty needs. Under ``torch.autocast`` the inputs are
        cast to the autocast dtype first, as ``F.linear`` would.
    """
    reduction = _validate(x, weight, target, bias, reduction, ignore_index, impl)
    dev_type = x.device.type
    # autocast casts float32/16 (never float64) inputs, as it does for F.linear; "meta" and
    # other device types without autocast have nothing to ask
    if dev_type in _AUTOCAST_DEVICES and x.dtype != torch.float64 and torch.is_autocast_enabled(dev_type):
        dt = torch.get_autocast_dtype(dev_type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype ({x.dtype}), got {weight.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected x's dtype ({x.dtype}), got {bias.dtype}")
    if target.dtype != torch.int64:
        target = target.long()
    v = weight.shape[0]
    impl = _resolve_impl(impl, x.device, x.shape[0], v)
    if not torch.compiler.is_compiling() and x.device.type != "meta" and (x.device.type == "cpu" or impl == "torch"):
        # CUDA + "triton" checks inside the op, after the first chunk is queued
        _check_target_range(target, v, ignore_index)
    if impl == "torch":
        return linear_cross_entropy_torch(x, weight, target, bias, reduction, ignore_index)
    x, weight, target = x.contiguous(), weight.contiguous(), target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grad_on = torch.is_grad_enabled()
    nx = grad_on and x.requires_grad
    nw = grad_on and weight.requires_grad
    nb = grad_on and bias is not None and bias.requires_grad
    pre = impl == "triton" and reduction != "none" and (nx or nw or nb)
    loss = _forward_op(x, weight, bias, target, reduction, ignore_index, impl, pre and nx, pre and nw, pre and nb)[0]
    return loss
