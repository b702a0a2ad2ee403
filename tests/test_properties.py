"""Property-based tests (hypothesis) of every kernel path against the references.

Kernels: ``reconcile`` (impl torch / cpp / triton: forward, backward and double backward) and
``linear_cross_entropy`` (impl torch / cpp / triton: loss and gradients). Inputs: random shapes
(odd sizes, multi-dim samples), all four float dtypes, magnitudes from 1e-30 to 1e30 in float32
(1e-60..1e60 in float64, bfloat16 up to its overflow threshold, float16 over its whole range),
special structures (all-equal logits, a == d, a == -d, zero vectors, constants).

The oracle is float64 math on the very same (already rounded) inputs. Properties:

1. In the *representable domain* (no intermediate of the accumulate dtype near over- or
   underflow; see ``_reconcile_domain``) every path is finite and accurate.
2. Everywhere: a kernel is never worse than the same-dtype torch reference: where the reference
   is accurate, the kernel is too; and a result that overflows the output dtype is never a
   finite (silently wrong) number.

Hypothesis runs derandomised (reproducible CI) with few examples; set
``SGR_HYPOTHESIS_EXAMPLES=500`` for a longer local search.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from sgr_ext.ops import _backends
from sgr_ext.ops.linear_ce import linear_cross_entropy
from sgr_ext.ops.reconcile import reconcile
from sgr_ext.reference import accumulate_dtype, penalty_dtype, reconcile_torch

N_EXAMPLES = int(os.environ.get("SGR_HYPOTHESIS_EXAMPLES", "12"))
SETTINGS = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# base-10 exponent ranges of the input magnitudes per dtype
EXPONENTS = {torch.float16: (-3, 4), torch.bfloat16: (-30, 37), torch.float32: (-30, 30), torch.float64: (-60, 60)}


def _impls():
    out = ["torch"]
    if _backends.cpp_ops() is not None:
        out.append("cpp")
    if torch.cuda.is_available() or _backends.triton_runs_on(torch.device("cpu")):
        out.append("triton")
    return out


IMPLS = _impls()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _device(impl):
    return "cpu" if impl == "cpp" else DEV


def _values(gen, shape, dtype, exponent, kind):
    """float64 values of ``kind`` at 10**exponent, clamped into ``dtype``'s finite range."""
    big = torch.finfo(dtype).max
    if kind == "near_max":
        mag = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5 + 0.5
        sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
        return (sign * mag * big / 2).to(dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0 ** exponent
    if kind == "constant":
        x = torch.full(shape, 10.0 ** exponent * 1.3, dtype=torch.float64)
    return x.clamp(-big, big).to(dtype)


def _u(dtype):
    """Unit roundoff."""
    return torch.finfo(dtype).eps / 2


# =============================================================================== reconcile


@st.composite
def reconcile_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b = draw(st.integers(1, 5))
    sample = draw(st.one_of(st.integers(1, 600).map(lambda f: (f,)),
                            st.lists(st.integers(1, 7), min_size=2, max_size=3).map(tuple)))
    lo, hi = EXPONENTS[dtype]
    ea = draw(st.integers(lo, hi))
    ed = ea if draw(st.booleans()) else draw(st.integers(lo, hi))
    kind = draw(st.sampled_from(["random", "random", "a_eq_d", "a_neg_d", "zero_a", "zero_d", "constant",
                                 "near_max"]))
    distance = draw(st.sampled_from(["l2", "cosine"]))
    eps = draw(st.sampled_from([1e-8, 0.0, 1e-3]))
    seed = draw(st.integers(0, 2**31 - 1))
    note(f"dtype={dtype} shape={(b, *sample)} kind={kind} ea={ea} ed={ed} distance={distance} eps={eps}")
    return reconcile_case(dtype, (b, *sample), ea, ed, kind, distance, eps, seed)


def reconcile_case(dtype, shape, ea, ed, kind, distance, eps, seed=0):
    """(a, d, distance, eps): a and d of ``kind`` at magnitudes 10**ea and 10**ed."""
    gen = torch.Generator().manual_seed(seed)
    a = _values(gen, shape, dtype, ea, "near_max" if kind == "near_max" else ("constant" if kind == "constant" else "random"))
    d = _values(gen, shape, dtype, ed, "near_max" if kind == "near_max" else "random")
    if kind == "a_eq_d":
        d = a.clone()
    elif kind == "a_neg_d":
        d = -a
    elif kind == "zero_a":
        a = torch.zeros_like(a)
    elif kind == "zero_d":
        d = torch.zeros_like(d)
    return a, d, distance, eps


# The ends of the ranges, every time (the derandomised search draws few examples): float32 at
# 1e-30 and 1e30, bfloat16 near its overflow threshold, both distances.
EXTREME_RECONCILE = [
    reconcile_case(torch.float32, (3, 50), 30, 30, "random", "cosine", 1e-8, 1),
    reconcile_case(torch.float32, (2, 7, 5), 20, 19, "random", "cosine", 0.0, 2),
    reconcile_case(torch.float32, (3, 50), -30, -30, "random", "cosine", 0.0, 3),
    reconcile_case(torch.float32, (4, 33), -30, -29, "random", "l2", 1e-8, 4),
    reconcile_case(torch.float32, (2, 40), 15, 15, "a_neg_d", "l2", 1e-8, 5),
    reconcile_case(torch.bfloat16, (3, 64), 0, 0, "near_max", "cosine", 1e-8, 6),
    reconcile_case(torch.bfloat16, (3, 64), 0, 0, "near_max", "l2", 1e-8, 7),
    reconcile_case(torch.bfloat16, (2, 9), 37, 36, "random", "cosine", 1e-8, 8),
]


def _with_examples(cases, **fixed):
    """``@example(case=c, **fixed)`` for every c in ``cases``."""
    def deco(f):
        for c in cases:
            f = example(case=c, **fixed)(f)
        return f
    return deco


def _reconcile_domain(a64, d64, acc, distance, eps) -> bool:
    """Whether every intermediate of the accumulate dtype ``acc`` stays well inside its range."""
    fi = torch.finfo(acc)
    b = a64.shape[0]
    a2, d2 = a64.reshape(b, -1), d64.reshape(b, -1)
    limit = fi.max / (16 * b)
    if distance == "l2":
        s = (a2 - d2).pow(2).sum(1)
        return bool(s.max() < limit) and bool(((a2 - d2).abs().max() ** 2) < limit)
    aa, dd = a2.pow(2).sum(1), d2.pow(2).sum(1)
    ok = bool(aa.max() < limit) and bool(dd.max() < limit)
    normal = lambda v: (v == 0) | (v > fi.tiny * 1e6)  # noqa: E731  (no subnormal sums)
    negligible = (aa.sqrt() * dd.sqrt()) < 1e-6 * eps   # the eps term dominates the denominator
    ok &= bool((normal(aa) & normal(dd) | negligible).all())
    if eps == 0:  # 0/0 where a sample is zero: NaN by definition
        ok &= bool(((aa > 0) & (dd > 0)).all())
    return ok


def _close(got, want, rtol, atol):
    got, want = got.double(), want.double()
    return bool(((got - want).abs() <= atol + rtol * want.abs()).all())


def _forward_tol(acc, distance, numel):
    if acc == torch.float64:
        return (1e-11, 1e-11) if distance == "cosine" else (1e-11, 0.0)
    tiny = torch.finfo(torch.float32).tiny
    return (1e-4, 1e-4) if distance == "cosine" else (1e-4, tiny * 1e-6 * numel)


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=reconcile_cases())
@_with_examples(EXTREME_RECONCILE)
def test_reconcile_forward_matches_float64(impl, case):
    a, d, distance, eps = case
    dev = _device(impl)
    a, d = a.to(dev), d.to(dev)
    acc = accumulate_dtype(a.dtype)
    truth = reconcile_torch(a.double(), d.double(), distance, eps)
    got = reconcile(a, d, distance=distance, eps=eps, impl=impl)
    ref = reconcile(a, d, distance=distance, eps=eps, impl="torch")
    assert got.dtype == acc and got.shape == ()
    rtol, atol = _forward_tol(acc, distance, a.numel())
    if _reconcile_domain(a.double(), d.double(), penalty_dtype(a.dtype, distance), distance, eps):
        assert torch.isfinite(got), got
        assert _close(got, truth, rtol, atol), (float(got), float(truth))
        assert _close(ref, truth, rtol, atol), (float(ref), float(truth))
    if torch.isfinite(ref) and _close(ref, truth, rtol, atol):  # never worse than the reference
        assert torch.isfinite(got) and _close(got, truth, 2 * rtol, 2 * atol), (float(got), float(truth))
    if torch.isfinite(truth) and truth.abs() > torch.finfo(acc).max:  # overflows the output dtype
        assert not torch.isfinite(got), float(got)


