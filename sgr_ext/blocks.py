"""``LocalBlock``: one gradient-isolated module f_k with its auxiliary head g_k."""
from __future__ import annotations

import torch
from torch import nn


class LocalBlock(nn.Module):
    """A module trained only by its own local loss (and, under SGR, its own penalty).

    Args:
        module: f_k, maps the previous block's output x_{k-1} to x_k.
        head: g_k, maps x_k to predictions (logits (B, C) for classification). For the
            last block of a ``LocalNet`` this is the model's real classifier.
    """

    def __init__(self, module: nn.Module, head: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head: expected an nn.Module, got {type(head).__name__}")
        self.module = module
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_k = f_k(x_{k-1}); the head is not applied (see ``predict``)."""
        return self.module(x)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """g_k(f_k(x)): this block's own prediction."""
        return self.head(self.module(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of f_k and g_k that require a gradient, in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]
