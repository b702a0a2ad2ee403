"""A small CNN for the 8x8 handwritten digits of the demo."""
from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Sequential):
    """(B, 1, 8, 8) -> logits (B, num_classes); four conv stages, so it splits into up to 4 blocks."""

    input_shape = (1, 8, 8)

    def __init__(self, num_classes: int = 10, width: int = 32):
        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        super().__init__(
            *stage(1, width),
            *stage(width, width),
            nn.MaxPool2d(2),
            *stage(width, 2 * width),
            *stage(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, num_classes),
        )
