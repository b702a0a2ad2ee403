"""One training run of the study: data split, model, optimizer, the loop, and what is recorded.

Validation is carved from the training set (a fixed permutation, the same for every run);
hyper-parameters are chosen on it. The test split is evaluated once, at the end, and only
reported.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import sgr_ext
from sgr_ext.trainer.augment import random_crop_flip

from .models import build
from .variants import Variant

SPLIT_SEED = 12345  # the validation split; fixed so every run sees the same one


@dataclass
class Data:
    x_train: torch.Tensor  # (N, 3, S, S) float32, normalised with the train part's statistics
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


_DATA: dict = {}


def load(path: str, image_size: int, val_fraction: float) -> Data:
    """The .npz (uint8 HWC x_train/y_train/x_test/y_test), split, area-downsampled to
    ``image_size`` and normalised; cached per process."""
    key = (str(path), image_size, val_fraction)
    if key in _DATA:
        return _DATA[key]
    with np.load(path, allow_pickle=False) as z:
        xtr, ytr, xte, yte = (z[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(xtr))
    n_val = int(round(val_fraction * len(xtr)))
    val, tr = perm[:n_val], perm[n_val:]

    def prep(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        if t.shape[-1] != image_size:
            t = F.adaptive_avg_pool2d(t, image_size)
        return t

    x_tr, x_val, x_te = prep(xtr[tr]), prep(xtr[val]), prep(xte)
    mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
    std = x_tr.std(dim=(0, 2, 3), keepdim=True)
    norm = lambda t: ((t - mean) / std).contiguous()  # noqa: E731
    data = Data(norm(x_tr), torch.from_numpy(ytr[tr]).long(), norm(x_val), torch.from_numpy(ytr[val]).long(),
                norm(x_te), torch.from_numpy(yte).long())
    _DATA[key] = data
    return data


def lam_at(v: Variant, progress: float) -> float:
    """The strength at ``progress`` in [0, 1) of training under the variant's schedule."""
    if v.schedule == "warm":
        return v.lam * min(1.0, progress * 3.0)
    if v.schedule == "late":
        return v.lam if progress >= 0.5 else 0.0
    return v.lam


@torch.no_grad()
def accuracy(model, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def _mean_rows(rows: list) -> list:
    """Per block, the mean over steps of the non-None values (None where there are none)."""
    if not rows:
        return []
    out = []
    for k in range(len(rows[0])):
        vals = [r[k] for r in rows if r[k] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def train(arch: str, v: Variant, seed: int, profile, data_path: str,
          log: Optional[Callable[[str], None]] = None) -> dict:
    """Train one (arch, variant, seed) and return its record (accuracies, alignment, penalty
    share, time)."""
    data = load(data_path, profile.image_size, profile.val_fraction)
    if profile.train_limit is not None:
        data = dataclasses.replace(data, x_train=data.x_train[:profile.train_limit],
                                   y_train=data.y_train[:profile.train_limit])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = Data(*(t.to(dev) for t in dataclasses.astuple(data)))
    torch.manual_seed(seed)
    model = build(arch).to(dev)
    net = None
    if v.method != "bp":
        blocks = sgr_ext.split(model, v.K, example_input=data.x_train[:2])
        net = sgr_ext.LocalNet(blocks, lam=lam_at(v, 0.0), distance=v.distance, lam_mode=v.lam_mode, mode=profile.mode,
                               side=v.side)
    params = list(net.parameters() if net is not None else model.parameters())
    opt = torch.optim.SGD(params, lr=profile.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    n = len(data.x_train)
    steps_per_epoch = n // profile.batch_size  # drop the ragged last batch (BatchNorm on tiny batches)
    total = steps_per_epoch * profile.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=profile.lr, total_steps=total)
    gen = torch.Generator().manual_seed(seed + 1)  # the epoch order, on the CPU
    # crops and flips: on a GPU a generator there; on the CPU the same one (the recorded CPU runs used it)
    aug = gen if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed + 2)
    pad = max(1, profile.image_size // 8)
    curve, cos_rows, share_rows, early_share = [], [], [], None
    t0 = time.perf_counter()
    step = 0
    for epoch in range(profile.epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        last, second = epoch == profile.epochs - 1, epoch == 1
        if net is not None:  # alignment and share measured in the 2nd and the last epoch only (they cost)
            net.config = dataclasses.replace(net.config, track_alignment=last or second,
                                             track_share=(last or second) and v.method == "sgr" and v.side == "input")
        losses = []
        epoch_shares = []
        for i in range(steps_per_epoch):
            idx = order[i * profile.batch_size:(i + 1) * profile.batch_size]
            x = random_crop_flip(data.x_train[idx], padding=pad, generator=aug)
            y = data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            if net is None:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                losses.append(float(loss))
            else:
                net.config = dataclasses.replace(net.config, lam=lam_at(v, step / total))
                st = net.train_step(x, y)
                losses.append(st.losses[-1])
                if last:
                    cos_rows.append(st.cosines)
                    share_rows.append(st.penalty_shares)
                if second:
                    epoch_shares.append(st.penalty_shares)
            if not math.isfinite(torch.stack([p.grad.abs().sum() for p in params if p.grad is not None]).sum()):
                raise FloatingPointError(f"{v.name} seed {seed}: non-finite gradient at step {step}")
            opt.step()
            sched.step()
            step += 1
        if second:
            early_share = _mean_rows(epoch_shares)
        val = accuracy(net if net is not None else model, data.x_val, data.y_val)
        curve.append(val)
        if log is not None:
            el = time.perf_counter() - t0
            eta = el / (epoch + 1) * (profile.epochs - epoch - 1)
            log(f"{v.name} s{seed} epoch {epoch + 1}/{profile.epochs} loss {np.mean(losses):.3f} "
                f"val {100 * val:.1f}% ({el / (epoch + 1):.0f} s/epoch, run ETA {eta:.0f} s)")
    target = net if net is not None else model
    return {
        "arch": arch, "variant": v.as_dict(), "name": v.name, "seed": seed,
        "val_acc": curve[-1], "test_acc": accuracy(target, data.x_test, data.y_test), "val_curve": curve,
        "cosines": _mean_rows(cos_rows), "penalty_shares": _mean_rows(share_rows),
        "penalty_shares_epoch2": early_share, "train_loss_last": float(np.mean(losses)),
        "wall_s": time.perf_counter() - t0, "steps": total,
        "env": {"torch": torch.__version__, "sgr_ext": getattr(sgr_ext, "__version__", "?"),
                "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                "threads": torch.get_num_threads(), "machine": platform.machine()},
    }


def cache_path(out: Path, arch: str, v: Variant, seed: int) -> Path:
    return out / "runs" / arch / f"{v.name}-s{seed}.json"
