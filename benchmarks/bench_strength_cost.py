"""What the penalty-strength options cost per training step, side by side in one process.

For each engine: plain local (lam = 0), SGR lam_mode="fixed" (the combined objective),
"fixed" + track_share (the loss and penalty gradients taken apart to report their ratio),
"grad_ratio" (the same split, plus the rescale), and side="output" (block k-1 recomputed).
Configurations are interleaved round-robin, so load on a shared machine hits them alike;
medians after warm-up.

  python benchmarks/bench_strength_cost.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import sgr_ext
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sgr_ext
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sgr_study.models import build  # noqa: E402

OPTIONS = {
    "local (lam=0)": dict(lam=0.0),
    "fixed": dict(lam=0.1),
    "fixed + track_share": dict(lam=0.1, track_share=True),
    "grad_ratio": dict(lam=0.1, lam_mode="grad_ratio"),
    "side=output (grad_ratio)": dict(lam=0.1, lam_mode="grad_ratio", side="output"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cnn")
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="exact,fast,double_backward")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    nets = {}
    for mode in args.modes.split(","):
        for name, kw in OPTIONS.items():
            blocks = sgr_ext.split(build(args.arch), args.K, example_input=x[:2])
            nets[(mode, name)] = sgr_ext.LocalNet(blocks, mode=mode, **kw)
    times = {k: [] for k in nets}
    for it in range(args.iters + 1):  # round-robin; the first round is the warm-up
        for k, net in nets.items():
            t = time.perf_counter()
            net.train_step(x, y)
            if it:
                times[k].append(time.perf_counter() - t)
    rows = []
    for mode in args.modes.split(","):
        base = statistics.median(times[(mode, "fixed")])
        for name in OPTIONS:
            med = statistics.median(times[(mode, name)])
            rows.append({"mode": mode, "option": name, "median_ms": 1000 * med, "vs_fixed": med / base})
    lines = [f"| engine | option | median step (ms) | vs fixed |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['option']} | {r['median_ms']:.0f} | {r['vs_fixed']:.2f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "config": vars(args),
                "command": "python benchmarks/bench_strength_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        (out / "strength_cost_cpu.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        (out / "strength_cost_cpu.md").write_text(
            f"# Cost of the penalty-strength options ({meta['date']}, CPU, {args.threads} thread, torch {meta['torch']})\n\n"
            f"`{meta['command']}`: {args.arch}, K={args.K}, batch {args.batch}, {args.size}x{args.size}; "
            f"median of {args.iters} interleaved steps after one warm-up.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
