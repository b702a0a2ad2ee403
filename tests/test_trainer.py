"""``sgr-ext train`` and ``sgr_ext.trainer``: CPU smoke runs, bit-identical resume, checkpoints, CLI errors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgr_ext import cli
from sgr_ext.engine import ENGINES
from sgr_ext.trainer import TrainConfig, TrainingDiverged, train
from sgr_ext.trainer import checkpoint
from sgr_ext.trainer.augment import random_crop_flip
from sgr_ext.trainer.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch="digits_cnn", modules=2, epochs=1, batch_size=32, train_subset=64, test_subset=32,
            lr=0.05, progress=False, plots=False)


def tiny_npz(path: Path, n_train=48, n_test=16, size=16, channels=3, seed=0) -> Path:
    """A tiny CIFAR-like .npz: (N, H, W, C) uint8 images, int64 labels (HWC as in cifar10_subset.npz)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels > 1 else (size, size)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=rng.integers(0, 10, n_train), x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=rng.integers(0, 10, n_test))
    return path


def _methods():
    return ["bp", "local", "sgr"] + (["sgr-fast"] if "fast" in ENGINES else [])


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_flip_matches_per_image_reference():
    x = torch.randn(6, 3, 8, 8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order
    oy, ox = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8]
        torch.testing.assert_close(out[i], ref.flip(-1) if flips[i] else ref, rtol=0, atol=0)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)


# ----------------------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("method", _methods())
def test_train_every_method_on_digits(method, tmp_path):
    res = train(TrainConfig(method=method, out=str(tmp_path), **TINY))
    assert res["complete"] and res["epochs_done"] == 1
    assert 0.0 <= res["final_test_acc"] <= 1.0
    for name in ("results.json", "metrics.csv", "metrics.json", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["name"] == res["name"] and saved["dataset"]["name"] == "sklearn-digits-8x8"
    if method == "bp":
        assert res["final_block_test_acc"] == [] and res["blocks"] == 1
    else:
        assert len(res["final_block_test_acc"]) == 2
        # boundary diagnostics, also under plain local learning (track_alignment)
        assert res["final_cosine"][0] is None and -1.0 <= res["final_cosine"][1] <= 1.0
        assert res["final_norm_ratio"][1] > 0
        assert (tmp_path / "steps.csv").is_file()
        header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"test_acc_block0", "test_acc_block1", "cos_block1", "norm_ratio_block1", "step_time_ms"} <= set(header)
    if method.startswith("sgr"):
        assert res["history"][-1]["block_penalty"][1] > 0
        # the default (the study's handback, grad_ratio 1.0): its share is logged per step
        steps = (tmp_path / "steps.csv").read_text().splitlines()
        col = steps[0].split(",").index("penalty_share_block1")
        assert float(steps[1].split(",")[col]) == pytest.approx(1.0)


def test_train_on_npz_with_augmentation_and_plots(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    res = train(TrainConfig(arch="resnet32", modules=2, method="sgr", lam=0.5, lam_warmup=1.0, epochs=1,
                            batch_size=24, data=str(data), out=str(out), progress=False, log_every=1))
    assert res["augment"] == "crop-flip" and res["dataset"]["shape"] == [3, 16, 16]
    assert res["dataset"]["train"] == 48 and res["dataset"]["test"] == 16
    assert (out / "learning_curves.png").stat().st_size > 0
    assert (out / "diagnostics.png").stat().st_size > 0
    assert [r["lam"] for r in json.loads((out / "metrics.json").read_text())] == [0.5]
    steps = (out / "steps.csv").read_text().splitlines()
    assert len(steps) == 3  # header + 2 steps; lambda warms up from 0.25 to 0.5
    assert [float(r.split(",")[3]) for r in steps[1:]] == [0.25, 0.5]


def test_load_dataset_npz_layouts_and_errors(tmp_path):
    d = load_dataset(str(tiny_npz(tmp_path / "gray.npz", size=8, channels=1)))
    assert d.x_train.shape == (48, 1, 8, 8) and d.x_train.dtype == torch.float32
    assert abs(float(d.x_train.mean())) < 1e-4  # standardised with training statistics
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="missing arrays"):
        load_dataset(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_dataset(str(tmp_path))  # a directory without cifar-10-batches-py


# ----------------------------------------------------------------------------- resume


def test_resume_is_bit_identical(tmp_path):
    cfg = dict(TINY, method="sgr", epochs=3, deterministic=True, lam_warmup=1.0)
    full = train(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = train(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **cfg))
    assert not part["complete"] and part["epochs_done"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "part"), resume="auto", **cfg))
    assert resumed["complete"] and resumed["epochs_done"] == 3
    assert (full["resumed_at_epoch"], resumed["resumed_at_epoch"]) == (None, 1)

    a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "part" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def strip(history):  # wall-clock fields differ, everything else must not
        return [{k: v for k, v in r.items() if "time" not in k and k != "samples_per_s"} for r in history]

    assert strip(full["history"]) == strip(resumed["history"])


