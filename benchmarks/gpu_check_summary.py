"""gpu_check's summary.md: the environment and every figure of results.json against its target."""
from __future__ import annotations

import math

# linear + CE (gpu_linear_ce.py): the fused paths against Liger-Kernel
LCE_TARGETS = {"time vs Liger": 0.9, "mem vs Liger": 1.0}
RECONCILE_TARGET = 1.3  # Triton forward / read-once floor and forward+backward / two-pass floor


def _num(v, fmt="{:.3g}") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _verdict(value, limit) -> str:
    if value is None or limit is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "ok" if value <= limit else "**MISSED**"


def _table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def summary_markdown(results: dict) -> str:
    m, sec = results["meta"], results["sections"]
    lines = [
        "# gpu_check" + (" (DRY RUN: CPU, tiny sizes, Triton interpreted; no figure is a GPU figure)"
                         if m.get("dry_run") else ""),
        "",
        f"device **{m.get('device')}**, driver {m.get('driver')}, CUDA {m.get('cuda')}, torch {m.get('torch')}, "
        f"triton {m.get('triton')}, Liger-Kernel {m.get('liger_kernel')}, sgr_ext {m.get('sgr_ext')}, "
        f"python {m.get('python')}",
        "",
        f"{m.get('date')}; `{m.get('command')}`; {m.get('elapsed_s')} s of a {m.get('budget_s')} s budget; "
        + ("finished." if m.get("finished") else "**not finished (killed, or still running)**."),
        "",
    ]
    lines += _correctness(sec.get("correctness", {}))
    lines += _train_step(sec.get("train_step", {}))
    lines += _kernels(sec.get("kernels", {}))
    lines += _extras(sec.get("extras", {}))
    errors = [(s, k, v) for s, d in sec.items() for k, v in d.get("errors", {}).items()]
    if results["skipped"] or errors:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {s['section']} / {s['item']}: skipped, {s['why']}" for s in results["skipped"]]
        lines += [f"- {s} / {k}: **failed**, {v}" for s, k, v in errors] + [""]
    return "\n".join(lines)


def _correctness(c: dict) -> list:
    rows = []
    for name, r in c.get("ops", {}).items():
        w = r["worst"] or {}
        ok = "ok" if not r["failed"] and r["cases"] == r["of"] else f"**{len(r['failed'])} FAILED**" if r["failed"] \
            else "incomplete"
        rows.append([name, f"{r['cases']}/{r['of']}", w.get("name", "–"), _num(w.get("max_rel_err")),
                     _num(w.get("tol")), ok])
    st = c.get("linear_ce_selftest")
    if st:
        rows.append(["linear_ce self-test (+ two-stream dW)", st.get("cases"), "fp64, all reductions, 2nd order",
                     _num(st.get("worst_rel_err_fp64")), "1e-09",
                     "ok" if st.get("passed") else "**FAILED**"])
    for dtype in ("float32", "bfloat16", "float16"):
        bn = [r for r in c.get("dual_bn", []) if r["dtype"] == dtype]
        if bn:
            worst = max(bn, key=lambda r: r["rel_err"])
            bad = [f"{r['layout']}{'+relu' if r['relu'] else ''}" for r in bn if not r["ok"]]
            rows.append([f"dual BatchNorm Triton {dtype}", len(bn), f"{worst['layout']} {worst['shape']}",
                         _num(worst["rel_err"]), _num(worst["tol"]),
                         "ok" if not bad else "**FAILED: " + ", ".join(bad) + "**"])
    for prec, e in c.get("engines", {}).items():
        for mode, err_key, tol in (("exact", "exact_rel_err", e.get("exact_tol")),
                                   ("fast", "fast_rel_err", e.get("fast_tol")),
                                   ("double_backward", "double_backward_rel_err", None)):
            if err_key in e:
                rows.append([f"LocalNet {mode} {prec} vs float64 double backward", 1, str(e["config"]),
                             _num(e[err_key]), _num(tol), _verdict(e[err_key], tol) if tol else "(floor)"])
        for key in ("exact_overlap_max_abs_diff", "fast_overlap_max_abs_diff", "local_overlap_max_abs_diff"):
            if key in e:
                rows.append([f"{key.split('_')[0]} {prec}: overlap on vs off, max |diff|", 1, "", _num(e[key]), "0",
                             _verdict(e[key], 0.0)])
    return ["## 1. Correctness on the device (against float64)", ""] + _table(
        ["check", "cases", "worst case", "rel err", "tolerance", "verdict"], rows)


def _train_step(t: dict) -> list:
    rows = [[r["config"], r["precision"], r["method"], _num(r.get("median_ms"), "{:.2f}"),
             _num(r.get("peak_mib"), "{:.0f}"), _num(r.get("max_reserved_mib"), "{:.0f}"), r.get("status", "ok")]
            for r in t.get("rows", [])]
    out = ["## 2. Training step (median after warm-up; peak = max_memory_allocated above the start)", ""]
    out += _table(["config", "precision", "method", "median ms", "peak MiB", "max reserved MiB", "status"], rows)
    targets = t.get("targets", {})
    checks = []
    for r in t.get("ratios", []):
        b128 = r["config"].endswith("_b128")
        pairs = [("exact/local time", targets.get("exact/local time")), ("exact/local mem", targets.get("exact/local mem")),
                 ("fast/local time", targets.get("fast/local time")), ("fast/local mem", targets.get("fast/local mem")),
                 ("local/global time", targets.get("local/global time (b128)" if b128 else "local/global time (b1024)")),
                 ("exact/global mem", targets.get("sgr/global mem")), ("fast/global mem", targets.get("sgr/global mem"))]
        for key, limit in pairs:
            checks.append([r["config"], r["precision"], key, _num(r.get(key), "{:.2f}"), _num(limit, "<= {:.2f}"),
                           _verdict(r.get(key), limit)])
    out += ["Against DESIGN.md's targets:", ""] + _table(["config", "precision", "ratio", "value", "target", "verdict"],
                                                          checks)
    out += _overlap(t.get("rows", []))
    return out


