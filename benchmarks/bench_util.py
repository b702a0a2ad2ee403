"""Timing and synchronisation shared by the benchmark scripts, on CUDA and on CPU.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls), median and
p10/p90. CPU (smoke and dry runs): wall clock over a few calls, the same fields.
"""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, rep_ms: int, device: torch.device, cpu_calls: int = 3) -> dict:
    """{"median_ms", "p10_ms", "p90_ms"} of ``fn()``; ``rep_ms``: CUDA timing window per statistic."""
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(cpu_calls):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"median_ms": times[len(times) // 2], "p10_ms": times[0], "p90_ms": times[-1]}
    from triton.testing import do_bench

    out = {"median_ms": do_bench(fn, warmup=max(25, rep_ms // 8), rep=rep_ms, return_mode="median")}
    out["p10_ms"], out["p90_ms"] = do_bench(fn, warmup=5, rep=max(50, rep_ms // 2), quantiles=[0.1, 0.9])
    return out
