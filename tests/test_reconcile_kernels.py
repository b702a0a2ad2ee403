"""The fused ``reconcile`` paths (torch, C++, Triton) against an independent float64 reference.

Triton runs on CUDA when there is one, else in the CPU interpreter (TRITON_INTERPRET=1, set by
conftest.py); interpreter shapes are kept small. Low-precision results are judged against the
error plain torch makes in the same dtype, both measured against float64 (as in Cut
Cross-Entropy / flash-attention tests).
"""
from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgr_ext.ops import _backends, _reconcile_ops
from sgr_ext.ops.reconcile import IMPLS, BackendUnavailable, reconcile, reconcile_and_grad, resolve_impl

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")
HAVE_CPP = _backends.cpp_ops() is not None
HAVE_TRITON = _backends.triton_runs_on(DEV)

PATHS = [
    pytest.param("torch", DEV, id="torch"),
    pytest.param(
        "cpp", CPU, id="cpp", marks=pytest.mark.skipif(not HAVE_CPP, reason="C++ library not built (see test_cpp_builds)")
    ),
    pytest.param("triton", DEV, id="triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="no CUDA / interpreter")),
]
KERNEL_PATHS = PATHS[1:]
DISTANCES = ["l2", "l2_rel", "cosine"]
KERNEL_DISTANCES = ["l2", "cosine"]  # the raw kernels; l2_rel reaches them as a rescaled l2


# ----------------------------------------------------------------------------- reference


def ref_per_sample(a: torch.Tensor, d: torch.Tensor, distance: str, eps: float) -> torch.Tensor:
    """Written from the definition, independently of sgr_ext.reference; any dtype, no upcast."""
    a = a.reshape(a.shape[0], -1)
    d = d.detach().reshape(d.shape[0], -1)
    if distance == "l2":
        return ((a - d) ** 2).sum(dim=1)
    if distance == "l2_rel":
        return ((a - d) ** 2).sum(dim=1) / ((d ** 2).sum(dim=1) + eps)
    return 1 - (a * d).sum(dim=1) / (torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(d, dim=1) + eps)


def ref_loss(a, d, distance, eps=1e-8):
    return ref_per_sample(a, d, distance, eps).mean()


def ref_grad(a, d, distance, eps=1e-8, dtype=torch.float64):
    """(loss, grad) of the reference in ``dtype`` (float64: the ground truth)."""
    x = a.detach().to(dtype).requires_grad_()
    loss = ref_loss(x, d.to(dtype), distance, eps)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def ref_hvp(a, d, v, distance, eps=1e-8):
    """float64 Hessian-vector product of the reference: d/da <grad_a loss, v>."""
    x = a.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(ref_loss(x, d.double(), distance, eps), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v.double()).sum(), x)
    return h


def rel(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    x, ref = x.double(), ref.double()
    den = ref.norm() if scale is None else torch.maximum(ref.norm(), scale.double())
    return float((x - ref).norm() / den.clamp_min(1e-300))


def grad_scale(a, d, distance, eps=1e-8):
    """Size of one term of the gradient: for cosine ||grad|| alone cancels (e.g. F = 1)."""
    a2 = a.detach().double().reshape(a.shape[0], -1)
    d2 = d.detach().double().reshape(d.shape[0], -1)
    if distance == "l2":
        return 2 * (a2.norm() + d2.norm()) / a.shape[0]
    den = a2.norm(dim=1, keepdim=True) * d2.norm(dim=1, keepdim=True) + eps
    return (d2 / den).norm() / a.shape[0]


def randn(*shape, dtype=torch.float32, device=DEV):
    return torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)


def run(a, d, distance, impl, eps=1e-8):
    """(loss, grad) of one path."""
    x = a.detach().clone().requires_grad_()
    loss = reconcile(x, d, distance=distance, eps=eps, impl=impl)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


# -------------------------------------------------------------------- first derivatives

