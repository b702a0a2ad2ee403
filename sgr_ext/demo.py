"""``sgr-ext demo``: global BP vs plain local learning vs SGR on real handwritten digits, offline.

A thin wrapper over ``sgr_ext.trainer.train``: the same model, data, schedule and seed
for the three methods, one table, ``results.json`` and a plot of the learning curves.
Torch and the trainer are imported in ``run``, after the arguments are checked (see
``sgr_ext.trainer.cli``).
"""
from __future__ import annotations

import json
from pathlib import Path

from sgr_ext._options import DISTANCES, positive_int
from sgr_ext.trainer.config import TrainConfig

METHODS = ("bp", "local", "sgr")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="train a small CNN on the embedded digits with bp, local and sgr",
        description="Train a small CNN on the 1,797 real 8x8 digits that ship with scikit-learn with global BP, "
        "plain local learning and SGR (same model, data, schedule and seed); print a table and write "
        "results.json and learning_curves.png into --out.")
    p.add_argument("--out", default="sgr_demo", help="output directory (results.json, learning_curves.png) (default %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs per method (default %(default)s)")
    p.add_argument("--modules", type=int, default=4, help="number of local blocks K, at most 4 (default %(default)s)")
    p.add_argument("--lam", type=float, default=None,
                   help="strength; default: the accuracy study's setting (sgr_ext.defaults: handback, grad_ratio, 1.0); "
                        "a value alone gives DESIGN.md's penalty weight")
    p.add_argument("--distance", default="l2", choices=DISTANCES, help="SGR distance (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data order and augmentation (default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.set_defaults(func=run)


def method_config(method: str, args) -> TrainConfig:
    return TrainConfig(
        arch="digits_cnn",
        modules=args.modules,
        method=method,
        lam=args.lam if method == "sgr" else None,
        distance=args.distance,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        data="digits",
        out=None,
        device=args.device,
        checkpoint=False,
        plots=False,
        peak_memory=True,  # the demo's table compares the methods' memory
    )


def summarise(result: dict) -> dict:
    """The demo's per-method entry from a trainer results dict."""
    history = result["history"]
    return {
        "test_acc": result["final_test_acc"],
        "peak_memory_mb": result["peak_mem_mib"],
        "memory_metric": result["memory_metric"],
        "time_s": sum(r["train_time_s"] for r in history),
        "curve": [r["test_acc"] for r in history],
    }


def plot_curves(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot(range(1, len(r["curve"]) + 1), [100 * a for a in r["curve"]], label=method, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(results: dict) -> str:
    metric = next(iter(results.values()))["memory_metric"]
    lines = [f"| method | test acc (%) | peak memory per step (MiB, {metric}) | train time (s) |", "|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {100 * r['test_acc']:.1f} | {r['peak_memory_mb']:.2f} | {r['time_s']:.1f} |")
    return "\n".join(lines)


def run(args) -> int:
    # every bad argument fails before any training starts; those of plain values before torch's import
    configs = {m: method_config(m, args).validate() for m in METHODS}
    import torch

    from sgr_ext.data import load_digits
    from sgr_ext.models import DigitsCNN
    from sgr_ext.split import model_units
    from sgr_ext.trainer.loop import train
    from sgr_ext.trainer.runtime import resolve_device

    units = len(model_units(DigitsCNN())[0])
    positive_int("--modules", args.modules, at_most=units, what=f" (DigitsCNN has {units} splittable stages)")
    device = resolve_device(args.device)
    data = load_digits()
    results = {m: summarise(train(cfg, data)) for m, cfg in configs.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "dataset": data.name,
        "num_classes": data.num_classes,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {k: v for k, v in vars(args).items() if k not in ("func", "command")},
        "methods": results,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    plot_curves(results, out / "learning_curves.png", f"{data.name}, K={args.modules}, lambda={args.lam if args.lam is not None else 'default'}")
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {out / 'learning_curves.png'}")
    return 0
