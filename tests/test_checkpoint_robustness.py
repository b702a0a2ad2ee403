"""Checkpoints never lose a run: atomic writes, damaged files, crashes, bit-identical resume.

- ``checkpoint.save`` writes a temporary file and renames it: a failure at any stage (the
  serialisation, the write, the fsync, the rename, a filesystem without hard links) and even a
  SIGKILL in the middle of a write leave a complete, loadable checkpoint and no temporary file
  that a later save trips over.
- A truncated, padded, bit-flipped or foreign file gives a ``CheckpointError`` that names the
  file (and the intact previous checkpoint, with the flag to resume from it); the previous
  checkpoint is kept and resuming from it reproduces the uninterrupted run.
- In deterministic mode, a run that crashed mid-epoch (or whose checkpoint write failed) and
  was resumed ends with exactly the weights of an uninterrupted run.
- A checkpoint is loaded with ``weights_only=True``: a pickle that would run code is refused.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sgr_ext import cli
from sgr_ext.net import LocalNet
from sgr_ext.trainer import TrainConfig, checkpoint, train

TINY = dict(arch="digits_cnn", modules=2, batch_size=32, train_subset=64, test_subset=32, lr=0.05,
            progress=False, plots=False, deterministic=True)


def state(i: int) -> dict:
    return {"epoch": i, "w": torch.full((64,), float(i)), "nested": {"lr": 0.1 * i, "tags": ["a", str(i)]}}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def assert_weights_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- atomic save


class Boom(Exception):
    pass


def _raise(*args, **kwargs):
    raise Boom("simulated failure")


def _oserror(*args, **kwargs):
    raise OSError(5, "Input/output error")


@pytest.mark.parametrize("stage", ["serialise", "write", "fsync", "link", "rename-prev", "rename-final"])
def test_failed_save_keeps_the_previous_checkpoint(stage, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, state(1))
    checkpoint.save(path, state(2))  # now checkpoint.pt = 2, checkpoint.prev.pt = 1
    real_replace = os.replace

    if stage == "serialise":
        monkeypatch.setattr(checkpoint.torch, "save", _raise)
    elif stage == "write":
        real_open = open

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()
                return False

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # a partial write, then the disk is full
                raise OSError(28, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: HalfWriter(real_open(p, mode, *a, **k))
                            if "w" in mode else real_open(p, mode, *a, **k))
    elif stage == "fsync":
        monkeypatch.setattr(checkpoint.os, "fsync", _oserror)
    elif stage == "link":  # a filesystem without hard links: the fallback path must stay safe
        monkeypatch.setattr(checkpoint.os, "link", lambda *a: (_ for _ in ()).throw(OSError(1, "no hard links")))
    elif stage == "rename-prev":
        monkeypatch.setattr(checkpoint.os, "replace",
                            lambda a, b: _oserror() if Path(b).name == "checkpoint.prev.pt" else real_replace(a, b))
    elif stage == "rename-final":
        monkeypatch.setattr(checkpoint.os, "replace",
                            lambda a, b: _oserror() if Path(b).name == "checkpoint.pt" else real_replace(a, b))

    if stage == "link":
        checkpoint.save(path, state(3))  # succeeds through the fallback
        monkeypatch.undo()
        assert checkpoint.load(path)["epoch"] == 3
        assert checkpoint.load(checkpoint.previous_path(path))["epoch"] == 2
    else:
        with pytest.raises((Boom, OSError)):
            checkpoint.save(path, state(3))
        monkeypatch.undo()
        assert checkpoint.load(path)["epoch"] == 2  # the last good checkpoint is untouched
        assert checkpoint.load(checkpoint.previous_path(path))["epoch"] in (1, 2)
    assert leftovers(tmp_path) == []  # no temporary file left behind
    checkpoint.save(path, state(4))  # and the next save works
    assert checkpoint.load(path)["epoch"] == 4


_WRITER = textwrap.dedent("""
    import sys, torch
    from sgr_ext.trainer import checkpoint
    path = sys.argv[1]
    big = torch.randn(4_000_000)  # 16 MB: a write takes a while
    i = 0
    while True:
        i += 1
        print("saving", i, flush=True)
        checkpoint.save(path, {"epoch": i, "w": big + i})