def _poison_batches(monkeypatch, which=(2,)):
    """One NaN pixel in the given training batches (1-based call count; None: every batch),
    after loading (a sample that goes bad mid-run); the data loader rejects non-finite files."""
    from sgr_ext.trainer import loop

    calls = {"n": 0}

    def poisoned(x, **kw):
        out = random_crop_flip(x, **kw)
        calls["n"] += 1
        if which is None or calls["n"] in which:
            out[0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(loop, "random_crop_flip", poisoned)


@pytest.mark.parametrize("policy", ["raise", "skip", "warn"])
def test_nonfinite_policy_in_the_trainer(policy, tmp_path, monkeypatch):
    _poison_batches(monkeypatch)
    cfg = TrainConfig(method="sgr", out=str(tmp_path), augment="flip", nonfinite=policy, **dict(TINY, epochs=2))
    if policy == "raise":
        with pytest.raises(TrainingDiverged, match=r"epoch 1, step 2: .*block 0"):
            train(cfg)
        return
    with pytest.warns(RuntimeWarning, match="non-finite values in block 0"):
        res = train(cfg)
    first, second = res["history"]
    assert (first["nonfinite_steps"], second["nonfinite_steps"]) == (1, 0)
    assert first["skipped_steps"] == (1 if policy == "skip" else 0) and second["skipped_steps"] == 0
    for rec in res["history"]:  # epoch statistics over the finite steps only
        assert all(np.isfinite(v) for v in rec["block_train_loss"] + rec["block_penalty"][1:])
    model = checkpoint.load(tmp_path / "checkpoint.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"nonfinite_steps", "skipped_steps"} <= set(header)


def test_every_step_skipped_still_finishes_with_the_progress_bar(tmp_path, monkeypatch):
    _poison_batches(monkeypatch, which=None)
    with pytest.warns(RuntimeWarning):
        res = train(TrainConfig(method="local", out=str(tmp_path), augment="flip", nonfinite="skip",
                                **dict(TINY, progress=True)))
    rec = res["history"][0]
    assert rec["train_loss"] is None and rec["skipped_steps"] == rec["nonfinite_steps"] == 2
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "checkpoint.pt").is_file()


def test_out_may_be_a_path_object(tmp_path):
    TrainConfig(out=tmp_path / "run").validate()


def test_checkpoints_from_before_datasets_were_named_still_resume(tmp_path):
    data = tiny_npz(tmp_path / "tiny.npz", size=8, channels=1)
    cfg = dict(arch="digits_cnn", modules=2, batch_size=24, progress=False, plots=False, augment="none",
               data=str(data), epochs=2, out=str(tmp_path / "run"))
    train(TrainConfig(stop_after=1, **cfg))
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoint.load(path)
    state["dataset"]["name"] = "x_test"  # what the loader called every .npz before 2026-11-22
    checkpoint.save(path, state)
    assert train(TrainConfig(resume="auto", **cfg))["complete"]


def test_cli_nonfinite_policy_rejected_for_global_bp(capsys):
    assert cli.main(["train", "--method", "bp", "--nonfinite", "skip", "--no-progress"]) == 2
    assert "--nonfinite skip: applies to the local methods" in capsys.readouterr().err


def test_resume_rejects_other_configuration(tmp_path):
    train(TrainConfig(out=str(tmp_path), method="local", **TINY))
    with pytest.raises(ValueError, match="different configuration.*method"):
        train(TrainConfig(out=str(tmp_path), method="sgr", resume="auto", **TINY))


# ----------------------------------------------------------------------------- checkpoints


def test_corrupt_checkpoint_gives_clear_error_and_keeps_previous(tmp_path):
    train(TrainConfig(out=str(tmp_path), method="local", **dict(TINY, epochs=2)))
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    assert checkpoint.is_intact(ckpt) and checkpoint.is_intact(prev)
    data = ckpt.read_bytes()

    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg and "truncated" in msg and str(prev) in msg

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # one corrupted byte
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load(ckpt)

    ckpt.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="not an sgr_ext checkpoint"):
        checkpoint.load(ckpt)
    assert checkpoint.load(prev)["epoch"] == 1  # the previous one is intact and usable


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"epoch": 1, "w": torch.arange(3)})

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"epoch": 2, "w": torch.arange(5)})
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temp file left behind


