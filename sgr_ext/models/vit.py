"""A small Vision Transformer for CIFAR-sized images (4x4 patches), laid out for splitting.

Attention is written out (``softmax(q k^T / sqrt(d)) v``) instead of calling
``F.scaled_dot_product_attention``: the fused attention kernels have no double
backward, and the exact SGR engine differentiates each block's input gradient
once more. At 65 tokens the explicit form costs little.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, 1 + (H/p)(W/p), D): patch projection, class token, position embedding."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size: expected a multiple of patch_size={patch_size}, got {image_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"x: expected images of {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}"
            )
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, x], dim=1) + self.pos_embed)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim: expected a multiple of heads={heads}, got {dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        attn = self.dropout(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.dropout(self.proj(out))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassTokenHead(nn.Module):
    """(B, T, D) -> logits (B, num_classes): final LayerNorm and a linear layer on the class token."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x[:, 0]))


class ViT(nn.Module):
    """Vision Transformer: (B, C, image_size, image_size) -> logits (B, num_classes).

    Splittable units: the patch embedding (with class token and position embedding),
    then each encoder block; the classifier is the final LayerNorm + linear layer on
    the class token. Activations between units are (B, T, D) tokens.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, v in (("image_size", image_size), ("patch_size", patch_size), ("depth", depth), ("dim", dim), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        self.input_shape = (in_channels, image_size, image_size)
        self.embed = PatchEmbed(image_size, patch_size, in_channels, dim, dropout)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.classifier = ClassTokenHead(dim, num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.embed(x)))

    def local_units(self) -> tuple[list[nn.Module], nn.Module]:
        """The patch embedding, each encoder block, and the class-token classifier."""
        return [self.embed, *self.blocks], self.classifier


def vit_tiny(num_classes: int = 10, *, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, **kwargs) -> ViT:
    """ViT-Tiny for CIFAR: 4x4 patches (65 tokens at 32x32), dim 192, depth 12, 3 heads (~5.4M params)."""
    kwargs.setdefault("dim", 192)
    kwargs.setdefault("depth", 12)
    kwargs.setdefault("heads", 3)
    return ViT(image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
