"""The study's report from its cached runs: selection on validation, test mean +- std over seeds,
gap closed, tables (markdown + JSON) and plots (PNG)."""
from __future__ import annotations

import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

from .variants import Variant


def _ms(xs: list) -> tuple:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _pct(m, s=None) -> str:
    if m is None:
        return "-"
    return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f} ± {100 * s:.1f}"


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mean(xs) -> float | None:
    xs = [x for x in (xs or []) if x is not None]
    return sum(xs) / len(xs) if xs else None


def cells(results: dict, profile) -> dict:
    """{(arch, K): {family: {seed: record}}}, bp filed under every K of its arch."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    Ks = (profile.screen_K, *profile.other_K)
    for (arch, name, seed), r in results.items():
        v = Variant(**r["variant"])
        for K in (Ks if v.method == "bp" else (v.K,)):
            out[(arch, K)][v.family][seed] = r
    return out


def select_default(table: dict, seeds: tuple) -> dict:
    """The library default, on validation only: the SGR family with the largest mean gain in
    validation accuracy over plain local learning, over the cells and seeds where both ran.
    None when no family gains (then SGR is off by default)."""
    gains = defaultdict(list)
    for (arch, K), fams in table.items():
        local = fams.get("local", {})
        for fam, runs in fams.items():
            if not fam.startswith(("sgr", "handback")):  # sgr, sgrout (output side), handback
                continue
            common = [s for s in runs if s in local and "failed" not in runs[s]]
            if len(common) == len(seeds):  # confirmed cells only
                gains[fam].append(statistics.mean(runs[s]["val_acc"] - local[s]["val_acc"] for s in common))
    scored = sorted(((statistics.mean(g), len(g), fam) for fam, g in gains.items()), reverse=True)
    best = scored[0] if scored else None
    return {"family": best[2] if best and best[0] > 0 else None,
            "scores": [{"family": f, "mean_val_gain": m, "cells": n} for m, n, f in scored]}


def write(out: Path, results: dict, profile, meta: dict) -> None:
    table = cells(results, profile)
    seeds = tuple(profile.seeds)
    lines = [f"# SGR accuracy study ({meta['profile']} profile)", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `{meta['command']}`. Settings: {meta['settings']}.", ""]
    confirmed, screen_rows = [], []
    for (arch, K) in sorted(table):
        fams = table[(arch, K)]
        loc, bp = fams.get("local", {}), fams.get("bp", {})
        for fam, runs in sorted(fams.items()):
            r0 = runs.get(0)
            if r0 is not None:
                screen_rows.append({
                    "arch": arch, "K": K, "family": fam, "val": r0["val_acc"], "test": r0["test_acc"],
                    "dval": (r0["val_acc"] - loc[0]["val_acc"]) if 0 in loc and fam != "bp" else None,
                    "cos": _mean((r0.get("cosines") or [])[1:]), "share": _mean((r0.get("penalty_shares") or [])[1:]),
                    "share_ep2": _mean((r0.get("penalty_shares_epoch2") or [])[1:]), "failed": r0.get("failed"),
                    "wall_s": r0.get("wall_s")})
            if len(runs) == len(seeds) and fam.startswith(("sgr", "handback")):
                tm, ts = _ms([runs[s]["test_acc"] for s in seeds])
                lm, ls = _ms([loc[s]["test_acc"] for s in seeds if s in loc])
                bm, bs = _ms([bp[s]["test_acc"] for s in seeds if s in bp])
                vm, _ = _ms([runs[s]["val_acc"] for s in seeds])
                gap = (tm - lm) / (bm - lm) if None not in (tm, lm, bm) and bm != lm else None
                confirmed.append({"arch": arch, "K": K, "family": fam, "test": [tm, ts], "local": [lm, ls],
                                  "bp": [bm, bs], "val": vm, "gap_closed": gap,
                                  "beyond_noise": None if None in (tm, lm) else (tm - lm) > max(ts, ls)})
    lines += [f"## Selected settings on the test split ({len(seeds)} seeds, mean ± std, %)", "",
              "| arch | K | global BP | plain local | reconciliation setting (chosen on validation) | with it | gap closed |",
              "|---|---|---|---|---|---|---|"]
    for c in confirmed:
        gap = "-" if c["gap_closed"] is None else f"{100 * c['gap_closed']:.0f} %"
        lines.append(f"| {c['arch']} | {c['K']} | {_pct(*c['bp'])} | {_pct(*c['local'])} | {c['family']} | "
                     f"{_pct(*c['test'])} | {gap} |")
    default = select_default(table, seeds)
    lines += ["", f"Default chosen on validation: **{default['family'] or 'no penalty (lam = 0)'}**. "
              "Mean validation gain over plain local per confirmed family: "
              + (", ".join(f"{s['family']} {100 * s['mean_val_gain']:+.2f} pt ({s['cells']} cells)" for s in default["scores"])
                 or "none yet") + ".", "",
              "## Every run at seed 0 (screen; validation decides, test shown for completeness)", "",
              "| arch | K | setting | val % | Δval vs local | test % | mean cos(A_k, D_k-1) | share of the update (last epoch / epoch 2) | minutes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in screen_rows:
        if r["failed"]:
            lines.append(f"| {r['arch']} | {r['K']} | {r['family']} | FAILED: {r['failed']} | | | | | |")
            continue
        share = f"{_fmt(r['share'], '.3f')} / {_fmt(r['share_ep2'], '.3f')}"
        dval = _fmt(None if r["dval"] is None else 100 * r["dval"], "+.1f")
        cos = _fmt(r["cos"], ".2f")
        lines.append(f"| {r['arch']} | {r['K']} | {r['family']} | {_pct(r['val'])} | {dval} | {_pct(r['test'])} | "
                     f"{cos} | {share} | {(r['wall_s'] or 0) / 60:.1f} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    summary = lines[lines.index(next(x for x in lines if x.startswith("## Selected"))):lines.index(
        next(x for x in lines if x.startswith("## Every run")))]
    (out / "summary.md").write_text("\n".join(summary).replace("## Selected", "#### Selected") + "\n")
    (out / "study.json").write_text(json.dumps({**meta, "confirmed": confirmed, "screen": screen_rows,
                                                "default": default}, indent=1))
    _plots(out, screen_rows, profile)


def _plots(out: Path, rows: list, profile) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K0 = profile.screen_K
    archs = sorted({r["arch"] for r in rows})
    if not archs:
        return
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.2), squeeze=False)
    colors: dict = {}  # one colour per setting family across the panels
    for ax, arch in zip(axes[0], archs):
        rs = [r for r in rows if r["arch"] == arch and r["K"] == K0 and not r["failed"]]
        groups = defaultdict(list)
        for r in rs:
            if r["family"].startswith(("sgr", "handback")):
                v = _parse(r["family"])
                side = {"output": " (output side)", "handback": " (handback control)"}.get(v["side"], "")
                groups[f"{v['distance']} {v['mode']}{' ' + v['sched'] if v['sched'] else ''}{side}"].append((v["lam"], r["val"]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            color = colors.setdefault(label, plt.cm.tab10(len(colors) % 10))
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=label, color=color)
        for fam, style in (("local", "k--"), ("bp", "k:")):
            for r in rs:
                if r["family"] == fam:
                    ax.axhline(100 * r["val"], ls=style[1:], color="k", label=f"{fam} ({100 * r['val']:.1f} %)")
        ax.set_xscale("log")
        ax.set_xlabel("strength (lam: weight if fixed, gradient-norm ratio if ratio)")
        ax.set_ylabel("validation accuracy (%), seed 0")
        ax.set_title(f"{arch}, K={K0}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_strength.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for arch, marker in zip(archs, "os^v"):
        for r in rows:
            if r["arch"] == arch and r["cos"] is not None and not r["failed"]:
                color = "tab:gray" if r["family"] == "local" else "tab:blue"
                ax.scatter(r["cos"], 100 * r["val"], marker=marker, color=color, s=25)
        ax.scatter([], [], marker=marker, color="k", label=arch)
    ax.scatter([], [], color="tab:gray", label="plain local")
    ax.scatter([], [], color="tab:blue", label="SGR variants")
    ax.set_xlabel("mean cos(A_k, D_{k-1}) over boundaries, last epoch")
    ax.set_ylabel("validation accuracy (%), seed 0")
    ax.set_title("alignment vs accuracy (every K)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_alignment.png", dpi=110)
    plt.close(fig)


def _parse(family: str) -> dict:
    """'sgr-l2-ratio0.3-warm' -> distance l2, mode ratio, lam 0.3, sched warm, side input
    ('sgrout-...': side output)."""
    parts = family.split("-")
    mode_lam = parts[2]
    mode = "ratio" if mode_lam.startswith("ratio") else "fixed"
    return {"distance": parts[1], "mode": mode, "lam": float(mode_lam[len(mode):]),
            "sched": parts[3] if len(parts) > 3 else "",
            "side": {"sgrout": "output", "handback": "handback"}.get(parts[0], "input")}


BEGIN, END = "<!-- study_sgr:begin -->", "<!-- study_sgr:end -->"


def update_readme(readme: Path, out: Path) -> bool:
    """Replace the README block between the study markers with ``summary.md`` and the plots
    (paths relative to the README). False when the README has no such block."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    rel = out.resolve().relative_to(readme.resolve().parent).as_posix()
    body = (out / "summary.md").read_text()
    block = (f"{BEGIN}\n<!-- generated by benchmarks/study_sgr.py --readme from {rel}/study.json; do not edit -->\n"
             f"{body}\nEvery run, failures included: [{rel}/study.md]({rel}/study.md).\n\n"
             f"![validation accuracy against strength]({rel}/study_strength.png)\n"
             f"![validation accuracy against alignment]({rel}/study_alignment.png)\n{END}")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + block + rest.split(END, 1)[1])
    return True
