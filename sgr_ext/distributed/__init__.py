"""Data-parallel and module-parallel local learning on ``torch.distributed``.

Local learning removes backward locking: block k never waits for a gradient from block
k+1. Two ways to spread a ``LocalNet`` over processes (one GPU each, or CPU processes
with the gloo backend) use that:

* ``DataParallelLocalNet`` (data parallel): every rank holds the whole net and steps on
  its shard of the batch; block k's gradients are all-reduced as soon as block k's step
  ends (``LocalNet.train_step(on_block_end=...)``), so the communication of block k
  overlaps the compute of block k+1. Averaged with shard-size weights, the gradients
  equal those of one process on the full batch (mean losses, no train-mode BatchNorm).
* ``PipelineStage`` (module parallel): rank r owns a contiguous group of blocks. The batch
  is cut into M micro-batches; for each one, rank r receives (x, D) from rank r-1, runs its
  blocks' local steps (accumulating micro-batch-weighted gradients, so the sum equals the
  full-batch gradient) and sends (x, D) to rank r+1. Messages only flow forward: a
  forward-only pipeline with bubble (P-1)/(M+P-1) per flushed step, and none between
  steps, because no rank ever waits for a later one.

``setup_from_env()`` initialises the process group when launched by ``torchrun`` (with a
timeout, so that a dead rank surfaces as ``PeerError`` instead of a hang). The
throughput model that predicts step times on N devices from measured per-block step times
is benchmark analysis: ``benchmarks/throughput_model.py`` (used by ``benchmarks/dist_throughput.py``).

Files: ``process`` (setup, ``DistContext``, ``PeerError``, collective wrappers),
``data_parallel``, ``pipeline`` (with ``partition`` and ``pipeline_bubble``), ``wire`` (the
pipeline's message header and tags), ``stats_table`` (statistics as tables between ranks).
"""
from __future__ import annotations

from sgr_ext.distributed.data_parallel import DataParallelLocalNet
from sgr_ext.distributed.pipeline import PipelineStage, partition, pipeline_bubble
from sgr_ext.distributed.process import (
    DEFAULT_TIMEOUT_S,
    PARALLEL_MODES,
    DistContext,
    PeerError,
    launched_with_torchrun,
    setup_from_env,
    shard_batch,
)

__all__ = [
    "PARALLEL_MODES",
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "PeerError",
    "DataParallelLocalNet",
    "PipelineStage",
    "launched_with_torchrun",
    "setup_from_env",
    "shard_batch",
    "partition",
    "pipeline_bubble",
]
