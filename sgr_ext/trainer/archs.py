"""Architectures ``sgr-ext train --arch`` can build, each splittable by ``sgr_ext.split``.

Torch-free until a model is built (the builders import it): ``sgr-ext train`` takes its
``--arch`` choices from ``ARCHS`` before importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Arch:
    # (num_classes, image_size, plain_attention) -> model; plain_attention: ViT attention
    # written out instead of fused SDPA kernels (needed by the local engines)
    build: Callable[..., nn.Module]
    channels: int  # input channels the model expects
    multiple: int = 1  # the image side must be a multiple of this (ViT patch size)
    description: str = ""


def _resnet32(num_classes, image_size, plain_attention):
    from sgr_ext.models import resnet32

    return resnet32(num_classes)


def _resnet110(num_classes, image_size, plain_attention):
    from sgr_ext.models import resnet110

    return resnet110(num_classes)


def _vit_tiny(num_classes, image_size, plain_attention):
    from sgr_ext.models.vit import vit_tiny

    return vit_tiny(num_classes, image_size=image_size)


def _tv(name):
    def build(num_classes, image_size, plain_attention):
        import torchvision

        from sgr_ext.adapters import adapt

        kwargs = {"image_size": image_size} if name.startswith("vit") else {}
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
        return adapt(model, input_shape=(3, image_size, image_size), plain_attention=plain_attention)

    return build


def _digits_cnn(num_classes, image_size, plain_attention):
    from sgr_ext.models import DigitsCNN

    return DigitsCNN(num_classes)


ARCHS: dict[str, Arch] = {
    "resnet32": Arch(_resnet32, 3, 1, "CIFAR ResNet-32 (16 units)"),
    "resnet110": Arch(_resnet110, 3, 1, "CIFAR ResNet-110 (55 units)"),
    "vit_tiny": Arch(_vit_tiny, 3, 4, "ViT-Tiny, 4x4 patches, dim 192, depth 12 (13 units)"),
    "resnet18": Arch(_tv("resnet18"), 3, 1, "torchvision ResNet-18 (9 units)"),
    "resnet50": Arch(_tv("resnet50"), 3, 1, "torchvision ResNet-50 (17 units)"),
    "vit_b_16": Arch(_tv("vit_b_16"), 3, 16, "torchvision ViT-B/16 (13 units)"),
    "digits_cnn": Arch(_digits_cnn, 1, 1, "4-conv CNN for 8x8 one-channel digits (4 units)"),
}


def image_size_for(arch: str, data_size: int, requested: int | None) -> int:
    """The side the model sees: ``requested``, else the data's, rounded up to the arch's multiple."""
    spec = ARCHS[arch]
    size = requested if requested is not None else -(-data_size // spec.multiple) * spec.multiple
    if size % spec.multiple:
        raise ValueError(f"--image-size: {arch} needs a multiple of {spec.multiple}, got {size}")
    return size


def build(arch: str, num_classes: int, image_size: int, *, plain_attention: bool = True) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"--arch: expected one of {tuple(ARCHS)}, got {arch!r}")
    return ARCHS[arch].build(num_classes, image_size, plain_attention)
