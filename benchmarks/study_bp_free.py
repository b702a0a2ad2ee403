"""BP-free local learning (forward gradients, activity perturbation) with and without SGR,
next to module-local backprop and global backprop, on the real CIFAR-10 subset.

Model: a 4-stage CNN, stage k = conv3x3 (stride 2 in stage 1) - GroupNorm without affine
parameters - ReLU [- maxpool], widths 32/64/128/128, global pool + linear classifier; the
same for every method. Local methods cut it into K = 4 blocks, one stage each, with a light
auxiliary head (2x2 average pool, linear) on blocks 1-3; the last block's head is the
model's classifier. GroupNorm, not BatchNorm: the per-sample forward-gradient estimator is
unbiased only when samples do not interact inside a block (see sgr_ext.engine.forward_grad);
no affine parameters, so the norm adds no perturbed activations (less estimator variance).

Methods (Adam + one-cycle, peak lr 2e-3, batch 128, random flips, the same epochs for all):
  global_bp     end-to-end backprop
  local_bp      LocalNet(grad="backward", lam=0): module-local backprop (DGL-style greedy)
  bp_free       LocalNet(grad="forward", lam=0, num_tangents=4): no backward pass through layers
  bp_free_sgr   LocalNet(grad="forward", lam=0.5, num_tangents=4): + SGR, forward-gradient A_k, D_k
lambda = 0.5: at initialisation the exact penalty-gradient norm is 0.2-0.3 x the local-loss
gradient norm at lambda = 1 (measured on this model), so 0.5 makes it a visible but minor
part of J_k; it is not tuned.
Per method and seed: final test accuracy (classifier; and every head, for local methods);
median time per training step (CUDA-synchronised
wall clock, forward + gradients + optimizer step); peak memory of one step
(max_memory_allocated - memory_allocated before it, DESIGN.md section 5).

If the calibrated projection exceeds --budget-s, the epoch count is scaled down for ALL
methods (written into the results). Outputs in --out: bp_free.json, bp_free.md, bp_free.png.

GPU (one H100, < 4 min):
  python benchmarks/study_bp_free.py --data .data/cifar10_subset.npz --out benchmarks/results/bp_free
CPU smoke test (~1 min):
  python benchmarks/study_bp_free.py --quick --out /tmp/bp_free_quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import LocalBlock, LocalNet

METHODS = ("global_bp", "local_bp", "bp_free", "bp_free_sgr")
LABELS = {"global_bp": "global BP", "local_bp": "local BP (K=4)", "bp_free": "BP-free local (K=4)",
          "bp_free_sgr": "BP-free local + SGR (K=4)"}
DATA_CANDIDATES = (".data/cifar10_subset.npz", "/work/main/.data/cifar10_subset.npz",
                   "/work/shared/data/cifar10_subset.npz")


# ----------------------------------------------------------------------------- data


def load_data(path: str | None, device, quick: bool):
    candidates = [path] if path else list(DATA_CANDIDATES)
    for p in candidates:
        if p and Path(p).is_file():
            z = np.load(p)
            xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
            break
    else:
        raise FileNotFoundError(f"no CIFAR-10 subset found (tried {candidates}); pass --data")
    if quick:
        xtr, ytr, xte, yte = xtr[:512], ytr[:512], xte[:256], yte[:256]

    def chw(x):
        return torch.as_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), dtype=torch.float32) / 255.0

    xtr, xte = chw(xtr), chw(xte)
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    as_long = lambda y: torch.as_tensor(np.asarray(y).reshape(-1), dtype=torch.int64)  # noqa: E731
    return xtr.to(device), as_long(ytr).to(device), xte.to(device), as_long(yte).to(device), str(p)


# ---------------------------------------------------------------------------- model


def make_model(widths=(32, 64, 128, 128), num_classes=10, groups=8):
    """(stages, classifier): stage k = conv3x3 (stride 2 for k = 0) - GroupNorm without affine
    parameters - ReLU (- maxpool for k < 3). 32x32 inputs give 16, 8, 4, 2 pixels per side."""
    stages, cin = [], 3
    for k, w in enumerate(widths):
        layers = [nn.Conv2d(cin, w, 3, stride=2 if k == 0 else 1, padding=1),
                  nn.GroupNorm(min(groups, w), w, affine=False), nn.ReLU()]
        if k < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        stages.append(nn.Sequential(*layers))
        cin = w
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return stages, classifier


def light_head(channels: int, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, num_classes))


def build(method: str, widths, lam: float, num_tangents: int, device):
    stages, classifier = make_model(widths)
    if method == "global_bp":
        return nn.Sequential(*stages, classifier).to(device)
    heads = [light_head(w) for w in widths[:-1]] + [classifier]
    blocks = [LocalBlock(s, h) for s, h in zip(stages, heads)]
    grad = "backward" if method == "local_bp" else "forward"
    return LocalNet(blocks, lam=lam if method == "bp_free_sgr" else 0.0, grad=grad,
                    num_tangents=num_tangents).to(device)


# ---------------------------------------------------------------------------- train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, x, y, opt):
    opt.zero_grad(set_to_none=True)
    if isinstance(model, LocalNet):
        stats = model.train_step(x, y)
        loss = stats.losses[-1]
    else:
        loss_t = F.cross_entropy(model(x), y)
        loss_t.backward()
        loss = loss_t.item()
    opt.step()
    return loss


@torch.no_grad()
def evaluate(model, x, y, batch=1000):
    """Test accuracy of the model's classifier, and (LocalNet) of every block's head on its x_k."""
    model.eval()
    heads = len(model.blocks) if isinstance(model, LocalNet) else 1
    correct = [0] * heads
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if isinstance(model, LocalNet):
            for k, block in enumerate(model.blocks):
                xb = block(xb)
                correct[k] += int((block.head(xb).argmax(1) == yb).sum())
        else:
            correct[0] += int((model(xb).argmax(1) == yb).sum())
    model.train()
    accs = [c / x.shape[0] for c in correct]
    return accs[-1], accs


def augment(x, gen):
    flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def run(method, seed, epochs, args, data, device, measure_steps=30):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    model = build(method, args.widths, args.lam, args.num_tangents, device)
    lr = args.lr_bp_free if method.startswith("bp_free") else args.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = xtr.shape[0] // args.batch
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    step_ms, peaks, history, losses = [], [], [], []
    t_start = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(xtr.shape[0], device=device, generator=gen)
        ep_loss = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch:(i + 1) * args.batch]
            x, y = augment(xtr[idx], gen), ytr[idx]
            timed = step >= 3 and len(step_ms) < measure_steps
            if timed:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
            loss = train_step(model, x, y, opt)
            if timed:
                sync(device)
                step_ms.append((time.perf_counter() - t0) * 1e3)
                if device.type == "cuda":
                    peaks.append((torch.cuda.max_memory_allocated() - before) / 2**20)
            sched.step()
            ep_loss.append(loss)
            step += 1
        if not all(math.isfinite(v) for v in ep_loss):
            history.append({"epoch": epoch + 1, "train_loss": float("nan"), "test_acc": float("nan")})
            break
        losses.append(statistics.fmean(ep_loss))
        acc, head_accs = evaluate(model, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": losses[-1], "test_acc": acc, "head_test_acc": head_accs})
    return {
        "method": method, "seed": seed, "epochs": epochs, "lr": lr,
        "test_acc": history[-1]["test_acc"] if history else float("nan"),
        "head_test_acc": history[-1].get("head_test_acc") if history else None,
        "step_ms_median": statistics.median(step_ms) if step_ms else float("nan"),
        "step_ms_p10": float(np.percentile(step_ms, 10)) if step_ms else float("nan"),
        "step_ms_p90": float(np.percentile(step_ms, 90)) if step_ms else float("nan"),
        "peak_mib": max(peaks) if peaks else None,
        "wall_s": time.perf_counter() - t_start,
        "history": history,
    }


def calibrate(method, args, data, device, steps=8):
    """Median seconds per step of ``method`` over a few steps (after 3 warm-up steps)."""
    xtr, ytr = data[0], data[1]
    torch.manual_seed(0)
    model = build(method, args.widths, args.lam, args.num_tangents, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(3 + steps):
        x, y = xtr[i * args.batch % xtr.shape[0]:][:args.batch], ytr[i * args.batch % xtr.shape[0]:][:args.batch]
        sync(device)
        t0 = time.perf_counter()
        train_step(model, x, y, opt)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- report


def summarize(results):
    rows = {}
    for m in METHODS:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        peaks = [r["peak_mib"] for r in rs if r["peak_mib"] is not None]
        rows[m] = {
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accs": accs, "step_ms": statistics.median(r["step_ms_median"] for r in rs),
            "best_head_acc_mean": statistics.fmean(max(r["head_test_acc"] or [r["test_acc"]]) for r in rs),
            "head_acc_mean": [statistics.fmean(h) for h in zip(*[r["head_test_acc"] for r in rs])]
            if all(r["head_test_acc"] for r in rs) else None,
            "peak_mib": statistics.median(peaks) if peaks else None, "epochs": rs[0]["epochs"],
        }
    return rows


def write_markdown(path, rows, meta):
    lines = [
        f"# BP-free local learning on the CIFAR-10 subset ({meta['device']})",
        "",
        f"{meta['n_train']} train / {meta['n_test']} test images; 4-stage CNN (GroupNorm), K = 4 for the local "
        f"methods; Adam + one-cycle, batch {meta['batch']}, {meta['epochs']} epochs, seeds {meta['seeds']}; "
        f"BP-free: num_tangents = {meta['num_tangents']}, per-sample tangents; SGR lambda = {meta['lam']}.",
        "Test accuracy: the model's classifier (the last block's head). Heads 1..K: each block's own "
        "head on its output x_k, test set (local methods).",
        "Time: median wall-clock of one training step (forward, gradients, optimizer; CUDA-synchronised). "
        "Peak memory: max_memory_allocated during one step minus memory allocated before it.",
        "",
        "| method | test accuracy (mean ± std) | per seed | heads 1..K (mean) | time / step (ms) | "
        "peak memory / step (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        seeds = ", ".join(f"{100 * a:.1f}" for a in r["accs"])
        peak = "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        heads = "-" if not r["head_acc_mean"] or len(r["head_acc_mean"]) < 2 else \
            " / ".join(f"{100 * a:.1f}" for a in r["head_acc_mean"])
        lines.append(f"| {LABELS[m]} | {100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f} % | {seeds} | {heads} | "
                     f"{r['step_ms']:.2f} | {peak} |")
    lines += ["", f"Command: `{meta['command']}`", f"Date: {meta['date']}; torch {meta['torch']}; "
              f"{meta['platform']}; total wall time {meta['wall_s']:.0f} s.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    Path(path).write_text("\n".join(lines))


def plot(path, rows, results):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    names = list(rows)
    labels = [LABELS[m].replace(" (K=4)", "\n(K=4)") for m in names]
    colors = {"global_bp": "0.3", "local_bp": "C0", "bp_free": "C1", "bp_free_sgr": "C2"}
    ax[0].bar(labels, [100 * rows[m]["acc_mean"] for m in names], yerr=[100 * rows[m]["acc_std"] for m in names],
              color=[colors[m] for m in names], capsize=4)
    ax[0].set_ylabel("test accuracy (%)")
    ax[1].bar(labels, [rows[m]["step_ms"] for m in names], color="0.5")
    ax[1].set_ylabel("time / step (ms)")
    ax[1].set_yscale("log")
    peaks = [rows[m]["peak_mib"] or 0.0 for m in names]
    ax[2].bar(labels, peaks, color="0.7")
    ax[2].set_ylabel("peak memory / step (MiB)")
    for i, m in enumerate(names):
        for r in (r for r in results if r["method"] == m):
            ep = [h["epoch"] for h in r["history"]]
            acc = [100 * h["test_acc"] for h in r["history"]]
            ax[3].plot(ep, acc, color=colors[m], alpha=0.7,
                       label=LABELS[m] if r["seed"] == results[0]["seed"] else None)
    ax[3].set_xlabel("epoch")
    ax[3].set_ylabel("test accuracy (%)")
    ax[3].legend(fontsize=7)
    for a in ax[:3]:
        a.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak lr, backprop methods")
    ap.add_argument("--lr-bp-free", type=float, default=2e-3, help="peak lr, BP-free methods")
    ap.add_argument("--lam", type=float, default=0.5, help="SGR lambda for bp_free_sgr")
    ap.add_argument("--num-tangents", type=int, default=4)
    ap.add_argument("--widths", type=int, nargs=4, default=[32, 64, 128, 128])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budget-s", type=float, default=200.0, help="scale epochs down to fit this wall time")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: 512 images, 2 epochs, 1 seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.widths = 2, [0], [8, 16, 16, 16]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t_all = time.perf_counter()
    xtr, ytr, xte, yte, data_path = load_data(args.data, device, args.quick)
    data = (xtr, ytr, xte, yte)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Calibrate, then fit the epochs into the budget (same epochs for every method).
    per_step = {m: calibrate(m, args, data, device) for m in args.methods}
    steps = xtr.shape[0] // args.batch
    elapsed = time.perf_counter() - t_all
    projected = sum(per_step.values()) * steps * args.epochs * len(args.seeds) * 1.15 + elapsed
    epochs, note = args.epochs, ""
    if projected > args.budget_s:
        epochs = max(2, int(args.epochs * (args.budget_s - elapsed) / (projected - elapsed)))
        note = (f"Epochs scaled from {args.epochs} to {epochs} to fit the {args.budget_s:.0f} s budget "
                f"(calibrated s/step: {', '.join(f'{m} {1e3 * t:.1f} ms' for m, t in per_step.items())}).")
        print(note, flush=True)

    results = []
    for seed in args.seeds:
        for m in args.methods:
            r = run(m, seed, epochs, args, data, device)
            results.append(r)
            print(f"{m:12s} seed {seed}: acc {100 * r['test_acc']:5.1f} %  step {r['step_ms_median']:7.2f} ms  "
                  f"peak {r['peak_mib'] if r['peak_mib'] is None else round(r['peak_mib'], 1)} MiB  "
                  f"({r['wall_s']:.1f} s)", flush=True)
    rows = summarize(results)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor()})",
        "torch": torch.__version__, "platform": platform.platform(), "python": sys.version.split()[0],
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
        "data": data_path, "n_train": int(xtr.shape[0]), "n_test": int(xte.shape[0]), "batch": args.batch,
        "epochs": epochs, "epochs_requested": args.epochs, "seeds": args.seeds, "lam": args.lam,
        "num_tangents": args.num_tangents, "lr": args.lr, "lr_bp_free": args.lr_bp_free, "widths": args.widths,
        "calibrated_step_s": per_step, "wall_s": time.perf_counter() - t_all, "note": note,
    }
    (out / "bp_free.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": results}, indent=1))
    write_markdown(out / "bp_free.md", rows, meta)
    plot(out / "bp_free.png", rows, results)
    print((out / "bp_free.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
