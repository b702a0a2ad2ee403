"""``reconcile``: the SGR penalty (1/B) * sum_i dist(a_i, d_i) between two boundary gradients.

Paths (``impl``):

- ``"triton"``: fused Triton kernels (``sgr_ext.kernels.reconcile``). CUDA tensors; CPU tensors
  only under ``TRITON_INTERPRET=1`` (the interpreter, for tests). All four float dtypes
  (float64 accumulates in float64).
- ``"cpp"``: fused C++/OpenMP kernels (``csrc/reconcile.cpp``), CPU tensors, all four float dtypes.
- ``"torch"``: the plain PyTorch oracle (``sgr_ext.reference.reconcile_torch``), any device.
- ``None``: CUDA -> triton (torch if Triton is missing); CPU -> cpp if the C++ library is built,
  else torch; any other device -> torch.

The triton/cpp paths make one pass over a and d forward, one pass backward, and have an exact
closed-form double backward (``sgr_ext.ops._reconcile_ops``). Under torch.compile they go
through the ``sgr_ext::reconcile_fwd`` / ``reconcile_bwd`` custom ops (no graph breaks with
``fullgraph=True``); in eager mode through equivalent autograd Functions (less host overhead).
"""
from __future__ import annotations

import torch

from sgr_ext import _checks
from sgr_ext.ops import _backends
from sgr_ext.ops import _reconcile_ops  # noqa: F401  (registers torch.ops.sgr_ext.reconcile_*)
from sgr_ext._tensor_util import accumulate_dtype
from sgr_ext.reference import reconcile_torch

IMPLS = ("torch", "cpp", "triton")
BackendUnavailable = _backends.BackendUnavailable

# dtypes each fused path runs (the torch path runs every float dtype)
SUPPORTED_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cpp": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def resolve_impl(impl: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The path that ``reconcile`` takes for tensors on ``device`` of ``dtype``.

    Raises BackendUnavailable when a path asked for explicitly cannot run here.
    """
    if impl is None:
        if device.type == "cuda":
            return "triton" if _backends.triton_installed_constant() else "torch"
        if device.type == "cpu":
            return "cpp" if _backends.cpp_built_constant() else "torch"
        return "torch"
    if impl == "torch":
        return impl
    if impl == "triton":
        _backends.require_triton("reconcile", device, "impl=None or 'cpp'")
    elif impl == "cpp":
        _backends.require_cpp("reconcile", device)
    if dtype not in SUPPORTED_DTYPES[impl]:
        raise BackendUnavailable(f"reconcile(impl={impl!r}) does not support dtype {dtype}")
    return impl


def _checked(a: torch.Tensor, d: torch.Tensor, distance: str, eps: float, impl: str | None) -> tuple[str, float, str]:
    """``reconcile``'s argument checks; (distance, eps, the resolved path)."""
    _checks.tensor("a", a, floating=True, min_dim=1)
    _checks.tensor("d", d, floating=True, min_dim=1)
    _checks.batch("a", a)
    _checks.same_shape("a", a, "d", d)
    distance = _checks.distance(distance)
    eps = _checks.nonneg_finite("eps", eps)
    if impl is not None:
        _checks.choice("impl", impl, IMPLS)
    return distance, eps, resolve_impl(impl, a.device, a.dtype)


