"""Train-mode BatchNorm (optionally fused with the following ReLU) on a dual value.

``DualBatchNorm`` saves only its packed input and per-channel statistics; ``DualBNReLUConv``
also recomputes the following convolution's input in backward. Eval-mode BatchNorm is a
per-channel affine map (``_rule_batchnorm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext.engine.dual.conv import _conv_backward, _conv_dtype
from sgr_ext.engine.dual.elementwise import _relu
from sgr_ext.engine.dual.value import Dual
from sgr_ext.reference import accumulate_dtype


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) for a (n, C, *spatial) tensor of ``ndim`` dims."""
    return v.view(1, -1, *([1] * (ndim - 2)))


def _as3d(t: torch.Tensor) -> torch.Tensor:
    """(2n, C, *spatial) -> (2n, C, S) (a view for dense layouts, NCHW or channels_last)."""
    return t.unsqueeze(-1) if t.dim() == 2 else t.flatten(2)


def _triton_forced() -> bool:
    """The package attribute ``sgr_ext.engine.dual._TRITON_FORCE`` (tests set it to run the
    Triton kernels on CPU tensors under TRITON_INTERPRET=1)."""
    from sgr_ext.engine import dual

    return dual._TRITON_FORCE


def _use_triton(z: torch.Tensor) -> bool:
    if z.dtype == torch.float64:
        return False
    if not (z.is_cuda or (_triton_forced() and z.device.type == "cpu")):
        return False
    try:
        from sgr_ext.engine import _dual_bn_kernels  # noqa: F401
    except Exception:  # no triton: the torch path
        return False
    return True


