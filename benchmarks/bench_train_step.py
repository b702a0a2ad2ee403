"""Training-step benchmark: global BP vs naive local vs naive double-backward SGR vs sgr_ext modes.

One "step" = zero_grad(set_to_none) + forward + backward of one batch (no optimizer step),
so every method's number covers the same work: all parameter gradients of the batch.

Methods (side by side, one run):
  global_bp      model(x) -> cross-entropy -> backward (end-to-end backprop)
  naive_local    plain local learning written out: per block u = x.detach(), loss of its
                 head, loss.backward()                               (DESIGN.md baseline)
  naive_sgr_db   LocalNet(mode="double_backward"): the create_graph reference SGR
  local          LocalNet(lam=0): the library's plain local step (stream overlap on CUDA)
  exact          LocalNet(mode="exact"): lean exact SGR
  fast           LocalNet(mode="fast"): finite-difference SGR
  local_nooverlap, exact_nooverlap   the same with overlap=False (CUDA only)

Configs (CIFAR ResNets, InfoPro-style 1c2f aux heads): ResNet-32 K=16 batch 1024,
ResNet-110 K=14 batch 1024, ResNet-32 K=16 batch 128; fp32 (TF32 allowed) and bf16
autocast. Time: median over --iters steps after --warmup (CUDA events). Memory: peak of one
step, ``max_memory_allocated() - memory_allocated()`` with ``reset_peak_memory_stats()``
before the step (DESIGN.md §5). A gradient check (fp32, TF32 off, small batch) records
each mode's relative gradient error against the double-backward reference and that
overlap on/off give the same gradients.

GPU (about 3-4 minutes on an H100):
    python benchmarks/bench_train_step.py --out benchmarks/results
CPU smoke run (seconds; CPU memory = allocation-profiler peak):
    python benchmarks/bench_train_step.py --quick --out /tmp/bench

Writes <out>/train_step_<device>.json (device, torch/triton versions, date, command, every
measurement, errors) and <out>/train_step_<device>.png; prints markdown tables.
A config or method that fails (OOM included) is recorded and skipped.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import sgr_ext
from sgr_ext.models.resnet_cifar import CifarResNet

CONFIGS = {
    "resnet32_k16_b1024": dict(depth=32, K=16, batch=1024, image=32),
    "resnet110_k14_b1024": dict(depth=110, K=14, batch=1024, image=32),
    "resnet32_k16_b128": dict(depth=32, K=16, batch=128, image=32),
}
QUICK_CONFIGS = {
    "resnet8_k3_b8": dict(depth=8, K=3, batch=8, image=16),
}
# sizes a CPU measures in about a minute (README's CPU memory ratios)
CPU_CONFIGS = {
    "resnet32_k16_b32": dict(depth=32, K=16, batch=32, image=32),
}
METHODS = ("global_bp", "naive_local", "naive_sgr_db", "local", "exact", "fast", "local_nooverlap", "exact_nooverlap")
LAM = 0.1
# DESIGN.md's targets: ratio -> upper bound
TARGETS = {"exact/local time": 2.0, "exact/local mem": 1.5, "fast/local time": 1.3, "fast/local mem": 1.2,
           "local/global time (b1024)": 1.1, "local/global time (b128)": 1.5, "sgr/global mem": 0.4}


# --------------------------------------------------------------------------- methods


def _zero(params):
    for p in params:
        p.grad = None


def make_step(method: str, model, blocks, x, y) -> Callable[[], None]:
    params = list(model.parameters()) + [p for b in blocks for p in b.parameters()]
    params = list({id(p): p for p in params}.values())
    if method == "global_bp":

        def step():
            _zero(params)
            F.cross_entropy(model(x), y).backward()

        return step
    if method == "naive_local":

        def step():
            _zero(params)
            h = x
            for b in blocks:
                u = h.detach()
                out = b.module(u)
                F.cross_entropy(b.head(out), y).backward()
                h = out.detach()

        return step
    mode = {"naive_sgr_db": "double_backward", "local": "exact", "local_nooverlap": "exact"}.get(method, method)
    mode = mode.replace("_nooverlap", "")
    lam = 0.0 if method.startswith("local") else LAM
    overlap = "auto" if not method.endswith("_nooverlap") else False
    net = sgr_ext.LocalNet(blocks, lam=lam, mode=mode, overlap=overlap)

    def step():
        _zero(params)
        net.train_step(x, y)

    return step


# --------------------------------------------------------------------------- measuring


def _cpu_peak_bytes(fn) -> int:
    """Peak of live CPU tensor allocations during fn (the autograd profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def measure(step: Callable[[], None], device: torch.device, amp: Optional[torch.dtype], warmup: int, iters: int) -> dict:
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else (lambda: _null())
    with ctx():
        for _ in range(warmup):
            step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with ctx():
                step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with ctx():
            step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        reserved = torch.cuda.max_memory_reserved(device)
        mem_metric = "cuda_max_allocated"
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            with ctx():
                step()
            times.append((time.perf_counter() - t0) * 1e3)
        with ctx():
            peak = _cpu_peak_bytes(step)
        reserved = None
        mem_metric = "cpu_profiler_peak"
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[max(0, int(0.1 * len(times)) - 0)],
        "p90_ms": times[min(len(times) - 1, int(math.ceil(0.9 * len(times))) - 1)],
        "iters": len(times),
        "peak_mib": peak / 2**20,
        "max_reserved_mib": None if reserved is None else reserved / 2**20,
        "memory_metric": mem_metric,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build(cfg: dict, device: torch.device, channels_last: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = CifarResNet(cfg["depth"]).to(device)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=device)
    y = torch.randint(0, 10, (cfg["batch"],), device=device)
    blocks = sgr_ext.split(model, cfg["K"], example_input=x[:2])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        for b in blocks:
            b.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    for b in blocks:
        b.train()
    return model, blocks, x, y


# --------------------------------------------------------------------------- gradient check


def gradient_check(device: torch.device, quick: bool, *, cfg: Optional[dict] = None,
                   amp: Optional[torch.dtype] = None, reference_dtype: torch.dtype = torch.float32) -> dict:
    """Relative gradient error of every mode against mode="double_backward" (TF32 off).

    cfg: the model config (default: ResNet-32 K=16 batch 64, or ResNet-8 K=3 batch 8 when
    ``quick``). amp: autocast dtype of the modes under test (None: fp32).
    reference_dtype: dtype of the double-backward reference (float64 also records the
    error of double backward itself at the tested precision, the floor for the others).
    """
    cfg = cfg or (dict(depth=8, K=3, batch=8, image=16) if quick else dict(depth=32, K=16, batch=64, image=32))
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {"config": cfg, "lam": 1.0, "amp": str(amp) if amp else None, "reference": str(reference_dtype),
           "note": "||g - g_ref|| / ||g_ref|| over all parameters; TF32 off"}
    try:
        model, blocks, x, y = build(cfg, device, channels_last=False, seed=1)

        def grads(mode, lam, overlap="auto", dtype=None, autocast=amp):
            bl = copy.deepcopy(blocks)
            xs = x
            if dtype is not None:
                bl, xs = [b.to(dtype) for b in bl], x.to(dtype)
            net = sgr_ext.LocalNet(bl, lam=lam, mode=mode, overlap=overlap)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                net.train_step(xs, y)
            return torch.cat([p.grad.double().flatten() for b in bl for p in b.parameters() if p.grad is not None])

        ref = grads("double_backward", 1.0, dtype=reference_dtype, autocast=None)
        ref0 = grads("double_backward", 0.0, dtype=reference_dtype, autocast=None)
        pen = (ref - ref0).norm()
        modes = ("exact", "fast") + (("double_backward",) if reference_dtype != torch.float32 or amp else ())
        for mode in modes:
            g = grads(mode, 1.0)
            out[f"{mode}_rel_err"] = float((g - ref).norm() / ref.norm())
            out[f"{mode}_penalty_part_rel_err"] = float((g - ref).norm() / pen)
        out["local_rel_err_vs_db_lam0"] = float((grads("exact", 0.0) - ref0).norm() / ref0.norm())
        if device.type == "cuda":
            for mode in ("exact", "fast"):
                a, b = grads(mode, 1.0, overlap=True), grads(mode, 1.0, overlap=False)
                out[f"{mode}_overlap_max_abs_diff"] = float((a - b).abs().max())
            a, b = grads("exact", 0.0, overlap=True), grads("exact", 0.0, overlap=False)
            out["local_overlap_max_abs_diff"] = float((a - b).abs().max())
    except Exception as exc:  # recorded, never fatal
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


# --------------------------------------------------------------------------- report


def ratios(rows: list[dict]) -> list[dict]:
    """Per (config, precision): the issue's target ratios."""
    out = []
    keys = sorted({(r["config"], r["precision"]) for r in rows}, key=lambda k: (list(CONFIGS) + list(QUICK_CONFIGS)).index(k[0]) if k[0] in CONFIGS or k[0] in QUICK_CONFIGS else 99)
    for cfg, prec in keys:
        get = {r["method"]: r for r in rows if r["config"] == cfg and r["precision"] == prec and "median_ms" in r}

        def rat(a, b, f):
            return get[a][f] / get[b][f] if a in get and b in get and get[b][f] else None

        out.append({
            "config": cfg, "precision": prec,
            "exact/local time": rat("exact", "local", "median_ms"), "exact/local mem": rat("exact", "local", "peak_mib"),
            "fast/local time": rat("fast", "local", "median_ms"), "fast/local mem": rat("fast", "local", "peak_mib"),
            "local/global time": rat("local", "global_bp", "median_ms"),
            "exact/global mem": rat("exact", "global_bp", "peak_mib"), "fast/global mem": rat("fast", "global_bp", "peak_mib"),
            "exact/naive_sgr_db time": rat("exact", "naive_sgr_db", "median_ms"),
            "local/naive_local time": rat("local", "naive_local", "median_ms"),
        })
    return out


def markdown(rows: list[dict], methods) -> str:
    lines = ["| config | precision | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for cfg, prec in dict.fromkeys((r["config"], r["precision"]) for r in rows):
        cells = []
        for m in methods:
            r = next((r for r in rows if r["config"] == cfg and r["precision"] == prec and r["method"] == m), None)
            if r is None:
                cells.append("-")
            elif "median_ms" in r:
                cells.append(f"{r['median_ms']:.1f} ms, {r['peak_mib']:.0f} MiB")
            else:
                cells.append(r.get("status", "failed"))
        lines.append(f"| {cfg} | {prec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_ratios(rat: list[dict]) -> str:
    cols = [k for k in rat[0] if k not in ("config", "precision")] if rat else []
    lines = ["| config | precision | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rat:
        lines.append(f"| {r['config']} | {r['precision']} | " + " | ".join("-" if r[c] is None else f"{r[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], methods, path: str, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["config"], r["precision"]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups) + 4), 8))
    width = 0.8 / max(1, len(methods))
    for ax, field, label in ((axes[0], "median_ms", "median step time (ms)"), (axes[1], "peak_mib", "peak memory (MiB)")):
        for i, m in enumerate(methods):
            vals = []
            for cfg, prec in groups:
                r = next((r for r in rows if r["config"] == cfg and r["precision"] == prec and r["method"] == m), None)
                vals.append(r[field] if r is not None and field in r else 0.0)
            ax.bar([g + i * width for g in range(len(groups))], vals, width, label=m)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{p}" for c, p in groups], fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=4)
    axes[0].set_title(f"sgr_ext training step, {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke run")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--configs", default=None, help=f"comma list of {list({**CONFIGS, **QUICK_CONFIGS, **CPU_CONFIGS})}")
    ap.add_argument("--methods", default=None, help=f"comma list of {list(METHODS)}")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32,bf16")
    ap.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip what is left after this many seconds")
    ap.add_argument("--no-grad-check", action="store_true")
    args = ap.parse_args(argv)

    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs:
        allc = {**CONFIGS, **QUICK_CONFIGS, **CPU_CONFIGS}
        configs = {k: allc[k] for k in args.configs.split(",")}
    methods = [m for m in (args.methods.split(",") if args.methods else METHODS)]
    if device.type != "cuda":
        methods = [m for m in methods if not m.endswith("_nooverlap")]
    precisions = args.precisions.split(",")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (2 if args.quick else 10)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32 (TF32 allowed)"
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None

    rows: list[dict] = []
    for cfg_name, cfg in configs.items():
        for prec in precisions:
            amp = {"fp32": None, "bf16": torch.bfloat16}[prec]
            for method in methods:
                row = {"config": cfg_name, **cfg, "precision": prec, "method": method,
                       "channels_last": bool(args.channels_last), "lam": 0.0 if method.startswith(("local", "naive_local", "global")) else LAM}
                if time.time() - t_start > args.budget_s:
                    row["status"] = "skipped (time budget)"
                    rows.append(row)
                    continue
                try:
                    model, blocks, x, y = build(cfg, device, args.channels_last)
                    step = make_step(method, model, blocks, x, y)
                    row.update(measure(step, device, amp, warmup, iters))
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as exc:
                    row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    row["traceback"] = traceback.format_exc(limit=6)
                finally:
                    step = model = blocks = x = y = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                msg = f"{cfg_name:22s} {prec:5s} {method:16s} "
                msg += f"{row['median_ms']:9.2f} ms {row['peak_mib']:9.1f} MiB" if "median_ms" in row else row["status"]
                print(msg, flush=True)

    grad_check = None if args.no_grad_check else gradient_check(device, args.quick)
    rat = ratios(rows)
    result = {
        "benchmark": "train_step",
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv) if argv is None else "main(" + repr(argv) + ")",
        "sgr_ext": sgr_ext.__version__,
        "settings": {"warmup": warmup, "iters": iters, "lam": LAM, "tf32": device.type == "cuda",
                     "channels_last": bool(args.channels_last), "step": "zero_grad + forward + backward, no optimizer step"},
        "rows": rows,
        "ratios": rat,
        "targets": TARGETS,
        "gradient_check": grad_check,
        "elapsed_s": time.time() - t_start,
    }
    os.makedirs(args.out, exist_ok=True)
    tag = device.type + ("_channels_last" if args.channels_last else "") + ("_quick" if args.quick else "")
    json_path = os.path.join(args.out, f"train_step_{tag}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    png_path = os.path.join(args.out, f"train_step_{tag}.png")
    try:
        plot([r for r in rows if "median_ms" in r], methods, png_path, device_name)
    except Exception as exc:
        print(f"plot failed: {exc}")
    print()
    print(f"## Training step, {device_name} (torch {torch.__version__}), median ms / peak MiB")
    print()
    print(markdown(rows, methods))
    print()
    print(markdown_ratios(rat))
    print()
    print("gradient check:", json.dumps(grad_check))
    print(f"wrote {json_path} and {png_path} in {result['elapsed_s']:.0f} s")
    return result


# --------------------------------------------------------------------------- pytest-benchmark


try:  # optional pytest-benchmark wrapper: pytest benchmarks/bench_train_step.py --benchmark-enable
    import pytest

    @pytest.mark.parametrize("method", ["naive_local", "local", "exact", "fast", "naive_sgr_db"])
    def test_train_step(benchmark, method):
        """Tiny CPU training steps per method (the GPU numbers come from ``main``)."""
        model, blocks, x, y = build(QUICK_CONFIGS["resnet8_k3_b8"], torch.device("cpu"), False)
        step = make_step(method, model, blocks, x, y)
        step()
        benchmark(step)

except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