def test_rng_state_round_trip():
    import random

    state = checkpoint.rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    checkpoint.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


# ----------------------------------------------------------------------------- CLI


def run_cli(argv, capsys):
    try:
        code = cli.main(["train", *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--arch", "resnet9000"], "invalid choice"),
        (["--method", "magic"], "invalid choice"),
        (["--lam", "-1"], "--lam"),
        (["--lam", "nan"], "--lam"),
        (["--epochs", "0"], "--epochs"),
        (["--modules", "x"], "--modules"),
        (["--arch", "digits_cnn", "--modules", "9"], "K must be at most 4"),
        (["--method", "local", "--lam", "0.5"], "only applies to --method sgr"),
        (["--data", "/nonexistent/cifar.npz"], "no such file"),
        (["--resume"], "no checkpoint"),
        (["--image-size", "30", "--arch", "vit_tiny"], "multiple of 4"),
    ],
)
def test_cli_bad_arguments_one_line_exit_2(argv, match, capsys, tmp_path):
    code, lines = run_cli([*argv, "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert match in lines[0] and lines[0].startswith("sgr-ext train")
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize("out", ["file", "file/sub", ""])
def test_cli_bad_out_one_line_exit_2(out, capsys, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    target = str(tmp_path / out) if out else ""
    code, lines = run_cli(["--arch", "digits_cnn", "--modules", "2", "--epochs", "1", "--train-subset", "32",
                           "--out", target, "--no-progress"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--out" in lines[0] and "Traceback" not in lines[0]


def test_npz_dataset_is_named_after_its_file_and_resume_checks_it(tmp_path):
    first = tiny_npz(tmp_path / "first.npz", size=8, channels=1)
    other = tiny_npz(tmp_path / "other.npz", size=8, channels=1, seed=1)
    assert load_dataset(str(first)).name == "first"
    cfg = dict(arch="digits_cnn", modules=2, batch_size=24, progress=False, plots=False, augment="none",
               out=str(tmp_path / "run"))
    train(TrainConfig(data=str(first), epochs=2, stop_after=1, **cfg))
    with pytest.raises(ValueError, match=r"different configuration \(dataset: .*'first'.* vs now .*'other'"):
        train(TrainConfig(data=str(other), epochs=2, resume="auto", **cfg))


def test_npz_without_test_images_is_an_error(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "notest.npz", x_train=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8),
             y_train=rng.integers(0, 3, 8), x_test=np.zeros((0, 8, 8), dtype=np.uint8), y_test=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="x_test: expected at least 1 test image"):
        load_dataset(str(tmp_path / "notest.npz"))


def test_cli_corrupt_checkpoint_one_line(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"SGRCKPT\x01" + b"\x00" * 10)
    code, lines = run_cli(["--out", str(tmp_path), "--resume"], capsys)
    assert code == 2 and len(lines) == 1 and "checkpoint.pt" in lines[0] and "truncated" in lines[0]


def test_cli_train_end_to_end_and_subprocess_error(tmp_path, capsys):
    code = cli.main(["train", "--arch", "digits_cnn", "--modules", "2", "--method", "local", "--epochs", "1",
                     "--batch-size", "32", "--train-subset", "64", "--test-subset", "32", "--no-plots",
                     "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["config"]["method"] == "local"
    proc = subprocess.run([sys.executable, "-m", "sgr_ext.cli", "train", "--arch", "nope"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- study runner


def test_study_quick_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("study_accuracy", REPO / "benchmarks" / "study_accuracy.py")
    study = importlib.util.module_from_spec(spec)
    sys.modules["study_accuracy"] = study  # dataclasses look their module up
    try:
        spec.loader.exec_module(study)
    finally:
        sys.modules.pop("study_accuracy", None)
    data = tiny_npz(tmp_path / "digits.npz", n_train=64, n_test=32, size=8, channels=1)
    out = tmp_path / "study"
    assert study.main(["--quick", "--arch", "digits_cnn", "--data", str(data), "--out", str(out), "--batch-size", "32"]) == 0
    agg = json.loads((out / "study.json").read_text())
    names = [r["name"] for r in agg["rows"]]
    assert names == ["bp", "K2-local", "K2-sgr-l2-lam0.1"]
    assert agg["meta"]["finished"] == 3 and not agg["errors"]
    assert "gap closed" in (out / "study.md").read_text()
    assert (out / "study.png").stat().st_size > 0
    assert (out / "runs" / "K2-local-s0" / "results.json").is_file()
    # a second start skips finished runs
    assert study.main(["--quick", "--arch", "digits_cnn", "--data", str(data), "--out", str(out), "--batch-size", "32"]) == 0
