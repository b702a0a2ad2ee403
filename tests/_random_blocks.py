"""Random small blocks for differential testing of the step engines.

Every entry of ``VOCAB`` maps a (B, C, H, W) float64 activation to another (B, C', H', W')
one, so that entries compose freely. Token-shaped ops (attention, ``.mT``, LayerNorm and
RMSNorm over features, 1-d and 3-d layers) convert to their layout and back inside the
entry. All modules are written with plain torch calls, so ``torch.fx`` traces them and the
dual interpreter meets the ops themselves, not one opaque module.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """x + body(x) (body keeps the shape)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Rows1d(nn.Module):
    """(B, C, H, W) -> (B, C, H*W) -> layer -> back: Conv1d / BatchNorm1d / InstanceNorm1d."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.flatten(2)).reshape(x.shape)


class Lift3d(nn.Module):
    """(B, C, H, W) -> (B, C, 1, H, W) -> layer -> back: Conv3d / BatchNorm3d / InstanceNorm3d."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.unsqueeze(2)).squeeze(2)


class ChannelsLast(nn.Module):
    """A layer over the channel (feature) axis: permute to (B, H, W, C) and back."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FlatBatchNorm(nn.Module):
    """BatchNorm1d over the flattened (B, C*H*W) features."""

    def __init__(self, features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)

    def forward(self, x):
        return self.bn(x.flatten(1)).view(x.shape)


class TokenMT(nn.Module):
    """tanh(linear(t.mT)).mT on the (B, C, L) tokens: a tensor-valued attribute of the input."""

    def __init__(self, c: int):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        t = x.flatten(2)
        return torch.tanh(self.lin(t.mT)).mT.reshape(x.shape)


class Attention(nn.Module):
    """One-head softmax attention over the H*W tokens, written with plain ops, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.scale = 1.0 / math.sqrt(c)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)  # (B, L, C)
        att = torch.softmax(self.q(t) @ self.k(t).transpose(-2, -1) * self.scale, dim=-1)
        return x + (att @ self.v(t)).transpose(1, 2).reshape(x.shape)


class Gate(nn.Module):
    """chunk / cat gating: [a * sigmoid(b), b] for the two channel halves."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a * torch.sigmoid(b), b], dim=1)


class SplitMix(nn.Module):
    """split into uneven channel groups, a different op on each, concat."""

    def forward(self, x):
        a, b = torch.split(x, [1, x.shape[1] - 1], dim=1)
        return torch.cat([b.tanh(), a * 2.0], dim=1)


class TransposeHW(nn.Module):
    def forward(self, x):
        return x.transpose(2, 3)


class Scramble(nn.Module):
    """reshape / permute round trip that mixes layouts: (B, C, H, W) -> (B, C, W, H) data."""

    def forward(self, x):
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).permute(0, 2, 1).reshape(b, h, w, c).permute(0, 3, 2, 1)


class Center(nn.Module):
    """x - mean over the spatial axes (mean with keepdim)."""

    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


class Scale(nn.Module):
    """x * a learnable per-channel scale (a parameter times a dual value)."""

    def __init__(self, c: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        return x * self.scale


class Elementwise(nn.Module):
    """One elementwise function of the input (kinks and smooth ones)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        if self.kind == "square":
            return x * x
        if self.kind == "abs":
            return x.abs()
        if self.kind == "pow":
            return torch.pow(x, 3)
        if self.kind == "where":
            return torch.where(x > 0, x, 0.1 * x)
        if self.kind == "exp":
            return torch.exp(-x * x)
        if self.kind == "sqrt":
            return torch.sqrt(x * x + 1.0)
        if self.kind == "softsign":
            return x / (1.0 + x.abs())
        return torch.sin(x)


ELEMENTWISE = ("square", "abs", "pow", "where", "exp", "sqrt", "softsign", "sin")


def _c2(r: random.Random, c: int) -> int:
    return r.choice([c, c + 1, 4])