def reconcile(
    a: torch.Tensor,
    d: torch.Tensor,
    *,
    distance: str = "l2",
    eps: float = 1e-8,
    impl: str | None = None,
) -> torch.Tensor:
    """Mean distance between per-sample gradients ``a`` and a constant target ``d``.

    Args:
        a: (B, *) float16/bfloat16/float32/float64. Usually ``B * dl_k/du_k``; when it came
            from ``torch.autograd.grad(..., create_graph=True)`` the result backpropagates
            (twice differentiable) to the parameters that produced it.
        d: same shape, dtype and device as ``a``; treated as a constant (no gradient).
        distance: ``"l2"`` (squared L2, ``||a_i - d_i||^2``), ``"l2_rel"`` (relative squared L2,
            ``||a_i - d_i||^2 / (||d_i||^2 + eps)``: dimensionless, so a strength means the same
            whatever the scale of the gradients) or ``"cosine"``
            (``1 - <a_i, d_i> / (|a_i| |d_i| + eps)``), over each flattened sample.
        eps: >= 0, used by ``"l2_rel"`` and ``"cosine"``.
        impl: ``None`` (fastest available: CUDA -> ``"triton"``, CPU -> ``"cpp"`` if built,
            else ``"torch"``), ``"torch"``, ``"cpp"`` or ``"triton"``. A path that cannot
            run here raises ``BackendUnavailable``.

    Returns:
        0-dim tensor, float32 for half/single inputs, float64 for float64. Its gradient
        w.r.t. ``a`` has ``a``'s dtype. Inputs may be non-contiguous. l2 accumulates in
        float32 (float64 for float64 inputs); cosine always in float64, so that |a|^2 stays
        in range at any scale of a (the cosine itself is scale-free).
    """
    distance, eps, path = _checked(a, d, distance, eps, impl)
    if path == "torch":
        return reconcile_torch(a, d, distance, eps)
    if distance == "l2_rel":
        # d is a constant, so l2_rel is l2 of both sides scaled per sample by 1/sqrt(|d_i|^2 + eps):
        # the fused l2 kernels (and their exact double backward) serve it unchanged.
        a, d = _relative(a, d, eps)
        distance = "l2"
    if torch.compiler.is_compiling():
        loss, _ = torch.ops.sgr_ext.reconcile_fwd(a, d.detach(), distance, eps, path)
        return loss
    return _reconcile_ops.ReconcileFn.apply(a, d.detach(), distance, eps, path)


def _relative_scale(d: torch.Tensor, eps: float) -> torch.Tensor:
    """s_i = 1 / sqrt(|d_i|^2 + eps), shaped (B, 1, ...) to broadcast over d, in the accumulate
    dtype (float32 for half inputs: 1/|d_i| of a small d_i leaves float16's range)."""
    d = d.detach().to(accumulate_dtype(d.dtype))
    norm2 = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1).pow(2)
    return torch.rsqrt(norm2 + eps).reshape((-1,) + (1,) * (d.dim() - 1))


def _relative(a: torch.Tensor, d: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_i s_i, d_i s_i) (``_relative_scale``), in the accumulate dtype. a, d: (B, *).
    Differentiable in ``a``; ``d`` is a constant."""
    s = _relative_scale(d, eps)
    return a.to(s.dtype) * s, d.detach().to(s.dtype) * s


def reconcile_and_grad(
    a: torch.Tensor, d: torch.Tensor, *, distance: str = "l2", eps: float = 1e-8, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, dR/da): ``reconcile(a, d)`` and its gradient w.r.t. ``a``, detached, in one forward
    and one backward kernel call (no autograd graph; the engines need both every block).

    Same arguments, checks, dtypes and paths as ``reconcile``; the gradient has a's shape and
    dtype. The torch path (and torch.compile) goes through autograd."""
    distance, eps, path = _checked(a, d, distance, eps, impl)
    if path == "torch" or torch.compiler.is_compiling():
        with torch.enable_grad():
            a_ = a.detach().requires_grad_(True)
            pen = reconcile(a_, d, distance=distance, eps=eps, impl=path)
            (grad,) = torch.autograd.grad(pen, a_)
        return pen.detach(), grad
    dtype = a.dtype
    a, d = a.detach(), d.detach()
    scale = None
    if distance == "l2_rel":
        scale = _relative_scale(d, eps)
        a, d, distance = a.to(scale.dtype) * scale, d.to(scale.dtype) * scale, "l2"
    loss, stats = _reconcile_ops.kernel_fwd(a, d, distance, eps, path)
    grad = _reconcile_ops.kernel_bwd(torch.ones_like(loss), a, d, stats, distance, eps, path).view(a.shape)
    if scale is not None:
        grad = (grad * scale).to(dtype)
    return loss, grad
