"""Triton kernels of the dual (primal + tangent) train-mode BatchNorm, optionally + ReLU.

The packed input z is viewed as (2n, C, S) with arbitrary strides (NCHW, channels_last,
(B, C) and (B, C, L) all work): rows [0, n) primal x, rows [n, 2n) tangent t. Per channel,
over the N = n * S primal elements:

    forward stats   one pass: per-block counts, sums of x and t, centred second moment
                    and centred x-t cross moment (Chan's parallel combination in torch,
                    deterministic, no atomics)
    forward apply   one pass: y = a x + b, yt = a t + d x + e, optional ReLU mask
    backward stats  one pass: sums of g, g (x - mu), gt, gt (x - mu), gt t  (g, gt masked
                    by the recomputed ReLU mask)
    backward apply  one pass: gx = k1 g + k2 gt + k3 t + kx (x - mu) + k0,
                                gt_in = k1 gt + k7 (x - mu) + k8

Statistics accumulate in float32 (inputs of any float dtype except float64, which the
torch path handles). The per-channel coefficient algebra lives in ``sgr_ext.engine.dual``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stats_fwd_kernel(
    Z, n, C, S, s_n, s_c, s_s, t_off,
    CNT, SX, ST, M2, CX,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n * S
    mask_c = offs_c < C
    i = offs_p // S
    s = offs_p % S
    off = i[:, None].to(tl.int64) * s_n + s[:, None].to(tl.int64) * s_s + offs_c[None, :].to(tl.int64) * s_c
    m = mask_p[:, None] & mask_c[None, :]
    x = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    t = tl.load(Z + t_off + off, mask=m, other=0.0).to(tl.float32)
    cnt = tl.sum(mask_p.to(tl.float32), axis=0)
    sx = tl.sum(x, axis=0)
    st = tl.sum(t, axis=0)
    mean = sx / cnt
    xc = tl.where(m, x - mean[None, :], 0.0)
    m2 = tl.sum(xc * xc, axis=0)
    cx = tl.sum(xc * t, axis=0)
    out = pid_p * C + offs_c
    tl.store(SX + out, sx, mask=mask_c)
    tl.store(ST + out, st, mask=mask_c)
    tl.store(M2 + out, m2, mask=mask_c)
    tl.store(CX + out, cx, mask=mask_c)
    tl.store(CNT + pid_p, cnt)


@triton.jit
def _apply_fwd_kernel(
    Z, OUT, n, C, S, s_n, s_c, s_s, t_off, o_n, o_c, o_s, o_t_off,
    A, B, D, E,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n * S
    mask_c = offs_c < C
    i = (offs_p // S)[:, None].to(tl.int64)
    s = (offs_p % S)[:, None].to(tl.int64)
    c = offs_c[None, :].to(tl.int64)
    m = mask_p[:, None] & mask_c[None, :]
    off = i * s_n + s * s_s + c * s_c
    x = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    t = tl.load(Z + t_off + off, mask=m, other=0.0).to(tl.float32)
    a = tl.load(A + offs_c, mask=mask_c, other=0.0)[None, :]
    b = tl.load(B + offs_c, mask=mask_c, other=0.0)[None, :]
    d = tl.load(D + offs_c, mask=mask_c, other=0.0)[None, :]
    e = tl.load(E + offs_c, mask=mask_c, other=0.0)[None, :]
    y = x * a + b
    yt = t * a + x * d + e
    if RELU:
        pos = y > 0
        y = tl.where(pos, y, 0.0)
        yt = tl.where(pos, yt, 0.0)
    o = i * o_n + s * o_s + c * o_c
    tl.store(OUT + o, y.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_t_off + o, yt.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _stats_bwd_kernel(
    Z, G, n, C, S, s_n, s_c, s_s, t_off, g_n, g_c, g_s, g_t_off,
    MEAN, A, B,
    SG, SGX, SGT, SGTX, SGTT,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n * S
    mask_c = offs_c < C
    i = (offs_p // S)[:, None].to(tl.int64)
    s = (offs_p % S)[:, None].to(tl.int64)
    c = offs_c[None, :].to(tl.int64)
    m = mask_p[:, None] & mask_c[None, :]
    off = i * s_n + s * s_s + c * s_c
    goff = i * g_n + s * g_s + c * g_c
    x = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    t = tl.load(Z + t_off + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + goff, mask=m, other=0.0).to(tl.float32)
    gt = tl.load(G + g_t_off + goff, mask=m, other=0.0).to(tl.float32)
    mu = tl.load(MEAN + offs_c, mask=mask_c, other=0.0)[None, :]
    if RELU:
        a = tl.load(A + offs_c, mask=mask_c, other=0.0)[None, :]
        b = tl.load(B + offs_c, mask=mask_c, other=0.0)[None, :]
        pos = (x * a + b) > 0
        g = tl.where(pos, g, 0.0)
        gt = tl.where(pos, gt, 0.0)
    xc = tl.where(m, x - mu, 0.0)
    out = pid_p * C + offs_c
    tl.store(SG + out, tl.sum(g, axis=0), mask=mask_c)
    tl.store(SGX + out, tl.sum(g * xc, axis=0), mask=mask_c)
    tl.store(SGT + out, tl.sum(gt, axis=0), mask=mask_c)
    tl.store(SGTX + out, tl.sum(gt * xc, axis=0), mask=mask_c)
    tl.store(SGTT + out, tl.sum(gt * t, axis=0), mask=mask_c)


@triton.jit
def _apply_bwd_kernel(
    Z, G, OUT, n, C, S, s_n, s_c, s_s, t_off, g_n, g_c, g_s, g_t_off, o_n, o_c, o_s, o_t_off,
    MEAN, A, B, K1, K2, K3, KX, K0, K7, K8,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < n * S
    mask_c = offs_c < C
    i = (offs_p // S)[:, None].to(tl.int64)
    s = (offs_p % S)[:, None].to(tl.int64)
    c = offs_c[None, :].to(tl.int64)
    m = mask_p[:, None] & mask_c[None, :]
    off = i * s_n + s * s_s + c * s_c
    goff = i * g_n + s * g_s + c * g_c
    x = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
    t = tl.load(Z + t_off + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + goff, mask=m, other=0.0).to(tl.float32)
    gt = tl.load(G + g_t_off + goff, mask=m, other=0.0).to(tl.float32)
    mu = tl.load(MEAN + offs_c, mask=mask_c, other=0.0)[None, :]
    if RELU:
        a = tl.load(A + offs_c, mask=mask_c, other=0.0)[None, :]
        b = tl.load(B + offs_c, mask=mask_c, other=0.0)[None, :]
        pos = (x * a + b) > 0
        g = tl.where(pos, g, 0.0)
        gt = tl.where(pos, gt, 0.0)
    xc = x - mu
    k1 = tl.load(K1 + offs_c, mask=mask_c, other=0.0)[None, :]
    k2 = tl.load(K2 + offs_c, mask=mask_c, other=0.0)[None, :]
    k3 = tl.load(K3 + offs_c, mask=mask_c, other=0.0)[None, :]
    kx = tl.load(KX + offs_c, mask=mask_c, other=0.0)[None, :]
    k0 = tl.load(K0 + offs_c, mask=mask_c, other=0.0)[None, :]
    k7 = tl.load(K7 + offs_c, mask=mask_c, other=0.0)[None, :]
    k8 = tl.load(K8 + offs_c, mask=mask_c, other=0.0)[None, :]
    gx = k1 * g + k2 * gt + k3 * t + kx * xc + k0
    gxt = k1 * gt + k7 * xc + k8
    o = i * o_n + s * o_s + c * o_c
    tl.store(OUT + o, gx.to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + o_t_off + o, gxt.to(OUT.dtype.element_ty), mask=m)