def _grad_tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


def _term_scale(a64, d64, distance, eps, g):
    """Size of the terms the gradient is a difference of (float64): the error scale.

    l2: (2g/B) max(|a|, |d|).  cosine: (g/B) max(|d_j| / den, |<a,d>| |d| |a_j| / (den^2 |a|)) -- the
    two terms cancel exactly when a sample has one feature, so the result itself is no scale.
    """
    b = a64.shape[0]
    a2, d2 = a64.reshape(b, -1), d64.reshape(b, -1)
    if distance == "l2":
        return 2 * abs(g) / b * float(torch.maximum(a2.abs(), d2.abs()).max())
    na, nd = a2.norm(dim=1, keepdim=True), d2.norm(dim=1, keepdim=True)
    s = (a2 * d2).sum(1, keepdim=True)
    den = na * nd + eps
    t1 = d2.abs() / den
    t2 = torch.where(na > 0, (s.abs() / den) * (nd / den) * a2.abs() / na.clamp_min(1e-300), torch.zeros_like(a2))
    return abs(g) / b * float(torch.maximum(t1, t2).max())


def _grad_close(got, want64, dtype, scale=None):
    """|got - want| <= tol * scale + (subnormal granularity), elementwise; scale: max|want| by default."""
    scale = max(float(want64.abs().max()), scale or 0.0)
    return bool(((got.double() - want64).abs() <= _grad_tol(dtype) * scale + 2 * torch.finfo(dtype).tiny).all())


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=reconcile_cases(), g=st.sampled_from([1.0, -0.3, 7.5]))
@_with_examples(EXTREME_RECONCILE, g=-0.3)
def test_reconcile_backward_matches_float64(impl, case, g):
    a, d, distance, eps = case
    dev = _device(impl)
    a, d = a.to(dev), d.to(dev)
    a64 = a.double().requires_grad_(True)
    (want,) = torch.autograd.grad(reconcile_torch(a64, d.double(), distance, eps) * g, a64)

    def grad_of(path):
        leaf = a.clone().requires_grad_(True)
        (out,) = torch.autograd.grad(reconcile(leaf, d, distance=distance, eps=eps, impl=path) * g, leaf)
        assert out.dtype == a.dtype and out.shape == a.shape
        return out

    got, ref = grad_of(impl), grad_of("torch")
    representable = bool(torch.isfinite(want).all()) and float(want.abs().max()) < torch.finfo(a.dtype).max / 8
    scale = _term_scale(a.double(), d.double(), distance, eps, g) if representable else None
    if representable and _reconcile_domain(a.double(), d.double(), penalty_dtype(a.dtype, distance), distance, eps):
        assert bool(torch.isfinite(got).all())
        assert _grad_close(got, want, a.dtype, scale), (float((got.double() - want).abs().max()), scale)
    if bool(torch.isfinite(ref).all()) and representable and _grad_close(ref, want, a.dtype, scale):
        assert bool(torch.isfinite(got).all()) and _grad_close(got, want, a.dtype, 2 * scale)


