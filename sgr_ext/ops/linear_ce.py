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

Ops (namespace ``sgr_ext``, registered with ``torch.library.custom_op`` + ``register_fake`` +
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces them without breaks):

    linear_ce_forward(x, weight, bias?, target, reduction, ignore_index, impl, need_dx, need_dw, need_db)
        -> (loss, lse, dx, dw, db)      dx/dw/db: gradient of the loss for grad_out = 1 when
                                         need_* (the precomputed mode), else empty
    linear_ce_backward(grad_out, x, weight, bias?, target, lse, cache_dx, cache_dw, cache_db,
                       reduction, ignore_index, impl, need_dx, need_dw, need_db) -> (dx, dw, db)
    linear_ce_double_backward(gdx?, gdw?, gdb?, grad_out, x, weight, bias?, target, lse,
                              reduction, ignore_index, impl, need_g, need_x, need_w, need_b)
        -> (grad_grad_out, grad_x, grad_w, grad_b)
    linear_ce_scale_(dx!, dw!, db!, grad_out)   in-place rescale of the precomputed gradient

Math (mean; c_i = g / N_valid, 0 on ignored rows; z = x W^T + b; p = softmax(z)):

    dz_i = c_i (p_i - e_{y_i});  dx = dz W;  dW = dz^T x;  db = sum_i dz_i
    given cotangents (gdx, gdW, gdb) of (dx, dW, db):
        Gdz  = gdx W^T + x gdW^T + gdb
        Gz_i = c_i (p_i * Gdz_i - p_i <p_i, Gdz_i>)
        grad_x = Gz W + dz gdW;  grad_W = Gz^T x + dz^T gdx;  grad_b = sum_i Gz_i
        grad_g = sum_i (c_i / g) <p_i - e_{y_i}, Gdz_i>
"sum" has c_i = g, "none" c_i = g_i (and grad_g_i = <p_i - e_{y_i}, Gdz_i>). Everything is
chunked over rows with the saved per-row lse, in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch
from torch import Tensor

from sgr_ext import _checks
from sgr_ext.ops import _backends
from sgr_ext.reference import accumulate_dtype, linear_cross_entropy_torch

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("torch", "cpp", "triton")

# impl=None on CUDA: the fused path pays off once the logits are big; below this many
# logits (N * V) plain torch is faster (CIFAR-size heads, DESIGN.md section 4).
FUSED_MIN_LOGITS = 1 << 22
# precomputed dW of a half-precision weight accumulates over chunks in float32 when the
# float32 buffer is at most this big; above it, in the weight's dtype (one rounding per
# chunk, fp32 inside every GEMM), so peak memory stays at one chunk of logits.
FP32_DW_MAX_BYTES = 32 << 20
# budget of the float32/float64 working buffers of the (chunked) double backward
DOUBLE_BACKWARD_CHUNK_BYTES = 64 << 20
# CUDA: 2 runs each chunk's dx GEMM on a side stream, concurrently with its dW GEMM (no
# extra memory; benchmarks/gpu_linear_ce.py times both: "sgr_ext_triton_2streams")
GRAD_GEMM_STREAMS = 1


# ------------------------------------------------------------------------------ helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_rows(n: int, h: int, v: int) -> int:
    """Rows per chunk of the fused path: the (rows, V) logits chunk holds about N*H elements.

    The same budget as Liger-Kernel's fused linear cross-entropy (so peak memory matches it
    at equal sizes), with at least 64 rows per chunk so the GEMMs stay efficient.
    """
    rows = _next_pow2(_cdiv(n, _cdiv(v, h)))
    return max(1, min(n, max(rows, 64)))


def _triton():
    # Imported lazily: triton.jit reads TRITON_INTERPRET when the kernels are defined.
    from sgr_ext.kernels import linear_ce as kernels

    return kernels


def _cpp():
    ops = _backends.cpp_ops()
    if ops is None:
        raise _backends.BackendUnavailable("sgr_ext: the C++ library is not built (see sgr_ext.info())")
    return ops


def _valid(target: Tensor, ignore_index: int) -> Tensor:
    return target != ignore_index