def _blocks(C: int, P: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): fixed, so that one compiled kernel serves every shape."""
    return 256, 16


def _finalize_blocks(C: int) -> tuple[int, int]:
    return 32, 64


def _triton_stats_fwd(z: torch.Tensor, weight, bias, eps: float):
    """(mean, rstd, mt, s, a, b, d, e): per-channel float32 statistics and apply coefficients."""
    import triton

    from sgr_ext.engine import _dual_bn_kernels as K

    z3 = _as3d(z)
    n, C, S = z3.shape[0] // 2, z3.shape[1], z3.shape[2]
    bp, bc = _blocks(C, n * S)
    grid = (triton.cdiv(n * S, bp), triton.cdiv(C, bc))
    f32 = dict(dtype=torch.float32, device=z.device)
    cnt = torch.empty(grid[0], **f32)
    parts = torch.empty(4, grid[0], C, **f32)
    K._stats_fwd_kernel[grid](
        z3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        cnt, parts[0], parts[1], parts[2], parts[3], BLOCK_P=bp, BLOCK_C=bc,
    )
    stats = torch.empty(8, C, **f32)
    br, bc2 = _finalize_blocks(C)
    K._finalize_fwd_kernel[(triton.cdiv(C, bc2),)](
        cnt, parts[0], parts[1], parts[2], parts[3], grid[0], C,
        weight if weight is not None else stats, bias if bias is not None else stats, float(eps),
        *stats, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_R=br, BLOCK_C=bc2,
    )
    return tuple(stats)


def _triton_apply_fwd(z, out, a, b, d, e, relu):
    import triton

    from sgr_ext.engine import _dual_bn_kernels as K

    z3, o3 = _as3d(z), _as3d(out)
    n, C, S = z3.shape[0] // 2, z3.shape[1], z3.shape[2]
    bp, bc = _blocks(C, n * S)
    grid = (triton.cdiv(n * S, bp), triton.cdiv(C, bc))
    K._apply_fwd_kernel[grid](
        z3, o3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        o3.stride(0), o3.stride(1), o3.stride(2), n * o3.stride(0),
        a, b, d, e, RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )


def _triton_stats_bwd(z, g, weight, stats, relu):
    """(k1, k2, k3, kx, k0, k7, k8, g_weight, g_bias): backward coefficients, float32."""
    import triton

    from sgr_ext.engine import _dual_bn_kernels as K

    mean, rstd, mt, s, a, b = stats[:6]
    z3, g3 = _as3d(z), _as3d(g)
    n, C, S = z3.shape[0] // 2, z3.shape[1], z3.shape[2]
    bp, bc = _blocks(C, n * S)
    grid = (triton.cdiv(n * S, bp), triton.cdiv(C, bc))
    parts = torch.empty(5, grid[0], C, dtype=torch.float32, device=z.device)
    K._stats_bwd_kernel[grid](
        z3, g3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        g3.stride(0), g3.stride(1), g3.stride(2), n * g3.stride(0),
        mean, a, b, *parts, RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )
    out = torch.empty(9, C, dtype=torch.float32, device=z.device)
    br, bc2 = _finalize_blocks(C)
    K._finalize_bwd_kernel[(triton.cdiv(C, bc2),)](
        *parts, grid[0], C, float(n * S), rstd, mt, s, weight if weight is not None else rstd,
        *out, HAS_W=weight is not None, BLOCK_R=br, BLOCK_C=bc2,
    )
    return tuple(out)


def _triton_apply_bwd(z, g, gz, mean, a, b, k1, k2, k3, kx, k0, k7, k8, relu):
    import triton

    from sgr_ext.engine import _dual_bn_kernels as K

    z3, g3, o3 = _as3d(z), _as3d(g), _as3d(gz)
    n, C, S = z3.shape[0] // 2, z3.shape[1], z3.shape[2]
    bp, bc = _blocks(C, n * S)
    grid = (triton.cdiv(n * S, bp), triton.cdiv(C, bc))
    K._apply_bwd_kernel[grid](
        z3, g3, o3, n, C, S, z3.stride(0), z3.stride(1), z3.stride(2), n * z3.stride(0),
        g3.stride(0), g3.stride(1), g3.stride(2), n * g3.stride(0),
        o3.stride(0), o3.stride(1), o3.stride(2), n * o3.stride(0),
        mean, a, b, k1, k2, k3, kx, k0, k7, k8, RELU=relu, BLOCK_P=bp, BLOCK_C=bc,
    )


class DualBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm (batch statistics of the primal) on a packed dual tensor.

    ``z``: (2n, C, *spatial): rows [0, n) primal x, rows [n, 2n) tangent t. Forward, per
    channel over the N = n * spatial elements of x (mu, sigma^2 biased batch statistics,
    r = 1/sqrt(sigma^2 + eps), xh = (x - mu) r, s = mean(xh t)):

        y  = gamma xh + beta
        yt = gamma r (t - mean(t) - xh s)              (the tangent of y along t)

    optionally followed by ReLU on both halves (mask y > 0). Backward (gy, gyt the incoming
    gradients, masked by the ReLU when fused; P v = v - mean(v) - xh mean(xh v)):

        g_t     = gamma r P gyt
        g_x     = gamma r P gy - gamma r^2 [ s P gyt + mean(gyt xh) P t + mean(gyt P t) xh ]
        g_gamma = sum(gy xh) + r sum(gyt P t),   g_beta = sum(gy)

    Saves only the packed input and per-channel statistics. CUDA: four fused Triton passes
    (``_dual_bn_kernels``); elsewhere torch ops. Statistics accumulate in float32 (float64
    for float64 inputs).
    """

    @staticmethod
    def forward(ctx, z, weight, bias, eps: float, relu: bool):
        out, stats, triton_path = _bn_fwd(z, weight, bias, eps, relu)
        ctx.relu, ctx.triton = relu, triton_path
        ctx.save_for_backward(z, weight, bias, *stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, weight, bias, *stats = ctx.saved_tensors
        gz, g_w, g_b = _bn_bwd(z, grad, weight, bias, stats, ctx.relu, ctx.triton, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gz, g_w, g_b, None, None


def _bn_fwd(z, weight, bias, eps, relu, out=None):
    """Forward of the dual BN(+ReLU): (out, stats, used_triton).

    stats = (mean, rstd, mt, s, a, b, d, e), per channel: batch mean and inverse std of the
    primal, mean of the tangent, s = mean(xh t), and the apply coefficients
    y = a x + b, yt = a t + d x + e.
    """
    with torch.autocast(z.device.type, enabled=False):
        triton_path = _use_triton(z)
        if triton_path:
            stats = _triton_stats_fwd(z, weight, bias, eps)
        else:
            n, nd = z.shape[0] // 2, z.dim()
            acc = accumulate_dtype(z.dtype)
            red = [0, *range(2, nd)]
            z2 = z.view(2, n, *z.shape[1:])
            xp, xt = z2[0].to(acc), z2[1].to(acc)
            var, mean = torch.var_mean(xp, dim=red, correction=0)
            mt = xt.mean(red)
            cross = ((xp - _bcast(mean, nd)) * xt).mean(red)
            del xp, xt
            rstd = torch.rsqrt(var + eps)
            s = cross * rstd
            gam = weight.to(acc) if weight is not None else torch.ones_like(mean)
            bet = bias.to(acc) if bias is not None else torch.zeros_like(mean)
            a = gam * rstd
            b = bet - a * mean
            d = -a * rstd * s
            e = -d * mean - a * mt
            stats = (mean, rstd, mt, s, a, b, d, e)
        out = _bn_apply(z, stats, relu, triton_path, out)
    return out, stats, triton_path


def _bn_apply(z, stats, relu, triton_path, out=None):
    a, b, d, e = stats[4:]
    out = torch.empty_like(z) if out is None else out
    with torch.autocast(z.device.type, enabled=False):
        if triton_path:
            _triton_apply_fwd(z, out, a, b, d, e, relu)
        else:
            _torch_apply_fwd(z, out, a, b, d, e, relu)
    return out


def _bn_bwd(z, grad, weight, bias, stats, relu, triton_path, need_w=True, need_b=True):
    """Backward of the dual BN(+ReLU): (grad_z, grad_weight, grad_bias)."""
    mean, rstd, mt, s, a, b = stats[:6]
    with torch.autocast(z.device.type, enabled=False):
        gz = torch.empty_like(z)
        if triton_path:
            k1, k2, k3, kx, k0, k7, k8, g_w, g_b = _triton_stats_bwd(z, grad, weight, stats, relu)
            _triton_apply_bwd(z, grad, gz, mean, a, b, k1, k2, k3, kx, k0, k7, k8, relu)
        else:
            acc = mean.dtype
            count = (z.numel() // 2) // z.shape[1]
            gam = weight.to(acc) if weight is not None else torch.ones_like(mean)
            sg, sgx, sgt, sgtx, sgtt = _torch_stats_bwd(z, grad, gz, mean, a, b, relu)
            gm, gxh = sg / count, sgx * rstd / count  # mean(gy), mean(gy xh)
            gtm, gtxh, gtt = sgt / count, sgtx * rstd / count, sgtt / count
            T = gtt - gtm * mt - gtxh * s  # mean(gyt P t)
            gr = gam * rstd
            gr2 = gr * rstd
            k1, k2, k3 = gr, -gr2 * s, -gr2 * gtxh
            kx = (-gr * gxh + 2 * gr2 * s * gtxh - gr2 * T) * rstd
            k0 = -gr * gm + gr2 * s * gtm + gr2 * gtxh * mt
            k7, k8 = -gr2 * gtxh, -gr * gtm
            _torch_apply_bwd(z, gz, mean, k1, k2, k3, kx, k0, k7, k8)
            g_w = sgx * rstd + count * rstd * T
            g_b = sg
        g_w = g_w.to(weight.dtype) if weight is not None and need_w else None
        g_b = g_b.to(bias.dtype) if bias is not None and need_b else None
    return gz, g_w, g_b


class DualBNReLUConv(torch.autograd.Function):
    """conv(relu(dual_bn(z))) without saving the conv input: backward recomputes it from z.

    The saved set is that of ``DualBatchNorm`` alone (its input z and per-channel stats),
    one 2n-row activation less than BN -> ReLU -> conv. The convolution has no bias (the
    caller adds it to the primal half) and zero padding given as integers.
    """

    @staticmethod
    def forward(ctx, z, gamma, beta, eps, weight, stride, padding, dilation, groups):
        cdt = _conv_dtype(z)
        y, stats, triton_path = _bn_fwd(z, gamma, beta, eps, True)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        with torch.autocast(z.device.type, enabled=False):
            out = conv(y.to(cdt), weight.to(cdt), None, stride, padding, dilation, groups)
        del y
        ctx.cdt, ctx.triton = cdt, triton_path
        ctx.conv = (stride, padding, dilation, groups)
        ctx.save_for_backward(z, gamma, beta, weight, *stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, gamma, beta, weight, *stats = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        y = _bn_apply(z, stats, True, ctx.triton)
        with torch.autocast(z.device.type, enabled=False):
            w = weight.to(ctx.cdt)
            g_y, g_w, _ = _conv_backward(
                grad.to(ctx.cdt), y.to(ctx.cdt), w, stride, padding, dilation, groups, [True, ctx.needs_input_grad[4], False]
            )
        del y
        gz, g_gamma, g_beta = _bn_bwd(
            z, g_y.to(z.dtype), gamma, beta, stats, True, ctx.triton, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        )
        g_w = None if g_w is None else g_w.to(weight.dtype)
        return gz, g_gamma, g_beta, None, g_w, None, None, None, None


def _torch_apply_fwd(z, out, a, b, d, e, relu):
    n, nd = z.shape[0] // 2, z.dim()
    acc = a.dtype
    z2, o2 = z.view(2, n, *z.shape[1:]), out.view(2, n, *z.shape[1:])
    A, Bc, Dc, E = (_bcast(v, nd) for v in (a, b, d, e))
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


def _torch_stats_bwd(z, grad, gz, mean, a, b, relu):
    """Masked incoming gradients into ``gz`` (scratch), and the five per-channel sums."""
    n, nd = z.shape[0] // 2, z.dim()
    acc = mean.dtype
    red = [0, *range(2, nd)]
    z2, g2, gz2 = z.view(2, n, *z.shape[1:]), grad.view(2, n, *grad.shape[1:]), gz.view(2, n, *z.shape[1:])
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    if relu:  # recompute the mask exactly as the forward did
        mask = torch.addcmul(_bcast(b, nd), xp, _bcast(a, nd)) > 0
        torch.mul(g2, mask, out=gz2)
        del mask
    else:
        gz2.copy_(g2)
    gy, gt = gz2[0].to(acc), gz2[1].to(acc)
    xc = xp - _bcast(mean, nd)
    sums = [gy.sum(red)]
    tmp = torch.mul(gy, xc)
    sums.append(tmp.sum(red))
    sums.append(gt.sum(red))
    sums.append(torch.mul(gt, xc, out=tmp).sum(red))
    sums.append(torch.mul(gt, xt, out=tmp).sum(red))
    return sums


def _torch_apply_bwd(z, gz, mean, k1, k2, k3, kx, k0, k7, k8):
    """In place on ``gz`` (which holds the masked incoming gradients)."""
    n, nd = z.shape[0] // 2, z.dim()
    acc = mean.dtype
    z2, gz2 = z.view(2, n, *z.shape[1:]), gz.view(2, n, *z.shape[1:])
    xp, xt = z2[0].to(acc), z2[1].to(acc)
    xc = xp - _bcast(mean, nd)
    del xp
    gy, gt = gz2[0].to(acc), gz2[1].to(acc)
    gx = gy.mul(_bcast(k1, nd)) if acc != z.dtype else gz2[0].mul_(_bcast(k1, nd))
    gx.addcmul_(gt, _bcast(k2, nd)).addcmul_(xt, _bcast(k3, nd)).addcmul_(xc, _bcast(kx, nd)).add_(_bcast(k0, nd))
    gtt = gt.mul(_bcast(k1, nd)) if acc != z.dtype else gz2[1].mul_(_bcast(k1, nd))
    gtt.addcmul_(xc, _bcast(k7, nd)).add_(_bcast(k8, nd))
    if acc != z.dtype:
        gz2[0].copy_(gx)
        gz2[1].copy_(gtt)


def _batch_stats(m: nn.modules.batchnorm._NormBase) -> bool:
    return m.training or (m.running_mean is None and m.running_var is None)


def _rule_batchnorm(m, x, *, relu: bool = False):
    if not isinstance(x, Dual):
        out = m(x)
        return torch.relu(out) if relu else out
    if _batch_stats(m):
        return Dual.from_z(DualBatchNorm.apply(x.z, m.weight, m.bias, m.eps, relu))
    # eval mode: a per-channel affine map; the tangent gets the scale only
    nd = x.ndim
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    p = x.primal * _bcast(scale, nd).to(x.P.dtype) + _bcast(shift, nd).to(x.P.dtype)
    t = x.tangent * _bcast(scale, nd).to(x.P.dtype)
    out = Dual(torch.stack([p, t]))
    return _relu(out) if relu else out