@st.composite
def double_backward_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    b = draw(st.integers(1, 4))
    f = draw(st.integers(1, 300))
    e = draw(st.integers(-8, 15)) if dtype == torch.float32 else draw(st.integers(-40, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = 10.0 ** e
    a = (torch.randn(b, f, generator=gen, dtype=torch.float64) * scale).to(dtype)
    d = (torch.randn(b, f, generator=gen, dtype=torch.float64) * scale * draw(st.sampled_from([1.0, 3.0, 0.1]))).to(dtype)
    v = torch.randn(b, f, generator=gen, dtype=torch.float64).to(dtype)
    distance = draw(st.sampled_from(["l2", "cosine"]))
    note(f"dtype={dtype} B={b} F={f} scale=1e{e} distance={distance}")
    return a, d, v, distance


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=double_backward_cases())
def test_reconcile_double_backward_matches_float64(impl, case):
    """Hessian-vector product d/da <grad_a R, v> (what the double-backward engine differentiates)."""
    a, d, v, distance = case
    if impl == "torch":  # plain autograd through norm() in float32 loses digits for nearly (anti)parallel
        a, d, v = a.double(), d.double(), v.double()  # a and d; it is the reference, not under test here
    dev = _device(impl)
    a, d, v = a.to(dev), d.to(dev), v.to(dev)

    def hvp(path, x, dd, vv):
        leaf = x.clone().requires_grad_(True)
        if path == "ref":
            out = reconcile_torch(leaf, dd, distance, 1e-8)
        else:
            out = reconcile(leaf, dd, distance=distance, eps=1e-8, impl=path)
        (g,) = torch.autograd.grad(out, leaf, create_graph=True)
        (h,) = torch.autograd.grad((g * vv).sum(), leaf)
        return h

    want = hvp("ref", a.double(), d.double(), v.double())
    got = hvp(impl, a, d, v)
    tol = 1e-9 if a.dtype == torch.float64 else 1e-3  # float32: a few cancelling second-order terms
    scale = float(want.abs().max())
    if distance == "cosine":  # terms of size |v| / (B |a|^2) cancel (exactly, for one feature)
        na = a.double().reshape(a.shape[0], -1).norm(dim=1)
        scale = max(scale, float(v.double().abs().max()) / (a.shape[0] * float(na.min()) ** 2))
    assert bool(torch.isfinite(got).all())
    assert float((got.double() - want).abs().max()) <= tol * scale + torch.finfo(a.dtype).tiny, (
        float((got.double() - want).abs().max()), scale)


# ====================================================================== linear_cross_entropy


@st.composite
def linear_ce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 37))
    h = draw(st.integers(1, 33))
    v = draw(st.integers(1, 67))
    bias = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    kind = draw(st.sampled_from(["random", "random", "equal_logits", "extreme", "near_overflow"]))
    lo, hi = EXPONENTS[dtype]
    e = draw(st.integers(lo, hi)) if kind == "extreme" else 0
    ignore_frac = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    note(f"dtype={dtype} N={n} H={h} V={v} bias={bias} reduction={reduction} kind={kind} e={e} ignore={ignore_frac}")
    return linear_ce_case(dtype, n, h, v, bias, reduction, kind, e, ignore_frac, seed)


