"""gpu_check sections 2-4: the training step, the kernels, and (time permitting) the
sanitizer and a 1-epoch accuracy run. Each measurement reuses the benchmark script that
owns it (``bench_train_step``, ``gpu_reconcile``, ``gpu_linear_ce``, ``sanitize_kernels``,
``study_accuracy``)."""
from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DRY_TRAIN = {"resnet8_k3_b4": dict(depth=8, K=3, batch=4, image=8)}
TRAIN_ORDER = ("resnet32_k16_b1024", "resnet32_k16_b128", "resnet110_k14_b1024")  # the costliest last
RECONCILE_SHAPES = ("1024x16x32x32", "8x512x768")
DRY_RECONCILE_SHAPES = ("4x3x5x7",)
LCE_SIZE = {"name": "N8192_H768_V32000", "N": 8192, "H": 768, "V": 32000, "llm": True}
DRY_LCE_SIZE = {"name": "N33_H16_V300", "N": 33, "H": 16, "V": 300, "llm": True}
SANITIZE_CASES = r"-(7x127|2x3x7x11|5x2049|1030x3|37x19x1001|130x33x517)-.*-(fp32|bf16)"
DRY_SANITIZE_CASES = r"-(3x5|3x5x7)-.*-fp32"


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ 2. training step


def train_step(check) -> None:
    """Every method, config and precision of ``bench_train_step``; overlap on and off."""
    import bench_train_step as B

    dev, dry = check.device, check.dry_run
    data = check.section_data("train_step")
    rows = data.setdefault("rows", [])
    data["targets"] = B.TARGETS
    methods = [m for m in B.METHODS if dev.type == "cuda" or not m.endswith("_nooverlap")]
    warmup, iters = (0, 1) if dry else (3, 10)
    data["settings"] = {"warmup": warmup, "iters": iters, "lam": B.LAM, "tf32": dev.type == "cuda",
                        "step": "zero_grad + forward + backward, no optimizer step"}
    if dev.type == "cuda":  # fp32 rows: TF32 allowed, as in bench_train_step
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    last_s = 1.0
    for cfg_name, cfg in (DRY_TRAIN if dry else {k: B.CONFIGS[k] for k in TRAIN_ORDER}).items():
        for prec, amp in (("fp32", None), ("bf16", torch.bfloat16)):
            for method in methods:
                row = {"config": cfg_name, **cfg, "precision": prec, "method": method}

                def measure(row=row, method=method, amp=amp):
                    model, blocks, x, y = B.build(cfg, dev, channels_last=False)
                    try:
                        row.update(B.measure(B.make_step(method, model, blocks, x, y), dev, amp, warmup, iters))
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "OOM"
                    finally:
                        del model, blocks, x, y
                        _free(dev)
                    rows.append(row)
                    data["ratios"] = B.ratios(rows)

                t0 = time.monotonic()
                check.item("train_step", f"{cfg_name} {prec} {method}", measure, need_s=last_s)
                last_s = time.monotonic() - t0


# ------------------------------------------------------------------ 3. kernels


def kernels(check) -> None:
    """reconcile (eager and Triton first, the torch.compile variants last: they compile for
    tens of seconds) and linear + cross-entropy against torch eager and Liger-Kernel."""
    import gpu_reconcile as R

    dev, dry = check.device, check.dry_run
    data = check.section_data("kernels")
    rep = 20 if dry else 100
    bw = check.item("kernels", "copy bandwidth",
                    lambda: R.copy_bandwidth(rep, dev, 2**20 if dry else 128 * 2**20), need_s=1)
    data["copy_bandwidth_GBps"] = None if bw is None else bw / 1e9
    bw = bw or 3.0e12
    configs = data.setdefault("reconcile", [])
    for impls in (("triton", "torch_eager"), ("triton_compile", "torch_compile")):
        if impls[0] == "triton_compile":
            check.item("kernels", f"linear_ce {LCE_SIZE['name']}", lambda: linear_ce(check), need_s=5)
            if dry:
                continue  # inductor's C++ compile on a CPU takes minutes
        for shape in DRY_RECONCILE_SHAPES if dry else RECONCILE_SHAPES:
            for dt in ("fp32", "bf16"):
                for distance in ("l2", "cosine"):
                    cfg = next((c for c in configs if (c["shape"], c["dtype"], c["distance"]) == (shape, dt, distance)),
                               None)
                    if cfg is None:
                        cfg = {"shape": shape, "dtype": dt, "distance": distance, "impls": []}
                        configs.append(cfg)
                    for impl in impls:
                        def measure(cfg=cfg, impl=impl):
                            a, d, ref_loss, ref_grad = R.setup_config(cfg, bw, dev)
                            try:
                                cfg["impls"].append(R.measure_impl(impl, cfg["distance"], a, d, rep, ref_loss, ref_grad))
                            finally:
                                del a, d
                                _free(dev)

                        check.item("kernels", f"reconcile {shape} {dt} {distance} {impl}", measure,
                                   need_s=20 if "compile" in impl else 1)


