"""Triton kernels of the fused linear + softmax cross-entropy head.

The matrix products (x @ W^T, dz @ W, dz^T @ x) run as cuBLAS GEMMs on one chunk of
rows at a time (fp32 accumulation inside the GEMM); everything between them runs in
the kernels below, one pass over the chunk, in float32 (float64 for float64 inputs):

* ``ce_rows_kernel``     logits chunk -> per-row loss (or their float64 sum) and log-sum-exp
                          (online, chunked over V) and, optionally, the logits gradient
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

# A row of at most this many logits is held in registers and read once.
MAX_SINGLE_BLOCK = 32768
# longer rows: blocks of LOOP_BLOCK with LOOP_WARPS warps, one program per SM
LOOP_BLOCK = 16384
LOOP_WARPS = 32


@triton.jit
def _ce_grad(z, cols, y, lse, c):
    """dL/dz = c (softmax(z) - onehot(y)) for logits z at columns ``cols``: the one
    expression every kernel writes, so precomputed and recomputed gradients agree bit for bit."""
    g = tl.exp(z - lse) * c
    return tl.where(cols == y, g - c, g)


@triton.jit
def ce_rows_kernel(
    Z, stride_z,  # (rows, V) logits chunk, overwritten by the gradient when WRITE_GRAD
    T,  # (rows,) int64 targets
    LOSS,  # REDUCE: 0-dim float64, += the rows' losses; else (rows,) per-row losses (0 if ignored)
    LSE,  # (rows,) log-sum-exp, accumulate dtype
    SCALE,  # 0-dim: gradient scale c for valid rows (1/n_valid for "mean", 1 for "sum")
    n_rows, V, ignore_index,
    BLOCK_V: tl.constexpr,
    SINGLE: tl.constexpr,  # V <= BLOCK_V: one block per row, read once
    WRITE_GRAD: tl.constexpr,
    REDUCE: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc_t: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    offs = tl.arange(0, BLOCK_V)
    for row in range(pid, n_rows, nprog):
        zrow = Z + tl.cast(row, tl.int64) * stride_z
        y = tl.load(T + row)
        valid = y != ignore_index
        if SINGLE:
            mask = offs < V
            z = tl.load(zrow + offs, mask=mask, other=-float("inf")).to(acc_t)
            m = tl.max(z, 0)
            s = tl.sum(tl.exp(z - m), 0)
            lse = m + tl.log(s)
            zy = tl.sum(tl.where(offs == y, z, 0.0), 0)
        else:
            # streaming online log-sum-exp, one running (max, sum) per lane: one exp per
            # element and no cross-warp reduction inside the loop; lanes combine at the end
            mv = tl.full((BLOCK_V,), -1.0e30, acc_t)
            sv = tl.zeros((BLOCK_V,), acc_t)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                zb = tl.load(zrow + cols, mask=cols < V, other=-float("inf")).to(acc_t)
                e = tl.exp(-tl.abs(zb - mv))
                sv = tl.where(zb > mv, sv * e + 1.0, sv + e)
                mv = tl.maximum(mv, zb)
            m = tl.max(mv, 0)
            lse = m + tl.log(tl.sum(sv * tl.exp(mv - m), 0))
            # bounds-checked: an out-of-range target must not fault (the caller raises)
            zy = tl.load(zrow + y, mask=valid & (y >= 0) & (y < V), other=0.0).to(acc_t)
        tl.store(LSE + row, lse)
        loss = tl.where(valid, lse - zy, 0.0)
        if REDUCE:
            tl.atomic_add(LOSS, loss.to(tl.float64), sem="relaxed")
        else:
            tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            c = tl.where(valid, tl.load(SCALE).to(acc_t), 0.0)
            if SINGLE:
                g = _ce_grad(z, offs, y, lse, c)
                tl.store(zrow + offs, g.to(Z.dtype.element_ty), mask=mask)
            else:
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + offs
                    cmask = cols < V
                    zb = tl.load(zrow + cols, mask=cmask, other=0.0).to(acc_t)
                    g = _ce_grad(zb, cols, y, lse, c)
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
    zrow = Z + tl.cast(row, tl.int64) * stride_z
    y = tl.load(T + row)
    c = tl.where(y != ignore_index, tl.load(C + row).to(acc_t), 0.0)
    lse = tl.load(LSE + row).to(acc_t)
    cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z = tl.load(zrow + cols, mask=mask, other=0.0).to(acc_t)
    g = _ce_grad(z, cols, y, lse, c)
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
    zrow = Z + tl.cast(row, tl.int64) * stride_z
    grow = G + tl.cast(row, tl.int64) * stride_g
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
def scale_kernel(X, G, numel, BLOCK: tl.constexpr, IS_FP64: tl.constexpr):
    """X *= G[0] in place (grid-stride); nothing is read or written when G[0] == 1."""
    acc_t: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    g = tl.load(G).to(acc_t)
    if g != 1.0:
        start = tl.program_id(0).to(tl.int64) * BLOCK
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for b0 in range(start, numel, step):
            offs = b0 + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(X + offs, mask=mask)
            tl.store(X + offs, (x.to(acc_t) * g).to(X.dtype.element_ty), mask=mask)


@triton.jit
def check_targets_kernel(T, n, V, ignore_index, FLAG, BLOCK: tl.constexpr):
    """FLAG <- 1 if any target is neither ignore_index nor in [0, V); no (N,) temporaries."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(T + offs, mask=offs < n, other=ignore_index)
    bad = (y != ignore_index) & ((y < 0) | (y >= V))
    if tl.max(bad.to(tl.int32), 0) > 0:
        tl.store(FLAG, 1)


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
    """Loss and lse of a logits chunk; the logits gradient in place when ``scale`` is given.

    ``loss``: (rows,) per-row losses, or a 0-dim float64 tensor that the rows' losses are
    added to (the reduced modes: no per-row buffer, no extra launch).
    """
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
        # persistent: one program per SM walks over rows, so few rows are in flight and
        # the second read of a row (the gradient pass) hits L2
        grid = (min(rows, _programs(z.device)),)
        warps = LOOP_WARPS
    ce_rows_kernel[grid](
        z, z.stride(0), target, loss, lse, scale if scale is not None else lse,
        rows, V, ignore_index,
        BLOCK_V=block, SINGLE=single, WRITE_GRAD=scale is not None, REDUCE=loss.dim() == 0,
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
    grid = (min(triton.cdiv(n, block), 8 * _programs(t.device)),)
    scale_kernel[grid](t, g, n, BLOCK=block, IS_FP64=t.dtype == torch.float64, num_warps=8)


def check_targets(target: torch.Tensor, v: int, ignore_index: int) -> torch.Tensor:
    """A 0-dim int32 device flag, set to 1 if a target is out of range (read it later)."""
    flag = torch.zeros((), dtype=torch.int32, device=target.device)
    n = target.numel()
    if n:
        block = 1024
        check_targets_kernel[(triton.cdiv(n, block),)](target, n, v, ignore_index, flag, BLOCK=block, num_warps=4)
    return flag
