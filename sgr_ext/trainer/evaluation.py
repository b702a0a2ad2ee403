"""Test accuracy of the whole model and of every block's head (sharded over ranks by the
caller), and the per-block epoch means of step statistics."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from sgr_ext.net import LocalNet


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _without_blocks(stats, blocks):
    """``stats`` with the given blocks' statistics replaced by None (their values are NaN/Inf
    or belong to a dropped update), so that epoch means stay over the finite steps."""
    drop = set(blocks)
    fields = ("losses", "penalties", "accuracies", "cosines", "norm_ratios")
    return dataclasses.replace(stats, **{
        f: [None if k in drop else v for k, v in enumerate(getattr(stats, f))] for f in fields})


def _per_block_mean(rows: list[list[Optional[float]]], n_blocks: int) -> list[Optional[float]]:
    """Per block, the mean over steps of its non-None values; ``n_blocks`` Nones when no step
    counted (a pipeline stage's rows cover only the blocks up to its own)."""
    return [_mean(r[k] for r in rows) for k in range(len(rows[0]) if rows else n_blocks)]


def evaluate(model: nn.Module, net: Optional[LocalNet], x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
             prepare, autocast) -> tuple[float, list[float]]:
    """Test accuracy of the model and of every block's head (empty list for global BP)."""
    correct = _eval_correct(model, net, x, y, batch_size=batch_size, prepare=prepare, autocast=autocast)
    return _accuracies(correct, len(x), net is not None)


def _accuracies(correct: torch.Tensor, n: int, local: bool) -> tuple[float, list[float]]:
    accs = (correct.double() / max(1, n)).tolist()
    return accs[-1], (accs if local else [])


@torch.no_grad()
def _eval_correct(model: nn.Module, net: Optional[LocalNet], x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                  prepare, autocast) -> torch.Tensor:
    """Correctly classified samples of (x, y): per block's head (LocalNet) or of the model, on x's device."""
    trained = net if net is not None else model
    was_training = trained.training
    trained.eval()
    n = len(x)
    correct = torch.zeros((len(net.blocks) if net is not None else 1,), dtype=torch.long, device=x.device)
    try:
        for i in range(0, n, batch_size):
            xb, yb = prepare(x[i : i + batch_size]), y[i : i + batch_size]
            with autocast():
                if net is None:
                    correct[0] += (model(xb).argmax(1) == yb).sum()
                else:
                    h = xb
                    for k, block in enumerate(net.blocks):
                        h = block(h)
                        correct[k] += (block.head(h).argmax(1) == yb).sum()
    finally:
        trained.train(was_training)
    return correct