def linear_ce(check) -> None:
    import gpu_linear_ce as L

    L.DEVICE = check.device.type
    size = DRY_LCE_SIZE if check.dry_run else LCE_SIZE
    x, w, t = L.make_inputs(size)
    ref = L.reference64(x, w, t)
    rows = check.section_data("kernels").setdefault("linear_ce", [])
    for name, fn in L.make_impls(size, no_compile=True).items():
        if check.budget.left() <= 0:
            check.skip("kernels", f"linear_ce {name}", "no time left in the section")
            continue
        row = {"size": size["name"], "impl": name}
        try:
            row.update(L.measure(fn, x, w, t, ref, 50 if check.dry_run else 200))
        except Exception as exc:  # one impl failing (Liger on a CPU) leaves the others
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        rows.append(row)
        _free(check.device)
        check.save()


# ------------------------------------------------------------------ 4. extras


def extras(check) -> None:
    check.item("extras", "compute-sanitizer memcheck", lambda: sanitizer(check), need_s=5 if check.dry_run else 30)
    check.item("extras", "accuracy, 1 epoch", lambda: accuracy(check), need_s=10 if check.dry_run else 60)


def _run_logged(cmd: list, check, log: Path) -> int:
    """Run cmd, its output into ``log``; at the end of the section's box it is killed with
    every process it started (its own session: the study's spawned workers included)."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE.parent, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, check.budget.left() - 2))
        except subprocess.TimeoutExpired:
            f.write("\n[gpu_check: killed at the end of the section's time box]\n")
            return -9
        finally:  # also on ItemTimeout: no orphan may keep the device busy after the box
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def sanitizer(check) -> None:
    """``compute-sanitizer --tool memcheck`` over a subset of ``sanitize_kernels.py``'s cases
    (a dry run, without a sanitizer, runs the same script in the interpreter)."""
    data = check.section_data("extras")
    log = check.out / "sanitizer.log"
    with tempfile.TemporaryDirectory() as tmp:
        script = [sys.executable, str(HERE / "sanitize_kernels.py"), "--out", tmp]
        if check.dry_run:
            cmd = script + ["--interpret", "--only=" + DRY_SANITIZE_CASES]
        else:
            tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
            if not os.path.exists(tool):
                data["sanitizer"] = {"status": "compute-sanitizer not found"}
                return
            cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3"] + script + ["--only=" + SANITIZE_CASES]
        rc = _run_logged(cmd, check, log)
        record = next(Path(tmp).glob("*.json"), None)
        cases = json.loads(record.read_text()) if record else {}
    text = log.read_text()
    summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line]
    data["sanitizer"] = {"returncode": rc, "error_summary": summary[-1] if summary else None,
                         "cases_run": cases.get("cases_run"), "cases_failed": cases.get("cases_failed"),
                         "command": " ".join(cmd[:4] + ["..."])}


def accuracy(check) -> None:
    """study_accuracy.py for 1 epoch: BP, local and SGR (lam 0.1) at K=16 (dry run: --quick)."""
    import study_accuracy

    data_path = next((str(HERE.parent / c) for c in study_accuracy.DATA_CANDIDATES if (HERE.parent / c).is_file()),
                     None)
    if data_path is None:
        check.section_data("extras")["accuracy"] = {"status": "no CIFAR-10 subset in .data/ (see README)"}
        return
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--data", data_path, "--out", tmp, "--seeds", "0", "--cos-lams", "", "--warm-lams", "",
                "--lams", "0.1"]
        args += (["--quick", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32"] if check.dry_run
                 else ["--epochs", "1", "--ks", "16", "--workers", "3"])
        cmd = [sys.executable, str(HERE / "study_accuracy.py")] + args
        rc = _run_logged(cmd, check, check.out / "accuracy.log")
        for name in ("study.md", "study.json"):
            if (Path(tmp) / name).is_file():
                shutil.copy(Path(tmp) / name, check.out / name.replace("study", "accuracy"))
    study = check.out / "accuracy.json"
    check.section_data("extras")["accuracy"] = {
        "returncode": rc, "rows": json.loads(study.read_text())["rows"] if study.is_file() else None}
