"""Device, seeds, determinism, optimizer, schedule and batch bounds of a training run."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from typing import Optional

import numpy as np
import torch

from sgr_ext.trainer.config import TrainConfig


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected e.g. 'cpu', 'cuda' or 'cuda:1', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was requested but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return device


def derived_seed(seed: int, *tags) -> int:
    """A 63-bit seed for (seed, tags...), independent across tags (data order, augmentation)."""
    digest = hashlib.sha256(":".join(str(t) for t in (seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Deterministic kernels (and cuBLAS workspace config) for the duration of a run."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    # warn_only: a few CUDA backward kernels (e.g. adaptive average pooling) have no
    # deterministic implementation; they warn instead of failing. On CPU every op used is
    # deterministic and a resumed run is bit-identical.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def _make_scheduler(cfg: TrainConfig, opt, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps,
                                                   cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _batches(n: int, batch_size: int, min_last: int = 2) -> list[tuple[int, int]]:
    """(start, stop) of each batch; a trailing batch of fewer than ``min_last`` samples joins
    the previous one (BatchNorm cannot train on a batch of one; under data or module
    parallelism ``min_last`` keeps every shard or micro-batch at two samples or more)."""
    bounds = [(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last:
        bounds[-2] = (bounds[-2][0], n)
        bounds.pop()
    return bounds
