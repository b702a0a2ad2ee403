"""GPU benchmark of the fused ``reconcile`` penalty against the memory-bandwidth floor.

    python benchmarks/gpu_reconcile.py                # ~1-2 min on one H100
    python benchmarks/gpu_reconcile.py --sweep        # + time alternative Triton tilings

Measures, on the current CUDA device:

1. device-to-device copy bandwidth (``y.copy_(x)`` on a 512 MiB buffer, read + write bytes);
2. floors: read-once = bytes(a) + bytes(d) over that bandwidth (the forward's minimum), and
   two-pass = 2 (bytes(a) + bytes(d)) + bytes(grad) (forward pass + backward pass that reads
   a and d again and writes the gradient: the minimum for separate forward and backward);
3. medians (``triton.testing.do_bench``, return_mode="median") and p10/p90 of the forward and
   of forward + backward (``torch.autograd.grad``) for torch eager, torch.compile (inductor)
   of the same torch formula, Triton (eager: autograd Functions) and Triton under
   torch.compile (the custom-op path); peak memory of forward + backward;
4. numerics: relative error of the loss and of the gradient against float64 computed on the
   same (rounded) inputs, for every dtype.

Target: Triton forward <= 1.3x the read-once floor (torch eager is ~3.4x, DESIGN.md §4);
Triton forward + backward <= 1.3x the two-pass floor.

Writes benchmarks/results/reconcile_<device>.json (date, device, torch/triton versions, the
command) and reconcile_<device>.png, and prints a markdown table. Every measurement is
guarded: one failing config is recorded with its error and the run goes on; the JSON is
rewritten after every config.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import traceback
from pathlib import Path

import torch
from bench_util import sync, time_ms

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
IMPLS = ("torch_eager", "torch_compile", "triton", "triton_compile")


def parse_shape(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.lower().split("x"))


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def make_fns(impl: str, distance: str):
    """fn(a, d) -> 0-dim loss, for one implementation."""
    from sgr_ext.ops.reconcile import reconcile

    if impl == "torch_eager":
        return lambda a, d: reconcile(a, d, distance=distance, impl="torch")
    if impl == "triton":
        return lambda a, d: reconcile(a, d, distance=distance, impl="triton")
    inner = "torch" if impl == "torch_compile" else "triton"
    return torch.compile(lambda a, d: reconcile(a, d, distance=distance, impl=inner), dynamic=False, fullgraph=True)


def bench(fn, rep: int, device=None) -> dict:
    return time_ms(fn, rep, device if device is not None else torch.device("cuda"))


def copy_bandwidth(rep: int, device="cuda", n: int = 128 * 2**20) -> float:
    """Bytes per second of a device-to-device copy (read + write counted) of n float32
    (default 128 Mi = 512 MiB, far beyond L2)."""
    x = torch.empty(n, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), rep, torch.device(device))["median_ms"]
    del x, y
    return 2 * n * 4 / (ms * 1e-3)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def reference(a: torch.Tensor, d: torch.Tensor, distance: str, eps: float = 1e-8):
    """float64 loss and gradient on the same inputs (plain formula + autograd)."""
    x = a.detach().double().reshape(a.shape[0], -1).requires_grad_()
    y = d.detach().double().reshape(d.shape[0], -1)
    if distance == "l2":
        per = ((x - y) ** 2).sum(1)
    else:
        per = 1 - (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)
    loss = per.mean()
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g.reshape(a.shape)


def setup_config(cfg: dict, bw: float, device: torch.device):
    """Inputs of one config (cfg: "shape", "dtype", "distance"), its floors at copy
    bandwidth ``bw`` (bytes/s) and Triton tiling written into cfg; -> (a, d, ref_loss, ref_grad)."""
    from sgr_ext.kernels import reconcile as K

    shape, dtype = parse_shape(cfg["shape"]), DTYPES[cfg["dtype"]]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, device=device, generator=gen).to(dtype)
    d = torch.randn(shape, device=device, generator=gen)
    if cfg["distance"] == "cosine":
        d = 0.6 * a.float() + 0.8 * d  # partly aligned, like A_k and D_{k-1}
    d = d.to(dtype)
    nbytes = a.numel() * a.element_size()
    cfg["bytes_a"] = nbytes
    cfg["floor_read_once_ms"] = 2 * nbytes / bw * 1e3
    cfg["floor_two_pass_ms"] = 5 * nbytes / bw * 1e3
    t = K.default_config(shape[0], a[0].numel(), a.element_size(), a.device)
    cfg["triton_tiling"] = dict(rows=t.rows, block=t.block, chunk=t.chunk, num_warps=t.num_warps)
    ref_loss, ref_grad = reference(a, d, cfg["distance"])
    return a, d, ref_loss, ref_grad


def measure_impl(impl, distance, a, d, rep, ref_loss, ref_grad) -> dict:
    fn = make_fns(impl, distance)
    x = a.detach().clone().requires_grad_()
    row: dict = {"impl": impl}

    def fwd():
        with torch.no_grad():
            return fn(a, d)

    def fwd_bwd():
        loss = fn(x, d)
        return torch.autograd.grad(loss, x)[0]

    for _ in range(3):  # compile / autotune / caches outside the timings
        fwd()
        fwd_bwd()
    sync(a.device)
    row["fwd"] = bench(fwd, rep, a.device)
    row["fwd_bwd"] = bench(fwd_bwd, rep, a.device)

    sync(a.device)
    if a.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    loss = fn(x, d)
    (grad,) = torch.autograd.grad(loss, x)
    sync(a.device)
    row["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20 if a.is_cuda else float("nan")
    row["loss_rel_err"] = rel_err(loss.detach(), ref_loss)
    row["grad_rel_err"] = rel_err(grad, ref_grad)
    row["loss_dtype"] = str(loss.dtype)
    row["grad_dtype"] = str(grad.dtype)
    return row


def sweep_tilings(a, d, distance, rep) -> list[dict]:
    """Time the Triton kernels directly under alternative tilings (for tuning default_config)."""
    from triton.testing import do_bench

    from sgr_ext.kernels import reconcile as K

    B = a.shape[0]
    a2, d2 = a.reshape(B, -1).contiguous(), d.reshape(B, -1).contiguous()
    F = a2.shape[1]
    cos = distance == "cosine"
    default = K.default_config(B, F, a.element_size(), a.device)
    cands = {default}
    for block in (1024, 2048, 4096, 8192):
        for chunk_mult in (1, 2, 4, 8, 16, 32):
            for warps in (4, 8, 16):
                chunk = block * chunk_mult
                if block > F * 2 or chunk > max(F, block) * 2 or chunk > 131072:
                    continue
                cands.add(K.Config(rows=1, block=block, chunk=chunk, num_warps=warps))
    out = []
    for cfg in sorted(cands, key=lambda c: (c.block, c.chunk, c.num_warps)):
        try:
            loss, stats = K.reconcile_fwd(a2, d2, cos, 1e-8, config=cfg)
            g = torch.ones((), device=a.device, dtype=loss.dtype)
            fwd = do_bench(lambda: K.reconcile_fwd(a2, d2, cos, 1e-8, config=cfg), rep=rep, return_mode="median")
            bwd = do_bench(lambda: K.reconcile_bwd(g, a2, d2, stats, cos, 1e-8, config=cfg), rep=rep,
                           return_mode="median")
            out.append(dict(block=cfg.block, chunk=cfg.chunk, rows=cfg.rows, num_warps=cfg.num_warps,
                            fwd_ms=fwd, bwd_ms=bwd, default=cfg == default))
        except Exception as exc:  # noqa: BLE001
            out.append(dict(block=cfg.block, chunk=cfg.chunk, num_warps=cfg.num_warps, error=repr(exc)[:300]))
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| shape | dtype | distance | impl | fwd ms | fwd / read-once floor | fwd+bwd ms | "
        "fwd+bwd / two-pass floor | fwd+bwd / read-once floor | peak MiB | loss rel err | grad rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in results:
        for r in cfg.get("impls", []):
            head = f"| {cfg['shape']} | {cfg['dtype']} | {cfg['distance']} | {r['impl']} |"
            if "error" in r:
                lines.append(head + f" error: {r['error'][:80]} |" + " |" * 7)
                continue
            f, fb = r["fwd"]["median_ms"], r["fwd_bwd"]["median_ms"]
            lines.append(
                head
                + f" {f:.4f} | {f / cfg['floor_read_once_ms']:.2f}x | {fb:.4f} | {fb / cfg['floor_two_pass_ms']:.2f}x |"
                + f" {fb / cfg['floor_read_once_ms']:.2f}x | {r['peak_mib']:.1f} | {r['loss_rel_err']:.1e} |"
                + f" {r['grad_rel_err']:.1e} |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = [c for c in results if c.get("impls")]
    if not cfgs:
        return
    impls = [i for i in IMPLS if any(r["impl"] == i and "error" not in r for c in cfgs for r in c["impls"])]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(cfgs) * 2), 4.8), sharey=False)
    width = 0.8 / max(1, len(impls))
    for ax, key, floor_key, title in (
        (axes[0], "fwd", "floor_read_once_ms", "forward / read-once floor"),
        (axes[1], "fwd_bwd", "floor_two_pass_ms", "forward + backward / two-pass floor"),
    ):
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(cfgs):
                r = next((r for r in c["impls"] if r["impl"] == impl and "error" not in r), None)
                if r is not None:
                    xs.append(i + (j - (len(impls) - 1) / 2) * width)
                    ys.append(r[key]["median_ms"] / c[floor_key])
            ax.bar(xs, ys, width=width, label=impl)
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(1.3, color="r", lw=1, ls="--", label="1.3x target")
        ax.set_xticks(range(len(cfgs)))
        ax.set_xticklabels([f"{c['shape']}\n{c['dtype']} {c['distance']}" for c in cfgs], fontsize=7)
        ax.set_ylabel("median time / floor")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sgr_ext reconcile on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1024x16x32x32", "8x512x768"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--distances", nargs="+", default=["l2", "cosine"], choices=["l2", "cosine"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--rep", type=int, default=200, help="ms of timed repetitions per measurement (do_bench)")
    p.add_argument("--sweep", action="store_true", help="also time alternative Triton tilings")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_reconcile.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    device = torch.cuda.get_device_name()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"reconcile_{slug(device)}"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "target": "triton fwd <= 1.3x read-once floor; fwd+bwd <= 1.3x two-pass floor",
    }
    report = {**meta, "copy_bandwidth_GBps": None, "results": [], "sweeps": []}

    def save():
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))

    try:
        bw = copy_bandwidth(args.rep)
        report["copy_bandwidth_GBps"] = bw / 1e9
        print(f"device: {device}; copy bandwidth {bw / 1e9:.0f} GB/s")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        bw = 3.0e12
        report["copy_bandwidth_GBps_assumed"] = bw / 1e9
    save()

    for shape_s in args.shapes:
        shape = parse_shape(shape_s)
        for dt in args.dtypes:
            for distance in args.distances:
                cfg = {"shape": shape_s, "B": shape[0], "dtype": dt, "distance": distance, "impls": []}
                report["results"].append(cfg)
                try:
                    a, d, ref_loss, ref_grad = setup_config(cfg, bw, torch.device("cuda"))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    cfg["error"] = repr(exc)[:500]
                    save()
                    continue
                for impl in args.impls:
                    try:
                        row = measure_impl(impl, distance, a, d, args.rep, ref_loss, ref_grad)
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        row = {"impl": impl, "error": repr(exc)[:500]}
                    cfg["impls"].append(row)
                    if "error" not in row:
                        print(
                            f"{shape_s} {dt} {distance} {impl}: fwd {row['fwd']['median_ms']:.4f} ms "
                            f"({row['fwd']['median_ms'] / cfg['floor_read_once_ms']:.2f}x floor), "
                            f"fwd+bwd {row['fwd_bwd']['median_ms']:.4f} ms "
                            f"({row['fwd_bwd']['median_ms'] / cfg['floor_two_pass_ms']:.2f}x two-pass floor)",
                            flush=True,
                        )
                    save()
                if args.sweep:
                    try:
                        report["sweeps"].append({"shape": shape_s, "dtype": dt, "distance": distance,
                                                 "configs": sweep_tilings(a, d, distance, min(args.rep, 50))})
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        report["sweeps"].append({"shape": shape_s, "dtype": dt, "distance": distance,
                                                 "error": repr(exc)[:500]})
                    save()
                del a, d, ref_grad
                torch.cuda.empty_cache()

    md = table(report["results"])
    report["markdown"] = md
    save()
    if not args.no_plot:
        try:
            plot(report["results"], stem.with_suffix(".png"), device)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    print()
    print(f"{device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"copy bandwidth {report['copy_bandwidth_GBps'] or float('nan'):.0f} GB/s")
    print(md)
    for s in report["sweeps"]:
        ok = [c for c in s.get("configs", []) if "error" not in c]
        if ok:
            best = min(ok, key=lambda c: c["fwd_ms"] + c["bwd_ms"])
            dflt = next((c for c in ok if c.get("default")), None)
            print(f"sweep {s['shape']} {s['dtype']} {s['distance']}: best {best}; default {dflt}")
    print(f"\nwrote {stem.with_suffix('.json')}" + ("" if args.no_plot else f" and {stem.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
