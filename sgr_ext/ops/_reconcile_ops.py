"""The fused ``reconcile`` penalty: backend calls, torch.library custom ops, autograd.

Two ops, each a single pass over a and d on the chosen backend (``impl`` = "triton" or "cpp"):

    sgr_ext::reconcile_fwd(a, d, distance, eps, impl) -> (loss, stats)
    sgr_ext::reconcile_bwd(grad, a, d, stats, distance, eps, impl) -> grad_a

``reconcile_fwd``'s backward calls ``reconcile_bwd`` (one elementwise pass using the saved
per-sample ``stats``); ``reconcile_bwd`` has its own backward (the double backward), written
with composite torch ops in closed form, so it is exact and itself differentiable (any order).
``stats`` is a non-differentiable output: the double backward differentiates through it
analytically (it is a function of ``a``), so nothing is counted twice.

Both ops are opaque to torch.compile (``register_fake`` gives shapes), so
``torch.compile(fullgraph=True)`` traces ``reconcile`` without graph breaks. In eager mode
``reconcile`` uses ``ReconcileFn`` / ``ReconcileBwdFn`` instead: plain autograd Functions
around the same kernel calls and the same double backward, with less host overhead.

Math, per flattened sample (g: incoming gradient of the mean, B: batch size):

    l2      dist = |a - d|^2,                    grad_a = (2 g / B) (a - d)
    cosine  dist = 1 - s / den,  s = <a, d>,  den = |a| |d| + eps
            grad_a = (g / B) (alpha d + beta a),  alpha = -1/den,  beta = s |d| / (den^2 |a|)

Double backward of cosine, for an incoming gg (shape of a), p = <gg, d>, q = <gg, a>:

    d/dg  = (1/B) sum_i (alpha_i p_i + beta_i q_i)
    d/da  = (g/B) [beta gg + k q d + (k p - c q) a],
            k = |d| / (den^2 |a|),  c = 2 s |d|^2 / (den^3 |a|^2) + s |d| / (den^2 |a|^3)

At |a| = 0 the terms with 1/|a| are set to 0 (the limit torch's norm backward uses).
"""
from __future__ import annotations

import torch
from torch import Tensor

from sgr_ext.ops import _backends
from sgr_ext._tensor_util import accumulate_dtype, penalty_dtype

KERNEL_IMPLS = ("triton", "cpp")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).contiguous()


def _triton_module():
    # Imported lazily: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from sgr_ext.kernels import reconcile as kernels

    return kernels


def _cpp():
    ops = _backends.cpp_ops()
    if ops is None:  # only reachable when the op is called directly
        raise _backends.BackendUnavailable("sgr_ext: the C++ library is not built (see sgr_ext.info())")
    return ops


# ------------------------------------------------------------------------- backend calls


def _kernel_distance(distance: str) -> None:
    # the kernels know l2 and cosine; "l2_rel" reaches them as l2 of rescaled inputs
    # (ops.reconcile), so any other name here would silently compute l2
    if distance not in ("l2", "cosine"):
        raise ValueError(f"sgr_ext reconcile kernels: distance must be 'l2' or 'cosine', got {distance!r}")


def kernel_fwd(a: Tensor, d: Tensor, distance: str, eps: float, impl: str) -> tuple[Tensor, Tensor]:
    """One fused pass over a and d: (loss () in the accumulate dtype, stats (B, S) in ``penalty_dtype``)."""
    _kernel_distance(distance)
    if impl == "triton":
        return _triton_module().reconcile_fwd(_flat(a), _flat(d), distance == "cosine", eps)
    if impl == "cpp":
        loss, stats = _cpp().reconcile_fwd(a, d, distance, eps)
        return loss, stats
    raise ValueError(f"sgr_ext reconcile: kernel impl must be one of {KERNEL_IMPLS}, got {impl!r}")


def kernel_bwd(grad: Tensor, a: Tensor, d: Tensor, stats: Tensor, distance: str, eps: float, impl: str) -> Tensor:
    """One fused elementwise pass: grad * d loss / d a, shape and dtype of ``a`` (contiguous)."""
    _kernel_distance(distance)
    if impl == "triton":
        out = _triton_module().reconcile_bwd(grad, _flat(a), _flat(d), stats, distance == "cosine", eps)
        return out.view(a.shape)
    if impl == "cpp":
        return _cpp().reconcile_bwd(grad.to(stats.dtype), a, d, stats, distance, eps)
    raise ValueError(f"sgr_ext reconcile: kernel impl must be one of {KERNEL_IMPLS}, got {impl!r}")


# ------------------------------------------------------- custom ops (the torch.compile path)


@torch.library.custom_op("sgr_ext::reconcile_fwd", mutates_args=())
def reconcile_fwd(a: Tensor, d: Tensor, distance: str, eps: float, impl: str) -> tuple[Tensor, Tensor]:
    """(loss () in the accumulate dtype, stats (B, S) in ``penalty_dtype``); S = 1 (l2) or 3 (cosine)."""
    return kernel_fwd(a, d, distance, eps, impl)


@reconcile_fwd.register_fake
def _(a, d, distance, eps, impl):
    s = 3 if distance == "cosine" else 1
    return (a.new_empty((), dtype=accumulate_dtype(a.dtype)),
            a.new_empty((a.shape[0], s), dtype=penalty_dtype(a.dtype, distance)))


