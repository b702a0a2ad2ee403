"""Train-mode BatchNorm (optionally fused with the following ReLU) on a dual value.

``DualBatchNorm`` saves only its packed input and per-channel statistics; ``DualBNReLUConv``
also recomputes the following convolution's input in backward. Eval-mode BatchNorm is a
per-channel affine map (``_rule_batchnorm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext._tensor_util import autocast_off, channel_view
from sgr_ext.engine.dual.conv import _conv_backward, _conv_dtype
from sgr_ext.engine.dual.elementwise import _relu
from sgr_ext.engine.dual.value import Dual, _refuse
from sgr_ext.ops import dual_batchnorm


def _triton_forced() -> bool:
    """The package attribute ``sgr_ext.engine.dual._TRITON_FORCE`` (tests set it to run the
    Triton kernels on CPU tensors under TRITON_INTERPRET=1)."""
    from sgr_ext.engine import dual

    return dual._TRITON_FORCE


def _impl(z: torch.Tensor) -> str:
    """The dual BatchNorm op's path for ``z``: the op's default, or Triton when tests force it."""
    forced = _triton_forced() and z.device.type == "cpu" and z.dtype != torch.float64
    return dual_batchnorm.resolve_impl("triton" if forced else None, z.device, z.dtype)


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

    Saves only the packed input and per-channel statistics. The passes are the
    ``sgr_ext.ops.dual_batchnorm`` op (CUDA: four fused Triton kernels; elsewhere torch
    ops). Statistics accumulate in float32 (float64 for float64 inputs).
    """

    @staticmethod
    def forward(ctx, z, weight, bias, eps: float, relu: bool):
        impl = _impl(z)
        out, stats = dual_batchnorm.trusted_forward(z, weight, bias, eps, relu, impl)
        ctx.relu, ctx.impl = relu, impl
        ctx.save_for_backward(z, weight, bias, stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, weight, bias, stats = ctx.saved_tensors
        gz, g_w, g_b = _bn_bwd(z, grad, weight, bias, stats, ctx.relu, ctx.impl, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gz, g_w, g_b, None, None


def _bn_bwd(z, grad, weight, bias, stats, relu, impl, need_w=True, need_b=True):
    """Backward of the dual BN(+ReLU): (grad_z, grad_weight, grad_bias), the parameter
    gradients in the parameters' dtypes (None where not needed)."""
    gz, g_w, g_b = dual_batchnorm.trusted_backward(z, grad, weight, stats, relu, impl)
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
        impl = _impl(z)
        y, stats = dual_batchnorm.trusted_forward(z, gamma, beta, eps, True, impl)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        with autocast_off(z.device.type):
            out = conv(y.to(cdt), weight.to(cdt), None, stride, padding, dilation, groups)
        del y
        ctx.cdt, ctx.impl = cdt, impl
        ctx.conv = (stride, padding, dilation, groups)
        ctx.save_for_backward(z, gamma, beta, weight, stats)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, gamma, beta, weight, stats = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        y = dual_batchnorm.trusted_apply(z, stats, True, ctx.impl)
        with autocast_off(z.device.type):
            w = weight.to(ctx.cdt)
            g_y, g_w, _ = _conv_backward(
                grad.to(ctx.cdt), y.to(ctx.cdt), w, stride, padding, dilation, groups, [True, ctx.needs_input_grad[4], False]
            )
        del y
        gz, g_gamma, g_beta = _bn_bwd(
            z, g_y.to(z.dtype), gamma, beta, stats, True, ctx.impl, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        )
        g_w = None if g_w is None else g_w.to(weight.dtype)
        return gz, g_gamma, g_beta, None, g_w, None, None, None, None


def _batch_stats(m: nn.modules.batchnorm._NormBase) -> bool:
    """Whether ``m`` normalises with batch statistics (refused where those span processes)."""
    batch = m.training or (m.running_mean is None and m.running_var is None)
    if batch and isinstance(m, nn.SyncBatchNorm) and _syncs(m):
        _refuse("SyncBatchNorm with batch statistics across processes (the dual BatchNorm reduces over the "
                "local batch only)")
    return batch


def _syncs(m: nn.SyncBatchNorm) -> bool:
    """SyncBatchNorm's own test: a process group with more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(m.process_group or dist.group.WORLD) > 1


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
    p = x.primal * channel_view(scale, nd).to(x.P.dtype) + channel_view(shift, nd).to(x.P.dtype)
    t = x.tangent * channel_view(scale, nd).to(x.P.dtype)
    out = Dual(torch.stack([p, t]))
    return _relu(out) if relu else out
