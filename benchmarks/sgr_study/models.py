"""The study's networks: two CPU-sized ones (a plain CNN and a residual CNN, 8 units each, for
16x16 inputs) and the paper-scale CIFAR ResNets for ``--profile gpu``."""
from __future__ import annotations

from torch import nn

from sgr_ext.models.resnet_cifar import CifarResNet


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PlainCNN(nn.Module):
    """VGG-style, 8 conv-BN-ReLU units (pooling inside the units), widths w..4w; (B, 3, H, W) -> logits."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        plan = [(3, w, False), (w, w, True), (w, 2 * w, False), (2 * w, 2 * w, True),
                (2 * w, 4 * w, False), (4 * w, 4 * w, False), (4 * w, 4 * w, False), (4 * w, 4 * w, True)]
        self.units = nn.ModuleList(
            nn.Sequential(*_conv(cin, cout), *([nn.MaxPool2d(2)] if pool else [])) for cin, cout, pool in plan)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return self.classifier(x)

    def local_units(self):
        return list(self.units), self.classifier


class _ResUnit(nn.Module):
    """pool(relu(bn(conv(x))) + shortcut(x)); the shortcut is the identity, or a 1x1 conv when
    the width changes."""

    def __init__(self, cin: int, cout: int, pool: bool):
        super().__init__()
        self.body = nn.Sequential(*_conv(cin, cout))
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.body(x) + self.shortcut(x))


class ResidualCNN(PlainCNN):
    """``PlainCNN``'s 8 units, each with a residual connection (ResNet-style skips at the cost of
    one conv per unit, so it trains about as fast as the plain CNN on 2 cores)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__(num_classes, width)
        w = width
        plan = [(3, w, False), (w, w, True), (w, 2 * w, False), (2 * w, 2 * w, True),
                (2 * w, 4 * w, False), (4 * w, 4 * w, False), (4 * w, 4 * w, False), (4 * w, 4 * w, True)]
        self.units = nn.ModuleList(_ResUnit(cin, cout, pool) for cin, cout, pool in plan)


ARCHS = {
    "cnn": lambda: PlainCNN(10, 16),
    "rescnn": lambda: ResidualCNN(10, 16),
    "resnet32": lambda: CifarResNet(32, 10),
    "resnet110": lambda: CifarResNet(110, 10),
}


def build(arch: str) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]()
