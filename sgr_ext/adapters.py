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

Attention and double backward: torchvision's encoder layers call
``scaled_dot_product_attention``, whose fused CPU/CUDA kernels have no double backward;
the exact SGR engine needs one. With ``double_backward=True`` (the default) each
encoder-layer unit runs attention with the math backend, which is differentiable
twice. Pass ``double_backward=False`` for global BP or plain local learning to keep the
fused kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["adapt", "torchvision_units", "TorchvisionAdapter", "ViTEmbedding", "ViTClassifier", "MathAttention"]


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


class MathAttention(nn.Module):
    """Runs ``layer`` with the math attention backend, so its graph is differentiable twice."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return self.layer(x)


def torchvision_units(model: nn.Module, *, double_backward: bool = True) -> Optional[tuple[list[nn.Module], nn.Module]]:
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
        if double_backward:
            layers = [MathAttention(layer) for layer in layers]
        return [ViTEmbedding(model), *layers], ViTClassifier(model)
    return None


class TorchvisionAdapter(nn.Module):
    """A torchvision model with ``local_units()`` and ``input_shape``; forward = the model's."""

    def __init__(self, model: nn.Module, *, input_shape=None, double_backward: bool = True):
        super().__init__()
        found = torchvision_units(model, double_backward=double_backward)
        if found is None:
            raise TypeError(
                f"model: expected a torchvision ResNet or VisionTransformer, got {type(model).__name__}; "
                "give other models a local_units() method"
            )
        self.model = model
        self._units = found
        if input_shape is None:
            size = getattr(model, "image_size", 224)
            input_shape = (3, size, size)
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def local_units(self) -> tuple[list[nn.Module], nn.Module]:
        units, classifier = self._units
        return list(units), classifier


def adapt(model: nn.Module, *, input_shape=None, double_backward: bool = True) -> TorchvisionAdapter:
    """Wrap a torchvision ResNet / VisionTransformer for ``sgr_ext.split``.

    Args:
        model: e.g. ``torchvision.models.resnet18(weights=None)`` or
            ``torchvision.models.vit_b_16(weights=None, image_size=32)``.
        input_shape: one sample's (C, H, W), used by ``split`` to probe activation shapes;
            default (3, image_size, image_size) for a ViT and (3, 224, 224) for a ResNet.
        double_backward: run ViT attention with the math backend (see the module docstring).

    Example::

        blocks = sgr_ext.split(adapt(torchvision.models.resnet18(weights=None), input_shape=(3, 32, 32)), 4)
        net = sgr_ext.LocalNet(blocks, lam=0.1)
    """
    return TorchvisionAdapter(model, input_shape=input_shape, double_backward=double_backward)