def linear_ce_case(dtype, n, h, v, bias, reduction, kind, e=0, ignore_frac=0.0, seed=0):
    """(x, w, b, t, reduction) of ``kind``: random, equal_logits, extreme (x at 10**e) or near_overflow."""
    gen = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    x = torch.randn(n, h, generator=gen, dtype=torch.float64)
    w = torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    if kind == "extreme":
        x = x * 10.0 ** e
    elif kind == "equal_logits":
        w = torch.zeros_like(w)
        if b is not None:
            b = torch.full_like(b, 2.5)
    elif kind == "near_overflow":  # logits up to about the dtype's largest value
        x = x / x.abs().max() * big / (4 * max(1.0, math.sqrt(h)))
    x, w = x.clamp(-big, big).to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    t = torch.randint(0, v, (n,), generator=gen)
    ignore = torch.rand(n, generator=gen) < ignore_frac
    t = torch.where(ignore, torch.full_like(t, -100), t)
    return x, w, b, t, reduction


EXTREME_LINEAR_CE = [
    linear_ce_case(torch.float32, 9, 5, 11, True, "mean", "extreme", 30, 0.3, 1),
    linear_ce_case(torch.float32, 9, 5, 11, False, "none", "extreme", -30, 0.0, 2),
    linear_ce_case(torch.bfloat16, 7, 6, 13, True, "sum", "near_overflow", 0, 0.0, 3),
    linear_ce_case(torch.float16, 7, 6, 13, False, "mean", "near_overflow", 0, 0.3, 4),
    linear_ce_case(torch.float32, 5, 4, 3, True, "mean", "equal_logits", 0, 0.0, 5),
    linear_ce_case(torch.bfloat16, 5, 4, 17, True, "none", "equal_logits", 0, 0.0, 6),
]


def _lce_truth(x, w, b, t, reduction):
    """float64 loss and gradients (x, w, b) on the same rounded inputs; grad_out = 1 (sum for none)."""
    leaves = [x.double().requires_grad_(True), w.double().requires_grad_(True)]
    if b is not None:
        leaves.append(b.double().requires_grad_(True))
    z = leaves[0] @ leaves[1].t() + (leaves[2] if b is not None else 0)
    loss = F.cross_entropy(z, t, reduction=reduction)
    total = loss.sum()
    grads = torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad and torch.isfinite(total) else None
    return loss.detach(), grads, float(z.detach().abs().max()) if z.numel() else 0.0


def _lce_run(impl, x, w, b, t, reduction):
    leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if b is not None:
        leaves.append(b.clone().requires_grad_(True))
    loss = linear_cross_entropy(leaves[0], leaves[1], t, bias=leaves[2] if b is not None else None,
                                reduction=reduction, impl=impl)
    total = loss.sum()
    grads = torch.autograd.grad(total, leaves) if total.requires_grad else None
    return loss.detach(), grads


def _err(got, want):
    """Largest absolute deviation (inf where non-finite)."""
    d = (got.double() - want.double()).abs()
    return float(d.max()) if d.numel() else 0.0


