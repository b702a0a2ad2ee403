"""Triton kernels of the SGR boundary penalty ``reconcile`` (installed as ``sgr_ext.kernels.reconcile``).

Contract (same as the C++ ops ``torch.ops.sgr_ext_cpp.reconcile_fwd/_bwd``), for a, d of shape
(B, F), contiguous, one float dtype, accumulated in ``acc`` = float64 for float64 inputs, else
float32:

    reconcile_fwd(a, d, cosine, eps) -> (loss, stats)
        loss  : 0-dim acc, (1/B) * sum_i dist(a_i, d_i)
        stats : (B, S); S = 1 for squared L2 (|a_i - d_i|^2) in acc, S = 3 for cosine
                (|a_i|^2, <a_i, d_i>, |d_i|^2) in float64 for every input dtype (|a|^2 of
                float32 values overflows from |a| ~ 1e19; the cosine is scale-free)
    reconcile_bwd(g, a, d, stats, cosine, eps) -> grad_a, (B, F) in a's dtype
        grad_a = g * d loss / d a (g: 0-dim acc, the incoming gradient)

Forward = two launches: a streaming kernel over a (row-tile, column-chunk) grid reads a and d
exactly once and writes float32/64 partial sums per (sample, chunk); a one-program finalize
kernel adds the partials in a fixed order (deterministic: no atomics), writes the per-sample
stats, and the mean. Backward = one streaming elementwise launch that rebuilds the two
per-sample coefficients from the saved stats in-kernel:

    l2:     grad_a = (2 g / B) (a - d)
    cosine: grad_a = (g / B) (alpha d + beta a),  den = |a||d| + eps,
            alpha = -1 / den,  beta = <a,d> |d| / (den^2 |a|)   (beta = 0 where |a| = 0)

Small features (F < BLOCK) are handled by packing several samples into one program
(ROWS > 1), so huge B with tiny F does not launch one program per sample.

float64 is supported (float64 accumulation; slow on GPUs without fast fp64, exact for
gradcheck). ``eps`` travels as two float32 halves (hi + lo) so it is not rounded to
float32 on the float64 path.

``TRITON_INTERPRET`` is read when this module is imported (triton.jit decides then), so it
is imported lazily by ``sgr_ext.ops._reconcile_ops``.
"""
from __future__ import annotations

import contextlib
import functools
import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------------------
# kernels
# -----------------------------------------------------------------------------------------