# name -> (build(r, C, H, W) -> module, needs(C, H, W) -> bool)
VOCAB = {
    "conv3x3": (lambda r, c, h, w: nn.Conv2d(c, _c2(r, c), 3, padding=1), None),
    "conv_strided": (lambda r, c, h, w: nn.Conv2d(c, _c2(r, c), 3, stride=2, padding=1), lambda c, h, w: h >= 3 and w >= 3),
    "conv1x1": (lambda r, c, h, w: nn.Conv2d(c, _c2(r, c), 1, bias=r.random() < 0.5), None),
    "conv_depthwise": (lambda r, c, h, w: nn.Conv2d(c, c, 3, padding=1, groups=c), None),
    "conv_dilated": (lambda r, c, h, w: nn.Conv2d(c, c, 3, padding=2, dilation=2), None),
    "conv_transposed": (lambda r, c, h, w: nn.ConvTranspose2d(c, c, 3, padding=1), None),
    "conv1d": (lambda r, c, h, w: Rows1d(nn.Conv1d(c, c, 3, padding=1)), None),
    "conv3d": (lambda r, c, h, w: Lift3d(nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1))), None),
    "linear": (lambda r, c, h, w: ChannelsLast(nn.Linear(c, _c2(r, c))), None),
    "batchnorm2d": (lambda r, c, h, w: nn.BatchNorm2d(c, affine=r.random() < 0.7), None),
    "batchnorm1d": (lambda r, c, h, w: Rows1d(nn.BatchNorm1d(c)), None),
    "batchnorm1d_flat": (lambda r, c, h, w: FlatBatchNorm(c * h * w), None),
    "batchnorm3d": (lambda r, c, h, w: Lift3d(nn.BatchNorm3d(c)), None),
    "syncbatchnorm": (lambda r, c, h, w: nn.SyncBatchNorm(c), None),
    # InstanceNorm after a parametrized layer, so that its statistics' dependence on the input
    # reaches a parameter gradient; with and without running statistics
    "instancenorm2d": (lambda r, c, h, w: nn.Sequential(
        nn.Conv2d(c, c, 1), nn.InstanceNorm2d(c, affine=True, track_running_stats=True)), None),
    "instancenorm2d_batch_stats": (lambda r, c, h, w: nn.Sequential(nn.Conv2d(c, c, 1), nn.InstanceNorm2d(c)), None),
    "instancenorm1d": (lambda r, c, h, w: Rows1d(nn.Sequential(
        nn.Conv1d(c, c, 1), nn.InstanceNorm1d(c, affine=True))), None),
    "instancenorm3d": (lambda r, c, h, w: Lift3d(nn.Sequential(
        nn.Conv3d(c, c, 1), nn.InstanceNorm3d(c, track_running_stats=True))), None),
    "groupnorm": (lambda r, c, h, w: nn.GroupNorm(2, c), lambda c, h, w: c % 2 == 0),
    "layernorm_channels": (lambda r, c, h, w: ChannelsLast(nn.LayerNorm(c)), None),
    "layernorm_chw": (lambda r, c, h, w: nn.LayerNorm([c, h, w], elementwise_affine=r.random() < 0.5), None),
    "rmsnorm": (lambda r, c, h, w: ChannelsLast(nn.RMSNorm(c)), None),
    "maxpool": (lambda r, c, h, w: nn.MaxPool2d(2), lambda c, h, w: h >= 2 and w >= 2),
    "avgpool": (lambda r, c, h, w: nn.AvgPool2d(2), lambda c, h, w: h >= 2 and w >= 2),
    "adaptive_avgpool": (lambda r, c, h, w: nn.AdaptiveAvgPool2d((2, 3)), None),
    "relu": (lambda r, c, h, w: nn.ReLU(), None),
    "gelu": (lambda r, c, h, w: nn.GELU(approximate=r.choice(["none", "tanh"])), None),
    "silu": (lambda r, c, h, w: nn.SiLU(), None),
    "tanh": (lambda r, c, h, w: nn.Tanh(), None),
    "sigmoid": (lambda r, c, h, w: nn.Sigmoid(), None),
    "hardswish": (lambda r, c, h, w: nn.Hardswish(), None),
    "softplus": (lambda r, c, h, w: nn.Softplus(), None),
    "leaky_relu": (lambda r, c, h, w: nn.LeakyReLU(0.2), None),
    "elu": (lambda r, c, h, w: nn.ELU(), None),
    "mish": (lambda r, c, h, w: nn.Mish(), None),
    "softmax_channels": (lambda r, c, h, w: nn.Softmax(dim=1), None),
    "residual_conv": (lambda r, c, h, w: Residual(nn.Conv2d(c, c, 3, padding=1)), None),
    "residual_conv_bn_relu": (
        lambda r, c, h, w: Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())), None),
    "gate_chunk_cat": (lambda r, c, h, w: Gate(), lambda c, h, w: c % 2 == 0),
    "split_cat": (lambda r, c, h, w: SplitMix(), lambda c, h, w: c >= 2),
    "transpose_hw": (lambda r, c, h, w: TransposeHW(), None),
    "reshape_permute": (lambda r, c, h, w: Scramble(), None),
    "mT": (lambda r, c, h, w: TokenMT(c), None),
    "attention": (lambda r, c, h, w: Attention(c), None),
    "center_mean": (lambda r, c, h, w: Center(), None),
    "scale_param": (lambda r, c, h, w: Scale(c), None),
    "elementwise": (lambda r, c, h, w: Elementwise(r.choice(ELEMENTWISE)), None),
}


def _fits(name: str, shape) -> bool:
    needs = VOCAB[name][1]
    return needs is None or needs(*shape[1:])


def random_block(seed: int, featured: str, allowed, shape, length: int = 3, where=None) -> nn.Sequential:
    """A float64 ``nn.Sequential`` of ``length`` random vocabulary entries, one of them
    ``featured`` (at a random position where it fits), the others drawn from ``allowed``;
    every entry is built for the shape it meets. ``shape``: the (B, C, H, W) input shape,
    at which every entry fits."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    where = r.randrange(length) if where is None else where
    layers, names, probe = [], [], torch.randn(*shape, dtype=torch.float64)
    for i in range(length):
        if i >= where and featured not in names and _fits(featured, probe.shape):
            name = featured
        else:
            name = r.choice([n for n in sorted(allowed) if _fits(n, probe.shape)])
        layer = VOCAB[name][0](r, *probe.shape[1:]).double()
        with torch.no_grad():
            probe = _probe(layer, probe)
        layers.append(layer)
        names.append(name)
    if featured not in names:  # a companion changed the shape so that it no longer fits
        return random_block(seed, featured, allowed, shape, length, where=0)
    return nn.Sequential(*layers)


def _probe(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` without touching its running statistics."""
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    out = layer(x)
    layer.load_state_dict(saved)
    return out
