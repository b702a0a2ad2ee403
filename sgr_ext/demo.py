"""``sgr-ext demo``: global BP vs plain local learning vs SGR on real handwritten digits, offline."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sgr_ext import _checks
from sgr_ext.data import TensorDataset, load_digits
from sgr_ext.memory import PeakMemory
from sgr_ext.models import DigitsCNN
from sgr_ext.net import LocalNet
from sgr_ext.split import split

METHODS = ("bp", "local", "sgr")


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a small CNN on the embedded digits with bp, local and sgr")
    p.add_argument("--out", default="sgr_demo", help="output directory (results.json, learning_curves.png)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--modules", type=int, default=4, help="number of local blocks K")
    p.add_argument("--lam", type=float, default=0.1, help="SGR penalty weight")
    p.add_argument("--distance", default="l2", choices=("l2", "cosine"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=run)


def resolve_device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected e.g. 'cpu', 'cuda' or 'cuda:1', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was requested but no CUDA device is available")
    return device


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def train_method(method: str, data: TensorDataset, args, device: torch.device, progress) -> dict:
    """Train one method from the same seed; returns {"test_acc", "peak_memory_mb", "memory_metric", "time_s", "curve"}."""
    torch.manual_seed(args.seed)
    model = DigitsCNN(data.num_classes).to(device)
    net = None
    if method != "bp":
        net = LocalNet(split(model, args.modules), lam=args.lam if method == "sgr" else 0.0, distance=args.distance)
        net.to(device)
    trained = net if net is not None else model
    opt = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # a trailing batch of one sample joins the one before it (BatchNorm cannot train on it)
    starts = list(range(0, len(data.x_train), args.batch_size))
    if len(starts) > 1 and len(data.x_train) - starts[-1] == 1:
        starts.pop()
    steps_per_epoch = len(starts)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    curve, peak, train_time = [], PeakMemory(device), 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(len(data.x_train), generator=gen).to(device)
        start = time.perf_counter()
        for j, i in enumerate(starts):
            idx = order[i : starts[j + 1] if j + 1 < len(starts) else len(order)]
            x, y = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            with peak:
                if net is None:
                    F.cross_entropy(model(x), y).backward()
                else:
                    net.train_step(x, y)
            opt.step()
            sched.step()
            progress.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        curve.append(evaluate(trained, data.x_test, data.y_test))
        progress.set_postfix(method=method, epoch=epoch + 1, test_acc=f"{curve[-1]:.3f}")
    return {"test_acc": curve[-1], "peak_memory_mb": peak.peak_mb, "memory_metric": peak.metric, "time_s": train_time, "curve": curve}


def plot_curves(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict, memory_metric: str) -> str:
    lines = [f"| method | test acc (%) | peak memory (MiB, {memory_metric}) | time (s) |", "|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {100 * r['test_acc']:.1f} | {r['peak_memory_mb']:.2f} | {r['time_s']:.1f} |")
    return "\n".join(lines)


def run(args) -> int:
    _checks.positive_int("--epochs", args.epochs)
    _checks.positive_int("--batch-size", args.batch_size)
    if args.batch_size < 2:
        raise ValueError("--batch-size: expected an int >= 2 (BatchNorm cannot train on a batch of one), got 1")
    _checks.nonneg_finite("--lam", args.lam)
    if _checks.nonneg_finite("--lr", args.lr) == 0:
        raise ValueError(f"--lr: expected a finite number > 0, got {args.lr}")
    device = resolve_device(args.device)
    data = load_digits().to(device)
    _checks.positive_int("--modules", args.modules, at_most=4, what=" (DigitsCNN has 4 splittable stages)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    n = len(data.x_train)
    steps = args.epochs * (-(-n // args.batch_size) - (n > args.batch_size and n % args.batch_size == 1))
    results = {}
    with tqdm(total=steps * len(METHODS), desc="demo", unit="step", mininterval=1.0) as progress:
        for method in METHODS:
            results[method] = train_method(method, data, args, device, progress)

    metric = results["bp"]["memory_metric"]
    summary = {
        "dataset": data.name,
        "num_classes": data.num_classes,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "memory_metric": metric,
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "methods": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_curves(results, out / "learning_curves.png", f"{data.name}, K={args.modules}, lambda={args.lam}")
    print(format_table(results, metric))
    print(f"wrote {out / 'results.json'} and {out / 'learning_curves.png'}")
    return 0
