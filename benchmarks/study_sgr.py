"""SGR accuracy study on the real CIFAR-10 subset: global BP vs plain local learning vs SGR variants.

Selects settings on a validation split carved from the training set, then reports the selected
ones on the test split over 3 seeds (mean +- std, share of the local-to-BP gap closed). See
``benchmarks/sgr_study/plan.py`` for the stages and ``variants.py`` for what is screened.

  python benchmarks/study_sgr.py --profile cpu --out benchmarks/results/study_sgr   # 2 cores, ~1.5 h
  python benchmarks/study_sgr.py --profile gpu --out benchmarks/results/study_sgr_gpu --jobs 8
  python benchmarks/study_sgr.py --profile smoke --out /tmp/smoke                    # seconds (CI)

Finished runs are cached as ``OUT/runs/<arch>/<run>.json``: stopping and restarting resumes,
and widening the variant list reruns nothing. The report (``study.md``, ``study.json``,
``study_strength.png``, ``study_alignment.png``) is rewritten after every finished run.
Progress (per epoch, with rate and ETA) goes to stdout and ``OUT/progress.log``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

try:  # a source checkout without an install
    import sgr_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sgr_study import plan, report, run  # noqa: E402
from sgr_study.variants import PROFILES, Variant  # noqa: E402

DATA_CANDIDATES = (".data/cifar10_subset.npz", "../shared/data/cifar10_subset.npz", "/work/shared/data/cifar10_subset.npz")


def _find_data(path):
    for p in ([path] if path else DATA_CANDIDATES):
        if p and Path(p).is_file():
            return str(Path(p).resolve())
    raise SystemExit(f"--data: no CIFAR-10 subset found (tried {[path] if path else list(DATA_CANDIDATES)})")


def load_results(out: Path) -> dict:
    results = {}
    for f in sorted((out / "runs").glob("*/*.json")):
        r = json.loads(f.read_text())
        results[(r["arch"], r["name"], r["seed"])] = r
    return results


_LOG = None


def _log(msg: str) -> None:
    line = time.strftime("%H:%M:%S ") + msg
    print(line, flush=True)
    if _LOG is not None:
        with open(_LOG, "a") as f:
            f.write(line + "\n")


def _init_worker(threads: int, log_path: str) -> None:
    global _LOG
    import torch

    torch.set_num_threads(threads)
    _LOG = log_path


def _job(args) -> dict:
    arch, variant, seed, profile, data = args
    try:
        return run.train(arch, Variant(**variant), seed, profile, data, log=lambda m: _log(f"{arch} {m}"))
    except Exception as exc:  # a failed variant is a result too (recorded, never retried silently)
        return {"arch": arch, "variant": variant, "name": Variant(**variant).name, "seed": seed,
                "failed": f"{type(exc).__name__}: {exc}", "val_acc": float("nan"), "test_acc": float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="sizes and variant lists (default cpu)")
    ap.add_argument("--data", default=None, help="cifar10_subset.npz (default: .data/ or ../shared/data/)")
    ap.add_argument("--out", default="benchmarks/results/study_sgr", help="results folder (runs are cached here)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--epochs", type=int, default=None, help="override the profile's epochs")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the cached runs")
    ap.add_argument("--readme", default=None, help="also rewrite this README's study block (between the "
                    "'<!-- study_sgr:begin/end -->' markers) from the report")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.epochs is not None:
        profile = dataclasses.replace(profile, epochs=args.epochs)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    global _LOG
    _LOG = str(out / "progress.log")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else f"study_sgr {argv}"
    meta = {"profile": args.profile, "settings": dataclasses.asdict(profile), "command": command}
    if args.report_only:
        report.write(out, load_results(out), profile, meta)
        return _readme(args, out)
    data = _find_data(args.data)
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    done_here = 0
    with ctx.Pool(args.jobs, initializer=_init_worker, initargs=(args.threads, _LOG)) as pool:
        while True:
            results = load_results(out)
            stages = plan.stage_jobs(profile, results)
            todo = next(([j for j in s if (j[0], j[1].name, j[2]) not in results] for s in stages
                         if any((j[0], j[1].name, j[2]) not in results for j in s)), None)
            if not todo:
                break
            todo.sort(key=lambda j: -j[1].cost())
            left = sum(1 for s in stages for j in s if (j[0], j[1].name, j[2]) not in results)
            _log(f"stage with {len(todo)} runs to go ({left} known runs left in the study)")
            jobs = [(a, dataclasses.asdict(v), s, profile, data) for a, v, s in todo]
            for rec in pool.imap_unordered(_job, jobs):
                path = run.cache_path(out, rec["arch"], Variant(**rec["variant"]), rec["seed"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rec, indent=1))
                done_here += 1
                left -= 1
                el = time.perf_counter() - t0
                _log(f"done {rec['arch']} {rec['name']} s{rec['seed']}: val {rec['val_acc']:.3f} test {rec['test_acc']:.3f}"
                     f"{' FAILED ' + rec['failed'] if 'failed' in rec else ''} | {done_here} runs in {el / 60:.1f} min, "
                     f"{el / done_here:.0f} s/run, >= {left} left, ETA >= {left * el / done_here / 60:.0f} min")
                report.write(out, load_results(out), profile, meta)
    report.write(out, load_results(out), profile, meta)
    _log(f"study complete: {out / 'study.md'}")
    return _readme(args, out)


def _readme(args, out: Path) -> int:
    if args.readme and not report.update_readme(Path(args.readme), out):
        print(f"--readme {args.readme}: no '{report.BEGIN}' ... '{report.END}' block to rewrite", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
