"""Fused linear + cross-entropy head: every path against a float64 reference written here.

Triton runs in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU), so its shapes stay small; chunking is exercised by shrinking the chunk size.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sgr_ext.ops._linear_ce_double_backward as lce_double
import sgr_ext.ops._linear_ce_fused as lce_fused
import sgr_ext.ops.linear_ce as lce
from sgr_ext.ops import _backends, linear_cross_entropy
from sgr_ext.reference import linear_cross_entropy_torch

IGNORE = -100
HAS_CPP = _backends.cpp_ops() is not None
HAS_TRITON = _backends.triton_runs_on(torch.device("cpu")) or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() else "cpu"

cpp_only = pytest.mark.skipif(not HAS_CPP, reason="C++ library not built")
triton_only = pytest.mark.skipif(not HAS_TRITON, reason="Triton cannot run here")


def _impls():
    out = [pytest.param("torch", id="torch")]
    out.append(pytest.param("cpp", id="cpp", marks=cpp_only))
    out.append(pytest.param("triton", id="triton", marks=triton_only))
    return out


def _device(impl: str) -> str:
    return "cpu" if impl == "cpp" else DEV


def ref_loss(x, w, t, b=None, reduction="mean", ignore_index=IGNORE):
    """float64 oracle, explicit log-sum-exp (differentiable to any order)."""
    z = x.double() @ w.double().t()
    if b is not None:
        z = z + b.double()
    lse = torch.logsumexp(z, dim=1)
    valid = t != ignore_index
    zy = z.gather(1, torch.where(valid, t, torch.zeros_like(t))[:, None])[:, 0]
    rows = torch.where(valid, lse - zy, torch.zeros_like(lse))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


def make(n, h, v, *, dtype=torch.float64, device="cpu", bias=True, ignore=(), scale=1.0):
    x = torch.randn(n, h, dtype=torch.float64, device=device)
    w = torch.randn(v, h, dtype=torch.float64, device=device) * scale / math.sqrt(h)
    b = torch.randn(v, dtype=torch.float64, device=device) if bias else None
    t = torch.randint(0, v, (n,), device=device)
    for i in ignore:
        t[i] = IGNORE
    leaf = lambda a: None if a is None else a.to(dtype).requires_grad_()  # noqa: E731
    return leaf(x), leaf(w), leaf(b), t


def rel(a, r):
    a, r = a.detach().double(), r.detach().double()
    den = r.norm()
    return float((a - r).norm() / den) if den > 0 else float((a - r).norm())


def _grads(loss, inputs, grad_out=None):
    inputs = [i for i in inputs if i is not None]
    return torch.autograd.grad(loss, inputs, grad_out)


def _check_first_order(impl, n, h, v, reduction, bias, ignore, device, tol=1e-10):
    x, w, b, t = make(n, h, v, bias=bias, ignore=ignore, device=device)
    out = linear_cross_entropy(x, w, t, bias=b, reduction=reduction, impl=impl)
    ref = ref_loss(x, w, t, b, reduction)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel(out, ref) < tol
    go = torch.randn_like(ref)
    for a, r in zip(_grads(out, [x, w, b], go), _grads(ref, [x, w, b], go)):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert rel(a, r) < tol


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("v", [3, 11, 1000, 4099])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64_reference(impl, v, bias):
    n = 7 if impl == "triton" else 29
    for reduction in ("mean", "sum", "none"):
        _check_first_order(impl, n, 10, v, reduction, bias, ignore=(2,), device=_device(impl))


@triton_only
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_many_chunks_whole_chunk_ignored(monkeypatch, reduction):
    # 4-row chunks: rows 4..7 (a whole chunk) and one more row are ignored
    monkeypatch.setattr(lce_fused, "chunk_rows", lambda n, h, v: 4)
    _check_first_order("triton", 13, 6, 11, reduction, True, ignore=(4, 5, 6, 7, 11), device=DEV)


@triton_only
def test_triton_looped_rows(monkeypatch):
    # rows longer than one block: the online (multi-block) log-sum-exp path
    import sgr_ext.kernels.linear_ce as kernels

    monkeypatch.setattr(kernels, "MAX_SINGLE_BLOCK", 256)
    monkeypatch.setattr(kernels, "LOOP_BLOCK", 256)
    for reduction in ("mean", "none"):
        _check_first_order("triton", 5, 8, 1000, reduction, True, ignore=(1,), device=DEV)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="side streams need CUDA")
def test_cuda_two_stream_grad_gemms_match(monkeypatch):
    monkeypatch.setattr(lce_fused, "chunk_rows", lambda n, h, v: 64)
    x, w, b, t = make(300, 32, 5000, dtype=torch.bfloat16, device="cuda", ignore=(7,))
    out = []
    for streams in (1, 2):
        monkeypatch.setattr(lce_fused, "GRAD_GEMM_STREAMS", streams)
        loss = linear_cross_entropy(x, w, t, bias=b, impl="triton")
        out.append([loss] + list(torch.autograd.grad(loss, [x, w, b])))
    for a, c in zip(*out):  # same kernels; cuBLAS may pick another algorithm on the side stream
        assert rel(a, c) < 5e-3


@cpp_only
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpp_across_chunks_whole_chunk_ignored(reduction):
    # 300 rows x 4099 classes crosses the 256-row and 2048-class tiles; rows 256.. all ignored
    _check_first_order("cpp", 300, 8, 4099, reduction, True, ignore=tuple(range(256, 300)) + (3,), device="cpu")


@pytest.mark.parametrize("impl", _impls())
def test_all_ignored_matches_torch(impl):
    x, w, b, t = make(5, 4, 6, ignore=range(5), device=_device(impl))
    mean = linear_cross_entropy(x, w, t, bias=b, impl=impl)
    assert torch.isnan(mean)
    gx, gw = torch.autograd.grad(mean, [x, w])
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gw) == 0
    assert linear_cross_entropy(x, w, t, bias=b, reduction="sum", impl=impl).item() == 0.0


@pytest.mark.parametrize("impl", _impls())
def test_ignore_index_in_class_range(impl):
    # an ignore_index that is also a valid class index
    x, w, b, t = make(9, 5, 7, device=_device(impl))
    t[:3] = 2
    out = linear_cross_entropy(x, w, t, bias=b, ignore_index=2, impl=impl)
    ref = ref_loss(x, w, t, b, ignore_index=2)
    assert rel(out, ref) < 1e-10
    for a, r in zip(_grads(out, [x, w, b]), _grads(ref, [x, w, b])):
        assert rel(a, r) < 1e-10


@pytest.mark.parametrize("impl", _impls())
def test_partial_requires_grad_and_no_grad(impl):
    x, w, b, t = make(8, 5, 13, device=_device(impl))
    w.requires_grad_(False)
    out = linear_cross_entropy(x, w, t, bias=b, impl=impl)
    ref = ref_loss(x, w, t, b)
    gx, gb = torch.autograd.grad(out, [x, b])
    rx, rb = torch.autograd.grad(ref, [x, b])
    assert rel(gx, rx) < 1e-10 and rel(gb, rb) < 1e-10
    with torch.no_grad():
        out2 = linear_cross_entropy(x, w, t, bias=b, impl=impl)
    assert not out2.requires_grad and rel(out2, ref) < 1e-10


@pytest.mark.parametrize("impl", _impls())
def test_non_contiguous_and_int32_target(impl):
    x, w, b, t = make(6, 9, 12, device=_device(impl))
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major view
    out = linear_cross_entropy(xt, w, t.int(), bias=b, impl=impl)
    assert rel(out, ref_loss(xt, w, t, b)) < 1e-10


@triton_only
def test_triton_retain_graph_second_backward_recomputes():
    x, w, b, t = make(9, 6, 17, ignore=(0,), device=DEV)
    out = linear_cross_entropy(x, w, t, bias=b, impl="triton")
    g1 = torch.autograd.grad(out, [x, w, b], torch.tensor(2.5, dtype=out.dtype, device=DEV), retain_graph=True)
    g2 = torch.autograd.grad(out, [x, w, b], torch.tensor(2.5, dtype=out.dtype, device=DEV))
    r = _grads(ref_loss(x, w, t, b) * 2.5, [x, w, b])
    for a, c, rr in zip(g1, g2, r):
        assert rel(a, rr) < 1e-10 and rel(c, rr) < 1e-10


@pytest.mark.parametrize("impl", _impls())
def test_accumulates_into_dot_grad(impl):
    x, w, b, t = make(6, 5, 8, device=_device(impl))
    for _ in range(2):
        linear_cross_entropy(x, w, t, bias=b, impl=impl).backward()
    ref = _grads(ref_loss(x, w, t, b), [x, w, b])
    for p, r in zip((x, w, b), ref):
        assert rel(p.grad, 2 * r) < 1e-10


# ---------------------------------------------------------------------- low precision


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_low_precision_error_vs_plain_torch(impl, dtype, monkeypatch):
    """Error vs float64 (on the same rounded inputs) is at most about plain torch's in this dtype."""
    if impl == "triton" and dtype == torch.bfloat16:
        monkeypatch.setattr(lce_fused, "FP32_DW_MAX_BYTES", 0)  # the big-weight path: dW in bf16 across chunks
        monkeypatch.setattr(lce_fused, "chunk_rows", lambda n, h, v: 16)
    dev = _device(impl)
    n, h, v = 37, 64, 1000
    x, w, b, t = make(n, h, v, dtype=dtype, device=dev, ignore=(5,), scale=3.0)
    ours = linear_cross_entropy(x, w, t, bias=b, impl=impl)
    plain = linear_cross_entropy_torch(x, w, t, b)
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    ref = ref_loss(x64, w64, t, b64)
    assert ours.dtype == torch.float32
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    assert rel(ours, ref) <= 2 * rel(plain, ref) + floor
    for a, p, r in zip(_grads(ours, [x, w, b]), _grads(plain, [x, w, b]), _grads(ref, [x64, w64, b64])):
        assert a.dtype == dtype
        assert rel(a, r) <= 2 * rel(p, r) + floor, (rel(a, r), rel(p, r))


