"""The ``dual_batchnorm`` op contract (``sgr_ext.ops.dual_batchnorm``): torch and Triton paths,
eager and custom-op dispatch, against a plain float64 reference built from elementary torch
ops (forward: y and its tangent J t; backward: the vector-Jacobian products of both).

Triton runs on CUDA when there is one, else in the CPU interpreter (TRITON_INTERPRET=1, set by
conftest.py)."""
import pytest
import torch

import sgr_ext
from sgr_ext.ops import _backends, _dual_bn_ops
from sgr_ext.ops.dual_batchnorm import (
    IMPLS,
    BackendUnavailable,
    dual_batchnorm_apply,
    dual_batchnorm_backward,
    dual_batchnorm_forward,
    resolve_impl,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAVE_TRITON = _backends.triton_runs_on(DEV)
HAVE_CPP = _backends.cpp_ops() is not None
PATHS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(not HAVE_CPP, reason="C++ library not built")),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="no CUDA / interpreter")),
]
EPS = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference(z, w, b, relu, g, dtype=torch.float64):
    """(out, grad_z, grad_w, grad_b) of <out, g> for out = the packed [y; J t], computed with
    elementary torch ops in ``dtype`` (float64: the reference; float32: what plain torch gets)."""
    n = z.shape[0] // 2
    x, t = z[:n].detach().to(dtype).requires_grad_(), z[n:].detach().to(dtype).requires_grad_()
    w, b = w.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)

    def bn(u):
        mu = u.mean(dims, keepdim=True)
        var = ((u - mu) ** 2).mean(dims, keepdim=True)
        y = (u - mu) * torch.rsqrt(var + EPS) * w.view(shape) + b.view(shape)
        return torch.relu(y) if relu else y

    y = bn(x)
    v = torch.zeros_like(y, requires_grad=True)
    (jtv,) = torch.autograd.grad(y, x, v, create_graph=True)
    (yt,) = torch.autograd.grad(jtv, v, t, create_graph=True)  # J t, differentiable in x, t, w, b
    out = torch.cat([y, yt])
    grads = torch.autograd.grad((out * g.to(dtype)).sum(), (x, t, w, b))
    return out.detach(), torch.cat(grads[:2]), grads[2], grads[3]


def inputs(shape, dtype, channels_last=False):
    z = torch.randn(*shape, dtype=torch.float64) * 1.7 + 0.4
    z = z.to(dtype=dtype, device=DEV)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(shape[1], dtype=acc, device=DEV)
    b = torch.randn(shape[1], dtype=acc, device=DEV)
    g = torch.randn(*shape, dtype=dtype, device=DEV)
    return z, w, b, g


SHAPES = [((6, 3), False), ((10, 5, 7), False), ((6, 3, 5, 3), False), ((6, 3, 5, 3), True)]


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,channels_last", SHAPES)
def test_forward_apply_backward_match_float64_reference(impl, relu, shape, channels_last):
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float64] if impl != "triton" else [])
    for dtype in dtypes:
        z, w, b, g = inputs(shape, dtype, channels_last)
        want = reference(z, w, b, relu, g)
        out, stats = dual_batchnorm_forward(z, w, b, EPS, relu, impl=impl)
        assert out.dtype == dtype and out.shape == z.shape
        assert stats.shape == (7, shape[1]) and stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        again = dual_batchnorm_apply(z, stats, relu, impl=impl)
        assert torch.equal(again, out)
        gz, gw, gb = dual_batchnorm_backward(z, g, w, stats, relu, impl=impl)
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        for got, ref in zip((out, gz, gw, gb), want):
            assert rel(got, ref) < tol, (dtype, rel(got, ref))


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("relu", [False, True])
def test_float32_accuracy_where_the_mean_is_far_from_zero(impl, relu):
    # mean/std = 15 for x and t: products of uncentred values (x t, or y = a x + b with
    # b ~ -a mean) or float32 sums of raw values lose ~|mean|/std digits; centred ones do not.
    # Judged against what plain torch gets from the same elementary-op BatchNorm in float32.
    torch.manual_seed(0)
    z64 = torch.randn(16, 4, 6, 5, dtype=torch.float64) * 0.5 + 7.5
    w, b, g = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(16, 4, 6, 5, dtype=torch.float64)
    want = reference(z64, w, b, relu, g)
    plain = reference(z64, w, b, relu, g, torch.float32)
    z = z64.float().to(DEV)
    out, stats = dual_batchnorm_forward(z, w.float().to(DEV), b.float().to(DEV), EPS, relu, impl=impl)
    got = (out, *dual_batchnorm_backward(z, g.float().to(DEV), w.float().to(DEV), stats, relu, impl=impl))
    for name, x, p, r in zip(("out", "grad_z", "grad_w", "grad_b"), got, plain, want):
        assert rel(x, r) <= 2 * rel(p, r) + 1e-6, (name, rel(x, r), rel(p, r))