@pytest.mark.parametrize("impl", IMPLS)
@SETTINGS
@given(case=linear_ce_cases())
@_with_examples(EXTREME_LINEAR_CE)
def test_linear_ce_matches_float64_and_is_never_worse_than_torch(impl, case):
    x, w, b, t, reduction = case
    dev = _device(impl)
    x, w, t = x.to(dev), w.to(dev), t.to(dev)
    b = b.to(dev) if b is not None else None
    truth, tgrads, zmax = _lce_truth(x, w, b, t, reduction)
    got, ggrads = _lce_run(impl, x, w, b, t, reduction)
    ref, rgrads = _lce_run("torch", x, w, b, t, reduction)
    assert got.shape == truth.shape and got.dtype == accumulate_dtype(x.dtype)
    valid = t != -100
    if reduction == "mean" and not bool(valid.any()):  # every row ignored: NaN, as in torch
        assert bool(torch.isnan(got)) and bool(torch.isnan(ref))
        return
    # the loss: in float32/64 accurate; in half precision within the logits' rounding error,
    # and never worse than plain torch in the same dtype
    u = _u(x.dtype)
    base = 1e-10 if x.dtype == torch.float64 else 1e-5
    rows = float(valid.sum()) if reduction == "sum" else 1.0
    tol = base * (1.0 + float(truth.abs().max())) + 4 * u * zmax * rows
    # representable: the logits in x's dtype, and the sum of the row losses (each <= 2 zmax) in
    # the accumulate dtype (the reduced modes add the rows before dividing)
    finite_truth = (bool(torch.isfinite(truth).all()) and zmax < torch.finfo(x.dtype).max / 8
                    and 4 * zmax * max(1, x.shape[0]) < torch.finfo(accumulate_dtype(x.dtype)).max)
    if finite_truth and x.dtype in (torch.float32, torch.float64):
        assert _err(got, truth) <= tol, (_err(got, truth), tol)
    if not bool(torch.isfinite(truth).all()):  # the true loss overflows even float64
        overflow = torch.isinf(truth)
        assert not bool(torch.isfinite(got[overflow]).any()), "a finite loss where the true one overflows"
        return
    ref_err = _err(ref, truth) if bool(torch.isfinite(ref).all()) else math.inf
    if ref_err <= tol:
        assert _err(got, truth) <= max(tol, 2 * ref_err), (_err(got, truth), ref_err, tol)
    # gradients: never worse than torch (norm-relative), accurate in float32/64
    if tgrads is None or ggrads is None or rgrads is None:
        return
    for name, g, r, want in zip(("x", "weight", "bias"), ggrads, rgrads, tgrads):
        if not bool(torch.isfinite(want).all()) or float(want.abs().max()) > torch.finfo(x.dtype).max / 8:
            continue  # the true gradient itself overflows x's dtype
        scale = float(want.abs().max()) if want.numel() else 0.0
        gtol = (1e-9 if x.dtype == torch.float64 else 1e-4) * scale + 8 * u * zmax * scale + 1e-30
        if finite_truth and x.dtype in (torch.float32, torch.float64):
            assert _err(g, want) <= gtol, (name, _err(g, want), gtol)
        rerr = _err(r, want) if bool(torch.isfinite(r).all()) else math.inf
        if rerr <= max(gtol, 5e-2 * scale):
            assert _err(g, want) <= max(gtol, 3 * rerr, 1e-2 * scale), (name, _err(g, want), rerr)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_ce_all_equal_logits_is_log_v(impl, dtype):
    """Zero weight, equal bias: every row's loss is log V exactly; dx = 0; dW = (p - e_y)^T x."""
    dev = _device(impl)
    n, h, v = 13, 7, 29
    x = torch.randn(n, h, dtype=torch.float64).to(dtype).to(dev).requires_grad_(True)
    w = torch.zeros(v, h, dtype=dtype, device=dev, requires_grad=True)
    b = torch.full((v,), 3.0, dtype=dtype, device=dev, requires_grad=True)
    t = torch.randint(0, v, (n,), device=dev)
    loss = linear_cross_entropy(x, w, t, bias=b, reduction="none", impl=impl)
    torch.testing.assert_close(loss.double(), torch.full((n,), math.log(v), dtype=torch.float64, device=dev),
                               rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)
    gx, gw, gb = torch.autograd.grad(loss.sum(), [x, w, b])
    assert bool((gx == 0).all())
    p_minus_e = torch.full((n, v), 1.0 / v, dtype=torch.float64, device=dev)
    p_minus_e[torch.arange(n), t] -= 1
    tol = 1e-12 if dtype == torch.float64 else 2 * _u(dtype) * 8
    torch.testing.assert_close(gw.double(), p_minus_e.t() @ x.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(gb.double(), p_minus_e.sum(0), rtol=tol, atol=tol)
