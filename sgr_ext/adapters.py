"""Split points for torchvision models: ``local_units()`` for ResNet and VisionTransformer.

``adapt(model)`` wraps a torchvision ``ResNet`` (resnet18/34/50/101/152, wide/resnext
variants) or ``VisionTransformer`` (vit_b_16, ...) in a module that shares the model's
layers, computes the same forward, and has ``local_units()`` and ``input_shape``, so
``sgr_ext.split(adapt(model), K)`` cuts it into K local blocks:

- ResNet: the stem (conv1, bn1, relu, maxpool), then each BasicBlock/Bottleneck of
  layer1..layer4; classifier = avgpool + flatten + fc.
- VisionTransformer: the patch embedding with class token, position embedding and
  dropout as the first unit, then each encoder layer; classifier = the encoder's final
  LayerNorm + the heads on the class token. Activations between units are (B, T, D)
  tokens, for which ``sgr_ext.heads.default_head`` builds ``token_head``.

``torchvision_units(model)`` returns the ``(units, classifier)`` pair directly, or None
for a model it does not know.

Attention: torchvision's encoder layers call ``scaled_dot_product_attention``, whose
fused CPU/CUDA kernels have neither a double backward nor forward-mode AD; the exact
SGR engines need one of them. With ``plain_attention=True`` (the default) each
encoder-layer unit is a ``PlainEncoderLayer``: the same block, sharing its parameters,
with attention written as ``softmax(q k^T / sqrt(d)) v``. Pass ``plain_attention=False``
for global BP or plain local learning to keep the fused kernels.
"""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["adapt", "torchvision_units", "TorchvisionAdapter", "ViTEmbedding", "ViTClassifier", "PlainEncoderLayer", "plain_self_attention"]


def _is_tv_resnet(model: nn.Module) -> bool:
    try:
        from torchvision.models.resnet import ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(model, ResNet)


def _is_tv_vit(model: nn.Module) -> bool:
    try:
        from torchvision.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, VisionTransformer)


class ViTEmbedding(nn.Module):
    """The first unit of a torchvision ViT: (B, C, H, W) -> (B, 1 + N, D) tokens.

    Patch projection (conv_proj), class token, position embedding and the encoder's
    input dropout, exactly as ``VisionTransformer.forward`` + ``Encoder.forward`` do
    before the first encoder layer. Shares the model's parameters.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size = vit.image_size
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"x: expected images of {self.image_size}x{self.image_size}, got {h}x{w}")
        p = self.patch_size
        x = self.conv_proj(x).reshape(n, self.hidden_dim, (h // p) * (w // p)).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTClassifier(nn.Module):
    """The tail of a torchvision ViT: final LayerNorm, class token, heads -> logits (B, classes)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def plain_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``mha(x, x, x, need_weights=False)[0]`` for batch-first self-attention, written with plain ops.

    Uses the module's own parameters (in_proj, out_proj) and attention dropout.
    """
    b, t, d = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // heads))
    attn = F.dropout(attn.softmax(dim=-1), p=mha.dropout, training=mha.training)
    out = (attn @ v).transpose(1, 2).reshape(b, t, d)
    return mha.out_proj(out)


class PlainEncoderLayer(nn.Module):
    """A torchvision ViT ``EncoderBlock`` with attention written out (shares the block's layers).

    Same function as the block; every op is differentiable twice and in forward mode, which
    the fused ``scaled_dot_product_attention`` kernels are not.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        attn = layer.self_attention
        if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise TypeError("layer: expected a torchvision ViT EncoderBlock with standard batch-first self-attention")
        self.ln_1 = layer.ln_1
        self.self_attention = attn
        self.dropout = layer.dropout
        self.ln_2 = layer.ln_2
        self.mlp = layer.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(plain_self_attention(self.self_attention, self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


def torchvision_units(model: nn.Module, *, plain_attention: bool = True) -> Optional[tuple[list[nn.Module], nn.Module]]:
    """``(units, classifier)`` of a torchvision ResNet or VisionTransformer, else None.

    The units share the model's layers (no copies); chaining them and the classifier
    computes ``model(x)``.
    """
    if _is_tv_resnet(model):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        units = [stem] + [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        return units, nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    if _is_tv_vit(model):
        layers = list(model.encoder.layers)
        if plain_attention:
            layers = [PlainEncoderLayer(layer) for layer in layers]
        return [ViTEmbedding(model), *layers], ViTClassifier(model)
    return None


class TorchvisionAdapter(nn.Module):
    """A torchvision model with ``local_units()`` and ``input_shape``; forward = the model's."""

    def __init__(self, model: nn.Module, *, input_shape=None, plain_attention: bool = True):
        super().__init__()
        found = torchvision_units(model, plain_attention=plain_attention)
        if found is None:
            raise TypeError(
                f"model: expected a torchvision ResNet or VisionTransformer, got {type(model).__name__}; "
                "give other models a local_units() method"
            )
        self.model = model
        self._units = found
        self.train(model.training)  # a wrapper of an eval-mode model starts in eval mode too
        if input_shape is None:
            size = getattr(model, "image_size", 224)
            input_shape = (3, size, size)
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def local_units(self) -> tuple[list[nn.Module], nn.Module]:
        units, classifier = self._units
        return list(units), classifier


def adapt(model: nn.Module, *, input_shape=None, plain_attention: bool = True) -> TorchvisionAdapter:
    """Wrap a torchvision ResNet / VisionTransformer for ``sgr_ext.split``.

    Args:
        model: e.g. ``torchvision.models.resnet18(weights=None)`` or
            ``torchvision.models.vit_b_16(weights=None, image_size=32)``.
        input_shape: one sample's (C, H, W), used by ``split`` to probe activation shapes;
            default (3, image_size, image_size) for a ViT and (3, 224, 224) for a ResNet.
        plain_attention: ViT encoder layers with attention written out (see the module docstring).

    Example::

        blocks = sgr_ext.split(adapt(torchvision.models.resnet18(weights=None), input_shape=(3, 32, 32)), 4)
        net = sgr_ext.LocalNet(blocks, lam=0.1)
    """
    return TorchvisionAdapter(model, input_shape=input_shape, plain_attention=plain_attention)
