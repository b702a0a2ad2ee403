"""Auxiliary heads g_k: small classifiers on a block's output."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def conv_head(in_channels: int, num_classes: int, *, width: int | None = None, hidden: int = 128) -> nn.Sequential:
    """InfoPro's "1c2f" head for (B, C, H, W) activations: conv3x3+BN+ReLU, global pool, FC-hidden, FC.

    Returns logits (B, num_classes) in the input's dtype.
    """
    width = width or in_channels
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def mlp_head(in_features: int, num_classes: int, *, hidden: int = 128) -> nn.Sequential:
    """Two fully connected layers for (B, F) activations; returns logits (B, num_classes)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class TokenPool(nn.Module):
    """(B, T, D) tokens -> (B, D): the class token (index 0) or the mean over tokens."""

    def __init__(self, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool: expected one of ('mean', 'cls'), got {pool!r}")
        self.pool = pool

    def forward(self, x):
        return x[:, 0] if self.pool == "cls" else x.mean(dim=1)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


def token_head(dim: int, num_classes: int, *, pool: str = "mean", hidden: int = 128) -> nn.Sequential:
    """Head for (B, T, D) token activations: LayerNorm, class token or mean pool, FC-hidden, FC.

    Returns logits (B, num_classes).
    """
    return nn.Sequential(
        nn.LayerNorm(dim),
        TokenPool(pool),
        nn.Linear(dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, num_classes),
    )


def default_head(sample_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The default head for one sample's activation shape (without the batch dimension).

    (C, H, W) -> ``conv_head``; (T, D) tokens -> ``token_head``; (F,) -> ``mlp_head``.
    """
    sample_shape = tuple(sample_shape)
    if len(sample_shape) == 3:
        return conv_head(sample_shape[0], num_classes)
    if len(sample_shape) == 2:
        return token_head(sample_shape[1], num_classes)
    if len(sample_shape) == 1:
        return mlp_head(sample_shape[0], num_classes)
    raise ValueError(
        f"head: no default head for activations of per-sample shape {sample_shape}; "
        "expected (C, H, W), (T, D) or (F,), or pass head=callable(sample_shape, num_classes)"
    )
