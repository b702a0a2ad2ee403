"""The plain-torch path of the dual BatchNorm op (``sgr_ext.ops.dual_batchnorm``): any
device and float dtype, float64 included. Same passes and per-channel coefficients as the
Triton kernels (``sgr_ext.kernels.dual_batchnorm``) and the C++ kernels
(``csrc/dual_batchnorm.cpp``), written with torch ops; statistics accumulate in float32
(float64 for float64 inputs), centred before multiplying.

``z`` is the packed dual tensor (2n, C, *spatial): rows [0, n) primal x, rows [n, 2n)
tangent t. ``stats`` is (7, C): mean, rstd, mt, s, a, beta, d (``_dual_bn_ops.STATS_ROWS``).
"""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext._tensor_util import accumulate_dtype, channel_view


def _halves(z: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The primal and tangent halves of a packed tensor, in ``acc``."""
    n = z.shape[0] // 2
    return z[:n].to(acc), z[n:].to(acc)


def _centred(z: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean, t - mt) in the dtype of ``stats``."""
    nd = z.dim()
    xp, xt = _halves(z, stats.dtype)
    return xp - channel_view(stats[0], nd), xt - channel_view(stats[2], nd)


def stats_fwd(z: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """(7, C) accumulate dtype: batch mean and inverse std of the primal, mean of the tangent,
    s = mean(xh t), and the apply coefficients a, beta, d."""
    nd = z.dim()
    red = [0, *range(2, nd)]
    xp, xt = _halves(z, accumulate_dtype(z.dtype))
    var, mean = torch.var_mean(xp, dim=red, correction=0)
    mt = xt.mean(red)
    cross = ((xp - channel_view(mean, nd)) * (xt - channel_view(mt, nd))).mean(red)
    del xp, xt
    rstd = torch.rsqrt(var + eps)
    s = cross * rstd
    a = rstd * weight.to(rstd.dtype) if weight is not None else rstd
    beta = bias.to(rstd.dtype) if bias is not None else torch.zeros_like(mean)
    return torch.stack((mean, rstd, mt, s, a, beta, -a * rstd * s))


def apply_fwd(z: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, relu: bool) -> None:
    """Writes y = a (x - mean) + beta, yt = a (t - mt) + d (x - mean) (then ReLU, mask y > 0)
    into ``out`` (like z)."""
    n, nd = z.shape[0] // 2, z.dim()
    a, beta, d = (channel_view(v, nd) for v in stats[4:7])
    xc, tc = _centred(z, stats)
    yp = torch.addcmul(beta, xc, a)
    yt = torch.mul(tc, a).addcmul_(xc, d)
    if relu:
        mask = yp > 0
        yp.relu_()
        yt.mul_(mask)
    out[:n].copy_(yp)
    out[n:].copy_(yt)


def backward(z: torch.Tensor, grad: torch.Tensor, gz: torch.Tensor, weight: Optional[torch.Tensor], stats: torch.Tensor, relu: bool):
    """Writes grad_z into ``gz`` (same shape as z); returns (grad_weight, grad_bias), (C,) each
    in the accumulate dtype."""
    n, nd = z.shape[0] // 2, z.dim()
    red = [0, *range(2, nd)]
    rstd, s = stats[1], stats[3]
    count = n * z[0, 0].numel()
    xc, tc = _centred(z, stats)
    gy, gt = _halves(grad, stats.dtype)
    if relu:  # recompute the mask exactly as the forward did
        mask = torch.addcmul(channel_view(stats[5], nd), xc, channel_view(stats[4], nd)) > 0
        gy, gt = gy * mask, gt * mask
    sg, sgt = gy.sum(red), gt.sum(red)
    sgx, sgtx, sgtt = (gy * xc).sum(red), (gt * xc).sum(red), (gt * tc).sum(red)
    gm, gxh, gtm, gtxh = sg / count, sgx * rstd / count, sgt / count, sgtx * rstd / count
    T = sgtt / count - gtxh * s  # mean(gyt P t)
    gr = rstd * weight.to(rstd.dtype) if weight is not None else rstd
    gr2 = gr * rstd
    k1, k2, k3 = gr, -gr2 * s, -gr2 * gtxh
    kx = (-gr * gxh + 2 * gr2 * s * gtxh - gr2 * T) * rstd
    k0, k8 = -gr * gm + gr2 * s * gtm, -gr * gtm
    cv = lambda v: channel_view(v, nd)  # noqa: E731
    gx = (gy * cv(k1)).addcmul_(gt, cv(k2)).addcmul_(tc, cv(k3)).addcmul_(xc, cv(kx)).add_(cv(k0))
    gtin = (gt * cv(k1)).addcmul_(xc, cv(k3)).add_(cv(k8))
    gz[:n].copy_(gx)
    gz[n:].copy_(gtin)
    return sgx * rstd + count * rstd * T, sg
