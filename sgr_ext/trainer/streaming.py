"""Image directories for ``sgr-ext train --data DIR``: streamed through a DataLoader, or loaded whole when small.

Two layouts are read (nothing is ever downloaded):

- an ``ImageFolder`` tree: ``DIR/train/<class>/<image>`` and ``DIR/test/<class>/<image>``
  (or ``DIR/val/...``), any format PIL opens; classes are the sorted ``train`` subfolders;
- CIFAR-10's python batches: ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch}``.

``ImageSource`` decodes, resizes (shorter side, then a centre crop to ``size`` x ``size``) and
standardises images in the DataLoader's worker processes; random crop and flip then run on
the device, on the batch, as for in-memory data (``sgr_ext.trainer.augment``).
``batches(index_lists)`` reads exactly the given index lists, in order, so a streamed epoch
visits the same samples in the same order as the in-memory path would (and ``--resume``
continues it). Per-channel mean and std come from a fixed sample of training images.
``load_image_dir`` chooses: sets whose decoded float32 images fit in ``IN_MEMORY_LIMIT``
bytes are loaded whole (the in-memory path, standardised with the whole training split's
statistics like every in-memory set); larger ones stream.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from sgr_ext.data import TensorDataset
from sgr_ext.trainer.config import LOADERS
from sgr_ext.trainer.data import cifar10_splits, from_arrays, is_cifar_dir, load_cifar10_dir

IN_MEMORY_LIMIT = 2 << 30  # bytes of decoded float32 train + test images
STATS_SAMPLES = 512  # training images that set the per-channel mean and std
LAYOUTS = ("an ImageFolder tree DIR/train/<class>/<image> with DIR/test/<class>/<image> (or DIR/val/...), "
           "or CIFAR-10's python batches DIR/cifar-10-batches-py/ with data_batch_1 ... data_batch_5 and "
           "test_batch (extracted; nothing is downloaded)")


class _Standardised(torch.utils.data.Dataset):
    """(image, label) of a torchvision dataset -> ((C, S, S) float32 standardised tensor, label)."""

    def __init__(self, base, size: int, mean: Optional[torch.Tensor], std: Optional[torch.Tensor]):
        from torchvision import transforms

        self.base = base
        self.mean, self.std = mean, std
        self.transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                             transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        x = self.transform(image.convert("RGB")).float()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, label


class ImageSource:
    """The train and test splits of an image directory, read through DataLoaders.

    name: the directory's name.  num_classes: classes of the train split.  shape: (3, S, S)
    of every image after resizing.  train_len / test_len: images per split.
    """

    def __init__(self, name: str, train, test, num_classes: int, size: int, workers: int):
        self.name = name
        self.num_classes = num_classes
        self.shape = (3, size, size)
        self.workers = workers
        self._raw = {"train": train, "test": test}
        self._standardised: Optional[dict] = None

    @property
    def train_len(self) -> int:
        return len(self._raw["train"])

    @property
    def test_len(self) -> int:
        return len(self._raw["test"])

    def decoded_bytes(self) -> int:
        """float32 bytes of every image of both splits once decoded."""
        return (self.train_len + self.test_len) * int(np.prod(self.shape)) * 4

    def _datasets(self) -> dict:
        if self._standardised is None:  # per-channel statistics of a fixed sample of training images
            raw = _Standardised(self._raw["train"], self.shape[-1], None, None)
            picks = torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))[:STATS_SAMPLES].tolist()
            x = torch.stack([raw[i][0] for i in picks])
            mean = x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
            std = x.std(dim=(0, 2, 3)).clamp_min(1e-6).view(-1, 1, 1)
            self._standardised = {k: _Standardised(d, self.shape[-1], mean, std) for k, d in self._raw.items()}
        return self._standardised

    def batches(self, split: str, index_lists: Iterable[Sequence[int]], pin_memory: bool = False) -> Iterator:
        """(x (b, C, S, S) float32 standardised, y (b,) int64) CPU batches of ``split``
        ("train"/"test"), one per index list, in order; decoding runs in ``workers`` processes."""
        return _load(self._datasets()[split], index_lists, self.workers, pin_memory)

    def to_memory(self) -> TensorDataset:
        """Every image decoded and standardised with the whole training split's statistics."""
        def whole(split: str):
            raw = _Standardised(self._raw[split], self.shape[-1], None, None)
            n = len(raw)
            parts = list(_load(raw, [range(i, min(n, i + 256)) for i in range(0, n, 256)], self.workers, False))
            return torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()

        (xt, yt), (xs, ys) = whole("train"), whole("test")
        return from_arrays(self.name, xt, yt, xs, ys, self.num_classes)


def _load(dataset, index_lists, workers: int, pin_memory: bool) -> Iterator:
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(ix) for ix in index_lists],
                                         num_workers=workers, pin_memory=pin_memory)
    for x, y in loader:
        yield x, y.long()


def open_image_dir(root, image_size: Optional[int] = None, workers: Optional[int] = None) -> ImageSource:
    """An ``ImageSource`` for ``root`` (layouts in the module docstring).

    image_size: side S the images are resized to (default: the first training image's shorter side).
    workers: DataLoader worker processes (default: up to 8, one fewer than the CPUs).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if root.name == "cifar-10-batches-py":
        root = root.parent
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    if is_cifar_dir(root):
        train, test = cifar10_splits(root)
        return ImageSource("cifar10", train, test, 10, image_size or 32, workers)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"--data {root}: expected {LAYOUTS}")
    try:
        train, test = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
    except (FileNotFoundError, RuntimeError) as exc:  # a class folder without images
        raise FileNotFoundError(f"--data {root}: {exc}; expected {LAYOUTS}") from None
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise ValueError(f"--data {root}: {test_dir.name}/ has classes {unknown} that train/ does not have")
    # test labels by the train split's class indices (test/ may lack some classes)
    test.samples = [(path, train.class_to_idx[test.classes[c]]) for path, c in test.samples]
    test.targets = [c for _, c in test.samples]
    if len(train) < 2:
        raise ValueError(f"--data {root}: expected at least 2 training images, got {len(train)}")
    size = image_size or min(train[0][0].size)
    return ImageSource(root.name, train, test, len(train.classes), size, workers)


def load_image_dir(root, loader: str = "auto", image_size: Optional[int] = None, workers: Optional[int] = None):
    """``TensorDataset`` (loaded whole) or ``ImageSource`` (streamed) for an image directory.

    loader: "auto" (whole when the decoded float32 images fit in ``IN_MEMORY_LIMIT`` bytes),
    "memory" or "stream".
    """
    if loader not in LOADERS:
        raise ValueError(f"--loader: expected one of {LOADERS}, got {loader!r}")
    if loader != "stream" and image_size in (None, 32) and is_cifar_dir(Path(root)):
        return load_cifar10_dir(root)  # 0.7 GB decoded: whole, straight from the arrays
    source = open_image_dir(root, image_size, workers)
    if loader == "stream" or (loader == "auto" and source.decoded_bytes() > IN_MEMORY_LIMIT):
        return source
    return source.to_memory()
