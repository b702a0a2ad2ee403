"""Crash-safe training checkpoints.

File layout: an 8-byte magic, the payload length (8 bytes, little endian), the payload's
SHA-256 (32 bytes), then the payload: a ``torch.save`` archive. ``load`` verifies length
and checksum before unpickling (with ``weights_only=True``), so a truncated or corrupted
file is reported as such, naming the file, instead of surfacing as an unpickling error.

``save`` writes to a temporary file in the same directory, fsyncs it, keeps the current
checkpoint as ``<name>.prev<suffix>`` and moves the new one in place with ``os.replace``:
at every moment a complete checkpoint exists, and an interrupted write leaves the last
good one untouched.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

MAGIC = b"SGRCKPT\x01"
_HEADER = len(MAGIC) + 8 + 32


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, or from another configuration."""


def previous_path(path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save(path, state: dict) -> Path:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if path.exists() and is_intact(path):  # a damaged current file never replaces a good previous one
            prev = previous_path(path)
            link = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
            try:
                if link.exists():
                    link.unlink()
                try:
                    os.link(path, link)  # the current file stays in place until the new one replaces it
                except OSError:  # no hard links on this filesystem: copy (never move it away)
                    shutil.copyfile(path, link)
                os.replace(link, prev)
            finally:
                if link.exists():
                    link.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _check(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    data = path.read_bytes()
    if len(data) < _HEADER or not data.startswith(MAGIC):
        if len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise CheckpointError(f"checkpoint {path}: truncated ({len(data)} bytes, no complete header)")
        raise CheckpointError(f"checkpoint {path}: not an sgr_ext checkpoint (bad header) or truncated")
    size = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "little")
    payload = data[_HEADER:]
    if len(payload) != size:
        raise CheckpointError(
            f"checkpoint {path}: truncated or padded ({len(payload)} payload bytes, header says {size})"
        )
    if hashlib.sha256(payload).digest() != data[len(MAGIC) + 8 : _HEADER]:
        raise CheckpointError(f"checkpoint {path}: corrupt (SHA-256 checksum mismatch)")
    return payload


def _load(path: Path, map_location) -> dict:
    payload = _check(path)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {first})") from None


def is_intact(path) -> bool:
    """Whether ``path`` is a complete checkpoint with a matching checksum (not unpickled)."""
    try:
        _check(Path(path))
        return True
    except (CheckpointError, FileNotFoundError):
        return False


def load(path, *, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save``; ``CheckpointError`` names the file if it is damaged.

    When the damaged file has an intact predecessor (``<name>.prev<suffix>``), the message
    says so and how to resume from it.
    """
    path = Path(path)
    try:
        return _load(path, map_location)
    except CheckpointError as exc:
        prev = previous_path(path)
        if prev != path and is_intact(prev):
            raise CheckpointError(f"{exc}; the previous checkpoint {prev} is intact: resume from it with --resume {prev}") from None
        raise


# RNG states --------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, NumPy, torch CPU and all CUDA generator states, as weights_only-loadable objects."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