def _row_scale(grad_out: Tensor, target: Tensor, reduction: str, ignore_index: int, acc: torch.dtype) -> Tensor:
    """c_i: d(loss)/d(loss_i) times grad_out, 0 on ignored rows; (N,) in ``acc``."""
    valid = _valid(target, ignore_index)
    g = grad_out.to(acc)
    if reduction == "none":
        c = g
    elif reduction == "mean":
        c = g / valid.sum().to(acc)
    else:
        c = g.expand(target.shape)
    return torch.where(valid, c.expand(target.shape), torch.zeros((), dtype=acc, device=target.device))


def _reduce(loss_rows: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / _valid(target, ignore_index).sum().to(total.dtype)
    return total


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


# --------------------------------------------------------------- fused (chunked GEMM) path


def _mm_acc(a: Tensor, b: Tensor, out: Tensor, accumulate: bool) -> None:
    """out (+)= a @ b with ``out`` possibly wider (float32) than a and b."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif out.device.type == "cuda":
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:
        prod = torch.mm(a.to(out.dtype), b.to(out.dtype))
        if accumulate:
            out.add_(prod)
        else:
            out.copy_(prod)


def _logits(xc: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    if bias is None:
        return torch.mm(xc, weight.t(), out=out)
    return torch.addmm(bias, xc, weight.t(), out=out)


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[key]


def _grad_buffers(x, weight, need_dx, need_dw, need_db):
    """Outputs of the chunked gradient: dx (N, H) in x's dtype; dw (V, H) in float32 for a
    half-precision weight up to FP32_DW_MAX_BYTES, else in the weight's dtype (a larger fp32
    buffer would exceed Liger's whole peak); db (V,) in the accumulate dtype. Empty where unused."""
    v, h = weight.shape
    acc = accumulate_dtype(x.dtype)
    dx = torch.empty_like(x) if need_dx else _empty(x)
    dw_dtype = acc if (weight.dtype != acc and v * h * 4 <= FP32_DW_MAX_BYTES) else weight.dtype
    dw = torch.empty((v, h), dtype=dw_dtype, device=x.device) if need_dw else _empty(weight)
    db = torch.empty(v, dtype=acc, device=x.device) if need_db else _empty(x)
    return dx, dw, db


def _add_chunk_param_grads(z, xc, dw, db, first: bool, need_dw: bool, need_db: bool) -> None:
    """dw (+)= z^T xc and db (+)= sum over rows of z, for one chunk's logits gradient z (rows, V)."""
    if need_dw:
        _mm_acc(z.t(), xc, dw, accumulate=not first)
    if need_db:
        if first:
            torch.sum(z, dim=0, dtype=db.dtype, out=db)
        else:
            db.add_(z.sum(dim=0, dtype=db.dtype))


def _cast_param_grads(dw, db, weight, bias, need_dw: bool, need_db: bool):
    """dw and db back to the parameters' dtypes."""
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if need_db:
        db = db.to(bias.dtype)
    return dw, db


def fused_forward(x, weight, bias, target, reduction, ignore_index, need_dx, need_dw, need_db, check_target=True):
    """Triton path forward: (loss, lse, dx, dw, db); gradients for grad_out = 1 when need_*."""
    k = _triton()
    n, h = x.shape
    v = weight.shape[0]
    acc = accumulate_dtype(x.dtype)
    dev = x.device
    need_db = need_db and bias is not None
    grads = need_dx or need_dw or need_db
    lse = torch.empty(n, dtype=acc, device=dev)
    scale = None
    if grads:  # the gradient scale c of valid rows, kept on the device (no host sync)
        if reduction == "mean":
            scale = 1.0 / _valid(target, ignore_index).sum().to(acc)
        else:
            scale = torch.ones((), dtype=acc, device=dev)
    rows = chunk_rows(n, h, v)
    nchunks = _cdiv(n, rows)
    zbuf = torch.empty((rows, v), dtype=x.dtype, device=dev)
    if reduction == "none":
        loss_rows = torch.empty(n, dtype=acc, device=dev)
    else:  # the kernel adds each row's loss to one float64 scalar (no per-row buffer)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    # the target check: a flag computed on the device now, read (one host sync) once the
    # first chunk is queued, so the sync costs almost no GPU idle time; the kernels
    # tolerate out-of-range targets in the meantime
    bad_flag = k.check_targets(target, v, ignore_index) if check_target else None
    dx, dw, db = _grad_buffers(x, weight, need_dx, need_dw, need_db)
    side = None
    if GRAD_GEMM_STREAMS > 1 and dev.type == "cuda" and need_dx and need_dw:
        main, side = torch.cuda.current_stream(dev), _side_stream(dev)
        dx_done = None
    for i in range(nchunks):
        s, e = i * rows, min(n, (i + 1) * rows)
        xc, z = x[s:e], zbuf[: e - s]
        if side is not None and dx_done is not None:
            main.wait_event(dx_done)  # the previous dx GEMM has read zbuf
        _logits(xc, weight, bias, z)
        k.ce_rows(z, target[s:e], loss_rows[s:e] if reduction == "none" else loss_sum, lse[s:e], scale, ignore_index)
        if bad_flag is not None and i == 0 and bool(bad_flag):
            _check_target_range(target, v, ignore_index)  # raises, naming a bad value
        if side is not None:  # dx on the side stream, dW (below) on this one, concurrently
            side.wait_event(main.record_event())
            with torch.cuda.stream(side):
                torch.mm(z, weight, out=dx[s:e])
                dx_done = side.record_event()
        elif need_dx:
            torch.mm(z, weight, out=dx[s:e])
        _add_chunk_param_grads(z, xc, dw, db, i == 0, need_dw, need_db)
    if side is not None:
        main.wait_event(dx_done)  # dx is complete, zbuf is free
    del zbuf
    if reduction == "none":
        loss = loss_rows
    else:
        loss = loss_sum.to(acc)
        if reduction == "mean":
            loss = loss / _valid(target, ignore_index).sum().to(acc)
    dw, db = _cast_param_grads(dw, db, weight, bias, need_dw, need_db)
    return loss, lse, dx, dw, db


def fused_backward(c, x, weight, bias, target, lse, ignore_index, need_dx, need_dw, need_db):
    """Recompute backward on the Triton path with per-row scales c (N,): (dx, dw, db)."""
    k = _triton()
    n, h = x.shape
    v = weight.shape[0]
    need_db = need_db and bias is not None
    rows = chunk_rows(n, h, v)
    zbuf = torch.empty((rows, v), dtype=x.dtype, device=x.device)
    dx, dw, db = _grad_buffers(x, weight, need_dx, need_dw, need_db)
    for i, s in enumerate(range(0, n, rows)):
        e = min(n, s + rows)
        xc, z = x[s:e], zbuf[: e - s]
        _logits(xc, weight, bias, z)
        k.ce_grad(z, target[s:e], lse[s:e], c[s:e], ignore_index)
        if need_dx:
            torch.mm(z, weight, out=dx[s:e])
        _add_chunk_param_grads(z, xc, dw, db, i == 0, need_dw, need_db)
    dw, db = _cast_param_grads(dw, db, weight, bias, need_dw, need_db)
    return dx, dw, db


# ------------------------------------------------------------------- double backward


def double_backward(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index,
                    use_triton, need_g, need_x, need_w, need_b):
    """VJP of (g, x, W, b) -> (dx, dW, db) for cotangents (gdx, gdW, gdb); chunked over rows.

    Runs in the accumulate dtype; the elementwise core is one Triton pass per chunk when
    ``use_triton`` and chunked torch otherwise. No (N, V) buffer: chunks of at most
    DOUBLE_BACKWARD_CHUNK_BYTES. (``lse`` is part of the op contract but each chunk
    renormalises with the lse of its float32/float64 logits.)
    """
    n, h = x.shape
    v = weight.shape[0]
    acc = accumulate_dtype(x.dtype)
    dev = x.device
    need_b = need_b and bias is not None
    c = _row_scale(grad_out, target, reduction, ignore_index, acc)
    valid = _valid(target, ignore_index)
    xa, wa = x.to(acc), weight.to(acc)
    ba = bias.to(acc) if bias is not None else None
    gdxa = gdx.to(acc) if gdx is not None else None
    gdwa = gdw.to(acc) if gdw is not None else None
    gdba = gdb.to(acc) if gdb is not None else None
    grad_x = torch.zeros((n, h), dtype=acc, device=dev) if need_x else None
    grad_w = torch.zeros((v, h), dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(v, dtype=acc, device=dev) if need_b else None
    dots = torch.zeros(n, dtype=acc, device=dev)
    if gdxa is not None or gdwa is not None or gdba is not None:
        elem = torch.finfo(acc).bits // 8
        rows = max(1, min(n, DOUBLE_BACKWARD_CHUNK_BYTES // max(1, 2 * v * elem)))
        k = _triton() if use_triton else None
        for s in range(0, n, rows):
            e = min(n, s + rows)
            xc, tc, cc = xa[s:e], target[s:e], c[s:e]
            z = xc @ wa.t()
            if ba is not None:
                z += ba
            gz = torch.zeros_like(z)
            if gdxa is not None:
                gz.addmm_(gdxa[s:e], wa.t())
            if gdwa is not None:
                gz.addmm_(xc, gdwa.t())
            if gdba is not None:
                gz += gdba
            # the chunk holds whole rows: normalise with their own lse (for half inputs the
            # saved one came from rounded logits)
            lse_c = torch.logsumexp(z, dim=1)
            if k is not None:  # z -> dz, gz -> Gz, dots <- <p - e_y, Gdz>
                k.ce_double(z, gz, tc, lse_c, cc, dots[s:e], ignore_index)
                dz = z
            else:
                p = torch.exp(z - lse_c[:, None])
                vc = valid[s:e]
                ysafe = torch.where(vc, tc, torch.zeros_like(tc))[:, None]
                pg = (p * gz).sum(1)
                dots[s:e] = torch.where(vc, pg - gz.gather(1, ysafe)[:, 0], torch.zeros((), dtype=acc, device=dev))
                gz = cc[:, None] * p * (gz - pg[:, None])
                dz = p.mul_(cc[:, None])
                dz.scatter_add_(1, ysafe, -cc[:, None])
            if grad_x is not None:
                grad_x[s:e] = gz @ wa
                if gdwa is not None:
                    grad_x[s:e] += dz @ gdwa
            if grad_w is not None:
                grad_w.addmm_(gz.t(), xc)
                if gdxa is not None:
                    grad_w.addmm_(dz.t(), gdxa[s:e])
            if grad_b is not None:
                grad_b += gz.sum(0)
    grad_g = None
    if need_g:
        if reduction == "none":
            grad_g = dots
        else:
            grad_g = dots.sum()
            if reduction == "mean":
                grad_g = grad_g / valid.sum().to(acc)
        grad_g = grad_g.to(grad_out.dtype)
    return (
        grad_g if grad_g is not None else _empty(grad_out),
        grad_x.to(x.dtype) if grad_x is not None else _empty(x),
        grad_w.to(weight.dtype) if grad_w is not None else _empty(weight),
        grad_b.to(bias.dtype) if grad_b is not None else _empty(x),
    )


# --------------------------------------------------------------------------- custom ops


def _loss_shape(x: Tensor, reduction: str) -> tuple:
    return (x.shape[0],) if reduction == "none" else ()


@contextlib.contextmanager
def _no_autocast(x: Tensor):
    """Kernels choose their own precision (autocast must not recast the GEMMs inside them)
    and run on x's device (Triton launches on the current device)."""
    with torch.autocast(x.device.type, enabled=False):
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                yield
        else:
            yield


@torch.library.custom_op("sgr_ext::linear_ce_forward", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, reduction: str, ignore_index: int,
    impl: str, need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _no_autocast(x):
        if impl == "triton":
            loss, lse, dx, dw, db = fused_forward(x, weight, bias, target, reduction, ignore_index, need_dx,
                                                  need_dw, need_db, check_target=x.device.type == "cuda")
            return loss, lse, dx, dw, db
        if impl == "cpp":
            loss_rows, lse = _cpp().linear_ce_forward(x, weight, bias, target, ignore_index)
            return _reduce(loss_rows, target, reduction, ignore_index), lse, _empty(x), _empty(weight), _empty(x)
    raise ValueError(f"sgr_ext::linear_ce_forward: impl must be 'triton' or 'cpp', got {impl!r}")


@_forward_op.register_fake
def _(x, weight, bias, target, reduction, ignore_index, impl, need_dx, need_dw, need_db):
    acc = accumulate_dtype(x.dtype)
    n, h = x.shape
    v = weight.shape[0]
    return (
        x.new_empty(_loss_shape(x, reduction), dtype=acc),
        x.new_empty((n,), dtype=acc),
        x.new_empty((n, h)) if need_dx else x.new_empty((0,)),
        weight.new_empty((v, h)) if need_dw else weight.new_empty((0,)),
        bias.new_empty((v,)) if (need_db and bias is not None) else x.new_empty((0,)),
    )


def _scale_impl(dx: Tensor, dw: Tensor, db: Tensor, grad_out: Tensor) -> None:
    for t in (dx, dw, db):
        if t.numel() == 0:
            continue
        if _backends.triton_runs_on(t.device):
            _triton().scale_(t, grad_out.reshape(1))
        else:
            t.mul_(grad_out.to(t.dtype))


_scale_op = torch.library.custom_op("sgr_ext::linear_ce_scale_", _scale_impl, mutates_args=("dx", "dw", "db"))


@_scale_op.register_fake
def _(dx, dw, db, grad_out):
    return None


@torch.library.custom_op("sgr_ext::linear_ce_backward", mutates_args=())
def _backward_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
    cache_dx: Tensor, cache_dw: Tensor, cache_db: Tensor, reduction: str, ignore_index: int, impl: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    need_db = need_db and bias is not None
    cached = (
        (not need_dx or cache_dx.numel() > 0)
        and (not need_dw or cache_dw.numel() > 0)
        and (not need_db or cache_db.numel() > 0)
        and reduction != "none"
    )
    if cached:
        def scaled(t: Tensor) -> Tensor:
            return (t.to(grad_out.dtype) * grad_out).to(t.dtype) if t.numel() else _empty(t)

        return (
            scaled(cache_dx) if need_dx else _empty(x),
            scaled(cache_dw) if need_dw else _empty(weight),
            scaled(cache_db) if need_db else _empty(x),
        )
    with _no_autocast(x):
        c = _row_scale(grad_out, target, reduction, ignore_index, accumulate_dtype(x.dtype))
        if impl == "triton":
            return fused_backward(c, x, weight, bias, target, lse, ignore_index, need_dx, need_dw, need_db)
        if impl == "cpp":
            dx, dw, db = _cpp().linear_ce_backward(x, weight, bias, target, ignore_index, lse, c.contiguous(),
                                                   need_dx, need_dw, need_db)
            return dx, dw, db
    raise ValueError(f"sgr_ext::linear_ce_backward: impl must be 'triton' or 'cpp', got {impl!r}")


@_backward_op.register_fake
def _(grad_out, x, weight, bias, target, lse, cache_dx, cache_dw, cache_db, reduction, ignore_index, impl,
      need_dx, need_dw, need_db):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_dw else weight.new_empty((0,)),
        bias.new_empty(bias.shape) if (need_db and bias is not None) else x.new_empty((0,)),
    )


@torch.library.custom_op("sgr_ext::linear_ce_double_backward", mutates_args=())
def _double_backward_op(
    gdx: Optional[Tensor], gdw: Optional[Tensor], gdb: Optional[Tensor], grad_out: Tensor, x: Tensor,
    weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, reduction: str, ignore_index: int,
    impl: str, need_g: bool, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    use_triton = impl == "triton" and _backends.triton_runs_on(x.device)
    with _no_autocast(x):
        return double_backward(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index,
                               use_triton, need_g, need_x, need_w, need_b)


@_double_backward_op.register_fake
def _(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction, ignore_index, impl, need_g, need_x,
      need_w, need_b):
    return (
        grad_out.new_empty(grad_out.shape) if need_g else grad_out.new_empty((0,)),
        x.new_empty(x.shape) if need_x else x.new_empty((0,)),
        weight.new_empty(weight.shape) if need_w else weight.new_empty((0,)),
        bias.new_empty(bias.shape) if (need_b and bias is not None) else x.new_empty((0,)),
    )


# ------------------------------------------------------------------------------ autograd


def _opt(t: Tensor, needed: bool) -> Optional[Tensor]:
    return t if needed else None


def _forward_setup(ctx, inputs, output):
    x, weight, bias, target, reduction, ignore_index, impl, need_dx, need_dw, need_db = inputs
    _, lse, cdx, cdw, cdb = output
    ctx.mark_non_differentiable(lse, cdx, cdw, cdb)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, target, lse, cdx, cdw, cdb)
    ctx.args = (reduction, ignore_index, impl)
    ctx.has_cache = need_dx or need_dw or need_db
    ctx.consumed = False


def _forward_backward(ctx, g_loss, *_unused):
    nx, nw, nb = ctx.needs_input_grad[:3]
    if g_loss is None or not (nx or nw or nb):
        return (None,) * 10
    x, weight, bias, target, lse, cdx, cdw, cdb = ctx.saved_tensors
    reduction, ignore_index, impl = ctx.args
    eager = type(cdx) is Tensor and not torch.compiler.is_compiling()  # not traced (fake/functional)
    if ctx.has_cache and not ctx.consumed and not torch.is_grad_enabled() and eager:
        # first-order backward of the precomputed mode: rescale in place and hand the
        # buffers over (no copy; nothing at all when g == 1). A second call (retain_graph)
        # recomputes from the saved lse instead.
        # ``.data``: the saved tensors' version counters stay untouched, so a retained graph
        # can still be unpacked (and then recomputes, see above).
        ctx.consumed = True
        cdx, cdw, cdb = cdx.data, cdw.data, cdb.data
        _scale_op(cdx, cdw, cdb, g_loss)
        return (_opt(cdx, nx), _opt(cdw, nw), _opt(cdb, nb and bias is not None)) + (None,) * 7
    if not ctx.has_cache or ctx.consumed:
        cdx = cdw = cdb = _empty(x)
    dx, dw, db = _backward_op(g_loss, x, weight, bias, target, lse, cdx.detach(), cdw.detach(), cdb.detach(),
                              reduction, ignore_index, impl, nx, nw, nb and bias is not None)
    return (_opt(dx, nx), _opt(dw, nw), _opt(db, nb and bias is not None)) + (None,) * 7


torch.library.register_autograd("sgr_ext::linear_ce_forward", _forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output):
    (grad_out, x, weight, bias, target, lse, _cdx, _cdw, _cdb, reduction, ignore_index, impl,
     need_dx, need_dw, need_db) = inputs
    ctx.save_for_backward(grad_out, x, weight, bias, target, lse)
    ctx.args = (reduction, ignore_index, impl)
    ctx.outs = (need_dx, need_dw, need_db and bias is not None)
    ctx.set_materialize_grads(False)


def _backward_backward(ctx, gdx, gdw, gdb):
    ng, nx, nw, nb = ctx.needs_input_grad[:4]
    grad_out, x, weight, bias, target, lse = ctx.saved_tensors
    reduction, ignore_index, impl = ctx.args
    odx, odw, odb = ctx.outs
    gdx = gdx if (odx and gdx is not None) else None
    gdw = gdw if (odw and gdw is not None) else None
    gdb = gdb if (odb and gdb is not None) else None
    if gdx is None and gdw is None and gdb is None:
        return (None,) * 15
    gg, gx, gw, gb = _double_backward_op(gdx, gdw, gdb, grad_out, x, weight, bias, target, lse, reduction,
                                         ignore_index, impl, ng, nx, nw, nb and bias is not None)
    return (_opt(gg, ng), _opt(gx, nx), _opt(gw, nw), _opt(gb, nb and bias is not None)) + (None,) * 11


torch.library.register_autograd("sgr_ext::linear_ce_backward", _backward_backward, setup_context=_backward_setup)


# ---------------------------------------------------------------------- public function


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


def _check_target_range(target: Tensor, v: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(
            f"target: expected class indices in [0, {v}) or ignore_index={ignore_index}, found {first}")


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
