"""Throughput model of ``sgr_ext.distributed``: predicted step times of data-parallel and
module-parallel (pipelined) local learning on N devices from measured per-block step times,
gradient and boundary bytes, link bandwidth and latency (``dist_throughput.py`` measures
the inputs and prints the predictions next to measured runs).
"""
from __future__ import annotations

from typing import Optional, Sequence

from sgr_ext.distributed import partition, pipeline_bubble


def _ring_allreduce_ms(nbytes: float, n: int, link_gbps: float, latency_us: float) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (link_gbps * 1e9) * 1e3 + 2 * (n - 1) * latency_us * 1e-3


def model_data_parallel(block_ms: Sequence[float], grad_bytes: Sequence[float], n_devices: int, *,
                        link_gbps: float, latency_us: float = 10.0, overlap: bool = True) -> dict:
    """Predicted step time of ``DataParallelLocalNet`` on ``n_devices``.

    block_ms: measured step time of each block at the PER-RANK batch (global batch / N).
    grad_bytes: bytes of each block's gradients. Block k's ring all-reduce
    (2(N-1)/N * bytes / bandwidth + 2(N-1) * latency) starts when block k's step ends and
    runs on one channel, overlapping later blocks' compute (``overlap``); the step ends
    when the compute and the last reduction are done.
    """
    comm = [_ring_allreduce_ms(b, n_devices, link_gbps, latency_us) for b in grad_bytes]
    t = c = 0.0
    for bt, ct in zip(block_ms, comm):
        t += bt
        c = max(c, t) + ct  # block k's reduction waits for its gradients and the previous reduction
    step = max(t, c) if overlap else t + sum(comm)
    return {"n_devices": n_devices, "step_ms": step, "compute_ms": t, "comm_ms": sum(comm),
            "exposed_comm_ms": step - t}


def model_module_parallel(block_ms: Sequence[float], boundary_bytes: Sequence[float], n_stages: int,
                          micro_batches: int, *, link_gbps: float, latency_us: float = 10.0,
                          placement: Optional[Sequence[int]] = None) -> dict:
    """Predicted step time of ``PipelineStage`` over ``n_stages`` devices.

    block_ms: measured step time of each block on ONE MICRO-BATCH (global batch / M).
    boundary_bytes: bytes that leave block k per micro-batch (x_k, plus D_k under SGR).
    Placement: ``partition(block_ms, P)`` unless given. A stage's time per micro-batch is
    max(its compute, its outgoing transfer) (sends are asynchronous, receives are posted
    ahead). Flushed step (every batch waits for the pipeline to drain): (M + P - 1) * t_max,
    bubble (P-1)/(M+P-1) with balanced stages; streamed steps (the default behaviour of
    ``PipelineStage``, no rank waits for a later one): M * t_max per step.
    """
    n = len(block_ms)
    sizes = list(placement) if placement is not None else partition(block_ms, n_stages)
    stage_ms, starts = [], []
    i = 0
    for s, size in enumerate(sizes):
        starts.append(i)
        compute = sum(block_ms[i: i + size])
        send = 0.0
        if s < len(sizes) - 1:
            send = boundary_bytes[i + size - 1] / (link_gbps * 1e9) * 1e3 + latency_us * 1e-3
        stage_ms.append(max(compute, send))
        i += size
    if i != n:
        raise ValueError(f"placement: sizes {sizes} do not cover {n} blocks")
    t_max = max(stage_ms)
    p, m = len(sizes), micro_batches
    flushed = (m + p - 1) * t_max
    return {"n_devices": p, "micro_batches": m, "placement": sizes, "stage_ms": stage_ms,
            "step_ms_flushed": flushed, "step_ms_streamed": m * t_max,
            "bubble_flushed": 1 - sum(stage_ms) * m / (p * flushed) if flushed > 0 else 0.0,
            "bubble_formula": pipeline_bubble(p, m)}
