"""The SGR accuracy-study harness (benchmarks/study_sgr.py): its CI smoke run, the cache, and
that every choice is made on validation accuracy, never on test accuracy."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (ROOT / ".data/cifar10_subset.npz", ROOT.parent / "shared/data/cifar10_subset.npz")
             if p.is_file()), None)
sys.path.insert(0, str(ROOT / "benchmarks"))

from sgr_study import plan, report  # noqa: E402
from sgr_study.variants import PROFILES, Variant, sgr  # noqa: E402


def _rec(arch, v, seed, val, test):
    return {"arch": arch, "variant": v.as_dict(), "name": v.name, "seed": seed, "val_acc": val, "test_acc": test}


def test_choices_use_validation_not_test():
    prof = PROFILES["smoke"]
    a, b = sgr(4, "l2", "grad_ratio", 0.1), sgr(4, "l2", "grad_ratio", 0.1, side="output")
    # a: better on validation, worse on test; b: the reverse
    results = {("cnn", v.name, 0): _rec("cnn", v, 0, val, test) for v, val, test in ((a, 0.6, 0.1), (b, 0.5, 0.9))}
    assert plan.best(results, "cnn", [a, b], 1) == [a]
    local = Variant("local", 4)
    table = {("cnn", 4): {"local": {s: _rec("cnn", local, s, 0.55, 0.99) for s in (0, 1)},
                          a.family: {s: _rec("cnn", a, s, 0.60, 0.10) for s in (0, 1)},
                          b.family: {s: _rec("cnn", b, s, 0.50, 0.99) for s in (0, 1)}}}
    assert report.select_default(table, (0, 1))["family"] == a.family
    # no family beats local on validation: SGR is off by default
    table[("cnn", 4)][a.family] = {s: _rec("cnn", a, s, 0.54, 0.99) for s in (0, 1)}
    assert report.select_default(table, (0, 1))["family"] is None
    del prof


def test_stages_confirm_the_validation_best_at_every_seed():
    prof = PROFILES["smoke"]
    s1, s2, s3 = plan.stage_jobs(prof, {})
    assert {j[1].method for j in s1} == {"bp", "local", "sgr"} and all(j[2] == 0 for j in s1)
    results = {}
    for arch, v, seed in s1:
        results[(arch, v.name, seed)] = _rec(arch, v, seed, 0.9 if v.side == "output" else 0.3, 0.0)
    s1, s2, s3 = plan.stage_jobs(prof, results)
    assert [j[1].side for j in s2 if j[1].method == "sgr"] == ["output"]  # the validation-best, at the other K
    assert {j[2] for j in s3} == set(prof.seeds)


@pytest.mark.skipif(DATA is None, reason="needs the CIFAR-10 subset (../shared/data)")
def test_smoke_run_writes_report_and_resumes_from_cache(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks/study_sgr.py"), "--profile", "smoke", "--data", str(DATA),
           "--out", str(tmp_path), "--jobs", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count(" done ") >= 8
    out = json.loads((tmp_path / "study.json").read_text())
    assert len(out["confirmed"]) == 2 and "default" in out
    assert (tmp_path / "study_strength.png").stat().st_size > 1000
    assert "| cnn | 4 |" in (tmp_path / "study.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and " done " not in again.stdout  # every run came from the cache
