"""benchmarks/gpu_check.py: the --dry-run (CPU, Triton interpreted) runs every section end to end;
the time boxes skip and interrupt what does not fit."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import gpu_check
    import gpu_check_perf
finally:
    sys.path.pop(0)


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "check"
    # a generous budget: on a loaded CI machine nothing may be skipped, so every path is covered
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "600"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"summary.md", "results.json", "sanitizer.log", "accuracy.md"} <= set(files), files
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["finished"] and res["meta"]["dry_run"]
    assert not res["skipped"], res["skipped"]
    assert not [s.get("errors") for s in res["sections"].values() if s.get("errors")]
    corr = res["sections"]["correctness"]
    assert len(corr["ops"]) == 8 and all(not r["failed"] and r["cases"] == r["of"] > 0 for r in corr["ops"].values()), \
        corr["ops"]
    assert {r["layout"] for r in corr["dual_bn"]} == {"nchw", "channels_last", "strided", "2d", "3d"}
    assert all(r["ok"] for r in corr["dual_bn"]), [r for r in corr["dual_bn"] if not r["ok"]]
    for prec in ("fp32", "bf16"):
        e = corr["engines"][prec]
        assert e["exact_rel_err"] <= e["exact_tol"] and e["fast_rel_err"] <= e["fast_tol"], e
    assert corr["linear_ce_selftest"]["passed"]
    rows = res["sections"]["train_step"]["rows"]
    assert {(r["precision"], r["method"]) for r in rows if "median_ms" in r} == {
        (p, m) for p in ("fp32", "bf16") for m in ("global_bp", "naive_local", "naive_sgr_db", "local", "exact", "fast")}
    kern = res["sections"]["kernels"]
    assert len([r for c in kern["reconcile"] for r in c["impls"] if "fwd" in r]) == 8
    assert {r["impl"] for r in kern["linear_ce"] if "median_ms" in r} >= {"torch_eager", "sgr_ext_triton"}
    assert res["sections"]["extras"]["sanitizer"]["cases_run"] > 0
    assert res["sections"]["extras"]["accuracy"]["rows"]
    md = (out / "summary.md").read_text()
    for heading in ("DRY RUN", "## 1. Correctness", "## 2. Training step", "## 3. Kernels", "## 4. Sanitizer"):
        assert heading in md
    assert "torch " + res["meta"]["torch"] in md and "triton " + res["meta"]["triton"] in md


def _check(tmp_path, budget_s):
    check = gpu_check.Check(tmp_path, True, budget_s, "cpu")
    check.results["meta"] = {"dry_run": True}
    check.budget.section("correctness")  # the first 30 % of the budget
    return check


def test_item_past_its_box_is_interrupted_and_noted(tmp_path):
    check = _check(tmp_path, 2.0)

    def spins_and_swallows():  # library code catching Exception must not hide the box's end
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            try:
                time.sleep(0.01)
            except Exception:  # noqa: BLE001
                pass

    t0 = time.monotonic()
    assert check.item("correctness", "slow", spins_and_swallows) is None
    assert time.monotonic() - t0 < 5
    assert check.results["skipped"][0]["item"] == "slow" and "interrupted" in check.results["skipped"][0]["why"]
    assert "slow: skipped, interrupted" in (tmp_path / "summary.md").read_text()


def test_item_that_does_not_fit_is_not_started(tmp_path):
    check = _check(tmp_path, 10.0)  # 3 s in the section
    ran = []
    assert check.item("correctness", "big", lambda: ran.append(1), need_s=60) is None
    assert check.item("correctness", "small", lambda: ran.append(2) or 7, need_s=0.1) == 7
    assert ran == [2]
    assert [s["item"] for s in check.results["skipped"]] == ["big"]
    assert "not started" in check.results["skipped"][0]["why"]


def test_failed_item_is_recorded_and_the_run_goes_on(tmp_path):
    check = _check(tmp_path, 10.0)
    assert check.item("correctness", "bad", lambda: 1 / 0) is None
    assert check.results["sections"]["correctness"]["errors"]["bad"].startswith("ZeroDivisionError")
    assert "correctness / bad: **failed**" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--dry-run"], "--out"),
    (["--out", "x", "--budget-s", "0"], "--budget-s: expected a positive number"),
    (["--out", "x", "--budget-s", "nan"], "--budget-s: expected a positive number"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert message in capsys.readouterr().err


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(f)])
    assert "--out: expected a directory" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_subprocess_past_its_box_is_killed_with_its_children(tmp_path):
    check = _check(tmp_path, 30.0)  # 9 s in the section, the command gets ~7 s (a loaded CI machine starts python slowly)
    child = "import time; time.sleep(120)"
    cmd = [sys.executable, "-c", f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]);"
                                 " print(p.pid, flush=True); time.sleep(120)"]
    log = tmp_path / "cmd.log"
    t0 = time.monotonic()
    assert gpu_check_perf._run_logged(cmd, check, log) == -9
    assert time.monotonic() - t0 < 20
    text = log.read_text()
    assert "killed at the end of the section's time box" in text
    grandchild = int(text.splitlines()[1])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
