"""The library's default reconciliation is the one the accuracy study chose on validation."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import sgr_ext
from sgr_ext import defaults

STUDY = Path(__file__).resolve().parents[1] / "benchmarks/results/study_sgr/study.json"


def _blocks():
    return [sgr_ext.LocalBlock(nn.Linear(4, 4), nn.Linear(4, 3)) for _ in range(3)]


def test_defaults_are_the_studys_validation_choice():
    study = json.loads(STUDY.read_text())
    assert study["default"]["family"] == defaults.STUDY_FAMILY
    side = {"handback": "handback", "sgrout": "output", "sgr": "input"}[defaults.STUDY_FAMILY.split("-")[0]]
    mode = "grad_ratio" if "-ratio" in defaults.STUDY_FAMILY else "fixed"
    lam = float(defaults.STUDY_FAMILY.split("-")[2].removeprefix("ratio").removeprefix("fixed"))
    assert (defaults.SIDE, defaults.LAM_MODE, defaults.LAM) == (side, mode, lam)
    # and the confirmed cells it rests on beat plain local learning on the test split
    cells = [c for c in study["confirmed"] if c["family"] == defaults.STUDY_FAMILY]
    assert cells and all(c["test"][0] > c["local"][0] for c in cells)


def test_localnet_default_and_explicit_lam():
    net = sgr_ext.LocalNet(_blocks())
    assert (net.side, net.config.lam_mode, net.config.lam) == (defaults.SIDE, defaults.LAM_MODE, defaults.LAM)
    paper = sgr_ext.LocalNet(_blocks(), lam=0.5)  # a lam alone is the DESIGN.md penalty
    assert (paper.side, paper.config.lam_mode, paper.config.lam) == ("input", "fixed", 0.5)
    with pytest.raises(ValueError, match="grad='forward'"):
        sgr_ext.LocalNet(_blocks(), grad="forward")


def test_default_share_is_reported_and_not_negligible():
    torch.manual_seed(0)
    net = sgr_ext.LocalNet(_blocks())
    stats = net.train_step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    assert stats.penalty_shares[0] is None
    assert stats.penalty_shares[1:] == pytest.approx([defaults.LAM] * 2)
