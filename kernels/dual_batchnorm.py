"""Triton kernels of the dual (primal + tangent) train-mode BatchNorm, optionally + ReLU.

The packed input z is viewed as (2n, C, S) with arbitrary strides (NCHW, channels_last,
(B, C) and (B, C, L) all work): rows [0, n) primal x, rows [n, 2n) tangent t. Per channel,
over the N = n * S primal elements:

    forward stats   one pass: per-block counts, sums of x and t, centred second moment
                    and centred (x - mean)(t - mt) cross moment (Chan's parallel combination in torch,
                    deterministic, no atomics)
    forward apply   one pass: y = a (x - mu) + beta, yt = a (t - mt) + d (x - mu), optional
                    ReLU mask
    backward stats  one pass: sums of g, g (x - mu), gt, gt (x - mu), gt (t - mt)  (g, gt
                    masked by the recomputed ReLU mask)
    backward apply  one pass: gx = k1 g + k2 gt + k3 (t - mt) + kx (x - mu) + k0,
                                gt_in = k1 gt + k3 (x - mu) + k8

Every product is of centred values (x - mu, t - mt): float32 loses nothing to cancellation
when a channel's |mean| is many times its std.

Sizes and strides are not specialised and tiles are fixed (16 channels x 256 rows), so
one compiled variant per (dtype, ReLU) serves every layer and layout (short first-run JIT).
Grid: axis 0 over blocks of the n * S rows (no 65535 limit there), axis 1 over channel
blocks. Statistics accumulate in float32 (inputs of any float dtype except float64, which the
torch path handles). The per-channel coefficient algebra is
derived in ``sgr_ext.engine.dual.batchnorm.DualBatchNorm``; ``sgr_ext.ops.dual_batchnorm`` is the op
contract that calls the launchers at the end of this file.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(n, C, S, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (BLOCK_P rows of the n * S primal elements) x (BLOCK_C channels) tile:
    (i, s, c) sample / spatial / channel indices (int64, broadcastable), the tile mask, the
    row mask, the channel offsets and the channel mask."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n * S
    mask_c = offs_c < C
    i = (offs_p // S)[:, None].to(tl.int64)
    s = (offs_p % S)[:, None].to(tl.int64)
    c = offs_c[None, :].to(tl.int64)
    return i, s, c, mask_p[:, None] & mask_c[None, :], mask_p, offs_c, mask_c


@triton.jit
def _load_pair(P, half_off, off, m):
    """The primal and the tangent half of a packed tensor at ``off``, in float32."""
    return (tl.load(P + off, mask=m, other=0.0).to(tl.float32),
            tl.load(P + half_off + off, mask=m, other=0.0).to(tl.float32))


@triton.jit
def _channel(V, offs_c, mask_c):
    """A per-channel vector, broadcast over the rows of the tile."""
    return tl.load(V + offs_c, mask=mask_c, other=0.0)[None, :]


@triton.jit
def _centred_pair(Z, t_off, off, m, STATS, C, offs_c, mask_c):
    """(x - mean, t - mt) of a packed tensor at ``off``, float32 (``STATS`` rows 0 and 2)."""
    x, t = _load_pair(Z, t_off, off, m)
    return x - _channel(STATS, offs_c, mask_c), t - _channel(STATS + 2 * C, offs_c, mask_c)


@triton.jit
def _primal_out(xc, STATS, C, offs_c, mask_c):
    """y = a (x - mean) + beta: the forward's primal output, and the backward's ReLU mask."""
    return xc * _channel(STATS + 4 * C, offs_c, mask_c) + _channel(STATS + 5 * C, offs_c, mask_c)


@triton.jit
def _bwd_inputs(Z, G, t_off, g_t_off, off, goff, m, STATS, C, offs_c, mask_c, RELU: tl.constexpr):
    """x - mean, t - mt and the incoming gradients g, gt (zeroed where the recomputed ReLU
    mask is off): what both backward kernels read."""
    xc, tc = _centred_pair(Z, t_off, off, m, STATS, C, offs_c, mask_c)
    g, gt = _load_pair(G, g_t_off, goff, m)
    if RELU:
        pos = _primal_out(xc, STATS, C, offs_c, mask_c) > 0
        g = tl.where(pos, g, 0.0)
        gt = tl.where(pos, gt, 0.0)
    return tl.where(m, xc, 0.0), tl.where(m, tc, 0.0), g, gt


@triton.jit
def _shift(Z, t_off, s_c, offs_c, mask_c):
    """Each channel's first primal and tangent element: the statistics sum x - kx and t - kt,
    values near zero, so float32 sums keep their precision when |mean| >> std."""
    off = offs_c.to(tl.int64) * s_c
    return (tl.load(Z + off, mask=mask_c, other=0.0).to(tl.float32),
            tl.load(Z + t_off + off, mask=mask_c, other=0.0).to(tl.float32))


@triton.jit(do_not_specialize=["n", "C", "S", "s_n", "s_c", "s_s", "t_off"])
def _stats_fwd_kernel(
    Z, n, C, S, s_n, s_c, s_s, t_off,
    CNT, SX, ST, M2, CX,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i, s, c, m, mask_p, offs_c, mask_c = _tile(n, C, S, BLOCK_P, BLOCK_C)
    x, t = _load_pair(Z, t_off, i * s_n + s * s_s + c * s_c, m)
    kx, kt = _shift(Z, t_off, s_c, offs_c, mask_c)
    x = tl.where(m, x - kx[None, :], 0.0)
    t = tl.where(m, t - kt[None, :], 0.0)
    cnt = tl.sum(mask_p.to(tl.float32), axis=0)
    sx = tl.sum(x, axis=0)
    st = tl.sum(t, axis=0)
    xc = tl.where(m, x - (sx / cnt)[None, :], 0.0)
    tc = tl.where(m, t - (st / cnt)[None, :], 0.0)
    m2 = tl.sum(xc * xc, axis=0)
    cx = tl.sum(xc * tc, axis=0)
    out = tl.program_id(0) * C + offs_c
    tl.store(SX + out, sx, mask=mask_c)
    tl.store(ST + out, st, mask=mask_c)
    tl.store(M2 + out, m2, mask=mask_c)
    tl.store(CX + out, cx, mask=mask_c)
    tl.store(CNT + tl.program_id(0), cnt)


@triton.jit(do_not_specialize=["n", "C", "S", "s_n", "s_c", "s_s", "t_off", "o_n", "o_c", "o_s", "o_t_off"])
def _apply_fwd_kernel(
    Z, OUT, n, C, S, s_n, s_c, s_s, t_off, o_n, o_c, o_s, o_t_off,
    STATS,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i, s, c, m, _, offs_c, mask_c = _tile(n, C, S, BLOCK_P, BLOCK_C)
    xc, tc = _centred_pair(Z, t_off, i * s_n + s * s_s + c * s_c, m, STATS, C, offs_c, mask_c)
    y = _primal_out(xc, STATS, C, offs_c, mask_c)
    yt = tc * _channel(STATS + 4 * C, offs_c, mask_c) + xc * _channel(STATS + 6 * C, offs_c, mask_c)
    if RELU:
        pos = y > 0
        y = tl.where(pos, y, 0.0)
        yt = tl.where(pos, yt, 0.0)
    o = i * o_n + s * o_s + c * o_c
    tl.store(OUT + o, y.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_t_off + o, yt.to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n", "C", "S", "s_n", "s_c", "s_s", "t_off", "g_n", "g_c", "g_s", "g_t_off"])
def _stats_bwd_kernel(
    Z, G, n, C, S, s_n, s_c, s_s, t_off, g_n, g_c, g_s, g_t_off,
    STATS,
    SG, SGX, SGT, SGTX, SGTT,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i, s, c, m, _, offs_c, mask_c = _tile(n, C, S, BLOCK_P, BLOCK_C)
    xc, tc, g, gt = _bwd_inputs(Z, G, t_off, g_t_off, i * s_n + s * s_s + c * s_c, i * g_n + s * g_s + c * g_c, m,
                                STATS, C, offs_c, mask_c, RELU)
    out = tl.program_id(0) * C + offs_c
    tl.store(SG + out, tl.sum(g, axis=0), mask=mask_c)
    tl.store(SGX + out, tl.sum(g * xc, axis=0), mask=mask_c)
    tl.store(SGT + out, tl.sum(gt, axis=0), mask=mask_c)
    tl.store(SGTX + out, tl.sum(gt * xc, axis=0), mask=mask_c)
    tl.store(SGTT + out, tl.sum(gt * tc, axis=0), mask=mask_c)


@triton.jit(do_not_specialize=["n", "C", "S", "s_n", "s_c", "s_s", "t_off", "g_n", "g_c", "g_s", "g_t_off", "o_n", "o_c", "o_s", "o_t_off"])
def _apply_bwd_kernel(
    Z, G, OUT, n, C, S, s_n, s_c, s_s, t_off, g_n, g_c, g_s, g_t_off, o_n, o_c, o_s, o_t_off,
    STATS, K1, K2, K3, KX, K0, K8,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i, s, c, m, _, offs_c, mask_c = _tile(n, C, S, BLOCK_P, BLOCK_C)
    xc, tc, g, gt = _bwd_inputs(Z, G, t_off, g_t_off, i * s_n + s * s_s + c * s_c, i * g_n + s * g_s + c * g_c, m,
                                STATS, C, offs_c, mask_c, RELU)
    k1 = _channel(K1, offs_c, mask_c)
    k3 = _channel(K3, offs_c, mask_c)
    gx = (k1 * g + _channel(K2, offs_c, mask_c) * gt + k3 * tc
          + _channel(KX, offs_c, mask_c) * xc + _channel(K0, offs_c, mask_c))
    gxt = k1 * gt + k3 * xc + _channel(K8, offs_c, mask_c)
    o = i * o_n + s * o_s + c * o_c
    tl.store(OUT + o, gx.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_t_off + o, gxt.to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["nb", "C", "eps", "s_c", "t_off"])
def _finalize_fwd_kernel(
    CNT, SX, ST, M2, CX, nb, C, W, BIAS, eps, Z, s_c, t_off,
    MEAN, RSTD, MT, S, A, BETA, D,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Combine the per-block partials (Chan) and emit the statistics and apply coefficients.
    The partial sums are of shifted values (``_shift``); the moments do not depend on it."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    n_tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    sx_tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    st_tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, nb, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mr = rows < nb
        m = mr[:, None] & mc[None, :]
        cnt = tl.load(CNT + rows, mask=mr, other=0.0)
        idx = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        n_tot += tl.sum(tl.where(m, cnt[:, None], 0.0), axis=0)
        sx_tot += tl.sum(tl.load(SX + idx, mask=m, other=0.0), axis=0)
        st_tot += tl.sum(tl.load(ST + idx, mask=m, other=0.0), axis=0)
    n_tot = tl.where(mc, n_tot, 1.0)
    mean = sx_tot / n_tot
    mt = st_tot / n_tot
    m2_tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    cx_tot = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, nb, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mr = rows < nb
        m = mr[:, None] & mc[None, :]
        cnt = tl.load(CNT + rows, mask=mr, other=1.0)
        idx = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        sx = tl.load(SX + idx, mask=m, other=0.0)
        st = tl.load(ST + idx, mask=m, other=0.0)
        dm = tl.where(m, sx / cnt[:, None] - mean[None, :], 0.0)
        dmt = tl.where(m, st / cnt[:, None] - mt[None, :], 0.0)
        m2_tot += tl.sum(tl.load(M2 + idx, mask=m, other=0.0) + cnt[:, None] * dm * dm, axis=0)
        cx_tot += tl.sum(tl.load(CX + idx, mask=m, other=0.0) + cnt[:, None] * dm * dmt, axis=0)
    kx, kt = _shift(Z, t_off, s_c, offs_c, mc)
    mean += kx
    mt += kt
    var = m2_tot / n_tot
    rstd = 1.0 / tl.sqrt(var + eps)
    s = cx_tot / n_tot * rstd
    if HAS_W:
        gam = tl.load(W + offs_c, mask=mc, other=1.0).to(tl.float32)
    else:
        gam = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        bet = tl.load(BIAS + offs_c, mask=mc, other=0.0).to(tl.float32)
    else:
        bet = tl.zeros([BLOCK_C], dtype=tl.float32)
    a = gam * rstd
    d = -a * rstd * s
    tl.store(MEAN + offs_c, mean, mask=mc)
    tl.store(RSTD + offs_c, rstd, mask=mc)
    tl.store(MT + offs_c, mt, mask=mc)
    tl.store(S + offs_c, s, mask=mc)
    tl.store(A + offs_c, a, mask=mc)
    tl.store(BETA + offs_c, bet, mask=mc)
    tl.store(D + offs_c, d, mask=mc)


@triton.jit(do_not_specialize=["nb", "C", "count"])
def _finalize_bwd_kernel(
    SG, SGX, SGT, SGTX, SGTT, nb, C, count,
    RSTD, S, W,
    K1, K2, K3, KX, K0, K8, GW, GB,
    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the backward partials; emit the apply coefficients and the gamma/beta gradients."""
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgt = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgtx = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgtt = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, nb, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < nb)[:, None] & mc[None, :]
        idx = rows[:, None].to(tl.int64) * C + offs_c[None, :]
        sg += tl.sum(tl.load(SG + idx, mask=m, other=0.0), axis=0)
        sgx += tl.sum(tl.load(SGX + idx, mask=m, other=0.0), axis=0)
        sgt += tl.sum(tl.load(SGT + idx, mask=m, other=0.0), axis=0)
        sgtx += tl.sum(tl.load(SGTX + idx, mask=m, other=0.0), axis=0)
        sgtt += tl.sum(tl.load(SGTT + idx, mask=m, other=0.0), axis=0)
    rstd = tl.load(RSTD + offs_c, mask=mc, other=0.0)
    s = tl.load(S + offs_c, mask=mc, other=0.0)
    if HAS_W:
        gam = tl.load(W + offs_c, mask=mc, other=1.0).to(tl.float32)
    else:
        gam = tl.full([BLOCK_C], 1.0, tl.float32)
    gm = sg / count
    gxh = sgx * rstd / count
    gtm = sgt / count
    gtxh = sgtx * rstd / count
    gtt = sgtt / count
    T = gtt - gtxh * s  # mean(gyt P t), gtt = mean(gyt (t - mt))
    gr = gam * rstd
    gr2 = gr * rstd
    tl.store(K1 + offs_c, gr, mask=mc)
    tl.store(K2 + offs_c, -gr2 * s, mask=mc)
    tl.store(K3 + offs_c, -gr2 * gtxh, mask=mc)
    tl.store(KX + offs_c, (-gr * gxh + 2.0 * gr2 * s * gtxh - gr2 * T) * rstd, mask=mc)
    tl.store(K0 + offs_c, -gr * gm + gr2 * s * gtm, mask=mc)
    tl.store(K8 + offs_c, -gr * gtm, mask=mc)
    tl.store(GW + offs_c, sgx * rstd + count * rstd * T, mask=mc)
    tl.store(GB + offs_c, sg, mask=mc)


