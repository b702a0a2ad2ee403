"""Datasets as in-memory tensors: the embedded demo set and ``.npz`` files."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TensorDataset:
    """A train/test split held in memory.

    x_train: (N, C, H, W) float32, normalised per channel with the training statistics.
    y_train: (N,) int64 in [0, num_classes). Same for the test split.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def to(self, device) -> "TensorDataset":
        return TensorDataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.num_classes,
        )


def normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) arrays -> float32 tensors standardised per channel with training statistics."""
    xt = torch.as_tensor(x_train, dtype=torch.float32)
    xs = torch.as_tensor(x_test, dtype=torch.float32)
    mean = xt.mean(dim=(0, 2, 3), keepdim=True)
    std = xt.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (xt - mean) / std, (xs - mean) / std


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """The 1,797 real 8x8 handwritten digits that ship with scikit-learn (UCI optdigits), offline.

    A stratified split: 1437 train / 360 test images of shape (1, 8, 8), 10 classes.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None]  # (N, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    xt, xs = normalise(x_tr, x_te)
    return TensorDataset("sklearn-digits-8x8", xt, torch.as_tensor(y_tr), xs, torch.as_tensor(y_te), 10)
