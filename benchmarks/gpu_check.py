"""One command that checks and measures everything a GPU can tell us, in at most 8 minutes.

    python benchmarks/gpu_check.py --out DIR        # one H100 / H200, <= 8 min
    python benchmarks/gpu_check.py --dry-run --out DIR   # CPU, tiny sizes, Triton interpreted, < 2 min

Sections, in priority order, each time-boxed (a section may run until its share of the
budget is used up, unused time passes to the next; before every sub-measurement the time
left is checked and what does not fit is skipped with a note in the summary; a running
sub-measurement that overruns its box is interrupted):

1. correctness on the device, each against float64 (``gpu_check_correct``);
2. the training step side by side: global BP, naive local, naive double-backward SGR and
   the library's local / exact / fast, overlap on and off (``gpu_check_perf``);
3. kernels: reconcile against torch eager / torch.compile and the read-once floor; fused
   linear + cross-entropy against torch eager and Liger-Kernel;
4. if time is left: compute-sanitizer memcheck over the kernels, a 1-epoch accuracy run.

Results are written as they come (a killed run leaves what it finished) into DIR:
``summary.md`` (device, driver, versions, every figure against its target), ``results.json``
(everything, with the command), ``sanitizer.log`` and ``accuracy.md`` / ``accuracy.json``.
Needs only this repository installed (``pip install --no-deps --no-build-isolation .``);
Liger-Kernel is used when importable or found as a wheel in ``.whl/``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # imported (tests) rather than run: the sibling scripts by name
    sys.path.insert(0, str(HERE))
from gpu_check_summary import summary_markdown  # noqa: E402
# the end of each section's box, as a fraction of the whole budget (priority order)
SECTION_ENDS = {"correctness": 0.3, "train_step": 0.62, "kernels": 0.82, "extras": 1.0}


class ItemTimeout(BaseException):
    """A sub-measurement ran past its time box (a BaseException, like KeyboardInterrupt, so
    that library code's ``except Exception`` fallbacks cannot swallow it)."""


class Budget:
    """Wall-clock boxes: ``section(name)`` opens a section; ``box(s)`` bounds one sub-measurement."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.start = time.monotonic()
        self.section_end = self.start + total_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def section(self, name: str) -> None:
        self.section_end = self.start + self.total_s * SECTION_ENDS[name]

    def left(self) -> float:
        """Seconds left in the open section."""
        return self.section_end - time.monotonic()

    @contextlib.contextmanager
    def box(self):
        """Interrupt the body (``ItemTimeout``) when the open section's time is up. SIGALRM:
        effective between Python bytecodes, so a single long kernel finishes first."""
        seconds = self.left()
        if seconds <= 0:
            raise ItemTimeout("no time left in this section")

        def alarm(signum, frame):
            raise ItemTimeout(f"interrupted at the end of the section's time box ({seconds:.0f} s)")

        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


class Check:
    """Shared state of one run: device, sizes, the budget and the record (results.json)."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float, device):
        self.out, self.dry_run, self.device = out, dry_run, device
        self.budget = Budget(budget_s)
        self.results: dict = {"meta": {}, "sections": {}, "skipped": []}

    def item(self, section: str, name: str, fn, need_s: float = 0.0):
        """Run ``fn()`` as one time-boxed sub-measurement; returns its value, or None when it was
        skipped, timed out or failed (recorded under ``skipped`` / the section's ``errors``)."""
        left = self.budget.left()
        if left < need_s or left <= 0:
            self.skip(section, name, f"not started: {max(left, 0):.0f} s left in the section, needs ~{need_s:.0f} s")
            return None
        t0 = time.monotonic()
        try:
            with self.budget.box():
                value = fn()
        except ItemTimeout as exc:
            self.skip(section, name, str(exc))
            return None
        except Exception as exc:  # recorded, the run goes on
            errors = self.results["sections"].setdefault(section, {}).setdefault("errors", {})
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"[{section}] {name}: FAILED {errors[name]}", flush=True)
            traceback.print_exc(limit=4)
            return None
        finally:
            self.save()
        print(f"[{section}] {name}: {time.monotonic() - t0:.1f} s", flush=True)
        return value

    def skip(self, section: str, name: str, why: str) -> None:
        self.results["skipped"].append({"section": section, "item": name, "why": why})
        print(f"[{section}] {name}: SKIPPED ({why})", flush=True)
        self.save()

    def section_data(self, section: str) -> dict:
        return self.results["sections"].setdefault(section, {})

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(self.budget.elapsed(), 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "summary.md").write_text(summary_markdown(self.results))


def environment(dry_run: bool, argv) -> dict:
    """Device, driver, CUDA, torch, triton, Liger-Kernel and sgr_ext versions, date, command."""
    import torch

    import sgr_ext

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in argv),
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not dry_run else "cpu (dry run)",
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "sgr_ext": sgr_ext.__version__,
        "python": sys.version.split()[0],
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    meta["liger_kernel"] = liger_version()
    if not dry_run:
        try:
            meta["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            pass
    return meta


def liger_version():
    """Liger-Kernel's version, putting a wheel from ``.whl/`` on sys.path when it is not
    installed (a pure-Python wheel imports from the zip); None when there is none."""
    from importlib import metadata

    try:
        return metadata.version("liger_kernel")
    except metadata.PackageNotFoundError:
        pass
    wheels = sorted((ROOT / ".whl").glob("liger_kernel-*.whl"))
    if not wheels:
        return None
    sys.path.append(str(wheels[-1]))
    return wheels[-1].name.split("-")[1] + " (from " + wheels[-1].name + " on sys.path)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the (at most 8) result files")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, Triton in the interpreter: checks this script (< 2 min)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all sections (default 450 on a GPU, 100 in a dry run)")
    args = p.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out: expected a directory, got the file {args.out}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before any import
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    import gpu_check_correct
    import gpu_check_perf

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:  # the one-time C++ build (CPU impl="cpp") before the clock starts, never cut by a box
        from sgr_ext.ops import _backends

        _backends.cpp_ops()
    check = Check(args.out, args.dry_run, args.budget_s or (100.0 if args.dry_run else 450.0), device)
    check.results["meta"] = {**environment(args.dry_run, argv), "budget_s": check.budget.total_s}
    check.save()
    for name, run in (("correctness", gpu_check_correct.run), ("train_step", gpu_check_perf.train_step),
                      ("kernels", gpu_check_perf.kernels), ("extras", gpu_check_perf.extras)):
        check.budget.section(name)
        run(check)
    check.results["meta"]["finished"] = True
    check.save()
    print(f"gpu_check: wrote {args.out / 'summary.md'} and results.json in {check.budget.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
