"""GPU benchmark of the fused linear + cross-entropy head (``sgr_ext.ops.linear_cross_entropy``).

    python benchmarks/gpu_linear_ce.py               # < 4 min on one H100
    python benchmarks/gpu_linear_ce.py --quick       # LLM sizes only, no torch.compile
    python benchmarks/gpu_linear_ce.py --smoke --out /tmp/x   # tiny, any device: checks the script

For every size and implementation, one forward + backward (``torch.autograd.grad`` w.r.t. x
and W, bf16 inputs, reduction="mean"):

* median time: ``triton.testing.do_bench(..., return_mode="median")`` (and p10/p90);
* peak memory: ``torch.cuda.reset_peak_memory_stats()`` after a warm-up call, then
  ``max_memory_allocated() - memory_allocated()`` before the call;
* numerics: relative error ``||out - ref|| / ||ref||`` of the loss, dL/dx and dL/dW against
  float64 computed (chunked) on the same bf16-rounded inputs.

Implementations: torch eager (logits in bf16, softmax in fp32: ``sgr_ext.reference``), torch.compile
(inductor) of the same function, Liger-Kernel's fused linear cross-entropy (if importable),
sgr_ext impl="triton", sgr_ext impl=None (the dispatch), and at the LLM sizes two variants:
dW accumulated in float32 across chunks (more memory, one rounding) and each chunk's dx GEMM
on a side stream concurrent with its dW GEMM (``GRAD_GEMM_STREAMS = 2``).

Sizes: N=8192 H=768 V=32000 and N=16384 H=2048 V=128256 (targets: peak <= Liger, time <=
0.9x Liger), CIFAR heads N=1024, H in {64, 128, 256, 512}, V in {10, 100}, and two sizes in
between (N=4096: H=512 V=1000, H=1024 V=8192) that show where the dispatch should switch.

Before the benchmark a GPU self-test checks the CUDA path (all reductions, bias, ignore_index,
double backward) against float64; its result goes into the JSON too.

Writes benchmarks/results/linear_ce_<device>.json (date, device, versions, command, results)
and linear_ce_<device>.png, and prints a markdown table. One failing (size, impl) is recorded
with its error and the run goes on; the JSON is rewritten after every size.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
DEVICE = "cuda"  # --smoke on a machine without a GPU: "cpu" (Triton in the interpreter)

LLM_SIZES = [
    {"name": "N8192_H768_V32000", "N": 8192, "H": 768, "V": 32000, "llm": True},
    {"name": "N16384_H2048_V128256", "N": 16384, "H": 2048, "V": 128256, "llm": True},
]
CIFAR_SIZES = [
    {"name": f"N1024_H{h}_V{v}", "N": 1024, "H": h, "V": v, "llm": False}
    for v in (10, 100)
    for h in (64, 128, 256, 512)
]
# in between: where the size-based dispatch (FUSED_MIN_LOGITS) should switch to the fused path
MID_SIZES = [
    {"name": "N4096_H512_V1000", "N": 4096, "H": 512, "V": 1000, "llm": False},
    {"name": "N4096_H1024_V8192", "N": 4096, "H": 1024, "V": 8192, "llm": False},
]
# numbers measured on an H100 (DESIGN.md section 4), for the "vs" columns when Liger is absent
DESIGN_LIGER = {"N8192_H768_V32000": (4.79, 74.5), "N16384_H2048_V128256": (50.0, 690.0)}
DESIGN_TORCH = {"N8192_H768_V32000": (6.07, 3000.0), "N16384_H2048_V128256": (68.2, 24048.0)}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------- implementations


def liger_fn():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - not installed or broken: skip the column
        return None
    return lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, ignore_index=IGNORE)


_COMPILED = {}


def make_impls(size: dict, no_compile: bool) -> dict:
    """name -> fn(x, w, t) returning the 0-dim loss."""
    from sgr_ext.ops import _linear_ce_fused as lce_fused  # the fused path's tuning knobs
    from sgr_ext.ops import linear_ce as lce
    from sgr_ext.reference import linear_cross_entropy_torch

    impls = {"torch_eager": lambda x, w, t: linear_cross_entropy_torch(x, w, t, None, "mean", IGNORE)}
    lig = liger_fn()
    if lig is not None:
        impls["liger"] = lig
    impls["sgr_ext_triton"] = lambda x, w, t: lce.linear_cross_entropy(x, w, t, impl="triton")
    impls["sgr_ext_auto"] = lambda x, w, t: lce.linear_cross_entropy(x, w, t)
    if size["llm"]:
        def fp32_dw(x, w, t):
            old = lce_fused.FP32_DW_MAX_BYTES
            lce_fused.FP32_DW_MAX_BYTES = 1 << 62
            try:
                return lce.linear_cross_entropy(x, w, t, impl="triton")
            finally:
                lce_fused.FP32_DW_MAX_BYTES = old

        impls["sgr_ext_triton_fp32dW"] = fp32_dw

        def two_streams(x, w, t):
            old = lce_fused.GRAD_GEMM_STREAMS
            lce_fused.GRAD_GEMM_STREAMS = 2
            try:
                return lce.linear_cross_entropy(x, w, t, impl="triton")
            finally:
                lce_fused.GRAD_GEMM_STREAMS = old

        impls["sgr_ext_triton_2streams"] = two_streams
    if not no_compile:  # last: the slowest to set up (compilation) and the least important
        key = "llm" if size["llm"] else "small"
        if key not in _COMPILED:
            # one dynamic-shape compile for all small sizes keeps the run short
            _COMPILED[key] = torch.compile(
                lambda x, w, t: F.cross_entropy(F.linear(x, w).float(), t, ignore_index=IGNORE),
                dynamic=not size["llm"],
            )
        impls["torch_compile"] = _COMPILED[key]
    return impls


def make_inputs(size: dict, seed: int = 0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    n, h, v = size["N"], size["H"], size["V"]
    x = torch.randn(n, h, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device=DEVICE, generator=g) * (2.0 / math.sqrt(h))).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    return x, w, t


def reference64(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor):
    """float64 loss, dL/dx, dL/dW of mean cross-entropy, in row chunks of <= 1 GiB of logits."""
    x64, w64 = x.detach().double(), w.detach().double()
    n, v = x.shape[0], w.shape[0]
    valid = t != IGNORE
    nvalid = valid.sum().double()
    rows = max(1, (1 << 30) // (v * 8))
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    gx = torch.empty_like(x64)
    gw = torch.zeros_like(w64)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        z = x64[s:e] @ w64.t()
        lse = torch.logsumexp(z, 1)
        ys = torch.where(valid[s:e], t[s:e], 0)
        loss += torch.where(valid[s:e], lse - z.gather(1, ys[:, None])[:, 0], 0).sum()
        z.sub_(lse[:, None]).exp_()
        z.scatter_add_(1, ys[:, None], -valid[s:e, None].double())
        z.mul_(valid[s:e, None].double() / nvalid)
        gx[s:e] = z @ w64
        gw.addmm_(z.t(), x64[s:e])
        del z
    return loss / nvalid, gx, gw


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm())


# ------------------------------------------------------------------------------ measuring


def _timings(step, rep_ms: int) -> dict:
    if DEVICE != "cuda":  # smoke run: wall clock
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"median_ms": times[1], "p10_ms": times[0], "p90_ms": times[2]}
    from triton.testing import do_bench

    out = {"median_ms": do_bench(step, warmup=max(25, rep_ms // 8), rep=rep_ms, return_mode="median")}
    out["p10_ms"], out["p90_ms"] = do_bench(step, warmup=5, rep=max(50, rep_ms // 2), quantiles=[0.1, 0.9])
    return out


def measure(fn, x, w, t, ref, rep_ms: int) -> dict:
    def step():
        loss = fn(x, w, t)
        return torch.autograd.grad(loss, [x, w])

    # warm-up (compiles), numerics
    loss = fn(x, w, t)
    gx, gw = torch.autograd.grad(loss, [x, w])
    out = {
        "loss_rel_err": rel(loss, ref[0]),
        "dx_rel_err": rel(gx, ref[1]),
        "dW_rel_err": rel(gw, ref[2]),
        "loss": float(loss.detach()),
    }
    del loss, gx, gw
    step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        out["peak_mib"] = float("nan")
    out.update(_timings(step, rep_ms))
    return out


def selftest(vocab=(11, 4099, 40000)) -> dict:
    """The CUDA path of sgr_ext against float64 on small shapes (first and second order)."""
    from sgr_ext.ops import linear_cross_entropy

    torch.manual_seed(0)
    worst = 0.0
    cases = 0
    for v in vocab:
        for reduction in ("mean", "sum", "none"):
            for bias in (True, False):
                x = torch.randn(67, 24, device=DEVICE, dtype=torch.float64, requires_grad=True)
                w = torch.randn(v, 24, device=DEVICE, dtype=torch.float64, requires_grad=True)
                b = torch.randn(v, device=DEVICE, dtype=torch.float64, requires_grad=True) if bias else None
                t = torch.randint(0, v, (67,), device=DEVICE)
                t[::5] = IGNORE
                params = [p for p in (x, w, b) if p is not None]

                def grads(loss):
                    g1 = torch.autograd.grad(loss, params, torch.ones_like(loss), create_graph=True)
                    s = sum((g * (i + 1.0)).sum() for i, g in enumerate(g1))
                    return [loss] + list(g1) + list(torch.autograd.grad(s, params))

                z = x @ w.t() + (b if b is not None else 0)
                ref = [g.detach() for g in grads(F.cross_entropy(z, t, reduction=reduction, ignore_index=IGNORE))]
                ours = [g.detach() for g in grads(linear_cross_entropy(x, w, t, bias=b, reduction=reduction,
                                                                       impl="triton"))]
                for a, r in zip(ours, ref):
                    worst = max(worst, float((a - r).norm() / max(float(r.norm()), 1e-300)))
                cases += 1
    # the side-stream variant must agree with the one-stream path
    from sgr_ext.ops import _linear_ce_fused as lce_fused  # the fused path's tuning knobs

    old_rows, old_streams = lce_fused.chunk_rows, lce_fused.GRAD_GEMM_STREAMS
    same = True
    try:
        lce_fused.chunk_rows = lambda n, h, v: 64
        x = torch.randn(300, 32, device=DEVICE).bfloat16().requires_grad_()
        w = torch.randn(5000, 32, device=DEVICE).bfloat16().requires_grad_()
        t = torch.randint(0, 5000, (300,), device=DEVICE)
        outs = []
        for streams in (1, 2):
            lce_fused.GRAD_GEMM_STREAMS = streams
            loss = linear_cross_entropy(x, w, t, impl="triton")
            outs.append([loss] + list(torch.autograd.grad(loss, [x, w])))
        same = all(rel(a, c) < 5e-3 for a, c in zip(*outs))  # cuBLAS may pick another algorithm
    finally:
        lce_fused.chunk_rows, lce_fused.GRAD_GEMM_STREAMS = old_rows, old_streams
    return {"cases": cases, "worst_rel_err_fp64": worst, "two_streams_agree": same,
            "passed": worst < 1e-9 and same}


# --------------------------------------------------------------------------------- output


def table(results: list) -> str:
    lines = [
        "| size | impl | median ms | p10-p90 ms | peak MiB | time vs Liger | mem vs Liger "
        "| loss err | dx err | dW err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_size = {}
    for r in results:
        by_size.setdefault(r["size"], []).append(r)
    for size, rows in by_size.items():
        lig = next((r for r in rows if r["impl"] == "liger" and "median_ms" in r), None)
        lt, lm = (lig["median_ms"], lig["peak_mib"]) if lig else DESIGN_LIGER.get(size, (None, None))
        for r in rows:
            if "median_ms" not in r:
                lines.append(f"| {size} | {r['impl']} | {r.get('error', 'skipped')[:60]} | | | | | | | |")
                continue
            vt = f"{r['median_ms'] / lt:.2f}x" if lt else ""
            vm = f"{r['peak_mib'] / lm:.3f}x" if lm else ""
            lines.append(
                f"| {size} | {r['impl']} | {r['median_ms']:.3f} | {r['p10_ms']:.3f}-{r['p90_ms']:.3f} | "
                f"{r['peak_mib']:.1f} | {vt} | {vm} | {r['loss_rel_err']:.1e} | {r['dx_rel_err']:.1e} | "
                f"{r['dW_rel_err']:.1e} |"
            )
    return "\n".join(lines)


def plot(results: list, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 1.4 * len(sizes)), 8), sharex=True)
    width = 0.8 / max(1, len(impls))
    has_data = {0: False, 1: False}
    for k, impl in enumerate(impls):
        for a, (ax, key) in enumerate(zip(axes, ("median_ms", "peak_mib"))):
            xs, ys = [], []
            for i, s in enumerate(sizes):
                r = next((r for r in results if r["size"] == s and r["impl"] == impl and key in r), None)
                if r is not None and math.isfinite(r[key]) and r[key] > 0:
                    xs.append(i + (k - (len(impls) - 1) / 2) * width)
                    ys.append(r[key])
            has_data[a] |= bool(ys)
            ax.bar(xs, ys, width=width, label=impl)
    axes[0].set_ylabel("fwd+bwd median (ms)")
    axes[1].set_ylabel("peak extra memory (MiB)")
    for a, ax in enumerate(axes):
        if has_data[a]:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(sizes)))
    axes[1].set_xticklabels(sizes, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8, ncol=3)
    axes[0].set_title(f"linear + cross-entropy, bf16, forward+backward ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "liger_kernel": None}
    try:
        from importlib.metadata import version

        out["liger_kernel"] = version("liger_kernel")
    except Exception:  # noqa: BLE001
        pass
    try:
        import sgr_ext

        out["sgr_ext"] = sgr_ext.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="LLM sizes only, no torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile (saves ~1 min)")
    ap.add_argument("--budget-s", type=float, default=190.0,
                    help="start nothing new after this many seconds (the run stays under 4 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, any device (CPU: Triton interpreter), to check the script itself")
    args = ap.parse_args(argv)
    global DEVICE
    if not torch.cuda.is_available():
        if not args.smoke:
            print("gpu_linear_ce.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        DEVICE = "cpu"
    t_start = time.time()
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"linear_ce_{slug(device)}"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        **versions(),
        "command": "python " + " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "dtype": "bfloat16",
        "reduction": "mean",
        "timing": "triton.testing.do_bench median of forward+backward (autograd.grad wrt x and W)",
        "memory": "max_memory_allocated - memory_allocated before one forward+backward, after warm-up",
        "errors": "||out - ref|| / ||ref||, ref = float64 on the same bf16 inputs",
    }
    try:
        meta["selftest"] = selftest((11, 300) if args.smoke else (11, 4099, 40000))
    except Exception as exc:  # noqa: BLE001
        meta["selftest"] = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    print("self-test:", {k: v for k, v in meta["selftest"].items() if k != "trace"}, flush=True)

    results: list = []
    sizes = LLM_SIZES + ([] if args.quick else CIFAR_SIZES + MID_SIZES)
    if args.smoke:
        sizes = [{"name": "N67_H32_V1000", "N": 67, "H": 32, "V": 1000, "llm": True},
                 {"name": "N64_H16_V10", "N": 64, "H": 16, "V": 10, "llm": False}]
    for size in sizes:
        from sgr_ext.ops._linear_ce_fused import chunk_rows

        print(f"== {size['name']} (chunk rows {chunk_rows(size['N'], size['H'], size['V'])})", flush=True)
        try:
            x, w, t = make_inputs(size)
            ref = reference64(x, w, t)
        except Exception as exc:  # noqa: BLE001
            results.append({"size": size["name"], "impl": "*", "error": f"{type(exc).__name__}: {exc}"})
            continue
        rep = 400 if size["llm"] else 100
        for name, fn in make_impls(size, args.quick or args.no_compile or args.smoke).items():
            row = {"size": size["name"], "impl": name, **{k: size[k] for k in ("N", "H", "V")}}
            if time.time() - t_start > args.budget_s:
                row["error"] = "skipped (time budget)"
            else:
                t0 = time.time()
                try:
                    row.update(measure(fn, x, w, t, ref, rep))
                except Exception as exc:  # noqa: BLE001 - record and go on
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    row["trace"] = traceback.format_exc()[-2000:]
                row["wall_s"] = round(time.time() - t0, 2)
            results.append(row)
            msg = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "trace"}
            print("  ", msg, flush=True)
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        del x, w, t, ref
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=1))

    meta["total_s"] = round(time.time() - t_start, 1)
    (args.out / f"{stem}.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    try:
        plot(results, args.out / f"{stem}.png", device)
    except Exception as exc:  # noqa: BLE001
        print("plot failed:", exc)
    print()
    print(f"linear + cross-entropy, bf16, forward+backward, {device}; torch {meta['torch']}, "
          f"triton {meta['triton']}, liger {meta['liger_kernel']}")
    print(table(results))
    print(f"\nwrote {args.out / (stem + '.json')} and .png in {meta['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
