"""gpu_check section 1: correctness on the device, every figure against float64.

- ``reconcile`` and ``linear_cross_entropy``, every impl that runs on the device, fp16 /
  bf16 / fp32 / fp64: value, gradient and second derivative on odd shapes (the cases of
  ``sanitize_kernels.py``), plus linear CE's own self-test (``gpu_linear_ce.selftest``);
- the dual-BatchNorm Triton kernels at multi-tile shapes and odd layouts;
- ``LocalNet`` exact and fast against double backward in float64 on ResNet-32 blocks, fp32
  (TF32 off) and bf16 autocast, and overlap on/off (``bench_train_step.gradient_check``).
"""
from __future__ import annotations

import re
import time

import torch

# dry run: the cases on the smallest odd shapes and two dtypes only (the interpreter is slow)
DRY_CASES = r"-(3x5|2x3x7x11|3x5x7)-"
DRY_DTYPES = ("fp32", "bf16")
# multi-tile (the kernels tile 256 rows x 16 channels) odd shapes of the dual BatchNorm
BN_SHAPES = {"nchw": (2 * 37, 35, 13, 11), "channels_last": (2 * 37, 35, 13, 11), "strided": (2 * 37, 35, 13, 11),
             "2d": (2 * 1031, 37), "3d": (2 * 29, 19, 53)}
DRY_BN_SHAPES = {"nchw": (2 * 5, 17, 7, 9), "channels_last": (2 * 5, 17, 7, 9), "strided": (2 * 5, 17, 7, 9),
                 "2d": (2 * 131, 19), "3d": (2 * 7, 17, 39)}
TORCH_HALF_TOL_FACTOR = 4
LATER_ITEMS = 4  # dual BN, LocalNet fp32 and bf16, the linear CE self-test
BN_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # dry run: the first only


def run(check) -> None:
    dev, dry = check.device, check.dry_run
    impls = [None, "torch", "triton"] + (["cpp"] if dev.type == "cpu" else [])
    todo = [(op, impl) for op in ("reconcile", "linear_ce") for impl in impls]
    for i, (op, impl) in enumerate(todo):
        # an equal share of what is left, keeping LATER_ITEMS shares for the checks after these
        share_s = check.budget.left() / (len(todo) - i + LATER_ITEMS)
        check.item("correctness", f"{op} impl={impl}", lambda op=op, impl=impl, s=share_s: op_cases(check, op, impl, s),
                   need_s=2)
    check.item("correctness", "dual BatchNorm kernels", lambda: dual_bn(check), need_s=2)
    from bench_train_step import gradient_check

    tol = {"fp32": 1e-4, "bf16": None}  # bf16: at most 2x double backward's own bf16 error
    for prec, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        def engines(prec=prec, amp=amp):
            res = gradient_check(dev, dry, amp=amp, reference_dtype=torch.float64)
            res["exact_tol"] = tol[prec] if tol[prec] else 2 * res.get("double_backward_rel_err", float("nan"))
            res["fast_tol"] = tol[prec] if tol[prec] else 2 * res.get("double_backward_rel_err", float("nan"))
            check.section_data("correctness").setdefault("engines", {})[prec] = res
            if "error" in res:
                raise RuntimeError(res["error"])

        check.item("correctness", f"LocalNet engines {prec}", engines, need_s=5)
    check.item("correctness", "linear_ce self-test", lambda: linear_ce_selftest(check), need_s=2)


def op_cases(check, op: str, impl, share_s: float) -> None:
    """The cases of one op and impl that fit in ``share_s`` seconds; records how many ran of
    how many, the worst error / tolerance and the failures."""
    import sanitize_kernels as S

    make = S.reconcile_cases if op == "reconcile" else S.linear_ce_cases
    cases = make(check.device, check.dry_run, impl=impl, **({"dtypes": DRY_DTYPES} if check.dry_run else {}))
    if check.dry_run:
        cases = [c for c in cases if re.search(DRY_CASES, c[0]) or "out-of-range" in c[0]]
    records = []
    stop = time.monotonic() + share_s
    for name, fn in cases:
        if time.monotonic() > stop:
            break
        rec = S.run_case(name, fn, check.device)
        if impl == "torch" and "tol" in rec and S.dtype_of(name) in ("bf16", "fp16"):
            # the plain formula rounds the logits / products to bf16 or fp16, as torch eager does;
            # the fused paths keep them in fp32, which is what TOL is set for
            rec["tol"] *= TORCH_HALF_TOL_FACTOR
            rec["ok"] = rec["max_rel_err"] <= rec["tol"]
        records.append(rec)
    failed = {r["name"]: r.get("error", f"rel err {r.get('max_rel_err'):.2e} > tol {r.get('tol')}")
              for r in records if not r["ok"]}
    worst = max(records, key=lambda r: r.get("max_rel_err", 0) / r.get("tol", 1), default=None)
    check.section_data("correctness").setdefault("ops", {})[f"{op} impl={impl}"] = {
        "cases": len(records), "of": len(cases), "failed": failed,
        "worst": None if worst is None else {k: worst.get(k) for k in ("name", "max_rel_err", "tol")},
    }


def linear_ce_selftest(check) -> None:
    import gpu_linear_ce

    gpu_linear_ce.DEVICE = check.device.type
    res = gpu_linear_ce.selftest((11,) if check.dry_run else (11, 4099, 40000))
    check.section_data("correctness")["linear_ce_selftest"] = res


def dual_bn(check) -> None:
    """DualBatchNorm (+ReLU) through the Triton kernels, fp32/bf16/fp16, against the float64
    torch path: output, input, weight and bias gradients (relative norm errors)."""
    from sgr_ext.engine import dual

    rows = []
    shapes = DRY_BN_SHAPES if check.dry_run else BN_SHAPES
    for layout, shape in shapes.items():
        for relu in (False, True):
            seed = len(rows)
            ref = _dual_bn_run(layout, shape, relu, torch.float64, check.device, dual, seed)
            for dtype, tol in list(BN_TOL.items())[:1 if check.dry_run else None]:
                got = _dual_bn_run(layout, shape, relu, dtype, check.device, dual, seed, triton=True)
                err = max(float((g - r).norm() / r.norm().clamp_min(1e-300)) for g, r in zip(got, ref))
                rows.append({"layout": layout, "shape": list(shape), "relu": relu, "dtype": str(dtype)[6:],
                             "rel_err": err, "tol": tol, "ok": err <= tol})
    check.section_data("correctness")["dual_bn"] = rows


def _dual_bn_run(layout, shape, relu, dtype, device, dual, seed, triton=False):
    g = torch.Generator().manual_seed(seed)
    z64 = torch.randn(*shape, dtype=torch.float64, generator=g) * 2 + 0.7
    w64, b64 = torch.randn(shape[1], dtype=torch.float64, generator=g), torch.randn(shape[1], dtype=torch.float64, generator=g)
    go = torch.randn(*shape, dtype=torch.float64, generator=g)
    z = z64.to(device=device, dtype=dtype)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # dense, but neither NCHW nor channels_last (H and W strides swapped)
        z = z.transpose(2, 3).contiguous().transpose(2, 3)
    z.requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = w64.to(device=device, dtype=acc).requires_grad_()
    b = b64.to(device=device, dtype=acc).requires_grad_()
    dual._TRITON_FORCE = triton and device.type == "cpu"
    try:
        out = dual.DualBatchNorm.apply(z, w, b, 1e-5, relu)
        out.backward(go.to(device=device, dtype=dtype))
    finally:
        dual._TRITON_FORCE = False
    return [t.detach().double().cpu() for t in (out, z.grad, w.grad, b.grad)]