# ------------------------------------------------------------------- second derivatives


def _penalty_grads(impl, x, w, b, t, reduction, gout=None):
    """grad of S = <dL/dx, u> + <dL/dW, U> + <dL/db, ub> w.r.t. x, W, b (and grad_out)."""
    if impl is None:
        loss = ref_loss(x, w, t, b, reduction)
    elif callable(impl):
        loss = impl(x, w, t, b, reduction)
    else:
        loss = linear_cross_entropy(x, w, t, bias=b, reduction=reduction, impl=impl)
    if gout is None:
        gout = torch.ones_like(loss)
    gout = gout.detach().requires_grad_()
    inputs = [i for i in (x, w, b) if i is not None]
    first = torch.autograd.grad(loss, inputs, gout, create_graph=True)
    gen = torch.Generator().manual_seed(1)  # the same projections for every dtype and device
    s = sum((f * torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f)).sum() for f in first)
    return torch.autograd.grad(s, inputs + [gout])


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_double_backward_matches_reference(impl, reduction, bias):
    x, w, b, t = make(9, 6, 11, bias=bias, ignore=(3,), device=_device(impl))
    gout = torch.rand(9 if reduction == "none" else (), dtype=torch.float64, device=x.device) + 0.5
    ours = _penalty_grads(impl, x, w, b, t, reduction, gout)
    ref = _penalty_grads(None, x, w, b, t, reduction, gout)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        assert rel(a, r) < 1e-10


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("v", [3, 1000, 4099])
def test_double_backward_odd_vocabularies(impl, v):
    x, w, b, t = make(13, 5, v, bias=True, ignore=(2, 7), device=_device(impl))
    for a, r in zip(_penalty_grads(impl, x, w, b, t, "mean"), _penalty_grads(None, x, w, b, t, "mean")):
        assert a.shape == r.shape
        assert rel(a, r) < 1e-10


