"""``sgr-ext train --grad forward``: BP-free training (forward gradients) in the trainer, resume, CLI errors."""
import json
import math

import pytest
import torch

from sgr_ext.engine import ENGINES, forward_grad
from sgr_ext.trainer import TrainConfig, checkpoint, train
from test_trainer import TINY, run_cli


@pytest.mark.parametrize("method", ["local", "sgr"])
def test_forward_grad_smoke_on_digits(method, tmp_path, monkeypatch):
    calls = []
    step = forward_grad.step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(forward_grad, "step", counting_step)  # LocalNet.step_engine() looks it up per step
    res = train(TrainConfig(method=method, grad="forward", num_tangents=2, out=str(tmp_path), **TINY))
    assert len(calls) == 2 * 2  # 2 steps x 2 blocks, all through the BP-free engine
    assert res["complete"] and res["name"].endswith("-fwdgradx2-s0")
    assert math.isfinite(res["final_train_loss"]) and 0.0 <= res["final_test_acc"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["grad"] == "forward" and saved["config"]["num_tangents"] == 2
    assert (tmp_path / "checkpoint.pt").is_file()
    h = res["history"][-1]
    assert all(math.isfinite(v) for v in h["block_train_loss"])
    assert -1.0 <= h["cosine"][1] <= 1.0  # A_1 vs D_0, both estimated
    if method == "sgr":
        assert h["block_penalty"][1] > 0


def test_forward_grad_resume_is_bit_identical_and_refuses_other_grad(tmp_path):
    cfg = dict(TINY, method="sgr", epochs=2, deterministic=True, grad="forward")
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = train(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **cfg))
    assert not part["complete"]
    out = str(tmp_path / "part")
    with pytest.raises(ValueError, match="different configuration.*grad: checkpoint 'forward' vs now 'backward'"):
        train(TrainConfig(out=out, resume="auto", **dict(cfg, grad="backward")))
    with pytest.raises(ValueError, match="different configuration.*num_tangents: checkpoint 1 vs now 3"):
        train(TrainConfig(out=out, resume="auto", **dict(cfg, num_tangents=3)))
    resumed = train(TrainConfig(out=out, resume="auto", **cfg))  # the tangents' RNG stream continues too
    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")["model"]
    b = checkpoint.load(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"][-1]["train_loss"] == full["history"][-1]["train_loss"]

    # A checkpoint written before --grad existed was trained with backprop.
    state = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    for key in ("grad", "num_tangents"):
        del state["config"][key]
    checkpoint.save(tmp_path / "old" / "checkpoint.pt", state)
    with pytest.raises(ValueError, match="grad: checkpoint 'backward' vs now 'forward'"):
        train(TrainConfig(out=str(tmp_path / "old"), resume="auto", **cfg))


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--method", "bp", "--grad", "forward"], "--grad forward: needs a local method"),
        (["--grad", "sideways"], "invalid choice"),
        (["--num-tangents", "0"], "--num-tangents"),
        (["--num-tangents", "3"], "--num-tangents: only applies to --grad forward"),
    ]
    + ([(["--method", "sgr-fast", "--grad", "forward"], "--grad forward: use --method sgr")] if "fast" in ENGINES else []),
)
def test_cli_bad_grad_options_one_line_exit_2(argv, match, capsys, tmp_path):
    code, lines = run_cli([*argv, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert match in lines[0] and lines[0].startswith("sgr-ext train") and "Traceback" not in lines[0]
    assert not (tmp_path / "o").exists()
