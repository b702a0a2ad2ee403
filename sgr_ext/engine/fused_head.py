"""A head's loss without its (N, V) logits, when the head ends in ``nn.Linear`` and the loss is cross-entropy.

A token head with a large vocabulary (V = 32000) turns an (N, H) activation into (N, V)
logits, which plain autograd keeps for backward and which dominate a block's memory.
``sgr_ext.ops.linear_cross_entropy`` computes ``cross_entropy(h @ W.T + b, y)`` in row chunks
and is twice differentiable (chunked double backward), so every backprop engine can run the
head's last layer through it, the SGR penalty's second derivative included:

- ``loss_and_accuracy`` for the passes that need l_k (and the head's accuracy);
- ``dual_loss`` for the exact engine's tangent pass: with h's tangent hdot,
  ldot = <dl/dh, hdot>, where dl/dh comes from the op's differentiable backward.

The fused path is taken when N * V >= ``FUSED_MIN_LOGITS`` (the size from which the op's
own dispatch prefers its fused kernels on CUDA); smaller heads run as written, since their
logits are small and plain torch is faster there. The accuracy statistic is the argmax over
row chunks, under no_grad, so no (N, V) buffer is held either.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext.engine.base import accuracy
from sgr_ext.ops.linear_ce import FUSED_MIN_LOGITS, linear_cross_entropy
from sgr_ext._tensor_util import accumulate_dtype

# bytes of logits one chunk of the accuracy pass may hold
_ACCURACY_CHUNK_BYTES = 1 << 24


def _without_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def split_head(head: nn.Module) -> Optional[tuple[Optional[nn.Module], nn.Linear]]:
    """(body, last Linear) when ``head`` is an ``nn.Linear`` (body None) or an ``nn.Sequential``
    whose last module is one; None otherwise or when hooks are registered on them (a fused
    path would skip those hooks)."""
    if isinstance(head, nn.Linear) and _without_hooks(head):
        return None, head
    if type(head) is nn.Sequential and len(head) and isinstance(head[-1], nn.Linear):
        if _without_hooks(head) and _without_hooks(head[-1]):
            return (head[:-1] if len(head) > 1 else None), head[-1]
    return None


def fused_parts(head: nn.Module, rows: int, loss_fn) -> Optional[tuple[Optional[nn.Module], nn.Linear]]:
    """``split_head(head)`` when this head, on ``rows`` samples, takes the fused path; else None."""
    if loss_fn is not F.cross_entropy:
        return None
    parts = split_head(head)
    if parts is None or rows * parts[1].out_features < FUSED_MIN_LOGITS:
        return None
    return parts


@torch.no_grad()
def _chunked_accuracy(h: torch.Tensor, linear: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    rows = max(1, _ACCURACY_CHUNK_BYTES // (linear.out_features * h.element_size()))
    hits = sum((linear(h[i:i + rows]).argmax(dim=1) == y[i:i + rows]).sum() for i in range(0, h.shape[0], rows))
    return hits.float() / h.shape[0]


def loss_and_accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn,
                      with_accuracy: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(l = loss_fn(head(x), y), accuracy of head(x) or None), without (N, V) logits where fused.

    x: (B, *) the block output x_k; y: (B,) labels. The loss is differentiable (twice, on the
    fused path) in x and the head's parameters.
    """
    parts = fused_parts(head, x.shape[0], loss_fn)
    if parts is not None:
        body, linear = parts
        h = body(x) if body is not None else x
        if h.dim() == 2:
            loss = linear_cross_entropy(h, linear.weight, y, bias=linear.bias)
            return loss, _chunked_accuracy(h, linear, y) if with_accuracy else None
        logits = linear(h)  # not (N, H) rows: the plain path, same numbers as head(x)
    else:
        logits = head(x)
    return loss_fn(logits, y), accuracy(logits, y) if with_accuracy else None


def dual_loss(h_primal: torch.Tensor, h_tangent: torch.Tensor, linear: nn.Linear,
              y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, ldot) of ``cross_entropy(linear(h), y)`` at h = ``h_primal`` along ``h_tangent``, both (N, H).

    ldot = <dl/dh, hdot>; dl/dh is taken with create_graph, so a backward of l + c * ldot reaches
    the parameters through the op's double backward (never through (N, V) logits).
    """
    if not h_primal.requires_grad:  # the block output does not depend on the parameters before the head
        h_primal = h_primal.detach().requires_grad_(True)
    loss = linear_cross_entropy(h_primal, linear.weight, y, bias=linear.bias)
    (g,) = torch.autograd.grad(loss, h_primal, create_graph=True)
    acc = accumulate_dtype(h_primal.dtype)
    return loss, (g.to(acc) * h_tangent.to(acc)).sum()
