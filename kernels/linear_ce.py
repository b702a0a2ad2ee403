"""Triton kernels of the fused linear + softmax cross-entropy head.

The matrix products (x @ W^T, dz @ W, dz^T @ x) run as cuBLAS GEMMs on one chunk of
rows at a time (fp32 accumulation inside the GEMM); everything between them runs in
the kernels below, one pass over the chunk, in float32 (float64 for float64 inputs):

* ``ce_rows_kernel``     logits chunk -> per-row loss and log-sum-exp (online, chunked
                          over V) and, optionally, the logits gradient
                          c_i * (softmax(z_i) - e_{y_i}) written in place. When a whole
                          row fits one block the row is read once and kept in registers.
* ``ce_grad_kernel``     logits chunk + saved lse -> logits gradient in place (the
                          recompute backward: reduction="none" and second calls).
* ``ce_double_kernel``   the elementwise core of the double backward:
                          Gz = c (p*Gdz - p <p, Gdz>), dz = c (p - e_y) and
                          <p - e_y, Gdz> per row, in place over two chunk buffers.
* ``scale_kernel``       in-place ``t *= g`` that returns at once when g == 1 (the usual
                          ``loss.backward()``), without a host synchronisation.

The launch helpers at the bottom take contiguous chunk tensors; ``sgr_ext.ops.linear_ce``
owns chunking, GEMMs and autograd. Importing this module never needs a GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# A row of at most this many logits is held in registers and read once.
MAX_SINGLE_BLOCK = 32768
LOOP_BLOCK = 8192


@triton.jit
def _acc_type(IS_FP64: tl.constexpr):
    if IS_FP64:
        return tl.float64
    return tl.float32


@triton.jit
def ce_rows_kernel(
    Z, stride_z,  # (rows, V) logits chunk, overwritten by the gradient when WRITE_GRAD
    T,  # (rows,) int64 targets
    LOSS,  # (rows,) per-row loss (0 for ignored rows), accumulate dtype
    LSE,  # (rows,) log-sum-exp, accumulate dtype
    SCALE,  # 0-dim: gradient scale c for valid rows (1/n_valid for "mean", 1 for "sum")
    n_rows, V, ignore_index,
    BLOCK_V: tl.constexpr,
    SINGLE: tl.constexpr,  # V <= BLOCK_V: one block per row, read once
    WRITE_GRAD: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_t: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    offs = tl.arange(0, BLOCK_V)
    for row in range(pid, n_rows, nprog):
        zrow = Z + row.to(tl.int64) * stride_z
        y = tl.load(T + row)
        valid = y != ignore_index
        if SINGLE:
            mask = offs < V
            z = tl.load(zrow + offs, mask=mask, other=-float("inf")).to(acc_t)
            m = tl.max(z, 0)
            e = tl.exp(z - m)
            s = tl.sum(e, 0)
            lse = m + tl.log(s)
            zy = tl.sum(tl.where(offs == y, z, 0.0), 0)
        else:
            # online log-sum-exp over V, one exp per element
            m = tl.full((), -float("inf"), acc_t)
            s = tl.zeros((), acc_t)
            zy = tl.zeros((), acc_t)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                zb = tl.load(zrow + cols, mask=cols < V, other=-float("inf")).to(acc_t)
                m_new = tl.maximum(m, tl.max(zb, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zb - m_new), 0)
                m = m_new
                zy += tl.sum(tl.where(cols == y, zb, 0.0), 0)
            lse = m + tl.log(s)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(valid, lse - zy, 0.0))
        if WRITE_GRAD:
            c = tl.where(valid, tl.load(SCALE).to(acc_t), 0.0)
            if SINGLE:
                g = e * (c / s)
                g = tl.where(offs == y, g - c, g)
                tl.store(zrow + offs, g.to(Z.dtype.element_ty), mask=mask)
            else:
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    cmask = cols < V
                    zb = tl.load(zrow + cols, mask=cmask, other=0.0).to(acc_t)
                    g = tl.exp(zb - lse) * c
                    g = tl.where(cols == y, g - c, g)
                    tl.store(zrow + cols, g.to(Z.dtype.element_ty), mask=cmask)


@triton.jit
def ce_grad_kernel(
    Z, stride_z,  # (rows, V) logits chunk -> gradient, in place
    T, LSE, C,  # (rows,) targets, lse, per-row scale (0 for ignored rows)
    V, ignore_index,
    BLOCK_V: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    row = tl.program_id(0)
    vb = tl.program_id(1)
    acc_t: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    zrow = Z + row.to(tl.int64) * stride_z
    y = tl.load(T + row)
    c = tl.where(y != ignore_index, tl.load(C + row).to(acc_t), 0.0)
    lse = tl.load(LSE + row).to(acc_t)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z = tl.load(zrow + cols, mask=mask, other=0.0).to(acc_t)
    g = tl.exp(z - lse) * c
    g = tl.where(cols == y, g - c, g)
    tl.store(zrow + cols, g.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def ce_double_kernel(
    Z, stride_z,  # (rows, V) logits chunk (accumulate dtype) -> dz = c (p - e_y), in place
    G, stride_g,  # (rows, V) Gdz chunk (accumulate dtype) -> Gz = c (p*Gdz - p <p,Gdz>), in place
    T, LSE, C,  # (rows,) targets, lse, per-row scale c_i (0 for ignored rows)
    DOT,  # (rows,) out: <p_i - e_{y_i}, Gdz_i> (0 for ignored rows)
    V, ignore_index,
    BLOCK_V: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    row = tl.program_id(0)
    acc_t: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    zrow = Z + row.to(tl.int64) * stride_z
    grow = G + row.to(tl.int64) * stride_g
    y = tl.load(T + row)
    valid = y != ignore_index
    c = tl.where(valid, tl.load(C + row).to(acc_t), 0.0)
    lse = tl.load(LSE + row).to(acc_t)
    offs = tl.arange(0, BLOCK_V)
    pg = tl.zeros((), acc_t)
    gy = tl.zeros((), acc_t)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(zrow + cols, mask=mask, other=-float("inf")).to(acc_t)
        gd = tl.load(grow + cols, mask=mask, other=0.0).to(acc_t)
        pg += tl.sum(tl.exp(z - lse) * gd, 0)
        gy += tl.sum(tl.where(cols == y, gd, 0.0), 0)
    tl.store(DOT + row, tl.where(valid, pg - gy, 0.0))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < V
        z = tl.load(zrow + cols, mask=mask, other=-float("inf")).to(acc_t)
        gd = tl.load(grow + cols, mask=mask, other=0.0).to(acc_t)
        p = tl.exp(z - lse)
        tl.store(grow + cols, (c * p * (gd - pg)).to(G.dtype.element_ty), mask=mask)
        dz = tl.where(cols == y, p - 1.0, p) * c
        tl.store(zrow + cols, dz.to(Z.dtype.element_ty), mask=mask)


@triton.jit
def scale_kernel(X, G, numel, BLOCK: tl.constexpr):
    """X *= G[0] in place; nothing is read or written when G[0] == 1."""
    g = tl.load(G)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask)
        tl.store(X + offs, (x.to(tl.float32) * g.to(tl.float32)).to(X.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few programs, each looping over rows


def ce_rows(z: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor,
            scale: torch.Tensor | None, ignore_index: int) -> None:
    """Per-row loss and lse of a logits chunk; gradient in place when ``scale`` is given."""
    rows, V = z.shape
    if rows == 0:
        return
    single = V <= MAX_SINGLE_BLOCK
    if single:
        block = max(16, triton.next_power_of_2(V))
        grid = (rows,)
        warps = 4 if block <= 2048 else (8 if block <= 8192 else (16 if block <= 16384 else 32))
    else:
        block = LOOP_BLOCK
        # a persistent grid: few rows in flight, so the second read of a row hits L2
        grid = (min(rows, _programs(z.device)),)
        warps = 16
    ce_rows_kernel[grid](
        z, z.stride(0), target, loss, lse, scale if scale is not None else lse,
        rows, V, ignore_index,
        BLOCK_V=block, SINGLE=single, WRITE_GRAD=scale is not None,
        IS_FP64=lse.dtype == torch.float64, num_warps=warps,
    )


def ce_grad(z: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, ignore_index: int) -> None:
    """z <- c_i (softmax(z_i) - e_{y_i}) in place, with the saved lse."""
    rows, V = z.shape
    if rows == 0:
        return
    block = min(4096, max(16, triton.next_power_of_2(V)))
    grid = (rows, triton.cdiv(V, block))
    ce_grad_kernel[grid](
        z, z.stride(0), target, lse, c, V, ignore_index,
        BLOCK_V=block, IS_FP64=lse.dtype == torch.float64, num_warps=4 if block <= 1024 else 8,
    )


def ce_double(z: torch.Tensor, gdz: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, c: torch.Tensor,
              dot: torch.Tensor, ignore_index: int) -> None:
    """Double-backward elementwise core over one chunk (see ``ce_double_kernel``)."""
    rows, V = z.shape
    if rows == 0:
        return
    block = min(4096, max(16, triton.next_power_of_2(V)))
    ce_double_kernel[(rows,)](
        z, z.stride(0), gdz, gdz.stride(0), target, lse, c, dot, V, ignore_index,
        BLOCK_V=block, IS_FP64=lse.dtype == torch.float64, num_warps=4 if block <= 1024 else 8,
    )


def scale_(t: torch.Tensor, g: torch.Tensor) -> None:
    """``t *= g`` in place (t contiguous, g a 1-element tensor); a no-op on the GPU when g == 1."""
    n = t.numel()
    if n == 0:
        return
    block = 4096
    scale_kernel[(triton.cdiv(n, block),)](t, g, n, BLOCK=block, num_warps=8)