SHAPES = [(1, 1), (1, 5), (3, 1), (3, 123), (7, 1000), (2, 3, 5, 7), (7, 5000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_float64_reference(impl, device, distance, shape, dtype):
    a, d = randn(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device)
    loss, g = run(a, d, distance, impl)
    ref, ref_g = ref_grad(a, d, distance)
    assert loss.dtype == dtype and loss.dim() == 0
    assert g.dtype == dtype and g.shape == a.shape
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert abs(float(loss) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    assert rel(g, ref_g, grad_scale(a, d, distance)) <= tol


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_reconcile_and_grad_is_reconcile_and_its_autograd_gradient(impl, device, distance, dtype):
    # the engines' one-call (R, dR/da), computed without autograd on the kernel paths: the same
    # numbers as reconcile + autograd.grad, on a non-contiguous a of an odd shape
    a = randn(7, 5, 9, dtype=dtype, device=device).transpose(1, 2)
    d = randn(7, 9, 5, dtype=dtype, device=device)
    loss, g = reconcile_and_grad(a, d, distance=distance, impl=impl)
    want_loss, want_g = run(a, d, distance, impl)
    assert loss.dtype == want_loss.dtype and g.dtype == dtype and g.shape == a.shape
    assert not loss.requires_grad and not g.requires_grad
    tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}[dtype]
    assert abs(float(loss) - float(want_loss)) <= tol * max(1.0, abs(float(want_loss)))
    assert rel(g, want_g) <= tol
    if dtype != torch.bfloat16:
        assert rel(g, ref_grad(a, d, distance)[1], grad_scale(a, d, distance)) <= 10 * tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", PATHS)
def test_low_precision_vs_same_dtype_torch(impl, device, distance, dtype):
    shape = (5, 777)
    a, d = randn(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device)
    if distance == "cosine":  # partly aligned, so the loss is not ~1 everywhere
        d = (0.7 * a.float() + 0.3 * d.float()).to(dtype)
    loss, g = run(a, d, distance, impl)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    truth, truth_g = ref_grad(a, d, distance)  # float64 on the same rounded inputs
    low, low_g = ref_grad(a, d, distance, dtype=dtype)  # what plain torch gets in this dtype
    err_loss, torch_err_loss = rel(loss, truth), rel(low, truth)
    err_g, torch_err_g = rel(g, truth_g), rel(low_g, truth_g)
    # float32 accumulation: the loss is far better than the same-dtype torch loss
    assert err_loss <= 0.1 * torch_err_loss + 1e-6, (err_loss, torch_err_loss)
    # the gradient is rounded once to the input dtype: no worse than torch's
    assert err_g <= torch_err_g + 1e-4, (err_g, torch_err_g)
    assert err_g <= 2 ** -8  # half an ulp-ish of bf16 per element at most, in norm


def test_low_precision_torch_path_accumulates_in_float32():
    a, d = randn(4, 300, dtype=torch.bfloat16), randn(4, 300, dtype=torch.bfloat16)
    loss, g = run(a, d, "l2", "torch")
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16


@pytest.mark.parametrize("impl,device", PATHS)
def test_noncontiguous_inputs(impl, device):
    base_a = randn(6, 9, 8, device=device)
    base_d = randn(6, 16, 9, device=device)
    a = base_a.transpose(1, 2)  # (6, 8, 9), not contiguous
    d = base_d[:, ::2, :]  # (6, 8, 9), strided
    assert not a.is_contiguous() and not d.is_contiguous()
    for distance in DISTANCES:
        loss, g = run(a, d, distance, impl)
        ref, ref_g = ref_grad(a, d, distance)
        assert g.shape == a.shape
        assert abs(float(loss) - float(ref)) <= 2e-6 * max(1.0, abs(float(ref)))
        assert rel(g, ref_g) <= 2e-6


@pytest.mark.parametrize("impl,device", PATHS)
def test_d_is_constant(impl, device):
    a = randn(3, 10, device=device, dtype=torch.float64).requires_grad_()
    d = randn(3, 10, device=device, dtype=torch.float64).requires_grad_()
    reconcile(a, d, impl=impl).backward()
    assert a.grad is not None and d.grad is None


# ------------------------------------------------------------------- second derivatives


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize(
    "impl,device", [p for p in PATHS if p.id != "triton"]
)
def test_gradgradcheck_float64(impl, device, distance):
    a = randn(3, 7, dtype=torch.float64, device=device).requires_grad_()
    d = randn(3, 7, dtype=torch.float64, device=device)
    f = lambda x: reconcile(x, d, distance=distance, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a,))
    assert torch.autograd.gradgradcheck(f, (a,))
    b = randn(2, 3, 4, dtype=torch.float64, device=device).requires_grad_()
    e = randn(2, 3, 4, dtype=torch.float64, device=device)
    assert torch.autograd.gradgradcheck(lambda x: reconcile(x, e, distance=distance, impl=impl), (b,))


@pytest.mark.skipif(not HAVE_TRITON, reason="no CUDA / interpreter")
def test_gradcheck_triton_float64():
    a = randn(2, 5, dtype=torch.float64).requires_grad_()
    d = randn(2, 5, dtype=torch.float64)
    for distance in DISTANCES:
        assert torch.autograd.gradcheck(lambda x: reconcile(x, d, distance=distance, impl="triton"), (a,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", PATHS)
def test_double_backward_matches_reference(impl, device, distance, dtype):
    """Hessian-vector product and d(grad)/d(grad_output) through create_graph=True."""
    shape = (3, 37)
    a, d = randn(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device)
    v = randn(*shape, dtype=dtype, device=device)
    x = a.clone().requires_grad_()
    w = torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    w.requires_grad_()
    loss = reconcile(x, d, distance=distance, impl=impl) * w
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    h, gw = torch.autograd.grad((g.to(v.dtype) * v).sum(), (x, w))
    ref_h = 1.7 * ref_hvp(a, d, v, distance)
    _, ref_g = ref_grad(a, d, distance)
    ref_gw = (ref_g * v.double()).sum()  # d/dw <w grad, v>
    tol = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}[dtype]
    assert h.dtype == dtype and h.shape == a.shape
    assert rel(h, ref_h) <= tol
    low = dtype in (torch.bfloat16, torch.float16)
    assert abs(float(gw) - float(ref_gw)) <= tol * max(1.0, abs(float(ref_gw))) * (10 if low else 1)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", PATHS)
def test_sgr_mixed_second_derivative(impl, device, distance):
    """The engine's use: a = B * dl/du from create_graph=True, penalty backpropagated to weights."""
    B, F, H = 4, 6, 5
    u0 = randn(B, F, dtype=torch.float64, device=device)
    W = randn(F, H, dtype=torch.float64, device=device).requires_grad_()
    d = randn(B, F, dtype=torch.float64, device=device)

    def penalty_grad(fn):
        u = u0.clone().requires_grad_()
        loss = (torch.tanh(u @ W) ** 2).sum() / B
        (a,) = torch.autograd.grad(loss, u, create_graph=True)
        (gw,) = torch.autograd.grad(fn(a * B), W)
        return gw

    got = penalty_grad(lambda a: reconcile(a, d, distance=distance, impl=impl))
    want = penalty_grad(lambda a: ref_loss(a, d, distance))
    assert rel(got, want) <= 1e-11


# ------------------------------------------------------------------ eps and zero vectors


@pytest.mark.parametrize("impl,device", PATHS)
def test_cosine_zero_vectors_and_eps(impl, device):
    eps = 1e-3
    a = randn(4, 6, dtype=torch.float64, device=device)
    d = randn(4, 6, dtype=torch.float64, device=device)
    a[0] = 0  # zero a: dist 1, grad -d / (eps B)
    d[1] = 0  # zero d: dist 1, grad 0
    a[2] = 0
    d[2] = 0  # both zero: dist 1, grad 0
    loss, g = run(a, d, "cosine", impl, eps=eps)
    ref, ref_g = ref_grad(a, d, "cosine", eps)
    assert torch.isfinite(g).all()
    assert abs(float(loss) - float(ref)) <= 1e-12
    assert rel(g, ref_g) <= 1e-12
    assert torch.allclose(g[0], -d[0] / (eps * 4), rtol=1e-12, atol=0)
    assert (g[1:3] == 0).all()
    # the double backward stays finite where |a| = 0 (terms in 1/|a| are taken as 0)
    x = a.clone().requires_grad_()
    (gx,) = torch.autograd.grad(reconcile(x, d, distance="cosine", eps=eps, impl=impl), x, create_graph=True)
    (h,) = torch.autograd.grad(gx.sum(), x)
    if impl != "torch":  # the plain torch oracle gives NaN there (norm's double backward at 0)
        assert torch.isfinite(h).all()
    assert rel(h[3], ref_hvp(a, d, torch.ones_like(a), "cosine", eps)[3]) <= 1e-10


@pytest.mark.parametrize("impl,device", PATHS)
def test_eps_values(impl, device):
    a = 1e-2 * randn(3, 20, dtype=torch.float64, device=device)
    d = 1e-2 * randn(3, 20, dtype=torch.float64, device=device)
    for eps in (0.0, 1e-8, 1e-4, 0.5):
        loss, g = run(a, d, "cosine", impl, eps=eps)
        ref, ref_g = ref_grad(a, d, "cosine", eps)
        assert abs(float(loss) - float(ref)) <= 1e-12, eps
        assert rel(g, ref_g) <= 1e-12, eps
    # eps does not matter for l2
    assert float(run(a, d, "l2", impl, eps=0.0)[0]) == float(run(a, d, "l2", impl, eps=1.0)[0])


@pytest.mark.parametrize("impl,device", KERNEL_PATHS)
def test_deterministic(impl, device):
    a, d = randn(5, 3000, device=device), randn(5, 3000, device=device)
    for distance in DISTANCES:
        l1, g1 = run(a, d, distance, impl)
        l2, g2 = run(a, d, distance, impl)
        assert torch.equal(l1, l2) and torch.equal(g1, g2)


# ---------------------------------------------------------------------- Triton tilings


@pytest.mark.skipif(not HAVE_TRITON, reason="no CUDA / interpreter")
@pytest.mark.parametrize(
    "B,F,rows,block,chunk",
    [
        (3, 100, 1, 16, 64),  # several chunks per sample, ragged end
        (4, 128, 1, 32, 64),  # exact tiling (unmasked path)
        (5, 3, 4, 4, 4),  # several samples per program, ragged rows
        (8, 16, 4, 16, 16),  # packed rows, exact tiling
        (1, 1, 1, 1, 1),
    ],
)
def test_triton_tilings(B, F, rows, block, chunk):
    from sgr_ext.kernels import reconcile as K

    cfg = K.Config(rows=rows, block=block, chunk=chunk, num_warps=4)
    for dtype in (torch.float32, torch.float64):
        a, d = randn(B, F, dtype=dtype), randn(B, F, dtype=dtype)
        tol = 2e-6 if dtype == torch.float32 else 1e-12
        for distance in KERNEL_DISTANCES:
            cos = distance == "cosine"
            loss, stats = K.reconcile_fwd(a, d, cos, 1e-8, config=cfg)
            ref, ref_g = ref_grad(a, d, distance)
            assert stats.shape == (B, 3 if cos else 1)
            assert abs(float(loss) - float(ref)) <= tol * max(1.0, abs(float(ref)))
            g = K.reconcile_bwd(torch.ones((), dtype=loss.dtype), a, d, stats, cos, 1e-8, config=cfg)
            assert rel(g, ref_g, grad_scale(a, d, distance)) <= tol


@pytest.mark.skipif(not HAVE_TRITON, reason="no CUDA / interpreter")
@pytest.mark.parametrize("B,F", [(3000, 3), (1, 20000), (1100, 1)])
def test_triton_default_tiling_extremes(B, F):
    """Huge B with tiny samples (packed rows; > 1024 samples in the finalize loop), one huge sample."""
    a, d = randn(B, F), randn(B, F)
    for distance in DISTANCES:
        loss, g = run(a, d, distance, "triton")
        ref, ref_g = ref_grad(a, d, distance)
        assert abs(float(loss) - float(ref)) <= 2e-6 * max(1.0, abs(float(ref)))
        assert rel(g, ref_g, grad_scale(a, d, distance)) <= 2e-6


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 9),
    F=st.integers(1, 300),
    distance=st.sampled_from(DISTANCES),
    impl=st.sampled_from([i for i, ok in (("torch", True), ("cpp", HAVE_CPP), ("triton", HAVE_TRITON)) if ok]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes(B, F, distance, impl, seed):
    torch.manual_seed(seed)
    device = CPU if impl == "cpp" else DEV
    a, d = randn(B, F, device=device), randn(B, F, device=device)
    loss, g = run(a, d, distance, impl)
    ref, ref_g = ref_grad(a, d, distance)
    assert abs(float(loss) - float(ref)) <= 2e-6 * max(1.0, abs(float(ref)))
    assert rel(g, ref_g, grad_scale(a, d, distance)) <= 2e-6


def test_triton_default_configs_cover_shapes():
    pytest.importorskip("triton")
    from sgr_ext.kernels import reconcile as K

    for B, F in [(1024, 16384), (8, 393216), (1, 1), (3, 5), (100000, 8), (1, 10**7)]:
        for size in (2, 4):
            cfg = K.default_config(B, F, size, torch.device("cuda", 0) if torch.cuda.is_available() else CPU)
            assert cfg.rows >= 1 and cfg.block >= 1 and cfg.chunk % cfg.block == 0
            assert cfg.rows * cfg.block <= 4096
            gr, gc = cfg.grid(B, F)
            assert gr * cfg.rows >= B and gc * cfg.chunk >= F


# ------------------------------------------------------------------------------ dispatch


def test_dispatch_default():
    assert resolve_impl(None, torch.device("cuda", 0), torch.float32) == ("triton" if _backends.triton_installed() else "torch")
    assert resolve_impl(None, CPU, torch.float32) == ("cpp" if HAVE_CPP else "torch")
    assert resolve_impl(None, torch.device("meta"), torch.float32) == "torch"
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert resolve_impl(None, CPU, dtype) == ("cpp" if HAVE_CPP else "torch")


def test_dispatch_default_is_cpp_even_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl(None, CPU, torch.float32) == ("cpp" if HAVE_CPP else "torch")


def test_dispatch_without_cpp(monkeypatch):
    monkeypatch.setattr(_backends, "cpp_ops", lambda: None)
    assert resolve_impl(None, CPU, torch.float32) == "torch"
    with pytest.raises(BackendUnavailable, match="C\\+\\+ library is not available"):
        reconcile(torch.randn(2, 3), torch.randn(2, 3), impl="cpp")
    a, d = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(reconcile(a, d), reconcile(a, d, impl="torch"))


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        reconcile(torch.randn(2, 3), torch.randn(2, 3), impl="triton")


def test_forced_triton_without_triton(monkeypatch):
    monkeypatch.setattr(_backends, "triton_installed", lambda: False)
    with pytest.raises(BackendUnavailable, match="not installed"):
        reconcile(torch.randn(2, 3), torch.randn(2, 3), impl="triton")
    assert resolve_impl(None, torch.device("cuda", 0), torch.float32) == "torch"


def test_forced_cpp_on_other_device():
    with pytest.raises(BackendUnavailable, match="CPU tensors only"):
        resolve_impl("cpp", torch.device("cuda", 0), torch.float32)
    with pytest.raises(BackendUnavailable, match="no Triton backend"):
        resolve_impl("triton", torch.device("meta"), torch.float32)


def test_forced_impl_unsupported_dtype(monkeypatch):
    mod = importlib.import_module("sgr_ext.ops.reconcile")  # the package attribute is the function
    monkeypatch.setitem(mod.SUPPORTED_DTYPES, "triton", (torch.float32,))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="does not support dtype torch.float64"):
        resolve_impl("triton", CPU, torch.float64)


def test_argument_errors():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="impl"):
        reconcile(a, a, impl="cuda")
    with pytest.raises(ValueError, match="distance"):
        reconcile(a, a, distance="l1")
    with pytest.raises(ValueError, match="eps"):
        reconcile(a, a, eps=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        reconcile(a, torch.randn(2, 4))
    with pytest.raises(TypeError, match="same dtype"):
        reconcile(a, a.double())
    with pytest.raises(TypeError, match="floating"):
        reconcile(a.long(), a.long())
    assert set(IMPLS) == {"torch", "cpp", "triton"}


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.skipif(os.environ.get("SGR_EXT_NO_CPP") == "1", reason="SGR_EXT_NO_CPP=1")
def test_cpp_builds():
    """With a compiler present the C++ library must build: no silent half-install."""
    assert HAVE_CPP, "csrc/*.cpp did not build; run with SGR_EXT_VERBOSE_BUILD=1 to see why"


# --------------------------------------------------------------------- torch.compile


def _graph_targets(fn, *args):
    """Trace ``fn`` with dynamo (fullgraph) and return the call targets of the captured graph."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets


@pytest.mark.parametrize("impl,device", KERNEL_PATHS)
def test_compile_fullgraph_uses_custom_op(impl, device):
    a, d = randn(3, 4, 5, device=device), randn(3, 4, 5, device=device)
    targets = _graph_targets(lambda x, y: reconcile(x * 2, y, impl=impl) + 1, a, d)
    assert any("sgr_ext.reconcile_fwd" in t for t in targets), targets


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("impl,device", [pytest.param(None, DEV, id="default")] + PATHS)
def test_compile_aot_eager_forward_backward(impl, device, distance):
    a, d = randn(3, 4, 5, device=device), randn(3, 4, 5, device=device)

    def f(x, y):
        return 3 * reconcile(x * 2, y, distance=distance, impl=impl)

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    x1, x2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    out, ref = cf(x1, d), f(x2, d)
    (g,) = torch.autograd.grad(out, x1)
    (g_ref,) = torch.autograd.grad(ref, x2)
    assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(g, g_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl,device", KERNEL_PATHS)
def test_compile_through_create_graph_double_backward(impl, device):
    """Compiled penalty on an ``a`` from create_graph=True; its gradient reaches the weights.

    (Differentiating the compiled region itself twice is not supported by aot_autograd:
    torch raises "torch.compile with aot_autograd does not currently support double backward".)
    """
    B, F, H = 3, 8, 4
    u0 = randn(B, F, dtype=torch.float64, device=device)
    W = randn(F, H, dtype=torch.float64, device=device).requires_grad_()
    d = randn(B, F, dtype=torch.float64, device=device)
    torch._dynamo.reset()
    pen = torch.compile(lambda a, y: reconcile(a, y, distance="cosine", impl=impl), backend="aot_eager", fullgraph=True)

    def grad_w(fn):
        u = u0.clone().requires_grad_()
        (a,) = torch.autograd.grad((torch.tanh(u @ W) ** 2).sum() / B, u, create_graph=True)
        return torch.autograd.grad(fn(a * B, d), W)[0]

    assert rel(grad_w(pen), grad_w(lambda a, y: ref_loss(a, y, "cosine"))) <= 1e-11


@pytest.mark.parametrize("impl,device", KERNEL_PATHS)
def test_opcheck_custom_ops(impl, device):
    a, d = randn(3, 5, device=device), randn(3, 5, device=device)
    for distance in KERNEL_DISTANCES:
        x = a.clone().requires_grad_()
        torch.library.opcheck(torch.ops.sgr_ext.reconcile_fwd.default, (x, d, distance, 1e-8, impl))
        loss, stats = _reconcile_ops.reconcile_fwd(a, d, distance, 1e-8, impl)
        g = torch.ones((), device=device).requires_grad_()
        torch.library.opcheck(
            torch.ops.sgr_ext.reconcile_bwd.default, (g, x, d, stats, distance, 1e-8, impl)
        )


@pytest.mark.parametrize("impl,device", KERNEL_PATHS)
def test_custom_op_double_backward(impl, device):
    """The custom-op path (used under torch.compile) has the same exact double backward."""
    a = randn(3, 9, dtype=torch.float64, device=device)
    d = randn(3, 9, dtype=torch.float64, device=device)
    v = randn(3, 9, dtype=torch.float64, device=device)
    for distance in KERNEL_DISTANCES:
        x = a.clone().requires_grad_()
        loss, _ = torch.ops.sgr_ext.reconcile_fwd(x, d, distance, 1e-8, impl)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        assert rel(h, ref_hvp(a, d, v, distance)) <= 1e-11
    with pytest.raises(ValueError, match="distance must be 'l2' or 'cosine'"):
        torch.ops.sgr_ext.reconcile_fwd(a, d, "l2_rel", 1e-8, impl)