@pytest.mark.parametrize("impl", PATHS)
def test_no_affine_parameters_mean_unit_scale_zero_shift(impl):
    z, w, b, g = inputs((8, 3, 2), torch.float32)
    out, stats = dual_batchnorm_forward(z, None, None, EPS, True, impl=impl)
    ref, _ = dual_batchnorm_forward(z, torch.ones_like(w), torch.zeros_like(b), EPS, True, impl=impl)
    torch.testing.assert_close(out, ref)
    gz, _, _ = dual_batchnorm_backward(z, g, None, stats, True, impl=impl)
    gz_ref, _, _ = dual_batchnorm_backward(z, g, torch.ones_like(w), stats, True, impl=impl)
    torch.testing.assert_close(gz, gz_ref)


@pytest.mark.parametrize("impl", PATHS)
@pytest.mark.parametrize("layout", ["3d", "channels_last", "hw_swapped"])
def test_custom_ops_match_eager_path_and_pass_opcheck(impl, layout):
    # opcheck compares the fake impl's strides with the real ones: every layout must agree
    z, w, b, g = inputs((6, 3, 4) if layout == "3d" else (6, 3, 4, 5), torch.float32, layout == "channels_last")
    if layout == "hw_swapped":  # dense, but H and W do not flatten into one strided dim
        z = z.transpose(2, 3).contiguous().transpose(2, 3)
    out, stats = _dual_bn_ops.kernel_fwd(z, w, b, EPS, True, impl)
    op_out, op_stats = torch.ops.sgr_ext.dual_bn_fwd(z, w, b, EPS, True, impl)
    assert torch.equal(op_out, out) and torch.equal(op_stats, stats)
    assert torch.equal(torch.ops.sgr_ext.dual_bn_apply(z, stats, True, impl), out)
    for got, want in zip(torch.ops.sgr_ext.dual_bn_bwd(z, g, w, stats, True, impl), _dual_bn_ops.kernel_bwd(z, g, w, stats, True, impl)):
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.sgr_ext.dual_bn_fwd.default, (z, w, b, EPS, True, impl))
    torch.library.opcheck(torch.ops.sgr_ext.dual_bn_apply.default, (z, stats, True, impl))
    torch.library.opcheck(torch.ops.sgr_ext.dual_bn_bwd.default, (z, g, w, stats, True, impl))


def test_default_path_is_cpp_on_cpu_and_torch_for_cuda_float64(monkeypatch):
    assert resolve_impl(None, torch.device("cpu"), torch.float32) == ("cpp" if HAVE_CPP else "torch")
    monkeypatch.setattr(_backends, "cpp_ops", lambda: None)
    assert resolve_impl(None, torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(BackendUnavailable, match="C\\+\\+ library is not available"):
        resolve_impl("cpp", torch.device("cpu"), torch.float32)
    assert resolve_impl(None, torch.device("cuda", 0), torch.float64) == "torch"
    if _backends.triton_installed():
        assert resolve_impl(None, torch.device("cuda", 0), torch.bfloat16) == "triton"


def test_forced_triton_needs_interpreter_and_a_triton_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.device("cpu"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="dtype torch.float64"):
        resolve_impl("triton", torch.device("cpu"), torch.float64)
    monkeypatch.setattr(_backends, "triton_installed", lambda: False)
    with pytest.raises(BackendUnavailable, match="not installed"):
        resolve_impl("triton", torch.device("cpu"), torch.float32)


def test_bad_input_names_the_argument():
    z, w, b, g = inputs((6, 3), torch.float32)
    with pytest.raises(ValueError, match="z: expected an even"):
        dual_batchnorm_forward(z[:5], w, b, EPS)
    with pytest.raises(TypeError, match="z: expected a real floating-point"):
        dual_batchnorm_forward(z.long(), w, b, EPS)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\)"):
        dual_batchnorm_forward(z, w[:2], b, EPS)
    with pytest.raises(ValueError, match="eps"):
        dual_batchnorm_forward(z, w, b, -1.0)
    with pytest.raises(ValueError, match="impl: expected one of"):
        dual_batchnorm_forward(z, w, b, EPS, impl="cuda")
    with pytest.raises(BackendUnavailable, match="CPU tensors only"):
        resolve_impl("cpp", torch.device("cuda", 0), torch.float32)
    _, stats = dual_batchnorm_forward(z, w, b, EPS)
    with pytest.raises(ValueError, match=r"stats: expected shape \(7, 3\)"):
        dual_batchnorm_apply(z, stats[:6])
    with pytest.raises(ValueError, match=r"stats: expected .* dtype torch.float32"):
        dual_batchnorm_apply(z, stats.double())
    with pytest.raises(ValueError, match="grad: expected the shape of z"):
        dual_batchnorm_backward(z, g[:4], w, stats)


def test_info_lists_the_op():
    assert sgr_ext.info()["ops"]["dual_batchnorm"] == IMPLS == ("torch", "cpp", "triton")
