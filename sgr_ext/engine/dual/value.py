"""The dual value: a primal/tangent pair stored as one ``(2, *shape)`` tensor, and the
helpers every rule uses to build, align and walk pairs."""
from __future__ import annotations

from typing import Optional

import torch


class Dual:
    """A primal/tangent pair stored as one ``(2, *shape)`` tensor ``P``."""

    __slots__ = ("P", "parts")

    def __init__(self, P: torch.Tensor, parts: Optional[tuple] = None):
        self.P = P
        self.parts = parts  # (primal, tangent) as separate tensors, when built by ``pack``

    @property
    def primal(self) -> torch.Tensor:
        return self.P[0]

    @property
    def tangent(self) -> torch.Tensor:
        return self.P[1]

    @property
    def shape(self) -> torch.Size:
        return self.P.shape[1:]

    @property
    def ndim(self) -> int:
        return self.P.dim() - 1

    @property
    def z(self) -> torch.Tensor:
        """(2n, *rest): primal rows then tangent rows (a view when the layout allows)."""
        return self.P.flatten(0, 1)

    @staticmethod
    def from_z(z: torch.Tensor) -> "Dual":
        return Dual(z.view(2, z.shape[0] // 2, *z.shape[1:]))


def pack(primal: torch.Tensor, tangent: torch.Tensor) -> Dual:
    tangent = tangent.to(primal.dtype)
    if tangent.shape != primal.shape:
        tangent = tangent.expand(primal.shape)
    return Dual(torch.stack([primal, tangent]), parts=(primal, tangent))


def _pd(dim: int, ndim: int) -> int:
    """A primal dimension index -> the pair tensor's."""
    return dim % max(ndim, 1) + 1


def _with_bias(P: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    """Add ``bias`` to the primal half of a pair tensor, in place (along ``channel_dim`` of the primal)."""
    if bias is not None:
        shape = [1] * (P.dim() - 1)
        shape[channel_dim] = -1
        P[0].add_(bias.view(shape))
    return P


def _is_dual(v) -> bool:
    return isinstance(v, Dual)


def _tree_map(fn, tree):
    if isinstance(tree, (list, tuple)):
        out = [_tree_map(fn, v) for v in tree]
        if hasattr(tree, "_fields"):
            return type(tree)(*out)
        return type(tree)(out) if not isinstance(tree, torch.Size) else tuple(out)
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, slice):
        return slice(_tree_map(fn, tree.start), _tree_map(fn, tree.stop), _tree_map(fn, tree.step))
    return fn(tree)


def _has_dual(tree) -> bool:
    """Whether ``tree`` (``_tree_map``'s containers) holds a Dual; stops at the first one and
    builds nothing (it runs on every node's arguments)."""
    if isinstance(tree, Dual):
        return True
    if isinstance(tree, (list, tuple)):
        return any(_has_dual(v) for v in tree)
    if isinstance(tree, dict):
        return any(_has_dual(v) for v in tree.values())
    if isinstance(tree, slice):
        return _has_dual((tree.start, tree.stop, tree.step))
    return False


def _align(P: torch.Tensor, ndim: int) -> torch.Tensor:
    """Insert unit dims after the pair dim so that P broadcasts as a primal of ``ndim`` dims."""
    while P.dim() - 1 < ndim:
        P = P.unsqueeze(1)
    return P


def _const_ok(c, x: Dual) -> bool:
    return not isinstance(c, torch.Tensor) or c.dim() <= x.ndim


class UnsupportedOpError(NotImplementedError):
    """The dual interpreter met an op it has no exact rule or verified fallback for."""


def _refuse(what: str):
    raise UnsupportedOpError(
        f"sgr_ext exact mode: {what} has no tangent rule, and using the primal alone would silently drop "
        "the penalty's dependence on the block input; use LocalNet(mode='double_backward') or mode='fast' "
        "for this block, or rewrite the op with a supported one (e.g. .transpose(-2, -1) for .mT)")
