"""Datasets for ``sgr-ext train``: the embedded digits, ``.npz`` files, CIFAR-10 directories.

Every loader returns a ``sgr_ext.data.TensorDataset``: (N, C, H, W) float32 images
standardised per channel with the training statistics, int64 labels. The whole set
lives in memory (move it to the GPU once with ``.to(device)``); augmentation then runs
on device tensors (``sgr_ext.trainer.augment``).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from sgr_ext.data import TensorDataset, load_digits, normalise

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _to_nchw(name: str, x: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, C, H, W)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{name}: expected images of shape (N, H, W, C), (N, C, H, W) or (N, H, W), got {x.shape}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        return x
    if x.shape[-1] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise ValueError(f"{name}: cannot tell the channel axis of shape {x.shape}; expected 1 or 3 channels")


def _labels(name: str, y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name}: expected {n} labels of shape ({n},), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: expected integer class labels, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{name}: expected labels >= 0, got minimum {y.min()}")
    return y.astype(np.int64)


def from_arrays(name: str, x_train, y_train, x_test, y_test, num_classes: int | None = None) -> TensorDataset:
    """Build a normalised ``TensorDataset`` from image/label arrays (uint8 or float, HWC or CHW)."""
    x_train = _to_nchw("x_train", np.asarray(x_train))
    x_test = _to_nchw("x_test", np.asarray(x_test))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_test: expected images of shape {x_train.shape[1:]} like x_train, got {x_test.shape[1:]}")
    if len(x_train) < 2:
        raise ValueError(f"x_train: expected at least 2 training images, got {len(x_train)}")
    if len(x_test) < 1:
        raise ValueError("x_test: expected at least 1 test image, got none")
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"{key}: expected integer or floating-point pixel values, got dtype {x.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int(np.flatnonzero((~np.isfinite(x.reshape(len(x), -1))).any(axis=1))[0])
            raise ValueError(f"{key}: image {bad} contains NaN or infinite values")
    y_train = _labels("y_train", y_train, len(x_train))
    y_test = _labels("y_test", y_test, len(x_test))
    classes = int(max(y_train.max(), y_test.max() if len(y_test) else 0)) + 1
    if num_classes is not None:
        if classes > num_classes:
            raise ValueError(f"labels: expected classes in [0, {num_classes}), got a label {classes - 1}")
        classes = num_classes
    xt, xs = normalise(x_train.astype(np.float32), x_test.astype(np.float32))
    return TensorDataset(name, xt, torch.as_tensor(y_train), xs, torch.as_tensor(y_test), classes)


def load_npz(path) -> TensorDataset:
    """An ``.npz`` with x_train, y_train, x_test, y_test (e.g. ``cifar10_subset.npz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: no such file: {path}")
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy, then as a pickle
        raise ValueError(f"--data {path}: not a NumPy .npz archive (expected a file written by numpy.savez "
                         f"with arrays {list(NPZ_KEYS)})")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            arrays = {k: z[k] for k in NPZ_KEYS if k in files}
    except ValueError as exc:  # object arrays: loading them would run pickled code
        raise ValueError(f"--data {path}: holds object (pickled) arrays, which are never loaded; expected "
                         f"numeric arrays {list(NPZ_KEYS)} ({exc.__class__.__name__})") from None
    except Exception as exc:  # zipfile.BadZipFile, OSError, EOFError ...
        raise ValueError(f"--data {path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    missing = [k for k in NPZ_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"--data {path}: missing arrays {missing}; expected {list(NPZ_KEYS)}, found {files}")
    return from_arrays(path.stem, *(arrays[k] for k in NPZ_KEYS))


CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def is_cifar_dir(root: Path) -> bool:
    return all((root / "cifar-10-batches-py" / f).is_file() for f in CIFAR_FILES)


def cifar10_splits(root: Path):
    """torchvision's CIFAR10 train and test sets of ``root`` (holding cifar-10-batches-py/), never downloaded."""
    from torchvision.datasets import CIFAR10

    try:
        return CIFAR10(str(root), train=True, download=False), CIFAR10(str(root), train=False, download=False)
    except RuntimeError:  # torchvision's checksum test failed (its message suggests download=True)
        raise ValueError(f"--data {root}: the CIFAR-10 batches in cifar-10-batches-py/ fail their checksums "
                         "(damaged or not CIFAR-10's python version); extract the archive again") from None


def load_cifar10_dir(root) -> TensorDataset:
    """CIFAR-10 python batches via ``torchvision.datasets.CIFAR10(root, download=False)``.

    ``root`` is the directory holding ``cifar-10-batches-py`` (or that folder itself).
    """
    root = Path(root)
    if root.name == "cifar-10-batches-py":
        root = root.parent
    train, test = cifar10_splits(root)
    return from_arrays("cifar10", train.data, np.asarray(train.targets), test.data, np.asarray(test.targets), 10)


def load_dataset(spec: str = "digits", *, loader: str = "auto", image_size=None, workers=None):
    """``"digits"`` (embedded), a path to an ``.npz``, or an image directory (CIFAR-10 python
    batches or an ImageFolder tree, ``sgr_ext.trainer.streaming``).

    Returns a ``TensorDataset``, or for a directory too large for memory (or ``loader="stream"``)
    a ``streaming.ImageSource``; ``image_size`` and ``workers`` apply to directories only.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--data: expected 'digits', an .npz path or an image directory, got {spec!r}")
    if spec == "digits":
        return load_digits()
    path = Path(spec).expanduser()
    if path.is_dir():
        from sgr_ext.trainer import streaming

        return streaming.load_image_dir(path, loader, image_size, workers)
    if path.suffix == ".npz" or path.is_file():
        return load_npz(path)
    raise FileNotFoundError(f"--data: no such file or directory: {spec}")


def subset(data: TensorDataset, train: int | None = None, test: int | None = None) -> TensorDataset:
    """The first ``train`` training and ``test`` test examples (None keeps all)."""
    def cut(n, limit):
        return n if limit is None else min(n, limit)

    nt, ns = cut(len(data.x_train), train), cut(len(data.x_test), test)
    return TensorDataset(data.name, data.x_train[:nt], data.y_train[:nt], data.x_test[:ns], data.y_test[:ns], data.num_classes)


def match_channels(data: TensorDataset, channels: int) -> TensorDataset:
    """Repeat a single-channel set to ``channels`` (e.g. gray digits for an RGB model)."""
    have = data.x_train.shape[1]
    if have == channels:
        return data
    if have != 1:
        raise ValueError(f"--arch: the model expects {channels}-channel images, the data has {have} channels")
    rep = lambda x: x.expand(-1, channels, -1, -1).contiguous()  # noqa: E731
    return TensorDataset(data.name, rep(data.x_train), data.y_train, rep(data.x_test), data.y_test, data.num_classes)
