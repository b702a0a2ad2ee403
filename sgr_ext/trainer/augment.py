"""Batched data augmentation on device tensors: random crop with zero padding + horizontal flip.

One gather per batch, no Python loop over samples, so it runs on the GPU at the cost of
one indexing kernel. Randomness comes from an explicit ``torch.Generator`` on the batch's
device (seeded per epoch by the trainer), which makes it reproducible and resumable.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pad (B, C, H, W) images by ``padding`` zeros, take a random HxW crop per image, flip half.

    Equivalent to torchvision's ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()`` applied
    per image. Zero padding is in the (normalised) input space. Returns a new (B, C, H, W) tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    oy = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (b,), device=dev, generator=generator)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip:
        flips = torch.rand(b, device=dev, generator=generator) < 0.5
        cols = torch.where(flips[:, None], w - 1 - cols, cols)
    cols = ox[:, None] + cols  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
