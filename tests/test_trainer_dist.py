"""``sgr-ext train`` under torchrun: 2 gloo ranks on CPU (launched by ``tests/_dist_util.py``).

Equality with one process needs a model without train-mode BatchNorm (each shard or
micro-batch would normalise by its own statistics), so the multi-rank runs use a test-only
BN-free MLP registered as ``--arch test_mlp``. float32 sums are taken in another order
(per shard, then all-reduced), so weights agree to rounding, not bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from torch import nn

from _dist_util import check_all_ok, free_port, launch
from sgr_ext import cli
from sgr_ext.trainer import TrainConfig, archs, checkpoint, train
from test_trainer import run_cli

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TEST_ARCH = "test_mlp"
# 64 images in batches of 16 (4 steps per epoch), 40 test images; flips check that every rank
# augments the global batch alike (a rank with other flips would change the reduced gradient).
SMALL = ["--train-subset", "64", "--test-subset", "40", "--batch-size", "16", "--lr", "0.05", "--no-plots",
         "--no-progress", "--dist-timeout", "20"]
SGR = ["--arch", TEST_ARCH, "--modules", "2", "--method", "sgr", "--lam", "0.5", "--augment", "flip", "--epochs", "2"]
SGR_CFG = dict(arch=TEST_ARCH, modules=2, method="sgr", lam=0.5, augment="flip", epochs=2, train_subset=64,
               test_subset=40, batch_size=16, lr=0.05, plots=False, progress=False)


def _mlp(num_classes, image_size, plain_attention):
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, num_classes))


def _register_arch():
    archs.ARCHS.setdefault(TEST_ARCH, archs.Arch(_mlp, 1, 1, "test only: BN-free MLP on 8x8 digits (2 units)"))


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.setitem(archs.ARCHS, TEST_ARCH, archs.Arch(_mlp, 1, 1, "test only"))
    for name in ("RANK", "WORLD_SIZE"):  # these tests are the single process
        monkeypatch.delenv(name, raising=False)


def _cli_runs(runs):
    """Every rank: ``sgr-ext train ARGV`` for each (argv, port), one process group per run as under torchrun."""
    _register_arch()
    rank = os.environ["RANK"]
    out = []
    for argv, port in runs:
        os.environ["MASTER_PORT"] = str(port)
        argv = [a.replace("{rank}", rank) for a in argv]
        so, se = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
            try:
                code = cli.main(["train", *argv])
            except SystemExit as exc:  # argparse errors
                code = exc.code
        out.append({"code": code, "stdout": so.getvalue().strip().splitlines(),
                    "stderr": se.getvalue().strip().splitlines()})
    return out


def _weights(path):
    return checkpoint.load(path)["model"]


def _assert_same_weights(got, want):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"parameter {k}")


def _assert_same_history(got, want, n_test=40):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-4)
        assert abs(g["test_acc"] - w["test_acc"]) <= 1.0 / n_test  # argmax ties aside, equal
        for key in ("block_train_loss", "block_penalty"):  # None: a penalty not computed (block 0)
            assert [v is None for v in g[key]] == [v is None for v in w[key]], key
            values = [v for v in g[key] if v is not None]
            assert values == pytest.approx([v for v in w[key] if v is not None], rel=1e-4, abs=1e-6), key


def test_two_ranks_data_and_module_parallel_match_one_process(tmp_path):
    d = str(tmp_path)
    runs = [
        # data parallel (auto under WORLD_SIZE=2): one epoch, then resumed from rank 0's checkpoint
        ([*SGR, *SMALL, "--stop-after", "1", "--out", f"{d}/dp-r{{rank}}"], free_port()),
        ([*SGR, *SMALL, "--resume", f"{d}/dp-r0/checkpoint.pt", "--out", f"{d}/dp-r{{rank}}"], free_port()),
        # module parallel: block 0 on rank 0, block 1 on rank 1 (the logging rank), 2 micro-batches
        ([*SGR, *SMALL, "--parallel", "module", "--micro-batches", "2", "--out", f"{d}/mp-r{{rank}}"], free_port()),
        # ... stopped after one epoch and resumed from the logging rank's checkpoint
        ([*SGR, *SMALL, "--parallel", "module", "--micro-batches", "2", "--stop-after", "1", "--out",
          f"{d}/mpr-r{{rank}}"], free_port()),
        ([*SGR, *SMALL, "--parallel", "module", "--micro-batches", "2", "--resume", f"{d}/mpr-r1/checkpoint.pt",
          "--out", f"{d}/mpr-r{{rank}}"], free_port()),
        # global BP under data parallel: DDP on each rank's shard
        (["--arch", TEST_ARCH, "--method", "bp", "--epochs", "2", *SMALL, "--out", f"{d}/bp-r{{rank}}"], free_port()),
        # BP-free training, data parallel
        (["--arch", TEST_ARCH, "--modules", "2", "--method", "local", "--grad", "forward", "--epochs", "1", *SMALL,
          "--out", f"{d}/fg-r{{rank}}"], free_port()),
        # a placement that does not fit: the same one-line error on every rank
        ([*SGR, *SMALL, "--parallel", "module", "--placement", "1,2", "--out", f"{d}/bad-r{{rank}}"], free_port()),
    ]
    payloads, _ = launch(_cli_runs, 2, tmp_path, deadline_s=120, _setup=False, runs=runs)
    ranks = check_all_ok(payloads)
    for r, runs_of_rank in enumerate(ranks):
        for i, run in enumerate(runs_of_rank[:-1]):
            assert run["code"] == 0, (r, i, run)
            assert not any("error" in line for line in run["stderr"]), (r, i, run["stderr"])
    # Only the logging rank writes or prints: rank 0 for data parallel, the last stage for module parallel.
    for name, logger in (("dp", 0), ("mp", 1), ("mpr", 1), ("bp", 0), ("fg", 0)):
        assert (tmp_path / f"{name}-r{logger}" / "results.json").is_file(), name
        assert not (tmp_path / f"{name}-r{1 - logger}").exists(), name
    for i, logger in enumerate((0, 0, 1, 1, 1, 0, 0)):
        assert any("test accuracy" in line for line in ranks[logger][i]["stdout"]), i
        assert ranks[1 - logger][i]["stdout"] == [], i
    for r in (0, 1):
        bad = ranks[r][-1]
        assert bad["code"] == 2 and len(bad["stderr"]) == 1, bad
        assert "--placement: expected 2 counts" in bad["stderr"][0] and "Traceback" not in bad["stderr"][0]
    assert not (tmp_path / "bad-r0").exists() and not (tmp_path / "bad-r1").exists()

    def results(name, r):
        return json.loads((tmp_path / f"{name}-r{r}" / "results.json").read_text())

    # One process, same configurations.
    ref = train(TrainConfig(out=str(tmp_path / "ref"), **SGR_CFG))
    ref_bp = train(TrainConfig(out=str(tmp_path / "ref-bp"), **dict(SGR_CFG, method="bp", lam=None, augment="auto")))
    for name, logger, want in (("dp", 0, ref), ("mp", 1, ref), ("bp", 0, ref_bp)):
        got = results(name, logger)
        _assert_same_weights(_weights(tmp_path / f"{name}-r{logger}" / "checkpoint.pt"),
                             _weights(tmp_path / ("ref-bp" if name == "bp" else "ref") / "checkpoint.pt"))
        _assert_same_history(got["history"], want["history"])
        assert got["complete"] and got["epochs_done"] == 2 and got["name"] == want["name"]
        assert set(got) == set(want), name  # the same results.json structure
    dist = {name: results(name, r)["distributed"] for name, r in (("dp", 0), ("mp", 1), ("bp", 0), ("fg", 0))}
    assert dist["dp"] == {"parallel": "data", "world_size": 2, "rank": 0, "logging_rank": True}
    assert dist["mp"] == {"parallel": "module", "world_size": 2, "rank": 1, "logging_rank": True,
                          "micro_batches": 2, "placement": [1, 1]}
    assert dist["bp"]["parallel"] == "data"
    assert ref["distributed"] == {"parallel": "none", "world_size": 1, "rank": 0, "logging_rank": True}
    fg = results("fg", 0)
    assert fg["config"]["grad"] == "forward" and fg["complete"]
    assert all(v == v for v in fg["history"][-1]["block_train_loss"]) and 0.0 <= fg["final_test_acc"] <= 1.0

    # Module-parallel resume: every stage gets its own optimizer and RNG state back, so the
    # continued run is the uninterrupted one, bit for bit.
    mpr = results("mpr", 1)
    assert mpr["complete"] and mpr["epochs_done"] == 2 and mpr["resumed_at_epoch"] == 1
    want, got = _weights(tmp_path / "mp-r1" / "checkpoint.pt"), _weights(tmp_path / "mpr-r1" / "checkpoint.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert mpr["history"][-1]["train_loss"] == results("mp", 1)["history"][-1]["train_loss"]
    # Its optimizer state is per stage: it resumes only as the same pipeline.
    with pytest.raises(ValueError, match=r"resumes only as the same pipeline \(checkpoint: module parallel, "
                                         r"placement \[1, 1\]; now: --parallel none\)"):
        train(TrainConfig(out=str(tmp_path / "mp-r1"), resume="auto", **dict(SGR_CFG, epochs=3)))


@pytest.mark.parametrize(
    "argv, match",
    [
        # the default side (handback) is refused earlier under --parallel data
        (["--parallel", "data", "--side", "input", "--lam", "0.1"], "--parallel data: needs a torchrun launch"),
        (["--parallel", "module", "--method", "bp"], "--parallel module: needs a local method"),
        (["--placement", "2,2"], "--placement: only applies to --parallel module"),
        (["--parallel", "module", "--placement", "2,x"], "--placement"),
        (["--parallel", "cluster"], "invalid choice"),
        (["--micro-batches", "0"], "--micro-batches"),
        (["--dist-timeout", "0"], "--dist-timeout"),
    ],
)
def test_cli_bad_distributed_options_one_line_exit_2(argv, match, capsys, tmp_path):
    code, lines = run_cli([*argv, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert match in lines[0] and lines[0].startswith("sgr-ext train") and "Traceback" not in lines[0]


def test_cli_peer_error_is_one_line_exit_1(monkeypatch, capsys, tmp_path):
    from sgr_ext.distributed import PeerError
    from sgr_ext.trainer import loop

    def dead_peer(cfg):
        raise PeerError("rank 0: gradient all-reduce failed or timed out; another rank has probably died or hangs")

    monkeypatch.setattr(loop, "train", dead_peer)
    code, lines = run_cli(["--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith("sgr-ext train: distributed error: rank 0: gradient all-reduce failed")