""")


def test_sigkill_during_writes_never_leaves_a_broken_checkpoint(tmp_path):
    """A real crash: the writer is killed with SIGKILL while it is saving, several times."""
    path = tmp_path / "checkpoint.pt"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.02,):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
        try:
            for line in proc.stdout:  # let it complete a save or two, then kill it mid-save
                if line.strip() == "saving 3":
                    time.sleep(delay)
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        saved = checkpoint.load(path)  # complete and verified, whatever moment the kill hit
        assert saved["epoch"] >= 2
        assert saved["w"].shape == (4_000_000,)
        assert checkpoint.is_intact(checkpoint.previous_path(path))
    checkpoint.save(path, state(99))  # a stale temporary file of the killed process does not matter
    assert checkpoint.load(path)["epoch"] == 99


# ----------------------------------------------------------------------------- damaged files


def _damage(data: bytes, how: str) -> bytes:
    n = len(data)
    return {
        "empty": b"",
        "magic-only": data[:8],
        "magic-partial": data[:5],
        "header-only": data[:48],
        "half": data[: n // 2],
        "one-byte-short": data[:-1],
        "padded": data + b"\0" * 16,
        "flip-payload": data[:n - 100] + bytes([data[n - 100] ^ 0x01]) + data[n - 99:],
        "flip-length": data[:8] + bytes([data[8] ^ 0x40]) + data[9:],
        "flip-checksum": data[:20] + bytes([data[20] ^ 0x80]) + data[21:],
        "foreign": b"PK\x03\x04" + data[4:],  # e.g. a plain torch.save zip
        "zeros": b"\0" * n,
    }[how]


DAMAGE = ["empty", "magic-only", "magic-partial", "header-only", "half", "one-byte-short", "padded",
          "flip-payload", "flip-length", "flip-checksum", "foreign", "zeros"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_checkpoint_gives_a_clear_error_and_the_previous_is_kept(how, tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, state(1))
    checkpoint.save(path, state(2))
    prev = checkpoint.previous_path(path)
    path.write_bytes(_damage(path.read_bytes(), how))
    assert not checkpoint.is_intact(path)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(path)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {path}: ")
    assert any(w in msg for w in ("truncated", "corrupt", "not an sgr_ext checkpoint", "checksum")), msg
    assert f"the previous checkpoint {prev} is intact: resume from it with --resume {prev}" in msg
    assert checkpoint.load(prev)["epoch"] == 1


def test_saving_over_a_damaged_checkpoint_keeps_the_good_previous(tmp_path):
    """Resumed from checkpoint.prev.pt after checkpoint.pt was damaged: the next save must not
    rotate the damaged file into checkpoint.prev.pt (a crash right after would lose both)."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, state(1))
    checkpoint.save(path, state(2))
    path.write_bytes(path.read_bytes()[:100])
    checkpoint.save(path, state(3))
    assert checkpoint.load(path)["epoch"] == 3
    assert checkpoint.load(checkpoint.previous_path(path))["epoch"] == 1


def test_damaged_checkpoint_without_an_intact_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, state(1))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(checkpoint.CheckpointError, match="truncated") as info:
        checkpoint.load(path)
    assert "previous" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        checkpoint.load(tmp_path / "missing.pt")


def test_code_in_a_checkpoint_is_never_run(tmp_path):
    """A well-formed header around a malicious pickle: refused by weights_only loading."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"epoch": 1, "x": Evil()})
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(checkpoint.MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- resume


def _weights(out: Path) -> dict:
    return checkpoint.load(out / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference runs, 3 epochs each, without interruption."""
    runs = {}
    for method in ("local", "sgr-fast"):
        out = tmp_path_factory.mktemp(f"full-{method}")
        train(TrainConfig(out=str(out), method=method, epochs=3, optimizer="adamw", schedule="cosine", **TINY))
        runs[method] = out
    return runs


@pytest.mark.parametrize("method", ["local", "sgr-fast"])
def test_crash_mid_epoch_then_resume_reproduces_the_uninterrupted_weights(method, uninterrupted, tmp_path,
                                                                          monkeypatch):
    cfg = dict(method=method, epochs=3, optimizer="adamw", schedule="cosine", **TINY)
    calls = {"n": 0}
    real_step = LocalNet.train_step

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, second step (2 steps per epoch)
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(LocalNet, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path), **cfg))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1  # the last complete epoch survived
    res = train(TrainConfig(out=str(tmp_path), resume="auto", **cfg))
    assert res["complete"] and res["epochs_done"] == 3
    assert_weights_equal(_weights(tmp_path), _weights(uninterrupted[method]))


def test_failed_checkpoint_write_during_training_loses_nothing(uninterrupted, tmp_path, monkeypatch):
    """The disk fills up while epoch 2's checkpoint is written: the run stops, epoch 1's
    checkpoint is intact, and resuming from it gives the uninterrupted run's weights."""
    cfg = dict(method="local", epochs=3, optimizer="adamw", schedule="cosine", **TINY)
    real_save = checkpoint.save
    calls = {"n": 0}

    def failing_save(path, st):
        calls["n"] += 1
        if calls["n"] == 2:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(checkpoint.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left")))
                return real_save(path, st)
        return real_save(path, st)

    monkeypatch.setattr(checkpoint, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(out=str(tmp_path), **cfg))
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert leftovers(tmp_path) == []
    train(TrainConfig(out=str(tmp_path), resume="auto", **cfg))
    assert_weights_equal(_weights(tmp_path), _weights(uninterrupted["local"]))


def test_cli_truncated_checkpoint_then_resume_from_previous(uninterrupted, tmp_path, capsys):
    """The file is cut short after epoch 2: the CLI names it and the intact previous one (one
    line, exit 2); resuming from the previous (epoch 1) reproduces the uninterrupted run."""
    args = ["train", "--arch", "digits_cnn", "--modules", "2", "--method", "local", "--epochs", "3",
            "--batch-size", "32", "--train-subset", "64", "--test-subset", "32", "--lr", "0.05",
            "--optimizer", "adamw", "--schedule", "cosine", "--deterministic", "--no-progress", "--no-plots",
            "--out", str(tmp_path)]
    assert cli.main([*args, "--stop-after", "2"]) == 0
    ckpt, prev = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # killed while copying the file elsewhere, say
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "truncated" in err[0] and f"--resume {prev}" in err[0]
    assert checkpoint.load(prev)["epoch"] == 1
    assert cli.main([*args, "--resume", str(prev)]) == 0
    assert_weights_equal(_weights(tmp_path), _weights(uninterrupted["local"]))
