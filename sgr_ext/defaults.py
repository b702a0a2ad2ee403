"""The default reconciliation, chosen on VALIDATION accuracy by the accuracy study
(``benchmarks/study_sgr.py --profile cpu``; ``benchmarks/results/study_sgr/study.json``,
field ``default``; ``tests/test_defaults.py`` keeps the two in step).

Every penalty on the distance between A_k and D_{k-1} lowered accuracy there, on either side
and at every strength; handing A_k back to block k-1 (``side="handback"``) raised it at every
(architecture, K). So ``LocalNet(blocks)`` and ``sgr-ext train --method sgr`` default to
``side="handback", lam_mode="grad_ratio", lam=1.0``. Passing ``lam`` alone keeps the penalty of
DESIGN.md section 1 (``side="input", lam_mode="fixed"``), as it always meant.
"""
from __future__ import annotations

from typing import Optional

LAM = 1.0
LAM_MODE = "grad_ratio"
SIDE = "handback"
STUDY_FAMILY = "handback-l2-ratio1"  # the study's name for this setting
# not studied: the BP-free setting (grad="forward") keeps the earlier penalty weight, input side
BP_FREE_LAM = 0.1


def resolve(lam: Optional[float], lam_mode: Optional[str], side: Optional[str]) -> tuple:
    """(lam, lam_mode, side) with the defaults filled in: the study's setting when ``lam`` is
    None; the DESIGN.md penalty (``"fixed"``, ``"input"``) for whatever a given ``lam`` leaves open."""
    if lam is None:
        return LAM, LAM_MODE if lam_mode is None else lam_mode, SIDE if side is None else side
    return lam, "fixed" if lam_mode is None else lam_mode, "input" if side is None else side
