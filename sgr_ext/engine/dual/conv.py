"""Convolutions on a dual value: one kernel over the packed [primal; tangent] batch, and the
convolution backward helpers the fused BatchNorm -> ReLU -> conv Function shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext.engine.dual.value import Dual, _with_bias
from sgr_ext._tensor_util import autocast_off


def _std(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides (``contiguous()`` keeps e.g. (4, 1, 4, 4) for a 1x1
    kernel, which is contiguous and channels_last at once)."""
    return t.clone(memory_format=torch.contiguous_format) if t.stride() != torch.empty(t.shape, device="meta").stride() else t


def _cpu_1x1_strided(inp: torch.Tensor, weight: torch.Tensor, stride) -> bool:
    return (
        inp.device.type == "cpu"
        and inp.dim() == 4
        and all(k == 1 for k in weight.shape[2:])
        and any(st > 1 for st in stride)
    )


def _conv_backward(grad, inp, weight, stride, padding, dilation, groups, mask):
    """``aten.convolution_backward`` (no bias, not transposed).

    CPU workaround: torch 2.x (oneDNN) corrupts the heap in the backward of a 1x1,
    stride > 1 convolution whose input is channels_last, or whose 1x1 weight has the
    strides ``Module.to(memory_format=torch.channels_last)`` gives it ((C, 1, C, C)); those
    run with row-major strides.
    """
    if _cpu_1x1_strided(inp, weight, stride):
        inp, grad, weight = _std(inp), _std(grad), _std(weight)
    return torch.ops.aten.convolution_backward(
        grad, inp, weight, None, list(stride), list(padding), list(dilation), False, [0] * (weight.dim() - 2), groups, mask
    )


def _conv_dtype(z: torch.Tensor) -> torch.dtype:
    dev = z.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return z.dtype


def _fusable_conv(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _rule_conv(m, x):
    if not isinstance(x, Dual):
        return m(x)
    if x.parts is not None and _fusable_conv(m):
        out = DualInputConv.apply(x.parts[0], x.parts[1], m.weight, m.stride, m.padding, m.dilation, m.groups)
    else:
        out = m._conv_forward(x.z, m.weight, None)
    return Dual(_with_bias(Dual.from_z(out).P, m.bias, 1))


class DualInputConv(torch.autograd.Function):
    """conv of the packed [primal; tangent] batch, saving the two halves as given (the primal
    is the block input the caller holds anyway) instead of the packed copy."""

    @staticmethod
    def forward(ctx, p, t, weight, stride, padding, dilation, groups):
        cdt = _conv_dtype(p)
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        with autocast_off(p.device.type):
            z, w = torch.cat([p, t]).to(cdt), weight.to(cdt)
            if _cpu_1x1_strided(z, w, stride):  # see _conv_backward
                z, w = _std(z), _std(w)
            out = conv(z, w, None, stride, padding, dilation, groups)
            del z
        ctx.cdt, ctx.conv = cdt, (stride, padding, dilation, groups)
        ctx.save_for_backward(p, t, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        p, t, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need_in = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with autocast_off(p.device.type):
            g_in, g_w, _ = _conv_backward(
                grad.to(ctx.cdt), torch.cat([p, t]).to(ctx.cdt), weight.to(ctx.cdt), stride, padding, dilation, groups,
                [need_in, ctx.needs_input_grad[2], False],
            )
        gp = gt = None
        if g_in is not None:
            gp, gt = g_in[: p.shape[0]].to(p.dtype), g_in[p.shape[0] :].to(t.dtype)
        return gp, gt, None if g_w is None else g_w.to(weight.dtype), None, None, None, None