# -----------------------------------------------------------------------------------------
# launchers
# -----------------------------------------------------------------------------------------


def _as3d(t: torch.Tensor) -> torch.Tensor:
    """(2n, C, *spatial) -> (2n, C, S): a view for NCHW, channels_last and (B, C, L) layouts,
    a copy where the spatial axes cannot be merged (e.g. H and W transposed); inputs only."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


def _out3d(t: torch.Tensor) -> torch.Tensor:
    """The (2n, C, S) view a kernel writes ``t`` through; ``view`` never copies, so a layout
    without one is refused (a copy's writes would be lost) rather than silently dropped."""
    if t.dim() == 2:
        return t.unsqueeze(-1)
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        raise RuntimeError(f"dual BatchNorm kernel: an output of shape {tuple(t.shape)} and strides {t.stride()} "
                           "has no (2n, C, S) view; allocate it with ops._dual_bn_ops._out_like") from None


def _blocks(C: int, P: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): fixed, so that one compiled kernel serves every shape."""
    return 256, 16


def _finalize_blocks(C: int) -> tuple[int, int]:
    return 32, 64


def _tiling(z3: torch.Tensor) -> tuple[int, int, int, int, int, tuple[int, int]]:
    """(n, C, S, BLOCK_P, BLOCK_C, grid) of the (row block, channel block) grid over a (2n, C, S) view."""
    n, C, S = z3.shape[0] // 2, z3.shape[1], z3.shape[2]
    bp, bc = _blocks(C, n * S)
    return n, C, S, bp, bc, (triton.cdiv(n * S, bp), triton.cdiv(C, bc))


def stats_fwd(z: torch.Tensor, weight, bias, eps: float):
    """(7, C) float32: per-channel statistics and apply coefficients mean, rstd, mt, s, a, beta, d."""
    z3 = _as3d(z)
    n, C, S, bp, bc, grid = _tiling(z3)
    f32 = dict(dtype=torch.float32, device=z.device)
    cnt = torch.empty(grid[0], **f32)
    parts = torch.empty(4, grid[0], C, **f32)
    _stats_fwd_kernel[grid](
        z3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        cnt, parts[0], parts[1], parts[2], parts[3], BLOCK_P=bp, BLOCK_C=bc,
    )
    stats = torch.empty(7, C, **f32)
    br, bc2 = _finalize_blocks(C)
    _finalize_fwd_kernel[(triton.cdiv(C, bc2),)](
        cnt, parts[0], parts[1], parts[2], parts[3], grid[0], C,
        weight if weight is not None else stats, bias if bias is not None else stats, float(eps),
        z3, z3.stride(1), n * z3.stride(0),
        *stats, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=br, BLOCK_C=bc2,
    )
    return stats


def apply_fwd(z, out, stats, relu):
    stats = stats.contiguous()  # the kernels address row r at STATS + r * C
    z3, o3 = _as3d(z), _out3d(out)
    n, C, S, bp, bc, grid = _tiling(z3)
    _apply_fwd_kernel[grid](
        z3, o3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        o3.stride(0), o3.stride(1), o3.stride(2), n * o3.stride(0),
        stats, RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )


def stats_bwd(z, g, weight, stats, relu):
    """(8, C) float32 rows k1, k2, k3, kx, k0, k8, g_weight, g_bias: the backward apply
    coefficients and the affine parameters' gradients."""
    stats = stats.contiguous()  # the kernels address row r at STATS + r * C
    rstd, s = stats[1], stats[3]
    z3, g3 = _as3d(z), _as3d(g)
    n, C, S, bp, bc, grid = _tiling(z3)
    parts = torch.empty(5, grid[0], C, dtype=torch.float32, device=z.device)
    _stats_bwd_kernel[grid](
        z3, g3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        g3.stride(0), g3.stride(1), g3.stride(2), n * g3.stride(0),
        stats, *parts, RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )
    out = torch.empty(8, C, dtype=torch.float32, device=z.device)
    br, bc2 = _finalize_blocks(C)
    _finalize_bwd_kernel[(triton.cdiv(C, bc2),)](
        *parts, grid[0], C, float(n * S), rstd, s, weight if weight is not None else rstd,
        *out, HAS_W=weight is not None, BLOCK_R=br, BLOCK_C=bc2,
    )
    return out


def apply_bwd(z, g, gz, stats, coef, relu):
    """Writes grad_z into ``gz`` from the rows of ``stats_bwd``'s ``coef``."""
    stats = stats.contiguous()  # the kernels address row r at STATS + r * C
    z3, g3, o3 = _as3d(z), _as3d(g), _out3d(gz)
    n, C, S, bp, bc, grid = _tiling(z3)
    _apply_bwd_kernel[grid](
        z3, g3, o3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        g3.stride(0), g3.stride(1), g3.stride(2), n * g3.stride(0),
        o3.stride(0), o3.stride(1), o3.stride(2), n * o3.stride(0),
        stats, *coef[:6], RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )
