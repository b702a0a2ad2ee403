"""Throughput of data-parallel and module-parallel local learning: a model for N GPUs, and a measured 2-process run.

    python benchmarks/dist_throughput.py --out benchmarks/results/dist_throughput      # GPU, about 2 min

1. One process measures every block's step time (``LocalNet.train_step`` with CUDA events
   recorded in ``on_block_end``) at the batch sizes the parallel schemes use: the global
   batch B, B/N (data parallel, N ranks) and B/M (module parallel, M micro-batches).
2. The throughput model (``throughput_model.model_data_parallel`` /
   ``model_module_parallel``, in this folder) turns those times, the gradient bytes per block and the
   boundary bytes (x_k and D_k) into predicted step times on N = 1, 2, 4, 8 devices, for an
   assumed link (``--link-gbps``, ``--latency-us``: stated in the output, not measured).
3. Two processes on the ONE GPU of this machine run ``DataParallelLocalNet`` and
   ``PipelineStage`` for real (gloo backend: NCCL refuses two ranks on one GPU, so
   activations travel through host memory). Both processes share the GPU, so this checks
   that the schemes run and what their overhead is; it cannot show a multi-GPU speedup.

Writes ``<out>.json`` (every number, the device, versions, the command), ``<out>.md``
(tables) and ``<out>.png`` (predicted and measured samples/s).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

import sgr_ext
from sgr_ext import distributed as sd

import throughput_model  # benchmarks/throughput_model.py, next to this script


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet32", choices=("resnet32", "resnet110", "digits_cnn"))
    p.add_argument("--modules", "-K", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256, help="global batch B (default %(default)s)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8], help="M values to model (default 4 8)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8], help="N values to model")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--mode", default="exact", help="LocalNet engine (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--link-gbps", type=float, default=100.0,
                   help="ASSUMED per-direction link bandwidth between GPUs in GB/s (default 100: NVLink-class)")
    p.add_argument("--latency-us", type=float, default=20.0, help="ASSUMED per-message latency (default 20 us)")
    p.add_argument("--two-proc-steps", type=int, default=30, help="measured steps of each 2-process run")
    p.add_argument("--two-proc-micro-batches", type=int, default=4)
    p.add_argument("--skip-two-proc", action="store_true")
    p.add_argument("--device", default=None, help="default cuda")
    p.add_argument("--out", default="benchmarks/results/dist_throughput")
    return p


# ------------------------------------------------------------------------------ building


def build_net(args, device):
    torch.manual_seed(0)
    if args.arch == "digits_cnn":
        from sgr_ext.models import DigitsCNN

        model, shape = DigitsCNN(10), (1, 8, 8)
    else:
        from sgr_ext import models

        model, shape = getattr(models, args.arch)(10), (3, 32, 32)
    model.to(device)
    blocks = sgr_ext.split(model, args.modules, example_input=torch.zeros(2, *shape, device=device))
    net = sgr_ext.LocalNet(blocks, lam=args.lam, mode=args.mode).to(device)
    return net, shape


def batch(shape, b, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(b, *shape, generator=g).to(device), torch.randint(0, 10, (b,), generator=g).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ phase 1


def measure_blocks(net, shape, b, device, warmup, reps) -> dict:
    """Median per-block step time (ms) at batch b, plus the step total."""
    x, y = batch(shape, b, device)
    K = len(net.blocks)
    per_block = [[] for _ in range(K)]
    totals = []
    info = {}
    for it in range(warmup + reps):
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(K + 1)]
            marks[0].record()

            def cb(k, r):
                marks[k + 1].record()
                info.setdefault(k, r)
        else:
            marks = [time.perf_counter()] + [0.0] * K

            def cb(k, r):
                marks[k + 1] = time.perf_counter()
                info.setdefault(k, r)

        net.train_step(x, y, on_block_end=cb)
        _sync(device)
        if it < warmup:
            continue
        if device.type == "cuda":
            ts = [marks[k].elapsed_time(marks[k + 1]) for k in range(K)]
        else:
            ts = [1e3 * (marks[k + 1] - marks[k]) for k in range(K)]
        for k in range(K):
            per_block[k].append(ts[k])
        totals.append(sum(ts))
    out_bytes = []  # bytes leaving block k per sample: x_k, plus D_k when SGR needs it
    for k in range(K):
        r = info[k]
        n = r.output[0].numel() * r.output.element_size()
        if r.output_grad is not None:
            n += r.output_grad[0].numel() * r.output_grad.element_size()
        out_bytes.append(n)
    return {"batch": b, "block_ms": [statistics.median(v) for v in per_block], "step_ms": statistics.median(totals),
            "step_ms_p10": sorted(totals)[len(totals) // 10], "step_ms_p90": sorted(totals)[(9 * len(totals)) // 10],
            "boundary_bytes_per_sample": out_bytes}


# ------------------------------------------------------------------------------ phase 3


def _two_proc_worker(rank, world, port, args_dict, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.simplefilter("ignore")
    args = argparse.Namespace(**args_dict)
    try:
        dev_arg = args.device
        ctx = sd.setup_from_env(timeout_s=120, device=dev_arg if dev_arg != "cuda" else None)
        device = ctx.device
        res = {"rank": rank, "backend": ctx.backend, "device": str(device)}
        for parallel in ("data", "module"):
            net, shape = build_net(args, device)
            if parallel == "data":
                runner = sd.DataParallelLocalNet(net)
            else:
                runner = sd.PipelineStage(net, micro_batches=args.two_proc_micro_batches,
                                          placement=args.placement, device=device)
            opt = torch.optim.SGD(runner.parameters(), lr=0.01, momentum=0.9)
            x, y = batch(shape, args.batch_size, device, seed=1)
            for it in range(args.warmup + args.two_proc_steps):
                if it == args.warmup:
                    if parallel == "module":
                        runner.flush()
                    ctx.barrier()
                    _sync(device)
                    t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                runner.train_step(x, y)
                opt.step()
            _sync(device)
            if parallel == "module":
                runner.flush()
            elapsed = time.perf_counter() - t0
            ctx.barrier()
            res[parallel] = {"step_ms": 1e3 * elapsed / args.two_proc_steps,
                             "samples_per_s": args.batch_size * args.two_proc_steps / elapsed}
            if parallel == "module":
                res[parallel]["placement"] = runner.placement
            del runner, net, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        queue.put(res)
        ctx.shutdown()
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


def two_process_run(args, placement) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args_dict = dict(vars(args), placement=placement)
    procs = [ctx.Process(target=_two_proc_worker, args=(r, 2, port, args_dict, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    for _ in procs:
        results.append(queue.get(timeout=600))
    for p in procs:
        p.join(60)
    results.sort(key=lambda r: r["rank"])
    for r in results:
        if "error" in r:
            raise RuntimeError(f"2-process run, rank {r['rank']}: {r['error']}\n{r['tb']}")
    return {"ranks": results,
            "data_parallel": {"step_ms": max(r["data"]["step_ms"] for r in results),
                              "samples_per_s": min(r["data"]["samples_per_s"] for r in results)},
            "module_parallel": {"step_ms": max(r["module"]["step_ms"] for r in results),
                                "samples_per_s": min(r["module"]["samples_per_s"] for r in results),
                                "micro_batches": args.two_proc_micro_batches, "placement": placement}}


# ------------------------------------------------------------------------------ report


def write_report(out: Path, rec: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=2))
    a, B = rec["config"], rec["config"]["batch_size"]
    lines = ["# Data- and module-parallel local learning: throughput model and 2-process run",
             "",
             f"{rec['date']}, {rec['device']}, torch {rec['torch']}; `{rec['command']}`",
             "",
             f"{a['arch']}, K={a['modules']} blocks, SGR lambda {a['lam']} (mode {a['mode']}), global batch {B}, fp32.",
             f"Link ASSUMED for the model: {a['link_gbps']:g} GB/s per direction, {a['latency_us']:g} us per message.",
             "",
             "## Measured per-block step times (one process)",
             "",
             "| batch | " + " | ".join(f"block {k}" for k in range(a["modules"])) + " | step |",
             "|---" * (a["modules"] + 2) + "|"]
    for m in rec["block_times"]:
        lines.append(f"| {m['batch']} | " + " | ".join(f"{t:.2f}" for t in m["block_ms"]) + f" | {m['step_ms']:.2f} ms |")
    base = rec["single_process"]["samples_per_s"]
    lines += ["", "## Predicted step time on N GPUs", "",
              f"Baseline (1 GPU, whole batch): {rec['single_process']['step_ms']:.2f} ms, {base:.0f} samples/s.", "",
              "| scheme | N | micro-batches | placement | step (ms) | samples/s | speed-up | idle (bubble + imbalance) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rec["model"]:
        lines.append(f"| {r['scheme']} | {r['n_devices']} | {r.get('micro_batches', '-')} | {r.get('placement', '-')} | "
                     f"{r['step_ms']:.2f} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x | "
                     f"{r.get('bubble', '-') if isinstance(r.get('bubble'), str) else format(r.get('bubble', 0.0), '.3f')} |")
    tp = rec.get("two_process")
    if tp:
        on_cpu = rec["config"].get("device", "cuda").startswith("cpu")
        where = (f"on this machine's CPU ({rec['device']}; gloo; with OMP_NUM_THREADS=1 each rank has a core of "
                 "its own)" if on_cpu else
                 f"sharing this machine's ONE device ({rec['device']}; gloo, host-staged transfers)")
        caveat = ("On a CPU with one thread per rank and a core per rank, this IS a 2-way parallel run: it tests the "
                  "model's predicted N = 2 speed-up (the assumed GPU link does not apply; gloo uses shared memory)."
                  if on_cpu else
                  "Both ranks share one GPU, so this measures that the schemes run and their overhead "
                  "(communication through host memory, smaller per-rank batches), not a multi-GPU speed-up.")
        lines += ["", f"## Measured: 2 processes {where}", "",
                  "| run | step (ms) | samples/s | vs 1 process |", "|---|---|---|---|",
                  f"| 1 process | {rec['single_process']['step_ms']:.2f} | {base:.0f} | 1.00x |",
                  f"| data parallel, 2 ranks | {tp['data_parallel']['step_ms']:.2f} | "
                  f"{tp['data_parallel']['samples_per_s']:.0f} | {tp['data_parallel']['samples_per_s'] / base:.2f}x |",
                  f"| module parallel, 2 stages {tp['module_parallel']['placement']}, M={tp['module_parallel']['micro_batches']} | "
                  f"{tp['module_parallel']['step_ms']:.2f} | {tp['module_parallel']['samples_per_s']:.0f} | "
                  f"{tp['module_parallel']['samples_per_s'] / base:.2f}x |",
                  "", caveat]
    lines += ["", "Model: data parallel = per-block compute at B/N, block k's ring all-reduce "
              "(2(N-1)/N x bytes / link + 2(N-1) x latency) overlapping later blocks; module parallel = blocks "
              "partitioned to minimise the slowest stage, stage time per micro-batch = max(compute at B/M, send), "
              "flushed step (M+P-1) x slowest stage, streamed step M x slowest stage (PipelineStage streams: "
              "no rank waits for a later one, so the fill bubble is paid once per run, not per step)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for scheme, style in (("data", "o-"), ("module-streamed", "s-"), ("module-flushed", "s--")):
        for mb in sorted({r.get("micro_batches") for r in rec["model"] if r["scheme"].startswith(scheme)}, key=str):
            rows = [r for r in rec["model"] if r["scheme"] == scheme and r.get("micro_batches") == mb]
            if rows:
                label = scheme if mb is None else f"{scheme}, M={mb}"
                ax.plot([r["n_devices"] for r in rows], [r["samples_per_s"] for r in rows], style, label=label)
    unit = "CPU core" if a.get("device", "cuda").startswith("cpu") else "GPU"
    if tp:
        ranks = "2 procs, a core each" if unit == "CPU core" else "2 procs / 1 GPU"
        ax.plot([2], [tp["data_parallel"]["samples_per_s"]], "k^", ms=9, label=f"measured DP, {ranks}")
        ax.plot([2], [tp["module_parallel"]["samples_per_s"]], "kv", ms=9, label=f"measured MP, {ranks}")
    ax.axhline(base, color="gray", lw=0.8, ls=":", label=f"1 {unit}, measured")
    ax.set_xlabel(f"{unit}s N")
    ax.set_ylabel("samples / s")
    ax.set_xscale("log", base=2)
    ax.set_title(f"{a['arch']} K={a['modules']}, B={B}: predicted throughput ({a['link_gbps']:g} GB/s link)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = str(device) if args.device else ("cuda" if device.type == "cuda" else "cpu")
    t_start = time.perf_counter()
    net, shape = build_net(args, device)
    B = args.batch_size
    sizes = sorted({B} | {max(1, B // n) for n in args.devices} | {max(1, B // m) for m in args.micro_batches},
                   reverse=True)
    block_times = {b: measure_blocks(net, shape, b, device, args.warmup, args.reps) for b in sizes}
    print(f"per-block times measured at batches {sizes} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    grad_bytes = [sum(p.numel() * p.element_size() for p in blk.trainable_parameters()) for blk in net.blocks]
    full = block_times[B]
    base_sps = B / (full["step_ms"] / 1e3)
    model = []
    for n in args.devices:
        bt = block_times[max(1, B // n)]
        d = throughput_model.model_data_parallel(bt["block_ms"], grad_bytes, n, link_gbps=args.link_gbps, latency_us=args.latency_us)
        model.append({"scheme": "data", "n_devices": n, "step_ms": d["step_ms"], "samples_per_s": B / (d["step_ms"] / 1e3),
                      "exposed_comm_ms": d["exposed_comm_ms"], "bubble": "-"})
    for m in args.micro_batches:
        bt = block_times[max(1, B // m)]
        mb = max(1, B // m)
        bnd = [s * mb for s in bt["boundary_bytes_per_sample"]]
        for n in args.devices:
            if n < 2 or n > args.modules:
                continue
            r = throughput_model.model_module_parallel(bt["block_ms"], bnd, n, m, link_gbps=args.link_gbps, latency_us=args.latency_us)
            for kind in ("streamed", "flushed"):
                step = r[f"step_ms_{kind}"]
                model.append({"scheme": f"module-{kind}", "n_devices": n, "micro_batches": m,
                              "placement": r["placement"], "stage_ms": r["stage_ms"], "step_ms": step,
                              "samples_per_s": B / (step / 1e3),
                              "bubble": r["bubble_flushed"] if kind == "flushed" else "0 (paid once)"})
    rec = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "grad_bytes": grad_bytes,
        "single_process": {"step_ms": full["step_ms"], "samples_per_s": base_sps},
        "block_times": [block_times[b] for b in sizes],
        "model": model,
    }
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_two_proc:
        m2 = args.two_proc_micro_batches
        placement = sd.partition(block_times[max(1, B // m2)]["block_ms"], 2) if (B // m2) in block_times else None
        t0 = time.perf_counter()
        rec["two_process"] = two_process_run(args, placement)
        print(f"2-process runs done ({time.perf_counter() - t0:.0f} s)", flush=True)
    rec["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    write_report(out, rec)
    print(out.with_suffix(".md").read_text())
    return rec


if __name__ == "__main__":
    main()
