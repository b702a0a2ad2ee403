"""``LocalNet``: a chain of gradient-isolated ``LocalBlock``s trained with SGR."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import _checks
from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import ENGINES, StepConfig


class NonFiniteError(FloatingPointError):
    """A loss or penalty of block ``block`` (0-based) was NaN or infinite."""

    def __init__(self, block: int, what: str):
        super().__init__(f"block {block}: non-finite {what}; the gradients of blocks >= {block} are not usable")
        self.block = block
        self.what = what


@dataclass
class StepStats:
    """Per-block statistics of one ``train_step``, index k = block k (0-based).

    losses: l_k.  penalties: R_k (``penalties[0] == 0.0``).  accuracies: fraction of the
    batch each head classifies right (None where the head is not a classifier).
    cosines, norm_ratios: mean cos(A_k, D_{k-1}) and |A_k| / |D_{k-1}| per boundary,
    None where A_k was not computed (block 0; lam == 0 without ``track_alignment``).
    """

    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    accuracies: list[Optional[float]] = field(default_factory=list)
    cosines: list[Optional[float]] = field(default_factory=list)
    norm_ratios: list[Optional[float]] = field(default_factory=list)


def _item(t: Optional[torch.Tensor]) -> Optional[float]:
    return None if t is None else float(t)


class LocalNet(nn.Module):
    """Local learning with Successive Gradient Reconciliation over K blocks.

    Args:
        blocks: the K ``LocalBlock``s in order; the last block's head is the classifier.
        lam: penalty weight lambda >= 0 (0 gives plain local learning).
        distance: ``"l2"`` or ``"cosine"`` (see ``sgr_ext.reconcile``).
        loss_fn: ``loss_fn(head_output, y) -> 0-dim`` batch MEAN loss; cross-entropy by
            default. The batch scaling of A_k and D_k assumes mean reduction.
        mode: ``"exact"``: the exact penalty gradient.
        eps: cosine-distance epsilon.
        track_alignment: also measure cos(A_k, D_{k-1}) and the norm ratio when
            ``lam == 0`` (costs one input-gradient per block).
    """

    def __init__(
        self,
        blocks: Sequence[LocalBlock],
        *,
        lam: float,
        distance: str = "l2",
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        mode: str = "exact",
        eps: float = 1e-8,
        track_alignment: bool = False,
    ):
        super().__init__()
        blocks = list(blocks) if not isinstance(blocks, nn.Module) else list(blocks.children())
        if not blocks:
            raise ValueError("blocks: expected at least one LocalBlock, got none")
        for i, b in enumerate(blocks):
            if not isinstance(b, LocalBlock):
                raise TypeError(f"blocks[{i}]: expected a LocalBlock, got {type(b).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.mode = _checks.choice("mode", mode, ENGINES)
        self.config = StepConfig(
            lam=_checks.nonneg_finite("lam", lam),
            distance=_checks.distance(distance),
            eps=_checks.nonneg_finite("eps", eps),
            loss_fn=loss_fn if loss_fn is not None else F.cross_entropy,
            track_alignment=bool(track_alignment),
        )

    @property
    def lam(self) -> float:
        return self.config.lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain inference: the last head applied to f_K(...f_1(x))."""
        for block in self.blocks:
            x = block(x)
        return self.blocks[-1].head(x)

    def _check_step_input(self, x, y) -> None:
        _checks.tensor("x", x)
        batch = _checks.batch("x", x)
        if self.config.loss_fn is F.cross_entropy:
            _checks.labels("y", y, batch)
        elif isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != batch):
            raise ValueError(f"y: expected a batch of {batch} targets along dimension 0, got {tuple(y.shape)}")

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One local-learning step: ADD grad of J_k = l_k + lam * R_k to every block's ``p.grad``.

        x: (B, *) input batch; y: (B,) int64 class labels for the default loss.
        Block k's activations are released when its step returns; only x_k and D_k
        travel forward. The optimizer step (and zero_grad) stays the caller's.
        Raises ``NonFiniteError`` naming the first block whose loss or penalty was NaN/Inf.
        """
        self._check_step_input(x, y)
        engine = ENGINES[self.mode]
        needs_d = self.config.lam > 0 or self.config.track_alignment
        results = []
        h, d = x, None
        last = len(self.blocks) - 1
        for k, block in enumerate(self.blocks):
            if k == 0 and self.config.loss_fn is F.cross_entropy:
                self._check_label_range(block, h, y)
            r = engine(block, h, y, d, self.config, need_output_grad=needs_d and k < last)
            h, d = r.output, r.output_grad
            results.append(r)
        return self._collect(results)

    def _check_label_range(self, block: LocalBlock, x: torch.Tensor, y: torch.Tensor) -> None:
        # Labels are checked against every head's class count, read off the heads' last
        # Linear layer without running them.
        counts = {m.out_features for b in self.blocks for m in [_last_linear(b.head)] if m is not None}
        if counts:
            _checks.labels("y", y, x.shape[0], min(counts))

    @staticmethod
    def _collect(results) -> StepStats:
        stats = StepStats()
        for k, r in enumerate(results):
            if not bool(torch.isfinite(r.loss)):
                raise NonFiniteError(k, "loss")
            if not bool(torch.isfinite(r.penalty)):
                raise NonFiniteError(k, "penalty")
            stats.losses.append(float(r.loss))
            stats.penalties.append(float(r.penalty))
            stats.accuracies.append(_item(r.accuracy))
            stats.cosines.append(_item(r.cosine))
            stats.norm_ratios.append(_item(r.norm_ratio))
        return stats


def _last_linear(head: nn.Module) -> Optional[nn.Linear]:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
