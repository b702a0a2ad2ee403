"""Host overhead of the exact engine on a CPU: aten ops per step and small-batch step time.

    python benchmarks/exact_overhead.py --out benchmarks/results          # ResNet-32 K=16, ~1 min
    python benchmarks/exact_overhead.py --quick --out /tmp/x              # ResNet-8 K=3, seconds

The exact step is interpreted node by node, so it dispatches many more, smaller ops than a
plain local step; at small batches (and on a GPU: launch-bound batches) that overhead is
the step time. Two figures, exact (lam = 0.1) against plain local (lam = 0, the same
LocalNet), both on one CPU thread:

- aten ops dispatched per training step (a ``TorchDispatchMode`` counter over one step
  after a warm-up step: forward, backward, the tangent pass, everything);
- median wall time of a batch-2 step (overhead-bound), after warm-up.

Targets (issue 15): exact <= 2.5x plain local in both. Writes <out>/exact_overhead_cpu.json
and .md (date, versions, the command, the counts per op).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sgr_ext
from bench_train_step import build, make_step

CONFIG = {"name": "resnet32_k16_b2", "depth": 32, "K": 16, "batch": 2, "image": 32}
QUICK_CONFIG = {"name": "resnet8_k3_b2", "depth": 8, "K": 3, "batch": 2, "image": 16}
TARGET = 2.5  # exact / local, ops and time
METHODS = ("local", "exact")


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the mode, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def measure(cfg: dict, iters: int) -> dict:
    """{method: ops per step, median / min step time} (fresh models, seed 0). The methods'
    timed steps alternate, so that a load change on a shared machine hits both alike."""
    steps = {}
    for method in METHODS:
        model, blocks, x, y = build(cfg, torch.device("cpu"), channels_last=False)
        steps[method] = make_step(method, model, blocks, x, y)
    out = {}
    for method, step in steps.items():
        step()  # warm-up: lazy initialisation (head-class probe, C++ build, caches)
        with CountOps() as counter:
            step()
        out[method] = {"aten_ops": sum(counter.counts.values()), "top_ops": dict(counter.counts.most_common(15))}
    times = {m: [] for m in METHODS}
    for _ in range(iters):
        for method, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[method].append((time.perf_counter() - t0) * 1e3)
    for method in METHODS:
        out[method].update(median_ms=statistics.median(times[method]), min_ms=min(times[method]), iters=iters)
    return out


def markdown(rec: dict) -> str:
    r, q = rec["results"], rec["ratios"]
    lines = [
        f"# Exact-engine host overhead, CPU ({rec['config']['name']}, one thread)", "",
        f"{rec['date']}; {rec['device']}; load average {rec['load_average_1min']:.1f} (other work on the machine "
        f"inflates both times); torch {rec['torch']}; sgr_ext {rec['sgr_ext']}.", "",
        f"Command: `{rec['command']}`", "",
        "| method | aten ops / step | median step ms (batch 2) | fastest step ms |", "|---|---|---|---|",
    ]
    lines += [f"| {m} | {r[m]['aten_ops']} | {r[m]['median_ms']:.1f} | {r[m]['min_ms']:.1f} |" for m in METHODS]
    lines += ["", "| exact / local | value | target |", "|---|---|---|",
              f"| aten ops | {q['ops']:.2f}x | <= {TARGET}x |", f"| median step time | {q['time']:.2f}x | <= {TARGET}x |",
              f"| fastest step time | {q['time_min']:.2f}x | |", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="ResNet-8 K=3: checks the script in seconds")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per method (default 20, quick 3)")
    args = ap.parse_args(argv)
    iters = args.iters or (3 if args.quick else 20)
    if iters < 1:
        ap.error(f"--iters: expected an int >= 1, got {iters}")
    torch.set_num_threads(1)
    cfg = QUICK_CONFIG if args.quick else CONFIG
    results = measure(cfg, iters)
    rec = {
        "benchmark": "exact_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "load_average_1min": os.getloadavg()[0],  # other work on a shared machine inflates both times
        "torch": torch.__version__, "sgr_ext": sgr_ext.__version__, "python": sys.version.split()[0],
        "command": "python benchmarks/exact_overhead.py " + " ".join(shlex.quote(a) for a in
                                                                     (sys.argv[1:] if argv is None else argv)),
        "config": cfg, "lam_exact": 0.1, "target": f"exact / local <= {TARGET}x (aten ops and batch-2 step time)",
        "results": results,
        "ratios": {"ops": results["exact"]["aten_ops"] / results["local"]["aten_ops"],
                   "time": results["exact"]["median_ms"] / results["local"]["median_ms"],
                   "time_min": results["exact"]["min_ms"] / results["local"]["min_ms"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("exact_overhead_cpu" + ("_quick" if args.quick else ""))
    stem.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    stem.with_suffix(".md").write_text(markdown(rec))
    print(markdown(rec))
    return rec


if __name__ == "__main__":
    main()