def _fwd_setup_context(ctx, inputs, output):
    a, d, distance, eps, impl = inputs
    _, stats = output
    ctx.save_for_backward(a, d, stats)
    ctx.distance, ctx.eps, ctx.impl = distance, eps, impl
    ctx.mark_non_differentiable(stats)


def _fwd_backward(ctx, grad_loss, grad_stats):
    a, d, stats = ctx.saved_tensors
    grad_a = None
    if ctx.needs_input_grad[0]:
        grad_a = reconcile_bwd(grad_loss, a, d, stats, ctx.distance, ctx.eps, ctx.impl)
    return grad_a, None, None, None, None


reconcile_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("sgr_ext::reconcile_bwd", mutates_args=())
def reconcile_bwd(
    grad: Tensor, a: Tensor, d: Tensor, stats: Tensor, distance: str, eps: float, impl: str
) -> Tensor:
    """grad * d loss / d a, shape and dtype of ``a`` (contiguous)."""
    return kernel_bwd(grad, a, d, stats, distance, eps, impl)


@reconcile_bwd.register_fake
def _(grad, a, d, stats, distance, eps, impl):
    return a.new_empty(a.shape)


def _bwd_setup_context(ctx, inputs, output):
    grad, a, d, stats, distance, eps, impl = inputs
    ctx.save_for_backward(grad, a, d)
    ctx.distance, ctx.eps = distance, eps


def _bwd_backward(ctx, gg):
    grad, a, d = ctx.saved_tensors
    d_grad, d_a = _double_backward_or_none(ctx, grad, a, d, gg)
    return d_grad, d_a, None, None, None, None, None


reconcile_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def _double_backward_or_none(ctx, grad, a, d, gg):
    if gg is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None
    d_grad, d_a = double_backward(grad, a, d, gg, ctx.distance, ctx.eps)
    return (d_grad if ctx.needs_input_grad[0] else None), (d_a if ctx.needs_input_grad[1] else None)


# ------------------------------------------------ autograd Functions (the eager fast path)
# Same kernels and math as the custom ops, without the custom-op dispatch layers: about half
# the host overhead per call, which matters when one call is tens of microseconds on a GPU.


class ReconcileFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, d: Tensor, distance: str, eps: float, impl: str) -> Tensor:
        loss, stats = kernel_fwd(a, d, distance, eps, impl)
        ctx.save_for_backward(a, d, stats)
        ctx.distance, ctx.eps, ctx.impl = distance, eps, impl
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        a, d, stats = ctx.saved_tensors
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = ReconcileBwdFn.apply(grad_loss, a, d, stats, ctx.distance, ctx.eps, ctx.impl)
        return grad_a, None, None, None, None


class ReconcileBwdFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, a, d, stats, distance, eps, impl):
        ctx.save_for_backward(grad, a, d)
        ctx.distance, ctx.eps = distance, eps
        return kernel_bwd(grad, a, d, stats, distance, eps, impl)

    @staticmethod
    def backward(ctx, gg):
        grad, a, d = ctx.saved_tensors
        d_grad, d_a = _double_backward_or_none(ctx, grad, a, d, gg)
        return d_grad, d_a, None, None, None, None, None


# -------------------------------------------------------------------------- double backward


def double_backward(
    g: Tensor, a: Tensor, d: Tensor, gg: Tensor, distance: str, eps: float
) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of grad_a(g, a) = g * d loss/d a with ``gg``: (d/dg, d/da).

    Composite torch ops in ``penalty_dtype`` (differentiable again). Returns
    (scalar like ``g``, tensor like ``a``).
    """
    acc = penalty_dtype(a.dtype, distance)
    B = a.shape[0]
    a2 = a.reshape(B, -1).to(acc)
    d2 = d.detach().reshape(B, -1).to(acc)
    gg2 = gg.reshape(B, -1).to(acc)
    gs = g.to(acc)
    if distance == "l2":
        d_g = (gg2 * (a2 - d2)).sum() * (2.0 / B)
        d_a = gg2 * (gs * (2.0 / B))
    else:
        na = a2.norm(dim=1, keepdim=True)
        nd = d2.norm(dim=1, keepdim=True)
        s = (a2 * d2).sum(dim=1, keepdim=True)
        p = (gg2 * d2).sum(dim=1, keepdim=True)
        q = (gg2 * a2).sum(dim=1, keepdim=True)
        nz = na > 0
        na_s = torch.where(nz, na, torch.ones_like(na))  # safe: no inf/nan in the unused branch
        den = na * nd + eps
        # The formulas above, regrouped into bounded factors (s/den ~ cos, nd/den ~ 1/|a|,
        # q/|a| ~ |gg|, a/|a| unit) so that no intermediate over- or underflows where the
        # forward does not (k = |d| / (den^2 |a|) itself overflows float32 from |a| ~ 1e7).
        inv_na = torch.where(nz, 1.0 / na_s, torch.zeros_like(na))
        u = nd / den
        cs = s / den
        qh = q * inv_na
        pd = p / den
        ah = a2 * inv_na
        beta = cs * u * inv_na
        d_g = (beta * q - pd).sum() / B  # alpha p + beta q
        d_a = (gs / B) * (beta * gg2 + (u * qh) * (d2 / den) + (u * pd - cs * u * (2.0 * u + inv_na) * qh) * ah)
    return d_g.to(g.dtype).reshape(g.shape), d_a.to(a.dtype).reshape(a.shape)
