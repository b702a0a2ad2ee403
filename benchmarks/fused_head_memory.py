"""Peak memory of a LocalNet step whose heads are large Linear token heads, fused vs unfused.

    python benchmarks/fused_head_memory.py --out benchmarks/results/fused_head_memory_cpu

Two local blocks (Linear + GELU bodies) whose heads are ``nn.Linear(H, V)`` with V = 32000,
on N rows: the (N, V) logits dominate a block's memory. "unfused" runs the same step with
``sgr_ext.engine.fused_head`` disabled (the head materialises its logits, as before the
engines used ``ops.linear_cross_entropy``); "fused" is the library's default. CPU memory is
the allocation profiler's peak of live tensor bytes during a ``train_step`` (the larger of
two, after one warm-up step), as in ``bench_train_step.py``; on CUDA the allocator's peak. Writes
``<out>.json`` (with the command, date, versions) and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import _cpu_peak_bytes  # noqa: E402

import sgr_ext  # noqa: E402
from sgr_ext.engine import fused_head  # noqa: E402

SETTINGS = (("local", "exact", 0.0), ("exact", "exact", 0.1), ("fast", "fast", 0.1),
            ("double_backward", "double_backward", 0.1))


def make_blocks(width: int, vocab: int, k: int) -> list:
    return [sgr_ext.LocalBlock(nn.Sequential(nn.Linear(width, width), nn.GELU()), nn.Linear(width, vocab))
            for _ in range(k)]


def peak_bytes(net, x, y) -> int:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        net.train_step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return _cpu_peak_bytes(lambda: net.train_step(x, y))


def measure(blocks, x, y, mode: str, lam: float, fused: bool) -> int:
    saved = fused_head.FUSED_MIN_LOGITS
    fused_head.FUSED_MIN_LOGITS = saved if fused else float("inf")
    try:
        net = sgr_ext.LocalNet(copy.deepcopy(blocks), lam=lam, mode=mode)
        net.train_step(x, y)  # warm-up: C++ build, allocator
        peaks = []
        for _ in range(2):  # the larger of two steps: a profiler run can miss events
            net.zero_grad(set_to_none=True)
            peaks.append(peak_bytes(net, x, y))
        return max(peaks)
    finally:
        fused_head.FUSED_MIN_LOGITS = saved


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=512, help="N, rows (tokens) per batch")
    ap.add_argument("--width", type=int, default=256, help="H, the head's input width")
    ap.add_argument("--vocab", type=int, default=32000, help="V, the head's classes")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", default=",".join(s[0] for s in SETTINGS), help="subset of " + ",".join(s[0] for s in SETTINGS))
    ap.add_argument("--out", default="benchmarks/results/fused_head_memory_cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    blocks = [b.to(dev) for b in make_blocks(args.width, args.vocab, args.blocks)]
    x = torch.randn(args.rows, args.width, device=dev)
    y = torch.randint(0, args.vocab, (args.rows,), device=dev)
    wanted = args.settings.split(",")
    rows = []
    for name, mode, lam in SETTINGS:
        if name not in wanted:
            continue
        before = measure(blocks, x, y, mode, lam, fused=False)
        after = measure(blocks, x, y, mode, lam, fused=True)
        rows.append({"setting": name, "mode": mode, "lam": lam, "unfused_peak_mib": before / 2**20,
                     "fused_peak_mib": after / 2**20})
        print(f"{name:16s} unfused {before / 2**20:8.1f} MiB   fused {after / 2**20:8.1f} MiB", flush=True)
    logits_mib = args.rows * args.vocab * 4 / 2**20
    result = {
        "command": "python benchmarks/fused_head_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "config": vars(args),
        "logits_mib_fp32": logits_mib,
        "memory_metric": "cpu allocation-profiler peak of live tensors" if dev.type == "cpu" else "cuda max_memory_allocated",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Peak memory of one `train_step`, {args.blocks} blocks with `nn.Linear({args.width}, {args.vocab})` heads, "
             f"N = {args.rows} rows, fp32, {result['device']} ({result['memory_metric']}; the (N, V) logits are "
             f"{logits_mib:.1f} MiB). Command: `{result['command']}` ({result['date']}, torch {torch.__version__}).",
             "", "| setting | unfused (MiB) | fused (MiB) |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['unfused_peak_mib']:.1f} | {r['fused_peak_mib']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