def _overlap(rows: list) -> list:
    """overlap="auto" (two side streams) against overlap=False: time and reserved memory."""
    table = []
    for r in rows:
        if not r["method"].endswith("_nooverlap") or "median_ms" not in r:
            continue
        on = next((o for o in rows if (o["config"], o["precision"], o["method"]) ==
                   (r["config"], r["precision"], r["method"].replace("_nooverlap", "")) and "median_ms" in o), None)
        if on is None:
            continue
        table.append([r["config"], r["precision"], r["method"].replace("_nooverlap", ""),
                      _num(on["median_ms"] / r["median_ms"], "{:.3f}"),
                      _num((on.get("max_reserved_mib") or 0) / (r.get("max_reserved_mib") or float("nan")), "{:.3f}"),
                      "saves time, no more reserved" if on["median_ms"] < r["median_ms"] and
                      (on.get("max_reserved_mib") or 0) <= (r.get("max_reserved_mib") or 0) else "keep overlap off"])
    if not table:
        return []
    return ["Overlap on / off (the default stays off unless every row says it saves time without more "
            "reserved memory):", ""] + _table(["config", "precision", "method", "time on/off", "reserved on/off",
                                               "verdict"], table)


def _kernels(k: dict) -> list:
    out = [f"## 3. Kernels (copy bandwidth {_num(k.get('copy_bandwidth_GBps'), '{:.0f}')} GB/s)", ""]
    rows = []
    for cfg in k.get("reconcile", []):
        for r in cfg.get("impls", []):
            if "fwd" not in r or "floor_read_once_ms" not in cfg:
                continue
            f1 = r["fwd"]["median_ms"] / cfg["floor_read_once_ms"]
            f2 = r["fwd_bwd"]["median_ms"] / cfg["floor_two_pass_ms"]
            limit = RECONCILE_TARGET if r["impl"].startswith("triton") else None
            rows.append([cfg["shape"], cfg["dtype"], cfg["distance"], r["impl"], _num(r["fwd"]["median_ms"], "{:.4f}"),
                         _num(f1, "{:.2f}"), _num(r["fwd_bwd"]["median_ms"], "{:.4f}"), _num(f2, "{:.2f}"),
                         _num(r["loss_rel_err"], "{:.1e}"), _num(r["grad_rel_err"], "{:.1e}"),
                         _verdict(max(f1, f2), limit) if limit else ""])
    out += ["reconcile, forward and forward+backward (target for Triton: <= 1.3x the floors):", ""]
    out += _table(["shape", "dtype", "distance", "impl", "fwd ms", "fwd / read-once floor", "fwd+bwd ms",
                   "fwd+bwd / two-pass floor", "loss err", "grad err", "verdict"], rows)
    lce = k.get("linear_ce", [])
    liger = next((r for r in lce if r["impl"] == "liger" and "median_ms" in r), None)
    rows = []
    for r in lce:
        if "median_ms" not in r:
            rows.append([r["size"], r["impl"], r.get("error", "")[:80], "", "", "", "", ""])
            continue
        vt = r["median_ms"] / liger["median_ms"] if liger else None
        vm = r["peak_mib"] / liger["peak_mib"] if liger and liger["peak_mib"] else None
        judge = r["impl"].startswith("sgr_ext")
        rows.append([r["size"], r["impl"], _num(r["median_ms"], "{:.3f}"), _num(r["peak_mib"], "{:.1f}"),
                     _num(vt, "{:.2f}"), _num(vm, "{:.2f}"), f"{r['dx_rel_err']:.1e} / {r['dW_rel_err']:.1e}",
                     (_verdict(vt, LCE_TARGETS["time vs Liger"]) + " / " + _verdict(vm, LCE_TARGETS["mem vs Liger"]))
                     if judge else ""])
    out += ["linear + cross-entropy, bf16 forward+backward (target for sgr_ext: time <= 0.9x Liger, "
            "memory <= Liger):", ""]
    return out + _table(["size", "impl", "median ms", "peak MiB", "time vs Liger", "mem vs Liger",
                         "dx / dW err", "verdict"], rows)


def _extras(e: dict) -> list:
    out = ["## 4. Sanitizer and accuracy", ""]
    s = e.get("sanitizer")
    if s:
        clean = s.get("error_summary") == "========= ERROR SUMMARY: 0 errors"
        out += [f"- compute-sanitizer memcheck: {s.get('error_summary') or s.get('status') or 'no sanitizer summary'}"
                f" (target: 0 errors: {'ok' if clean else '–'}); {s.get('cases_run')} cases, failed "
                f"{s.get('cases_failed')}, exit status {s.get('returncode')}; log in sanitizer.log", ""]
    a = e.get("accuracy")
    if a:
        if a.get("rows"):
            out += ["- 1-epoch accuracy (accuracy.md): " + ", ".join(
                f"{r['name']} {_num(100 * r['acc_mean'] if r['acc_mean'] is not None else None, '{:.1f}')} %"
                for r in a["rows"]), ""]
        else:
            out += [f"- accuracy: {a.get('status') or 'no result'} (exit status {a.get('returncode')})", ""]
    return out
