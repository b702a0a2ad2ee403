"""The main job: `sgr-ext demo` on the embedded real digits."""
import json
import subprocess
import sys

import pytest

from sgr_ext.cli import main


def test_demo_writes_results_and_plot(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dataset"] == "sklearn-digits-8x8" and res["num_classes"] == 10 and res["device"] == "cpu"
    assert set(res["methods"]) == {"bp", "local", "sgr"}
    for method, r in res["methods"].items():
        assert 0.0 <= r["test_acc"] <= 1.0 and r["peak_memory_mb"] > 0 and r["time_s"] > 0
        assert r["test_acc"] > 0.3, f"{method} did not learn past chance (0.1) in 2 epochs"
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert "| sgr |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "0"], "--epochs: expected an int >= 1"),
        (["demo", "--lam", "-1"], "--lam: expected a finite number >= 0"),
        (["demo", "--modules", "9"], "--modules: expected at most 4"),
    ],
)
def test_bad_arguments_give_one_line(argv, message, tmp_path):
    # cwd outside the checkout, so the installed package runs, not the source tree
    proc = subprocess.run([sys.executable, "-m", "sgr_ext.cli", *argv, "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
