"""Block statistics as float tables, as both runners send them between ranks: one row per
block, one column per field of ``StepStats``; NaN marks an absent statistic."""
from __future__ import annotations

import math

import torch

from sgr_ext.net import StepStats


# Statistics travel as float tables: one row per block, one column per field of StepStats.
_FIELDS = ("loss", "penalty", "accuracy", "cosine", "norm_ratio")
_WHAT = ("input", "loss", "penalty", "gradient")


def _present(r) -> list[bool]:
    return [getattr(r, name) is not None for name in _FIELDS]


def _stat_row(r) -> torch.Tensor:
    """A block's statistics as one (5,) tensor (one kernel); absent ones hold the loss."""
    return torch.stack([(getattr(r, name) if getattr(r, name) is not None else r.loss).detach().reshape(())
                        for name in _FIELDS])


def _mask_absent(table: torch.Tensor, present) -> torch.Tensor:
    """Absent statistics -> NaN (CPU float64). The loss is always present."""
    mask = torch.tensor(present, dtype=torch.bool)
    return table.double().cpu().masked_fill(~mask, float("nan"))


def _bad_blocks(table: torch.Tensor, input_bad: bool = False) -> dict:
    """{block: [what, ...]} for non-finite input (block 0), loss or penalty in a statistics table
    (before ``_mask_absent``: an absent penalty holds the loss)."""
    bad: dict = {}
    if input_bad:
        bad.setdefault(0, []).append("input")
    for k, row in enumerate(table.tolist()):
        for what, v in (("loss", row[0]), ("penalty", row[1])):
            if not math.isfinite(v):
                bad.setdefault(k, []).append(what)
    return bad


def _stats_from_table(table: torch.Tensor) -> StepStats:
    """StepStats from a (blocks, 5) CPU table, NaN = absent (the loss is kept as it is)."""
    stats = StepStats()
    for row in table.tolist():
        stats.losses.append(row[0])
        stats.penalties.append(None if row[1] != row[1] else row[1])
        stats.accuracies.append(None if row[2] != row[2] else row[2])
        stats.cosines.append(None if row[3] != row[3] else row[3])
        stats.norm_ratios.append(None if row[4] != row[4] else row[4])
    return stats
