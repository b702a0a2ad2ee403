"""Run every Triton kernel of sgr_ext on odd shapes, for compute-sanitizer (memcheck).

The command (on a machine with a CUDA GPU; takes a few minutes under the sanitizer):

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py

To keep the sanitizer's own report next to the JSON this script writes:

    compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/sanitize_kernels.py 2>&1 \
        | tee benchmarks/results/sanitize_memcheck.log

(``--tool initcheck`` and ``--tool racecheck`` take the same command.) memcheck reports
out-of-bounds and misaligned accesses of every launch; a clean run ends with
``ERROR SUMMARY: 0 errors``.

Kernels covered (through the public ops with ``impl="triton"``, so the launch configurations
are the real ones, plus forced small chunks / loop blocks so that every code path runs):

- ``kernels/reconcile.py``: ``_fwd_partial_kernel``, ``_fwd_finalize_kernel``, ``_bwd_kernel``
  (l2 and cosine; EVEN and masked tiles; ROWS > 1 packing; several column chunks; B > 1024 in
  the finalize loop; non-contiguous inputs; all four float dtypes), the double backward.
- ``kernels/linear_ce.py``: ``ce_rows_kernel`` (single-block and looped rows, reduced and
  per-row losses), ``ce_grad_kernel``, ``ce_double_kernel``, ``scale_kernel``,
  ``check_targets_kernel`` (an out-of-range target must raise, not read out of bounds), with
  bias / no bias, ignore_index rows and whole ignored chunks, chunked rows.

Every case is also checked against the float64 PyTorch reference (max relative error), so
the run records numerics too. Results: ``benchmarks/results/sanitize_kernels_<device>.json``
(date, device, torch/triton/CUDA versions, the command, one entry per case). Exit status 1
if a case raised or was numerically off.

Without a GPU, ``--interpret`` runs the same cases (smaller shapes) in the Triton CPU
interpreter: it checks this script, not the kernels' memory safety.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import traceback
from pathlib import Path

COMMAND = "compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py"
ROOT = Path(__file__).resolve().parents[1]


TOL = {"fp16": 1e-2, "bf16": 5e-2, "fp32": 1e-4, "fp64": 1e-9}
DTYPE_NAMES = ("fp16", "bf16", "fp32", "fp64")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="no GPU: run small shapes in the Triton interpreter")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory of the JSON record")
    p.add_argument("--only", default=None, help="regex: run the cases whose name matches")
    return p.parse_args()


def _dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]


def dtype_of(case_name: str) -> str:
    """The dtype tag ("fp32", ...) a case name carries."""
    return next(k for k in TOL if f"-{k}" in case_name)


def rel(got, want) -> float:
    """max |got - want| / max |want| in float64 (the absolute error where want is all zero)."""
    got, want = got.detach().double(), want.detach().double()
    den = float(want.abs().max())
    return float((got - want).abs().max()) / den if den > 0 else float((got - want).abs().max())


def run_case(name: str, fn, dev) -> dict:
    """Run one case: {"name", "max_rel_err", "tol", "ok"} or {"name", "ok": False, "error", "traceback"}."""
    import torch

    rec = {"name": name}
    try:
        err = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rec["max_rel_err"] = err
        rec["ok"] = bool(err <= rec.setdefault("tol", TOL[dtype_of(name)]))
    except Exception as exc:  # record and go on
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        rec["traceback"] = traceback.format_exc(limit=3)
    return rec


def reconcile_cases(dev, small: bool, impl="triton", dtypes=DTYPE_NAMES) -> list:
    """(name, fn) pairs: ``reconcile(impl=impl)`` value, gradient and Hessian-vector product
    against float64 on odd shapes, both distances, contiguous and strided; fn() -> max rel err."""
    import torch

    from sgr_ext.ops.reconcile import reconcile
    from sgr_ext.reference import reconcile_torch

    rec_shapes = [(1, 1), (3, 5), (7, 127), (2, 3, 7, 11), (17, 33), (5, 2049), (3, 4097), (1030, 3)]
    if not small:
        rec_shapes += [(1, 65537), (2, 131075), (4099, 257), (128, 16, 17, 19)]

    def case(shape, dtype, distance, transpose):
        def fn():
            a = torch.randn(*shape, dtype=torch.float64, device=dev)
            d = torch.randn(*shape, dtype=torch.float64, device=dev)
            if transpose and len(shape) >= 2:
                a, d = a.transpose(0, -1).contiguous().transpose(0, -1), d.transpose(0, -1).contiguous().transpose(0, -1)
            a, d = a.to(dtype), d.to(dtype)
            leaf = a.clone().requires_grad_(True)
            out = reconcile(leaf, d, distance=distance, impl=impl)
            (g,) = torch.autograd.grad(out, leaf, create_graph=True)
            v = torch.randn_like(leaf)
            (h,) = torch.autograd.grad((g * v).sum(), leaf)
            ref_leaf = a.double().requires_grad_(True)
            ref = reconcile_torch(ref_leaf, d.double(), distance, 1e-8)
            (rg,) = torch.autograd.grad(ref, ref_leaf, create_graph=True)
            (rh,) = torch.autograd.grad((rg * v.double()).sum(), ref_leaf)
            return max(rel(out, ref), rel(g, rg), rel(h, rh))
        return fn

    out = []
    for shape in rec_shapes:
        for dname in dtypes:
            for distance in ("l2", "cosine"):
                if distance == "cosine" and math.prod(shape[1:]) == 1:
                    continue  # one feature: the cosine gradient is 0 up to rounding noise
                for transpose in (False, True) if len(shape) > 1 and shape[-1] > 1 else (False,):
                    tag = "x".join(map(str, shape)) + ("-strided" if transpose else "")
                    out.append((f"reconcile-{distance}-{tag}-{dname}", case(shape, _dtype(dname), distance, transpose)))
    return out


class _Patched:
    """Temporarily set module attributes (forced small chunks / loop blocks)."""

    def __init__(self, *triples):
        self.triples = triples

    def __enter__(self):
        self.saved = [(m, k, getattr(m, k)) for m, k, _ in self.triples]
        for m, k, v in self.triples:
            setattr(m, k, v)

    def __exit__(self, *exc):
        for m, k, v in self.saved:
            setattr(m, k, v)
        return False


def linear_ce_cases(dev, small: bool, impl="triton", dtypes=DTYPE_NAMES) -> list:
    """(name, fn) pairs: ``linear_cross_entropy(impl=impl)`` loss, first and second derivatives
    against float64: odd shapes, bias or not, every reduction, ignored rows, forced chunking
    (which only the fused paths have); plus an out-of-range target that must be rejected."""
    import torch

    from sgr_ext.kernels import linear_ce as lce_kernels
    from sgr_ext.ops import _linear_ce_double_backward as lce_double  # the tuning knobs live where they are used
    from sgr_ext.ops import _linear_ce_fused as lce_fused
    from sgr_ext.ops.linear_ce import linear_cross_entropy

    lce_shapes = [(1, 1, 1), (3, 5, 7), (37, 19, 1001), (130, 33, 517)]
    if not small:
        lce_shapes += [(257, 64, 5003), (33, 48, 40001), (1031, 129, 32769)]

    def case(n, h, v, dtype, bias, reduction, ignore, force):
        def fn():
            x = (torch.randn(n, h, dtype=torch.float64, device=dev)).to(dtype).requires_grad_(True)
            w = (torch.randn(v, h, dtype=torch.float64, device=dev) / h ** 0.5).to(dtype).requires_grad_(True)
            b = torch.randn(v, dtype=torch.float64, device=dev).to(dtype).requires_grad_(True) if bias else None
            t = torch.randint(0, v, (n,), device=dev)
            if ignore == "some":
                t[1::3] = -100  # never every row ("mean" over no rows is NaN by definition)
            elif ignore == "first-chunk":
                t[: min(n, 4)] = -100
            patches = []
            if force:
                patches = [(lce_fused, "chunk_rows", lambda n_, h_, v_: 4), (lce_kernels, "MAX_SINGLE_BLOCK", 64),
                           (lce_kernels, "LOOP_BLOCK", 64), (lce_double, "DOUBLE_BACKWARD_CHUNK_BYTES", 3 * 2 * v * 8)]
            with _Patched(*patches):
                out = linear_cross_entropy(x, w, t, bias=b, reduction=reduction, impl=impl)
                go = torch.randn_like(out) if reduction == "none" else torch.tensor(1.7, dtype=out.dtype, device=dev)
                inputs = [x, w] + ([b] if bias else [])
                grads = torch.autograd.grad(out, inputs, go, create_graph=True)
                gsum = sum((gi.double() * 0.5).sum() for gi in grads)
                second = torch.autograd.grad(gsum, inputs, allow_unused=True)
            xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
            br = b.detach().double().requires_grad_(True) if bias else None
            z = xr @ wr.t() + (br if bias else 0)
            ref = torch.nn.functional.cross_entropy(z, t, reduction=reduction)
            rin = [xr, wr] + ([br] if bias else [])
            rgrads = torch.autograd.grad(ref, rin, go.double(), create_graph=True)
            rsum = sum((gi * 0.5).sum() for gi in rgrads)
            rsecond = torch.autograd.grad(rsum, rin, allow_unused=True)
            errs = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, rgrads)]
            errs += [rel(a, r) for a, r in zip(second, rsecond) if a is not None and r is not None]
            return max(errs)
        return fn

    out = []
    for n, h, v in lce_shapes:
        for dname in dtypes:
            for bias in (True, False):
                for reduction in ("mean", "sum", "none"):
                    ignore = "some" if reduction != "sum" else "first-chunk"
                    force = n > 8 and bias and impl != "torch"  # forced chunking on half of the bigger cases
                    name = f"linear_ce-{n}x{h}x{v}-{'bias' if bias else 'nobias'}-{reduction}-{ignore}" \
                           f"{'-chunked' if force else ''}-{dname}"
                    out.append((name, case(n, h, v, _dtype(dname), bias, reduction, ignore, force)))

    def bad_target():
        x = torch.randn(5, 3, device=dev)
        w = torch.randn(7, 3, device=dev)
        t = torch.tensor([0, 1, 7, 2, 3], device=dev)
        try:
            linear_cross_entropy(x, w, t, impl=impl)
        except ValueError:
            return 0.0  # rejected before any kernel reads logits[7]
        raise AssertionError("an out-of-range target was not rejected")

    out.append(("linear_ce-out-of-range-target-fp32", bad_target))
    return out


def main() -> int:
    args = _parse()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    import torch

    if not torch.cuda.is_available() and not args.interpret:
        print("sanitize_kernels: no CUDA device; run on a GPU machine (or --interpret to check the script)",
              file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cpu" if args.interpret else "cuda")
    small = args.interpret
    torch.manual_seed(0)
    cases: list[dict] = []
    for name, fn in reconcile_cases(dev, small) + linear_ce_cases(dev, small):
        if args.only and not re.search(args.only, name):
            continue
        rec = run_case(name, fn, dev)
        cases.append(rec)
        print(f"{'ok  ' if rec['ok'] else 'FAIL'} {name}" + (f"  rel err {rec.get('max_rel_err'):.2e}"
                                                             if "max_rel_err" in rec else f"  {rec.get('error')}"),
              flush=True)

    # ------------------------------------------------------------------ record
    failed = [c["name"] for c in cases if not c["ok"]]
    props = torch.cuda.get_device_properties(0) if dev.type == "cuda" else None
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": props.name if props else "cpu (Triton interpreter: not a memory-safety check)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "command": COMMAND if not small else "python benchmarks/sanitize_kernels.py --interpret",
        "argv": sys.argv,
        "sanitizer_env": sorted(k for k in os.environ if "SANITIZER" in k or k == "CUDA_INJECTION64_PATH"),
        "note": "the sanitizer's verdict is its own output ('ERROR SUMMARY: N errors'); this file records "
                "which kernels and shapes ran and their numerics",
        "cases_run": len(cases),
        "cases_failed": failed,
        "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "interpret" if small else re.sub(r"[^a-z0-9]+", "_", record["device"].lower()).strip("_")
    path = out / f"sanitize_kernels_{tag}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"{len(cases)} cases, {len(failed)} failed; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
