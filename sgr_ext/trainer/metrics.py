"""Per-epoch / per-step metric files (CSV + JSON) and PNG plots of a training run."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

LIST_FIELDS = {
    # per-epoch list field -> CSV column prefix; index k is block k (0-based)
    "block_train_loss": "train_loss_block",
    "block_penalty": "penalty_block",
    "block_test_acc": "test_acc_block",
    "block_train_acc": "train_acc_block",
    "cosine": "cos_block",
    "norm_ratio": "norm_ratio_block",
    "penalty_share": "penalty_share_block",  # ||lam_k grad R_k|| / ||grad l_k|| (StepStats.penalty_shares)
}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path, obj) -> None:
    _atomic_write_text(Path(path), json.dumps(_clean(obj), indent=2) + "\n")


def flatten(record: dict) -> dict:
    """A per-epoch record with list fields spread over ``<prefix><k>`` columns."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            prefix = LIST_FIELDS.get(key, key + "_")
            for k, v in enumerate(value):
                flat[f"{prefix}{k}"] = v
        else:
            flat[key] = value
    return flat


def write_csv(path, rows: Iterable[dict]) -> None:
    rows = [flatten(r) for r in rows]
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    os.replace(tmp, path)


def write_run_files(out: Path, history: Sequence[dict], steps: Sequence[dict]) -> None:
    """metrics.csv, metrics.json (per epoch) and steps.csv (sampled steps) in ``out``."""
    write_csv(out / "metrics.csv", history)
    write_json(out / "metrics.json", list(history))
    if steps:
        write_csv(out / "steps.csv", steps)


# Plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: Sequence[dict], key: str, k: int) -> list[Optional[float]]:
    out = []
    for r in rows:
        v = r.get(key)
        out.append(v[k] if isinstance(v, (list, tuple)) and k < len(v) else None)
    return out


def _plot_masked(ax, xs, ys, **kw):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        return True
    return False


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(1, n - 1)) for i in range(n)]


def plot_learning_curves(history: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """Train loss, test accuracy and every block's aux-head test accuracy per epoch."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    _plot_masked(ax, epochs, [r.get("train_loss") for r in history], label="train loss (last block)")
    n_blocks = max((len(r.get("block_train_loss") or []) for r in history), default=0)
    for k, c in zip(range(n_blocks - 1), _colors(max(1, n_blocks - 1))):
        _plot_masked(ax, epochs, _series(history, "block_train_loss", k), color=c, alpha=0.5, lw=1,
                     label=f"block {k + 1}" if k in (0, n_blocks - 2) else None)
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    ax.legend(fontsize=7)
    ax = axes[1]
    _plot_masked(ax, epochs, [r.get("test_acc") for r in history], marker="o", ms=3, label="test")
    _plot_masked(ax, epochs, [r.get("train_acc") for r in history], ls="--", label="train (running mean)")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax.legend(fontsize=7)
    ax = axes[2]
    n_acc = max((len(r.get("block_test_acc") or []) for r in history), default=0)
    for k, c in zip(range(n_acc), _colors(n_acc)):
        _plot_masked(ax, epochs, _series(history, "block_test_acc", k), color=c, label=f"block {k + 1}")
    ax.set(xlabel="epoch", ylabel="test accuracy", title="aux-head test accuracy per block")
    if n_acc:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "global BP: no aux heads", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_diagnostics(history: Sequence[dict], steps: Sequence[dict], path, title: str = "") -> Optional[Path]:
    """cos(A_k, D_{k-1}) and |A_k|/|D_{k-1}| per boundary over training (sampled steps), and the penalty."""
    rows = steps if steps else history
    if not rows:
        return None
    xkey = "step" if steps else "epoch"
    n = max((len(r.get("cosine") or []) for r in rows), default=0)
    if n < 2 or all(v is None for r in rows for v in (r.get("cosine") or [])):
        return None
    plt = _pyplot()
    xs = [r[xkey] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = _colors(n - 1)
    for k in range(1, n):
        c = colors[k - 1]
        lab = f"boundary {k}|{k + 1}"
        _plot_masked(axes[0], xs, _series(rows, "cosine", k), color=c, lw=1, label=lab)
        _plot_masked(axes[1], xs, _series(rows, "norm_ratio", k), color=c, lw=1, label=lab)
        _plot_masked(axes[2], xs, _series(rows, "block_penalty", k), color=c, lw=1, label=lab)
    axes[0].axhline(0.0, color="gray", lw=0.5)
    axes[0].set(xlabel=xkey, ylabel="cosine", title="cos(A_k, D_{k-1})")
    axes[1].axhline(1.0, color="gray", lw=0.5)
    axes[1].set(xlabel=xkey, ylabel="|A_k| / |D_{k-1}|", title="norm ratio", yscale="log")
    axes[2].set(xlabel=xkey, ylabel="R_k", title="SGR penalty R_k")
    if any(v for r in rows for v in (r.get("block_penalty") or [])[1:] if v):
        axes[2].set_yscale("log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0] and n <= 17:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