@triton.jit
def _tile(B, F, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """This program's ROWS samples and the first BLOCK columns of its CHUNK: (rows, their
    mask, their int64 element offsets (ROWS, 1), the columns)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols0 = tl.program_id(1) * CHUNK + tl.arange(0, BLOCK)
    return rows, rows < B, rows.to(tl.int64)[:, None] * F, cols0


@triton.jit
def _load_pair(a_ptr, d_ptr, off, m, EVEN: tl.constexpr, ACC: tl.constexpr):
    """a and d at ``off`` in the accumulate dtype; unmasked when the tiling divides the problem."""
    if EVEN:
        x = tl.load(a_ptr + off).to(ACC)
        y = tl.load(d_ptr + off).to(ACC)
    else:
        x = tl.load(a_ptr + off, mask=m, other=0.0).to(ACC)
        y = tl.load(d_ptr + off, mask=m, other=0.0).to(ACC)
    return x, y


@triton.jit
def _fwd_partial_kernel(
    a_ptr,
    d_ptr,
    part_ptr,  # (S, n_chunks, B) accumulate dtype
    B,
    F,
    n_chunks,
    COSINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, base, cols0 = _tile(B, F, ROWS, BLOCK, CHUNK)
    s0 = tl.zeros((ROWS, BLOCK), ACC)
    s1 = tl.zeros((ROWS, BLOCK), ACC)
    s2 = tl.zeros((ROWS, BLOCK), ACC)
    for off in range(0, CHUNK, BLOCK):
        cols = (cols0 + off)[None, :]
        m = row_ok[:, None] & (cols < F)
        x, y = _load_pair(a_ptr, d_ptr, base + cols, m, EVEN, ACC)
        if COSINE:
            s0 += x * x
            s1 += x * y
            s2 += y * y
        else:
            diff = x - y
            s0 += diff * diff
    out = part_ptr + tl.program_id(1) * B + rows
    tl.store(out, tl.sum(s0, axis=1), mask=row_ok)
    if COSINE:
        plane = n_chunks * B
        tl.store(out + plane, tl.sum(s1, axis=1), mask=row_ok)
        tl.store(out + 2 * plane, tl.sum(s2, axis=1), mask=row_ok)


@triton.jit
def _fwd_finalize_kernel(
    part_ptr,  # (S, n_chunks, B)
    stats_ptr,  # (B, S)
    loss_ptr,  # ()
    B,
    n_chunks,
    eps_hi,
    eps_lo,
    COSINE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    ACC: tl.constexpr,
):
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    total = tl.zeros((BLOCK_B,), ACC)
    plane = n_chunks * B
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = rows < B
        s0 = tl.zeros((BLOCK_B,), ACC)
        s1 = tl.zeros((BLOCK_B,), ACC)
        s2 = tl.zeros((BLOCK_B,), ACC)
        for c in range(0, n_chunks):
            p = part_ptr + c * B + rows
            s0 += tl.load(p, mask=ok, other=0.0)
            if COSINE:
                s1 += tl.load(p + plane, mask=ok, other=0.0)
                s2 += tl.load(p + 2 * plane, mask=ok, other=0.0)
        if COSINE:
            tl.store(stats_ptr + rows * 3, s0, mask=ok)
            tl.store(stats_ptr + rows * 3 + 1, s1, mask=ok)
            tl.store(stats_ptr + rows * 3 + 2, s2, mask=ok)
            den = tl.sqrt(s0) * tl.sqrt(s2) + eps
            dist = 1.0 - s1 / tl.where(ok, den, 1.0)
        else:
            tl.store(stats_ptr + rows, s0, mask=ok)
            dist = s0
        total += tl.where(ok, dist, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@triton.jit
def _bwd_kernel(
    g_ptr,  # () accumulate dtype
    a_ptr,
    d_ptr,
    stats_ptr,  # (B, S)
    out_ptr,  # (B, F) a's dtype
    B,
    F,
    eps_hi,
    eps_lo,
    COSINE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN: tl.constexpr,
    ACC: tl.constexpr,
):
    rows, row_ok, base, cols0 = _tile(B, F, ROWS, BLOCK, CHUNK)
    g = tl.load(g_ptr).to(ACC) / B
    if COSINE:
        eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
        aa = tl.load(stats_ptr + rows * 3, mask=row_ok, other=1.0)
        ad = tl.load(stats_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
        dd = tl.load(stats_ptr + rows * 3 + 2, mask=row_ok, other=1.0)
        na = tl.sqrt(aa)
        nd = tl.sqrt(dd)
        den = na * nd + eps
        coef_d = (-g / den)[:, None]
        safe_na = tl.where(na > 0, na, 1.0)
        # (ad/den) (nd/den) / na, not ad nd / (den^2 na): den^2 overflows float32 from |a||d| ~ 2e19
        coef_a = tl.where(na > 0, g * (ad / den) * (nd / den) / safe_na, 0.0)[:, None]
    else:
        two_g = 2.0 * g
    for off in range(0, CHUNK, BLOCK):
        cols = (cols0 + off)[None, :]
        m = row_ok[:, None] & (cols < F)
        x, y = _load_pair(a_ptr, d_ptr, base + cols, m, EVEN, ACC)
        if COSINE:
            gr = coef_a * x + coef_d * y
        else:
            gr = two_g * (x - y)
        gr = gr.to(out_ptr.dtype.element_ty)  # round to nearest even on GPUs
        if EVEN:
            tl.store(out_ptr + base + cols, gr)
        else:
            tl.store(out_ptr + base + cols, gr, mask=m)


# -----------------------------------------------------------------------------------------
# launch configuration
# -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """How a (B, F) problem is tiled: ROWS samples x CHUNK features per program, BLOCK per step."""

    rows: int
    block: int
    chunk: int
    num_warps: int

    def grid(self, B: int, F: int) -> tuple[int, int]:
        return (triton.cdiv(B, self.rows), max(1, triton.cdiv(F, self.chunk)))

    def even(self, B: int, F: int) -> bool:
        return B % self.rows == 0 and F % self.chunk == 0 and F > 0


_TL_ACC = {torch.float64: tl.float64}


def _acc(dtype: torch.dtype, cosine: bool = False) -> torch.dtype:
    """The accumulate (and stats) dtype: float64 for float64 inputs and for cosine, whose |a|^2
    leaves float32's range beyond |a| ~ 1e19 and below 1e-19 although the cosine itself is
    scale-free; float32 otherwise. The loss is returned in ``_acc(dtype)``."""
    return torch.float64 if dtype == torch.float64 or cosine else torch.float32


@functools.lru_cache(maxsize=64)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few, large programs keep the Python loop short


def default_config(B: int, F: int, element_size: int, device: torch.device) -> Config:
    """Heuristic tiling; ``benchmarks/gpu_reconcile.py --sweep`` times alternatives on a GPU."""
    interp = device.type != "cuda"
    # GPU: one inner step = 32 bytes per thread per tensor (two 16-byte loads) with 8 warps
    block = 4096 if interp else (2048 if element_size >= 4 else 4096)
    num_warps = 8
    fp = triton.next_power_of_2(max(F, 1))
    if fp <= block // 2:  # small samples: several per program
        rows = min(block // fp, triton.next_power_of_2(B))
        return Config(rows=rows, block=fp, chunk=fp, num_warps=4 if rows * fp <= 1024 else num_warps)
    block = min(block, fp)
    # enough programs to fill the device, at least one BLOCK each, at most 64 Ki elements each
    want = max(1, triton.cdiv(B * F, _programs_target(device)))
    chunk = min(max(triton.next_power_of_2(want), block), 65536, fp)
    return Config(rows=1, block=block, chunk=chunk, num_warps=num_warps)


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _eps_parts(eps: float) -> tuple[float, float]:
    """eps = hi + lo with both exactly representable in float32 (about 48 significant bits)."""
    hi = _f32(eps)
    return hi, _f32(eps - hi)


def _device_ctx(t: torch.Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------------------
# launchers
# -----------------------------------------------------------------------------------------


def reconcile_fwd(
    a: torch.Tensor, d: torch.Tensor, cosine: bool, eps: float, config: Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, d: (B, F) contiguous, same dtype. Returns (loss (), stats (B, S)) in the accumulate dtype."""
    B, F = a.shape
    acc = _acc(a.dtype, cosine)
    tl_acc = _TL_ACC.get(acc, tl.float32)
    cfg = config or default_config(B, F, a.element_size(), a.device)
    grid = cfg.grid(B, F)
    S = 3 if cosine else 1
    part = torch.empty((S, grid[1], B), dtype=acc, device=a.device)
    stats = torch.empty((B, S), dtype=acc, device=a.device)
    loss = torch.empty((), dtype=acc, device=a.device)
    eps_hi, eps_lo = _eps_parts(eps)
    with _device_ctx(a):
        _fwd_partial_kernel[grid](
            a, d, part, B, F, grid[1],
            COSINE=cosine, ROWS=cfg.rows, BLOCK=cfg.block, CHUNK=cfg.chunk,
            EVEN=cfg.even(B, F), ACC=tl_acc, num_warps=cfg.num_warps,
        )
        block_b = min(1024, triton.next_power_of_2(B))
        _fwd_finalize_kernel[(1,)](
            part, stats, loss, B, grid[1], eps_hi, eps_lo,
            COSINE=cosine, BLOCK_B=block_b, ACC=tl_acc, num_warps=4,
        )
    return loss.to(_acc(a.dtype)), stats


def reconcile_bwd(
    g: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    stats: torch.Tensor,
    cosine: bool,
    eps: float,
    config: Config | None = None,
) -> torch.Tensor:
    """g: () accumulate dtype; a, d: (B, F) contiguous; stats from reconcile_fwd. Returns (B, F) in a's dtype."""
    B, F = a.shape
    acc = _acc(a.dtype, cosine)
    tl_acc = _TL_ACC.get(acc, tl.float32)
    cfg = config or default_config(B, F, a.element_size(), a.device)
    grid = cfg.grid(B, F)
    # The interpreter (triton 3.x) truncates float32 -> bfloat16 instead of rounding to nearest
    # even like the GPU does; there the kernel writes float32 and torch rounds.
    interp_round = a.device.type == "cpu" and a.dtype == torch.bfloat16
    out = torch.empty(a.shape, dtype=torch.float32 if interp_round else a.dtype, device=a.device)
    g = g.to(device=a.device, dtype=acc).contiguous()
    stats = stats.to(acc).contiguous()
    eps_hi, eps_lo = _eps_parts(eps)
    with _device_ctx(a):
        _bwd_kernel[grid](
            g, a, d, stats, out, B, F, eps_hi, eps_lo,
            COSINE=cosine, ROWS=cfg.rows, BLOCK=cfg.block, CHUNK=cfg.chunk,
            EVEN=cfg.even(B, F), ACC=tl_acc, num_warps=cfg.num_warps,
        )
    return out.to(a.dtype) if interp_round else out
