"""Accuracy study on the real CIFAR-10 subset: global BP vs plain local learning vs SGR.

ResNet-32, 30 epochs, batch 128, K = 4, 8, 16; methods bp, local and sgr with a lambda
sweep plus variants (cosine distance, lambda warm-up); 3 seeds. Each run is one
``sgr_ext.trainer.train`` call. Small-batch runs are launch-bound, so many of them run
CONCURRENTLY on one GPU: a pool of worker processes (spawned), each loading the dataset
to the GPU once and then training the configurations it is handed, one after another.

Writes into --out:
  runs/<name>/        per run: results.json, metrics.csv/json, steps.csv (alignment trace)
  study.md / .json    aggregate: mean ± std over seeds, gap closed = (sgr - local)/(bp - local)
  study.png           accuracy vs K per method, and mean cos(A_k, D_{k-1}) vs K
The aggregate is rewritten after every finished run, so a stopped study still leaves a
table. Finished runs are skipped when the study is started again (--force reruns them).

GPU (one H100, ~9 min):
  python benchmarks/study_accuracy.py --data .data/cifar10_subset.npz --out benchmarks/results/study_accuracy
Calibrate first (~1-2 min):  ... --epochs 2 --seeds 0 --out /tmp/study_calib
CPU smoke test:                python benchmarks/study_accuracy.py --quick --out /tmp/study_quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

try:  # run from a source checkout without an install: the repository root on sys.path
    import sgr_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA_CANDIDATES = (".data/cifar10_subset.npz", "shared/data/cifar10_subset.npz",
                   "../shared/data/cifar10_subset.npz", "/work/shared/data/cifar10_subset.npz")


@dataclass(frozen=True)
class Variant:
    """One configuration of the study, before the seed."""

    method: str  # bp | local | sgr | sgr-fast
    K: int = 1
    lam: float = 0.0
    distance: str = "l2"
    warmup: float = 0.0  # lambda warm-up epochs

    @property
    def name(self) -> str:
        if self.method == "bp":
            return "bp"
        if self.method == "local":
            return f"K{self.K}-local"
        tag = f"K{self.K}-{self.method}-{self.distance}-lam{self.lam:g}"
        return tag + (f"-warm{self.warmup:g}" if self.warmup else "")

    def cost(self, blocks_factor: float = 1.0) -> float:
        """A rough relative time per step, for longest-first scheduling."""
        if self.method == "bp":
            return 1.0
        return (1.2 if self.method == "local" else 3.5) * (0.5 + self.K / 8.0) * blocks_factor


@dataclass
class Job:
    variant: Variant
    seed: int
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.variant.name}-s{self.seed}"


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def build_variants(args) -> list[Variant]:
    vs = [Variant("bp")]
    warm = args.warmup_epochs if args.warmup_epochs is not None else max(1.0, round(args.epochs / 3))
    sgr = "sgr-fast" if args.fast else "sgr"
    for K in args.ks:
        vs.append(Variant("local", K))
        vs += [Variant(sgr, K, lam, "l2") for lam in args.lams]
        vs += [Variant(sgr, K, lam, "cosine") for lam in args.cos_lams]
        vs += [Variant(sgr, K, lam, "l2", warm) for lam in args.warm_lams]
    return vs


def build_jobs(args, variants: list[Variant]) -> list[Job]:
    inc = re.compile(args.filter) if args.filter else None
    exc = re.compile(args.exclude) if args.exclude else None
    jobs = []
    for seed in args.seeds:
        for v in variants:
            job = Job(v, seed)
            if inc and not inc.search(job.name):
                continue
            if exc and exc.search(job.name):
                continue
            job.config = dict(
                arch=args.arch, modules=max(1, v.K), method=v.method, lam=(v.lam if v.method.startswith("sgr") else None),
                distance=v.distance, lam_warmup=v.warmup, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                seed=seed, amp=args.amp, device=args.device, diag_every=args.diag_every, log_every=args.log_every,
                train_subset=args.train_subset, test_subset=args.test_subset, progress=False, plots=args.run_plots,
                checkpoint=False, extra={"study_variant": v.name},
            )
            jobs.append(job)
    # Seed-major (so a stopped study has every configuration for the first seeds), longest first within a seed.
    order = {s: i for i, s in enumerate(args.seeds)}
    jobs.sort(key=lambda j: (order[j.seed], -j.variant.cost()))
    return jobs


# ------------------------------------------------------------------------------ workers

_DATA = None


def _init_worker(data_path: str, device: str | None, threads: int) -> None:
    """Per process: limit CPU threads, load the dataset once and move it to the device."""
    global _DATA
    import torch

    torch.set_num_threads(threads)
    from sgr_ext.trainer.data import load_dataset
    from sgr_ext.trainer.runtime import resolve_device

    dev = resolve_device(device)
    _DATA = load_dataset(data_path).to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _run_job(name: str, config: dict, out_dir: str) -> dict:
    from sgr_ext.trainer.config import TrainConfig
    from sgr_ext.trainer.loop import train

    t0 = time.perf_counter()
    try:
        res = train(TrainConfig(out=out_dir, **config), dataset=_DATA)
    except Exception as exc:  # record and go on with the other runs
        return {"name": name, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "config": config}
    res["study_name"] = name
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------ aggregate


def _stats(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(results: list[dict], variants: list[Variant]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        if "error" in r:
            continue
        by_variant.setdefault(r["config"]["extra"]["study_variant"], []).append(r)
    rows = []
    means = {}
    for v in variants:
        runs = by_variant.get(v.name, [])
        if not runs:
            continue
        acc_m, acc_s = _stats([r["final_test_acc"] for r in runs])
        best_m, best_s = _stats([r["best_test_acc"] for r in runs])
        cos_m, _ = _stats([r.get("mean_cosine") for r in runs])
        step_m, _ = _stats([r.get("median_step_time_ms") for r in runs])
        mem_m, _ = _stats([r.get("peak_mem_mib") for r in runs])
        wall_m, _ = _stats([r.get("wall_time_s") for r in runs])
        block_acc = [r.get("final_block_test_acc") or [] for r in runs]
        n_blocks = min((len(b) for b in block_acc), default=0)
        aux = [statistics.fmean(b[k] for b in block_acc) for k in range(n_blocks)]
        means[v.name] = acc_m
        rows.append({
            "name": v.name, "method": v.method, "K": v.K if v.method != "bp" else None, "lam": v.lam,
            "distance": v.distance if v.method.startswith("sgr") else None, "warmup": v.warmup,
            "seeds": sorted(r["config"]["seed"] for r in runs), "n": len(runs),
            "acc_mean": acc_m, "acc_std": acc_s, "best_mean": best_m, "best_std": best_s,
            "mean_cosine": cos_m, "step_ms": step_m, "peak_mem_mib": mem_m, "wall_s": wall_m,
            "aux_acc_mean": aux,
        })
    bp = means.get("bp")
    for row in rows:
        row["gap_closed"] = None
        if row["method"].startswith("sgr") and bp is not None:
            local = means.get(f"K{row['K']}-local")
            if local is not None and row["acc_mean"] is not None and abs(bp - local) > 1e-12:
                row["gap_closed"] = (row["acc_mean"] - local) / (bp - local)
    return {"rows": rows, "bp_acc": bp}


def _pct(m, s=None):
    if m is None:
        return "–"
    return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")


def _num(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def markdown(agg: dict, meta: dict) -> str:
    lines = [
        "# SGR accuracy study",
        "",
        f"{meta['arch']}, {meta['epochs']} epochs, batch {meta['batch_size']}, lr {meta['lr']} (SGD Nesterov, one-cycle), "
        f"data `{meta['data']}` ({meta.get('dataset', '')}), device {meta.get('device', '?')}, torch {meta.get('torch', '?')}, "
        f"{meta.get('finished', 0)} runs finished, {meta.get('failed', 0)} failed, study wall time {meta.get('wall_s', 0):.0f} s.",
        "",
        "Test accuracy (%) at the last epoch, mean ± std over seeds. gap closed = (sgr - local) / (bp - local) at the same K. "
        "cos = mean over boundaries of cos(A_k, D_{k-1}) in the last epoch. step = median training step time "
        "(many runs shared the GPU, so step times are inflated by contention; compare them with each other only).",
        "",
        "| config | K | method | distance | λ | warm-up | final acc | best acc | gap closed | cos | step ms | peak MiB | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in agg["rows"]:
        lines.append(
            f"| {r['name']} | {r['K'] or '–'} | {r['method']} | {r['distance'] or '–'} | "
            f"{_num(r['lam'], '{:g}') if r['method'].startswith('sgr') else '–'} | {_num(r['warmup'] or None, '{:g}')} | "
            f"{_pct(r['acc_mean'], r['acc_std'])} | {_pct(r['best_mean'], r['best_std'])} | "
            f"{_num(r['gap_closed'] * 100 if r['gap_closed'] is not None else None, '{:+.0f} %')} | "
            f"{_num(r['mean_cosine'], '{:.3f}')} | {_num(r['step_ms'])} | {_num(r['peak_mem_mib'], '{:.0f}')} | {r['n']} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in agg["rows"] if r["method"] != "bp" and r["acc_mean"] is not None]
    series: dict[str, list] = {}
    for r in rows:
        label = r["name"].split("-", 1)[1]  # without the K prefix
        series.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["K"])
        ks = [r["K"] for r in rs]
        axes[0].errorbar(ks, [100 * r["acc_mean"] for r in rs], yerr=[100 * (r["acc_std"] or 0) for r in rs],
                         marker="o", capsize=3, label=label, lw=2 if label == "local" else 1)
        cos = [(r["K"], r["mean_cosine"]) for r in rs if r["mean_cosine"] is not None]
        if cos:
            axes[1].plot([c[0] for c in cos], [c[1] for c in cos], marker="o", label=label, lw=2 if label == "local" else 1)
    if agg.get("bp_acc") is not None:
        axes[0].axhline(100 * agg["bp_acc"], color="k", ls="--", label="global BP")
    axes[0].set(xscale="log", xlabel="K (modules)", ylabel="test accuracy (%)", title="final test accuracy")
    axes[1].set(xscale="log", xlabel="K (modules)", ylabel="cos(A_k, D_{k-1})", title="mean boundary alignment, last epoch")
    for ax in axes:
        ax.set_xticks(sorted({r["K"] for r in rows}) or [1])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="the CIFAR-10 subset .npz (default: first found of %s)" % ", ".join(DATA_CANDIDATES))
    p.add_argument("--out", default="benchmarks/results/study_accuracy")
    p.add_argument("--arch", default="resnet32")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--ks", type=_ints, default=[4, 8, 16], help="comma-separated K values (default 4,8,16)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--lams", type=_floats, default=[0.1, 1.0], help="squared-L2 SGR lambdas (default 0.1,1)")
    p.add_argument("--cos-lams", type=_floats, default=[0.1], help="cosine-distance SGR lambdas (default 0.1)")
    p.add_argument("--warm-lams", type=_floats, default=[1.0], help="squared-L2 lambdas with warm-up (default 1)")
    p.add_argument("--warmup-epochs", type=float, default=None, help="lambda warm-up length (default epochs/3)")
    p.add_argument("--fast", action="store_true", help="use the fast SGR engine (method sgr-fast) instead of exact")
    p.add_argument("--filter", default=None, help="regex: only runs whose name matches (e.g. 'K16|bp', 's0$')")
    p.add_argument("--exclude", default=None, help="regex: skip runs whose name matches")
    p.add_argument("--workers", type=int, default=None, help="concurrent training processes (default 14 on CUDA, 0 = in-process on CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per worker (default 1)")
    p.add_argument("--device", default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--diag-every", type=int, default=4, help="plain local: alignment measured every N steps (default 4)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--run-plots", action="store_true", help="also write each run's PNG plots")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start no new run after this")
    p.add_argument("--force", action="store_true", help="rerun runs that already have results")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke mode: 1 epoch, K=2, bp + local + sgr (lam 0.1), seed 0, 256/128 images, batch 64")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.ks, args.seeds = 1, [2], [0]
        args.lams, args.cos_lams, args.warm_lams = [0.1], [], []
        args.batch_size = 64 if args.batch_size == 128 else args.batch_size
        args.train_subset = args.train_subset or 256
        args.test_subset = args.test_subset or 128
        if args.workers is None:
            args.workers = 0
    return args


def find_data(arg):
    if arg is not None:
        return arg
    for cand in DATA_CANDIDATES:
        if Path(cand).is_file():
            return cand
    raise SystemExit("study_accuracy: no --data given and none of %s exists" % ", ".join(DATA_CANDIDATES))


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = build_variants(args)
    jobs = build_jobs(args, variants)
    if args.list:
        for j in jobs:
            print(j.name)
        print(f"{len(jobs)} runs", file=sys.stderr)
        return 0
    data_path = find_data(args.data)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    import torch

    from sgr_ext.trainer.runtime import resolve_device

    dev = resolve_device(args.device)
    workers = args.workers if args.workers is not None else (14 if dev.type == "cuda" else 0)

    results: dict[str, dict] = {}
    todo = []
    for j in jobs:
        f = out / "runs" / j.name / "results.json"
        if f.is_file() and not args.force:
            try:
                r = json.loads(f.read_text())
                if r.get("complete") and r["config"]["epochs"] == args.epochs:
                    r["study_name"] = j.name
                    results[j.name] = r
                    continue
            except (ValueError, KeyError):
                pass
        todo.append(j)

    meta = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "data": data_path,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "workers": workers, "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_start = time.perf_counter()

    def write_aggregate(final=False):
        done = [r for r in results.values()]
        meta.update(finished=sum("error" not in r for r in done), failed=sum("error" in r for r in done),
                    wall_s=time.perf_counter() - t_start)
        ok = [r for r in done if "error" not in r]
        if ok:
            meta["dataset"] = "{name}: {train} train / {test} test".format(**ok[0]["dataset"])
        agg = aggregate(done, variants)
        payload = {"meta": meta, "rows": agg["rows"], "bp_acc": agg["bp_acc"],
                   "errors": {r["name"]: r["error"] for r in done if "error" in r}}
        (out / "study.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "study.md").write_text(markdown(agg, meta))
        if final and agg["rows"]:
            plot(agg, out / "study.png")
        return agg

    print(f"study: {len(jobs)} runs ({len(jobs) - len(todo)} already done), {workers or 'no'} worker processes, "
          f"device {meta['device']}, data {data_path}", file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="run", desc="study", dynamic_ncols=True, file=sys.stderr)

    def finished(res):
        results[res.get("study_name", res["name"])] = res
        if "error" in res:
            tqdm.write(f"FAILED {res['name']}: {res['error']}", file=sys.stderr)
        else:
            tqdm.write(f"{res['study_name']:<34} acc {100 * res['final_test_acc']:.2f}%  "
                       f"step {res['median_step_time_ms']:.1f} ms  run {res['wall_time_s']:.0f} s", file=sys.stderr)
        bar.update(1)
        write_aggregate()

    def over_budget():
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    skipped = []
    if workers <= 0:
        _init_worker(data_path, args.device, args.threads)
        for j in todo:
            if over_budget():
                skipped.append(j.name)
                continue
            finished(_run_job(j.name, j.config, str(out / "runs" / j.name)))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(data_path, args.device, args.threads)) as pool:
            pending = list(todo)
            running = {}
            while pending or running:
                while pending and len(running) < workers:
                    if over_budget():
                        skipped += [j.name for j in pending]
                        pending = []
                        break
                    j = pending.pop(0)
                    running[pool.submit(_run_job, j.name, j.config, str(out / "runs" / j.name))] = j
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    j = running.pop(fut)
                    try:
                        res = fut.result()
                    except Exception as exc:  # a worker died (e.g. CUDA error)
                        res = {"name": j.name, "error": f"{type(exc).__name__}: {exc}", "config": j.config}
                    finished(res)
    bar.close()
    if skipped:
        print(f"study: time budget reached, {len(skipped)} runs not started: {', '.join(skipped)}", file=sys.stderr)
    write_aggregate(final=True)
    print((out / "study.md").read_text())
    print(f"study: wrote {out / 'study.md'}, {out / 'study.json'}, {out / 'study.png'}", file=sys.stderr)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