@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=cpp_only), pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_double_backward_low_precision(impl, dtype):
    """Second derivatives in bf16/fp32: error vs float64 at most about plain torch's."""
    dev = _device(impl)
    x, w, b, t = make(23, 32, 300, dtype=dtype, device=dev, ignore=(4,), scale=3.0)
    x64, w64, b64 = (a.detach().double().requires_grad_() for a in (x, w, b))
    ref = _penalty_grads(None, x64, w64, b64, t, "mean")

    def plain(x, w, t, b, reduction):
        return linear_cross_entropy_torch(x, w, t, b, reduction)

    ours = _penalty_grads(impl, x, w, b, t, "mean")
    torch_same_dtype = _penalty_grads(plain, x, w, b, t, "mean")
    floor = 1e-6 if dtype == torch.float32 else 1e-4
    for a, p_, r in zip(ours, torch_same_dtype, ref):
        assert rel(a, r) <= 2 * rel(p_, r) + floor, (rel(a, r), rel(p_, r))


@cpp_only
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpp_gradgradcheck(reduction):
    x, w, b, t = make(5, 3, 6, ignore=(1,))
    f = lambda x, w, b: linear_cross_entropy(x, w, t, bias=b, reduction=reduction, impl="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_torch_gradgradcheck():
    x, w, b, t = make(5, 3, 6, ignore=(1,))
    f = lambda x, w, b: linear_cross_entropy(x, w, t, bias=b, reduction="sum", impl="torch")  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@triton_only
def test_triton_double_backward_chunked(monkeypatch):
    monkeypatch.setattr(lce_double, "DOUBLE_BACKWARD_CHUNK_BYTES", 3 * 2 * 11 * 8)  # 3-row chunks
    x, w, b, t = make(10, 4, 11, ignore=(0, 1, 2), device=DEV)
    for a, r in zip(_penalty_grads("triton", x, w, b, t, "mean"), _penalty_grads(None, x, w, b, t, "mean")):
        assert rel(a, r) < 1e-10


@pytest.mark.parametrize("impl", _impls())
def test_sgr_penalty_on_parameters(impl):
    """The SGR use: A = B * dl/dx (create_graph), R = |A - D|^2, grad of l + R on (W, b)."""
    x, w, b, t = make(8, 5, 7, device=_device(impl))
    d = torch.randn(8, 5, dtype=torch.float64, device=x.device)

    def objective(fn):
        u = x.detach().requires_grad_()
        loss = fn(u)
        a = torch.autograd.grad(loss, [u], create_graph=True)[0] * 8
        return torch.autograd.grad(loss + ((a - d) ** 2).sum() / 8, [w, b])

    ours = objective(lambda u: linear_cross_entropy(u, w, t, bias=b, impl=impl))
    ref = objective(lambda u: ref_loss(u, w, t, b))
    for a, r in zip(ours, ref):
        assert rel(a, r) < 1e-10


# ------------------------------------------------------------------------- dispatch


def test_default_impl_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert lce._resolve_impl(None, cpu, 64, 10) == ("cpp" if HAS_CPP else "torch")
    monkeypatch.setattr(lce, "_cpp_available", lambda: False)
    assert lce._resolve_impl(None, cpu, 64, 10) == "torch"
    monkeypatch.setattr(lce, "_triton_available", lambda device_type: True)
    cuda = torch.device("cuda")
    assert lce._resolve_impl(None, cuda, 1024, 10) == "torch"  # CIFAR head: torch eager is faster
    assert lce._resolve_impl(None, cuda, 8192, 32000) == "triton"


def test_forced_paths_unavailable(monkeypatch):
    x, w, b, t = make(4, 3, 5)
    monkeypatch.setattr(_backends, "cpp_ops", lambda: None)
    with pytest.raises(_backends.BackendUnavailable, match="cpp"):
        linear_cross_entropy(x, w, t, impl="cpp")
    assert rel(linear_cross_entropy(x, w, t), ref_loss(x, w, t)) < 1e-10  # falls back to torch
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(_backends.BackendUnavailable, match="triton"):
        linear_cross_entropy(x, w, t, impl="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cpp_on_non_cpu_device_is_unavailable():
    with pytest.raises(_backends.BackendUnavailable, match="CPU"):
        lce._resolve_impl("cpp", torch.device("cuda"), 4, 4)


# ------------------------------------------------------------------------- bad input


def _bad_cases():
    x, w, b, t = make(4, 3, 5, bias=True)
    x, w, b = x.detach(), w.detach(), b.detach()
    return [
        ("x", TypeError, dict(x=x.numpy())),
        ("x", TypeError, dict(x=x.long())),
        ("x", ValueError, dict(x=x[0])),
        ("x", ValueError, dict(x=x[:0], target=t[:0])),
        ("weight", ValueError, dict(weight=w[:, :2])),
        ("weight", TypeError, dict(weight=w.float())),
        ("weight", ValueError, dict(weight=w[None])),
        ("bias", ValueError, dict(bias=b[:3])),
        ("bias", TypeError, dict(bias=b.float())),
        ("target", TypeError, dict(target=t.double())),
        ("target", TypeError, dict(target=t.bool())),
        ("target", ValueError, dict(target=t[:3])),
        ("target", ValueError, dict(target=torch.tensor([0, 1, 5, 2]))),
        ("target", ValueError, dict(target=torch.tensor([0, -1, 2, 2]))),
        ("reduction", ValueError, dict(reduction="avg")),
        ("impl", ValueError, dict(impl="cuda")),
        ("ignore_index", TypeError, dict(ignore_index=1.5)),
    ], (x, w, b, t)


@pytest.mark.parametrize("case", range(17))
def test_bad_input_names_the_argument(case):
    cases, (x, w, b, t) = _bad_cases()
    name, exc, override = cases[case]
    kw = dict(x=x, weight=w, target=t, bias=b, reduction="mean", ignore_index=IGNORE, impl=None)
    kw.update(override)
    with pytest.raises(exc, match=name):
        linear_cross_entropy(kw.pop("x"), kw.pop("weight"), kw.pop("target"), **kw)


@triton_only
@pytest.mark.parametrize("single", [True, False], ids=["one-block", "looped"])
def test_triton_checks_target_inside_the_op(monkeypatch, single):
    # on CUDA the range check runs inside the op after the first chunk is queued: the
    # kernels must survive out-of-range targets, and the op must still raise ValueError
    import sgr_ext.kernels.linear_ce as kernels

    if not single:
        monkeypatch.setattr(kernels, "MAX_SINGLE_BLOCK", 64)
        monkeypatch.setattr(kernels, "LOOP_BLOCK", 64)
    x, w, b, t = make(5, 4, 300, device=DEV, ignore=(0,))
    with torch.no_grad():
        loss = lce.fused_forward(x, w, b, t, "mean", IGNORE, True, True, True, check_target=True)[0]
    assert rel(loss, ref_loss(x, w, t, b)) < 1e-10
    t[1], t[3] = 300, -7
    with torch.no_grad(), pytest.raises(ValueError, match="target"):
        lce.fused_forward(x, w, b, t, "mean", IGNORE, True, True, True, check_target=True)


# ----------------------------------------------------------------- torch.library, compile


@pytest.mark.parametrize(
    "impl",
    [pytest.param("cpp", marks=cpp_only), pytest.param("triton", marks=triton_only)],
)
def test_opcheck(impl):
    x, w, b, t = make(5, 4, 7, ignore=(1,), device=_device(impl))
    flags = (True, True, True) if impl == "triton" else (False, False, False)
    torch.library.opcheck(torch.ops.sgr_ext.linear_ce_forward.default, (x, w, b, t, "mean", IGNORE, impl, *flags))
    with torch.no_grad():
        _, lse, *_ = torch.ops.sgr_ext.linear_ce_forward(x, w, b, t, "none", IGNORE, impl, False, False, False)
    e = x.new_empty(0)
    g = torch.rand(5, dtype=torch.float64, device=x.device).requires_grad_()
    torch.library.opcheck(
        torch.ops.sgr_ext.linear_ce_backward.default,
        (g, x, w, b, t, lse, e, e, e, "none", IGNORE, impl, True, True, True),
    )


@pytest.mark.parametrize(
    "impl",
    [pytest.param("cpp", marks=cpp_only), pytest.param("triton", marks=triton_only), pytest.param(None)],
)
def test_torch_compile_fullgraph(impl):
    x, w, b, t = make(6, 4, 9, dtype=torch.float32, ignore=(2,), device=_device(impl or "triton"))

    def step(x, w, b, t):
        return linear_cross_entropy(x, w, t, bias=b, impl=impl) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, t)
    ref = step(x, w, b, t)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(torch.autograd.grad(out, [x, w, b]), torch.autograd.grad(ref, [x, w, b])):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-6)


def test_autocast_casts_inputs():
    x, w, b, t = make(6, 8, 9, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(x, w, t, bias=b)
        plain = linear_cross_entropy_torch(x, w, t, b)
    gx, gw = torch.autograd.grad(out, [x, w])
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    ref = ref_loss(x, w, t, b)
    assert rel(out, ref) <= 2 * rel(plain, ref) + 1e-3


def test_meta_tensors_propagate_shapes():
    x, w = torch.randn(5, 4, device="meta"), torch.randn(7, 4, device="meta")
    target = torch.zeros(5, dtype=torch.long, device="meta")
    loss = linear_cross_entropy(x, w, target)
    assert loss.device.type == "meta" and loss.shape == ()
    assert linear_cross_entropy(x, w, target, reduction="none").shape == (5,)


def test_autocast_leaves_float64_alone_like_f_linear():
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    target = torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, target)
        want = F.cross_entropy(F.linear(x, w), target)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
