"""The plain-torch path of the dual BatchNorm op (``sgr_ext.ops.dual_batchnorm``): any
device and float dtype, float64 included. Same passes and per-channel coefficients as the
Triton kernels (``sgr_ext.kernels.dual_batchnorm``), written with torch ops; statistics
accumulate in float32 (float64 for float64 inputs).

``z`` is the packed dual tensor (2n, C, *spatial): rows [0, n) primal x, rows [n, 2n)
tangent t. ``stats`` is (8, C): mean, rstd, mt, s, a, b, d, e (see ``stats_fwd``).
"""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext._tensor_util import accumulate_dtype, channel_view


def stats_fwd(z: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """(8, C) accumulate dtype: batch mean and inverse std of the primal, mean of the tangent,
    s = mean(xh t), and the apply coefficients of y = a x + b, yt = a t + d x + e."""
    n, nd = z.shape[0] // 2, z.dim()
    acc = accumulate_dtype(z.dtype)
    red = [0, *range(2, nd)]
    z2 = z.view(2, n, *z.shape[1:])
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    var, mean = torch.var_mean(xp, dim=red, correction=0)
    mt = xt.mean(red)
    cross = ((xp - channel_view(mean, nd)) * xt).mean(red)
    del xp, xt
    rstd = torch.rsqrt(var + eps)
    s = cross * rstd
    gam = weight.to(acc) if weight is not None else torch.ones_like(mean)
    bet = bias.to(acc) if bias is not None else torch.zeros_like(mean)
    a = gam * rstd
    b = bet - a * mean
    d = -a * rstd * s
    e = -d * mean - a * mt
    return torch.stack((mean, rstd, mt, s, a, b, d, e))


def apply_fwd(z, out, a, b, d, e, relu):
    n, nd = z.shape[0] // 2, z.dim()
    acc = a.dtype
    z2, o2 = z.view(2, n, *z.shape[1:]), out.view(2, n, *z.shape[1:])
    A, Bc, Dc, E = (channel_view(v, nd) for v in (a, b, d, e))
    if acc == z.dtype:  # write straight into the output halves
        torch.addcmul(Bc, z2[0], A, out=o2[0])
        torch.addcmul(E, z2[0], Dc, out=o2[1])
        o2[1].addcmul_(z2[1], A)
        if relu:
            mask = o2[0] > 0
            o2[0].relu_()
            o2[1].mul_(mask)
        return
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    yp = torch.addcmul(Bc, xp, A)
    yt = torch.addcmul(E, xp, Dc).addcmul_(xt, A)
    if relu:
        mask = yp > 0
        yp.relu_()
        yt.mul_(mask)
    o2[0].copy_(yp)
    o2[1].copy_(yt)


def backward(z: torch.Tensor, grad: torch.Tensor, gz: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor, relu: bool):
    """Writes grad_z into ``gz`` (same shape as z); returns (grad_weight, grad_bias), (C,) each
    in the accumulate dtype."""
    mean, rstd, mt, s, a, b = stats[:6]
    acc = mean.dtype
    count = (z.numel() // 2) // z.shape[1]
    gam = weight.to(acc) if weight is not None else torch.ones_like(mean)
    sg, sgx, sgt, sgtx, sgtt = _stats_bwd(z, grad, gz, mean, a, b, relu)
    gm, gxh = sg / count, sgx * rstd / count  # mean(gy), mean(gy xh)
    gtm, gtxh, gtt = sgt / count, sgtx * rstd / count, sgtt / count
    T = gtt - gtm * mt - gtxh * s  # mean(gyt P t)
    gr = gam * rstd
    gr2 = gr * rstd
    k1, k2, k3 = gr, -gr2 * s, -gr2 * gtxh
    kx = (-gr * gxh + 2 * gr2 * s * gtxh - gr2 * T) * rstd
    k0 = -gr * gm + gr2 * s * gtm + gr2 * gtxh * mt
    k7, k8 = -gr2 * gtxh, -gr * gtm
    _apply_bwd(z, gz, mean, k1, k2, k3, kx, k0, k7, k8)
    g_w = sgx * rstd + count * rstd * T
    g_b = sg
    return g_w, g_b


def _stats_bwd(z, grad, gz, mean, a, b, relu):
    """Masked incoming gradients into ``gz`` (scratch), and the five per-channel sums."""
    n, nd = z.shape[0] // 2, z.dim()
    acc = mean.dtype
    red = [0, *range(2, nd)]
    z2, g2, gz2 = z.view(2, n, *z.shape[1:]), grad.view(2, n, *grad.shape[1:]), gz.view(2, n, *z.shape[1:])
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    if relu:  # recompute the mask exactly as the forward did
        mask = torch.addcmul(channel_view(b, nd), xp, channel_view(a, nd)) > 0
        torch.mul(g2, mask, out=gz2)
        del mask
    else:
        gz2.copy_(g2)
    gy, gt = gz2[0].to(acc), gz2[1].to(acc)
    xc = xp - channel_view(mean, nd)
    sums = [gy.sum(red)]
    tmp = torch.mul(gy, xc)
    sums.append(tmp.sum(red))
    sums.append(gt.sum(red))
    sums.append(torch.mul(gt, xc, out=tmp).sum(red))
    sums.append(torch.mul(gt, xt, out=tmp).sum(red))
    return sums


def _apply_bwd(z, gz, mean, k1, k2, k3, kx, k0, k7, k8):
    """In place on ``gz`` (which holds the masked incoming gradients)."""
    n, nd = z.shape[0] // 2, z.dim()
    acc = mean.dtype
    z2, gz2 = z.view(2, n, *z.shape[1:]), gz.view(2, n, *z.shape[1:])
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    xc = xp - channel_view(mean, nd)
    del xp
    gy, gt = gz2[0].to(acc), gz2[1].to(acc)
    gx = gy.mul(channel_view(k1, nd)) if acc != z.dtype else gz2[0].mul_(channel_view(k1, nd))
    gx.addcmul_(gt, channel_view(k2, nd)).addcmul_(xt, channel_view(k3, nd)).addcmul_(xc, channel_view(kx, nd)).add_(channel_view(k0, nd))
    gtt = gt.mul(channel_view(k1, nd)) if acc != z.dtype else gz2[1].mul_(channel_view(k1, nd))
    gtt.addcmul_(xc, channel_view(k7, nd)).add_(channel_view(k8, nd))
    if acc != z.dtype:
        gz2[0].copy_(gx)
        gz2[1].copy_(gtt)
