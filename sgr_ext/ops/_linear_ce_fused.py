"""The fused (chunked GEMM) forward and backward of ``linear_cross_entropy``'s triton and cpp
paths, and the helpers the double backward shares: row scales, reductions, chunk sizes.

No (N, V) buffer exists: rows are processed in chunks of ``chunk_rows`` (about N*H logits per
chunk); each chunk's logits come from one GEMM, one kernel pass (Triton or C++) gives the
loss, the log-sum-exp and the logits gradient, then two GEMMs give dx and dW.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sgr_ext.ops import _backends
from sgr_ext._tensor_util import accumulate_dtype

# precomputed dW of a half-precision weight accumulates over chunks in float32 when the
# float32 buffer is at most this big; above it, in the weight's dtype (one rounding per
# chunk, fp32 inside every GEMM), so peak memory stays at one chunk of logits.
FP32_DW_MAX_BYTES = 32 << 20
# CUDA: 2 runs each chunk's dx GEMM on a side stream, concurrently with its dW GEMM (no
# extra memory; benchmarks/gpu_linear_ce.py times both: "sgr_ext_triton_2streams")
GRAD_GEMM_STREAMS = 1


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


def _check_target_range(target: Tensor, v: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= v))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(
            f"target: expected class indices in [0, {v}) or ignore_index={ignore_index}, found {first}")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


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
