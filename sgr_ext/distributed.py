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
throughput model (``model_data_parallel``, ``model_module_parallel``) predicts step times
on N devices from measured per-block step times (``benchmarks/dist_throughput.py``).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sgr_ext.net import LocalNet, NonFiniteError, StepStats, eager_step

__all__ = [
    "PARALLEL_MODES",
    "DistContext",
    "PeerError",
    "DataParallelLocalNet",
    "PipelineStage",
    "launched_with_torchrun",
    "setup_from_env",
    "shard_batch",
    "partition",
    "pipeline_bubble",
    "model_data_parallel",
    "model_module_parallel",
]

PARALLEL_MODES = ("data", "module")
DEFAULT_TIMEOUT_S = 300.0


class PeerError(RuntimeError):
    """A collective or point-to-point transfer with another rank failed or timed out.

    Usually another process died or hangs; its own error is in its log.
    """


# ------------------------------------------------------------------------------ setup


def launched_with_torchrun() -> bool:
    """True when the environment says this process is one rank of a ``torchrun`` job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class DistContext:
    """This process's place in the job: ranks, its device and the backend in use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, net: LocalNet, parallel: str, *, micro_batches: int = 4,
             placement: Optional[Sequence[int]] = None) -> Union["DataParallelLocalNet", "PipelineStage"]:
        """``DataParallelLocalNet(net)`` for ``parallel="data"``, ``PipelineStage(net, ...)`` for ``"module"``.

        The net must be built identically (same seed) on every rank.
        """
        if parallel == "data":
            net.to(self.device)
            return DataParallelLocalNet(net)
        if parallel == "module":
            return PipelineStage(net, micro_batches=micro_batches, placement=placement, device=self.device)
        raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {parallel!r}")

    def barrier(self) -> None:
        """A barrier that names the missing ranks (gloo: ``monitored_barrier``) after the timeout."""
        try:
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                dist.barrier()
        except RuntimeError as exc:
            raise PeerError(f"rank {self.rank}: barrier failed: {_first_line(exc)}") from exc

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_from_env(*, backend: Optional[str] = None, device: Union[str, torch.device, None] = None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[DistContext]:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment; None when not launched so.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
    Device (``None`` or ``"cuda"``): ``cuda:LOCAL_RANK`` when there is a GPU per local rank (nccl); when
    several ranks share a GPU (NCCL refuses two ranks on one device) they share
    ``cuda:(LOCAL_RANK % n)`` over gloo; CPU otherwise (gloo). ``timeout_s`` bounds every
    collective and transfer: a rank that dies makes the others raise instead of hanging.
    """
    if not launched_with_torchrun():
        return None
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s: expected a finite number > 0, got {timeout_s!r}")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    req = torch.device(device) if device is not None else None
    if req is None or (req.type == "cuda" and req.index is None):  # choose: one GPU per local rank
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if req is not None and n_gpu == 0:
            raise ValueError("device: cuda was requested but no CUDA device is available")
        if n_gpu == 0:
            device = torch.device("cpu")
            backend = backend or "gloo"
        elif n_gpu >= local_world:
            device = torch.device("cuda", local_rank)
            backend = backend or "nccl"
        else:
            device = torch.device("cuda", local_rank % n_gpu)
            if backend is None:
                backend = "gloo"
                if local_rank == 0:
                    warnings.warn(f"{local_world} local ranks share {n_gpu} GPU(s): using the gloo backend "
                                  "(NCCL cannot place two ranks on one GPU)", stacklevel=2)
    else:
        device = req
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise PeerError(f"rank {rank}: could not join the process group of {world} ranks within "
                            f"{timeout_s:g} s ({_first_line(exc)})") from exc
    else:
        backend = dist.get_backend()
    return DistContext(rank, world, local_rank, device, str(backend), float(timeout_s))


# ------------------------------------------------------------------------------ helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _peer_error(exc: BaseException, what: str, rank: int) -> PeerError:
    return PeerError(f"rank {rank}: {what} failed or timed out; another rank has probably died or hangs "
                     f"(see its log): {_first_line(exc)}")


def _wait(work, what: str, rank: int) -> None:
    try:
        work.wait()
    except RuntimeError as exc:  # DistBackendError, gloo "Connection closed by peer", timeouts
        raise _peer_error(exc, what, rank) from exc


def _start(op, what: str, rank: int, *args, **kwargs):
    """Launch an asynchronous collective or transfer; a broken connection raises PeerError already here."""
    try:
        return op(*args, **kwargs)
    except RuntimeError as exc:
        raise _peer_error(exc, what, rank) from exc


def _blocking(op, what: str, rank: int, *args, **kwargs) -> None:
    _wait(_start(op, what, rank, *args, async_op=True, **kwargs), what, rank)


def _group_rank(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _global(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _comm_device(group, device: torch.device) -> torch.device:
    """Where tensors must live for this backend: the GPU for nccl, the CPU for gloo send/recv."""
    backend = str(dist.get_backend(group))
    return device if "nccl" in backend else torch.device("cpu")


def shard_batch(x: Optional[torch.Tensor], y: torch.Tensor, rank: int, world_size: int):
    """Rank ``rank``'s contiguous shard of a batch (``tensor_split``: sizes differ by at most one)."""
    ys = y.tensor_split(world_size)[rank]
    xs = x.tensor_split(world_size)[rank] if x is not None else None
    return xs, ys


# ------------------------------------------------------------------------------ data parallel


class DataParallelLocalNet:
    """Data-parallel ``LocalNet``: per-block gradient all-reduce overlapped with the next block.

    Args:
        net: the same ``LocalNet`` (same architecture) on every rank, already on this
            rank's device. Parameters and buffers are broadcast from rank 0 at construction.
        process_group: the group to average over (default: the world).
        shard_input: ``train_step`` receives the GLOBAL batch and takes this rank's
            contiguous shard (default); False: it receives this rank's own shard.

    ``train_step(x, y)`` leaves in ``p.grad`` the gradient of the full batch: each rank's
    per-block gradient is weighted by its shard size and all-reduced (one bucket per block
    and dtype, started in ``on_block_end``, so block k's reduction runs during block k+1's
    step); the returned ``StepStats`` are the full-batch statistics (shard-weighted means),
    identical on every rank. Exact for mean losses without cross-sample layers: A_k and D_k
    are per-sample gradients and R_k a mean over samples, so the shard-weighted mean of
    the per-rank gradients is the full-batch gradient. Train-mode BatchNorm uses each
    shard's statistics (as under DDP without SyncBatchNorm); ``sync_buffers()`` averages
    running statistics before evaluation. A NaN/Inf input, loss, penalty or gradient on any
    rank gets ``net.nonfinite``'s policy (raise / skip / warn) on EVERY rank alike, with the
    affected gradients left as before the step. DDP itself does not fit: its reducer expects one
    ``forward`` and one ``backward`` per iteration, while ``train_step`` runs K local
    backward passes (with double backward for the exact SGR gradient).
    """

    def __init__(self, net: LocalNet, *, process_group=None, shard_input: bool = True):
        if not isinstance(net, LocalNet):
            raise TypeError(f"net: expected a LocalNet, got {type(net).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("DataParallelLocalNet: torch.distributed is not initialised (call setup_from_env())")
        self.net = net
        self.group = process_group
        self.rank, self.world_size = _group_rank(process_group)
        self.shard_input = bool(shard_input)
        self._sync = True
        self._broadcast_state()

    # -- plumbing
    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def parameters(self):
        return self.net.parameters()

    def _device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _broadcast_state(self) -> None:
        src = _global(self.group, 0)
        with torch.no_grad():
            for t in [*self.net.parameters(), *self.net.buffers()]:
                _blocking(dist.broadcast, "initial broadcast", self.rank, t.data, src=src, group=self.group)

    @contextlib.contextmanager
    def no_sync(self):
        """Inside, ``train_step`` only accumulates local gradients (gradient accumulation)."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def sync_buffers(self) -> None:
        """Average floating buffers (BatchNorm running statistics) over ranks; others from rank 0."""
        src = _global(self.group, 0)
        with torch.no_grad():
            for b in self.net.buffers():
                if b.is_floating_point():
                    _blocking(dist.all_reduce, "buffer all-reduce", self.rank, b, group=self.group)
                    b.div_(self.world_size)
                else:
                    _blocking(dist.broadcast, "buffer broadcast", self.rank, b, src=src, group=self.group)

    def sync_for_eval(self) -> None:
        """Collective (call on every rank): make this rank's net ready for evaluation/checkpoint."""
        self.sync_buffers()

    # -- the step
    @eager_step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One data-parallel step; see the class docstring. Call on every rank with the same batch."""
        if self.shard_input:
            if x.shape[0] < self.world_size:
                raise ValueError(f"x: a batch of {x.shape[0]} cannot be sharded over {self.world_size} ranks")
            x, y = shard_batch(x, y, self.rank, self.world_size)
        if not self._sync or self.world_size == 1:
            return self.net.train_step(x, y)

        blocks = self.net.blocks
        n_blocks = len(blocks)
        b_local = float(x.shape[0])
        saved = _save_grads(blocks)
        input_bad = (~torch.isfinite(x).all()) if x.is_floating_point() else None
        buckets: list = []  # (block, flat, params, work)
        results: dict = {}
        extras: list = []

        def on_block_end(k: int, r) -> None:
            results[k] = r.statistics()
            groups: dict = {}
            for p in blocks[k].trainable_parameters():
                groups.setdefault(p.dtype, []).append(p)
            for params in groups.values():
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in params])
                flat.mul_(b_local)  # shard-size weight; divided by the global batch afterwards
                work = _start(dist.all_reduce, "gradient all-reduce", self.rank, flat, group=self.group, async_op=True)
                buckets.append((k, flat, params, work))
            if k == n_blocks - 1:  # every block's statistics, shard-weighted, the shard size, the input flag
                rows = torch.stack([_stat_row(results[i]) for i in range(n_blocks)]).double()
                tail = rows.new_zeros(2)
                tail[0] = b_local
                if input_bad is not None:
                    tail[1] = input_bad.double()
                vec = torch.cat([(rows * b_local).flatten(), tail])
                present = [_present(results[i]) for i in range(n_blocks)]
                extras.append((vec, present, _start(dist.all_reduce, "statistics all-reduce", self.rank, vec,
                                                    group=self.group, async_op=True)))

        try:
            self.net.train_step(x, y, on_block_end=on_block_end)
        except NonFiniteError:  # every block ran and launched its reduction: the policy is applied below
            pass
        if not extras:
            raise RuntimeError("DataParallelLocalNet: train_step ended before the last block")
        vec, present, work = extras[0]
        for _, flat, _, w in buckets:
            _wait(w, "gradient all-reduce", self.rank)
        _wait(work, "statistics all-reduce", self.rank)
        flags = [~torch.isfinite(flat).all() for _, flat, _, _ in buckets]  # any rank's NaN/Inf survives the sum
        host = torch.cat([vec.double(), torch.stack(flags).double() if flags else vec.new_zeros(0)]).cpu()
        n_stats = n_blocks * len(_FIELDS)
        total = float(host[n_stats])
        raw = host[:n_stats].reshape(n_blocks, len(_FIELDS)) / total  # absent statistics hold the loss
        bad = _bad_blocks(raw, input_bad=float(host[n_stats + 1]) > 0)
        table = _mask_absent(raw, present)
        for (k, *_), flag in zip(buckets, host[n_stats + 2:].tolist()):
            if flag and "gradient" not in bad.setdefault(k, []):
                bad[k].append("gradient")
        bad = {k: v for k, v in bad.items() if v}
        restore = set(bad) if self.policy == "warn" else (set(range(n_blocks)) if bad else set())
        main = torch.cuda.current_stream(buckets[0][1].device) if buckets and buckets[0][1].is_cuda else None
        with torch.no_grad():
            for k, flat, params, _ in buckets:
                if main is not None:
                    flat.record_stream(main)  # allocated on a block's side stream (LocalNet overlap)
                if k in restore:
                    continue
                flat.div_(total)
                offset = 0
                for p in params:
                    view = flat[offset: offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if p.grad is not None and p.grad.shape == p.shape:
                        p.grad.copy_(view)
                    else:
                        p.grad = view
            _restore_grads(blocks, restore, saved)
        return _apply_policy(_stats_from_table(table), bad, self.policy, "on at least one rank")

    @property
    def policy(self) -> str:
        return getattr(self.net, "nonfinite", "raise")


# Statistics travel as float tables: one row per block, one column per field of StepStats.
_FIELDS = ("loss", "penalty", "accuracy", "cosine", "norm_ratio")
_WHAT = ("input", "loss", "penalty", "gradient")


def _present(r) -> list[bool]:
    return [getattr(r, name) is not None for name in _FIELDS]


def _stat_row(r) -> torch.Tensor:
    """A block's statistics as one (5,) tensor (one kernel); absent ones hold the loss."""
    return torch.stack([(getattr(r, name) if getattr(r, name) is not None else r.loss).detach().reshape(())
                        for name in _FIELDS])


def _mask_absent(table: torch.Tensor, present) -> torch.Tensor:
    """Absent statistics -> NaN (CPU float64). The loss is always present."""
    mask = torch.tensor(present, dtype=torch.bool)
    return table.double().cpu().masked_fill(~mask, float("nan"))


def _bad_blocks(table: torch.Tensor, input_bad: bool = False) -> dict:
    """{block: [what, ...]} for non-finite input (block 0), loss or penalty in a statistics table
    (before ``_mask_absent``: an absent penalty holds the loss)."""
    bad: dict = {}
    if input_bad:
        bad.setdefault(0, []).append("input")
    for k, row in enumerate(table.tolist()):
        for what, v in (("loss", row[0]), ("penalty", row[1])):
            if not math.isfinite(v):
                bad.setdefault(k, []).append(what)
    return bad


def _stats_from_table(table: torch.Tensor) -> StepStats:
    """StepStats from a (blocks, 5) CPU table, NaN = absent (the loss is kept as it is)."""
    stats = StepStats()
    for row in table.tolist():
        stats.losses.append(row[0])
        stats.penalties.append(None if row[1] != row[1] else row[1])
        stats.accuracies.append(None if row[2] != row[2] else row[2])
        stats.cosines.append(None if row[3] != row[3] else row[3])
        stats.norm_ratios.append(None if row[4] != row[4] else row[4])
    return stats


def _grads_bad(grads, device) -> torch.Tensor:
    """0-dim bool tensor: some entry of these gradients is NaN/Inf (no host sync)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(grads, 1)
    return ~torch.isfinite(torch.stack([n.to(torch.float64) for n in norms]).sum())


def _save_grads(blocks, which=None) -> dict:
    """id(p) -> a copy of p.grad (None stays None: nothing is copied after zero_grad(set_to_none=True))."""
    which = range(len(blocks)) if which is None else which
    return {id(p): (None if p.grad is None else p.grad.detach().clone())
            for k in which for p in blocks[k].trainable_parameters()}


def _restore_grads(blocks, which, saved: dict) -> None:
    for k in sorted(which):
        for p in blocks[k].trainable_parameters():
            if id(p) in saved:
                old = saved[id(p)]
                p.grad = None if old is None else old.clone()


def _apply_policy(stats: StepStats, bad: dict, policy: str, where: str) -> StepStats:
    """LocalNet's ``nonfinite`` policy on ``bad`` ({block: [what]}); the caller restored the gradients."""
    if not bad:
        return stats
    stats.nonfinite_blocks = sorted(bad)
    first = stats.nonfinite_blocks[0]
    if policy == "raise":
        raise NonFiniteError(first, f"{bad[first][0]} ({where})")
    stats.skipped = policy == "skip"
    blocks = ", ".join(f"block {k} ({'/'.join(bad[k])})" for k in stats.nonfinite_blocks)
    action = ("the step was skipped (p.grad left as before it)" if stats.skipped
              else "those blocks' p.grad were left as before the step")
    warnings.warn(f"non-finite values {where} in {blocks}; {action}", RuntimeWarning, stacklevel=3)
    return stats


# ------------------------------------------------------------------------------ module parallel

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_HEADER = 16
_MAGIC = 0x5347  # "SG"
_TAG_HEADER, _TAG_X, _TAG_D, _TAG_STATS = 11, 12, 13, 14


def _even_counts(n_blocks: int, parts: int) -> list[int]:
    base, extra = divmod(n_blocks, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class PipelineStage:
    """This rank's stage of a module-parallel (pipelined) ``LocalNet``.

    Args:
        net: the same ``LocalNet`` on every rank (built from the same seed); this rank
            trains only its own blocks and moves them to ``device``.
        micro_batches: M, the number of micro-batches each batch is cut into
            (``tensor_split``; fewer when the batch is smaller than M).
        placement: blocks per rank, e.g. ``[3, 2, 3]`` (contiguous, in rank order); default
            as even as possible. ``partition(costs, P)`` balances measured per-block costs.
        device: where this rank's blocks run (default: where they already are).
        process_group: the ranks of the pipeline, in stage order (default: the world).

    ``train_step(x, y)``: call on every rank with the same labels ``y`` (``x`` is only read
    on the first stage, pass None elsewhere). For each micro-batch the stage receives
    (x_{a-1}, D_{a-1}) from the previous rank (D only when SGR or alignment tracking needs
    it), runs its blocks' engine steps, and sends (x_{b-1}, D_{b-1}) on. Gradients of
    micro-batch j are weighted by |j|/B, so ``p.grad`` gets the full-batch gradient (exact
    without train-mode BatchNorm, which normalises each micro-batch by its own statistics
    and updates running statistics once per micro-batch). Nothing is sent backward, so a
    stage never waits for a later one: after its last micro-batch it can take its optimizer
    step and start the next batch while later stages still work on this one.

    Returns the ``StepStats`` of blocks 0..b-1 (statistics travel forward with the last
    micro-batch): the last stage gets all K blocks, equal to the single-device statistics.
    Non-finite values follow ``net.nonfinite`` on the stage that saw them and on every later
    one (their flags travel forward with the statistics); earlier stages cannot know (nothing
    travels backward), so ``"skip"`` drops the step of those stages only and ``"raise"`` stops
    them with a ``PeerError`` once the raising ranks exit. Train-mode BatchNorm running
    statistics are not rolled back here. Within a stage, blocks run one after another on
    the current CUDA stream (``LocalNet``'s two-stream overlap is not used).
    """

    def __init__(self, net: LocalNet, *, micro_batches: int = 4, placement: Optional[Sequence[int]] = None,
                 device: Union[str, torch.device, None] = None, process_group=None):
        if not isinstance(net, LocalNet):
            raise TypeError(f"net: expected a LocalNet, got {type(net).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("PipelineStage: torch.distributed is not initialised (call setup_from_env())")
        if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
            raise ValueError(f"micro_batches: expected an integer >= 1, got {micro_batches!r}")
        self.net = net
        self.group = process_group
        self.rank, self.world_size = _group_rank(process_group)
        n = len(net.blocks)
        if placement is None:
            if n < self.world_size:
                raise ValueError(f"net: {n} blocks cannot fill {self.world_size} pipeline stages (one block at least each)")
            counts = _even_counts(n, self.world_size)
        else:
            counts = [int(c) for c in placement]
            if len(counts) != self.world_size or any(c < 1 for c in counts) or sum(counts) != n:
                raise ValueError(f"placement: expected {self.world_size} counts >= 1 summing to {n} blocks, got {list(placement)}")
        self.placement = counts
        self.start = sum(counts[: self.rank])
        self.stop = self.start + counts[self.rank]
        self.owner = [r for r, c in enumerate(counts) for _ in range(c)]
        self.micro_batches = micro_batches
        if device is not None:
            for k in self.owned:
                net.blocks[k].to(device)
        first_param = next(net.blocks[self.start].parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first_param.device if first_param is not None else torch.device("cpu"))
        self.comm_device = _comm_device(process_group, self.device)
        self.prev = _global(process_group, self.rank - 1) if self.rank > 0 else None
        self.next = _global(process_group, self.rank + 1) if self.rank < self.world_size - 1 else None
        self._inflight: deque = deque()  # per step: list of (work, tensor) sends not yet known complete

    # -- plumbing
    @property
    def owned(self) -> range:
        return range(self.start, self.stop)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.is_last

    def parameters(self):
        """This stage's parameters (its blocks'): what its optimizer steps."""
        for k in self.owned:
            yield from self.net.blocks[k].parameters()

    def _isend(self, t: torch.Tensor, tag: int, sends: list) -> None:
        t = t.detach().to(self.comm_device).contiguous()
        what = f"sending to rank {self.rank + 1}"
        sends.append((_start(dist.isend, what, self.rank, t, dst=self.next, group=self.group, tag=tag), t))

    def _irecv(self, shape, dtype, tag: int):
        buf = torch.empty(shape, dtype=dtype, device=self.comm_device)
        what = f"receiving from rank {self.rank - 1}"
        return _start(dist.irecv, what, self.rank, buf, src=self.prev, group=self.group, tag=tag), buf

    def _take(self, pending, what: str) -> torch.Tensor:
        work, buf = pending
        _wait(work, f"receiving {what} from rank {self.rank - 1}", self.rank)
        return buf.to(self.device)

    def _retire(self, keep_steps: int) -> None:
        while len(self._inflight) > keep_steps:
            for work, _ in self._inflight.popleft():
                _wait(work, f"sending to rank {self.rank + 1}", self.rank)

    def flush(self) -> None:
        """Wait until every message this stage sent was received."""
        self._retire(0)

    # -- the step
    @eager_step
    def train_step(self, x: Optional[torch.Tensor], y: torch.Tensor) -> StepStats:
        """One pipelined step over M micro-batches; see the class docstring."""
        net, cfg = self.net, self.net.config
        engine = net.step_engine()
        n_blocks = len(net.blocks)
        needs_d = cfg.lam > 0 or cfg.track_alignment
        if self.is_first:
            if x is None:
                raise ValueError("x: the first pipeline stage needs the input batch, got None")
            net._check_step_input(x, y)
            if cfg.loss_fn is F.cross_entropy:
                net._check_label_range(x, y, probe=False)  # the other stages' blocks are not run here
        y = y.to(self.device)
        batch = y.shape[0]
        m = min(self.micro_batches, batch)
        ys = y.tensor_split(m)
        sizes = [t.shape[0] for t in ys]
        xs = x.to(self.device).tensor_split(m) if self.is_first else None

        # This stage's messages of the step before last must have been received by now
        # (back-pressure, bounded memory); the last step's may still be in flight.
        self._retire(1)
        sends: list = []
        self._inflight.append(sends)

        recvs: deque = deque()
        x_meta = d_meta = None
        if not self.is_first:
            pending = self._irecv((_HEADER,), torch.int64, _TAG_HEADER)
            x_meta, d_meta = _parse_header(self._take(pending, "a header").tolist(), self.rank)

            def post(j: int) -> None:
                if j < m:
                    px = self._irecv((sizes[j], *x_meta[1]), x_meta[0], _TAG_X)
                    pd = self._irecv((sizes[j], *d_meta[1]), d_meta[0], _TAG_D) if d_meta is not None else None
                    recvs.append((px, pd))

            post(0)
            post(1)

        params = [p for k in self.owned for p in net.blocks[k].trainable_parameters()]
        stash = [p.grad for p in params]  # gradients before the step (usually None)
        for p in params:
            p.grad = None
        input_bad = (~torch.isfinite(x).all()) if self.is_first and x.is_floating_point() else None
        rows: list = []  # one statistics row per (micro-batch, owned block), stacked at the end
        present: list = []
        scale = None
        for j in range(m):
            w = sizes[j] / batch
            if self.is_first:
                h, d = xs[j], None
            else:
                px, pd = recvs.popleft()
                post(j + 2)
                h = self._take(px, f"activations of micro-batch {j}")
                d = self._take(pd, f"boundary gradients of micro-batch {j}") if pd is not None else None
            if scale is not None and scale != w:  # keep p.grad = sum_i (w_i / w) g_i
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, scale / w)
            scale = w
            for k in self.owned:
                r = engine(net.blocks[k], h, ys[j], d, cfg, need_output_grad=needs_d and k < n_blocks - 1)
                h, d = r.output, r.output_grad
                rows.append(_stat_row(r))
                if j == 0:
                    present.append(_present(r))
            if not self.is_last:
                if j == 0:
                    self._isend(_make_header(h, d if needs_d else None, self.comm_device), _TAG_HEADER, sends)
                self._isend(h, _TAG_X, sends)
                if needs_d:
                    self._isend(d, _TAG_D, sends)
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            if grads and scale != 1.0:
                torch._foreach_mul_(grads, scale)
            flags = [_grads_bad([p.grad for p in net.blocks[k].trainable_parameters()], self.device)
                     for k in self.owned]
            if input_bad is not None:
                flags.append(input_bad)

        # Micro-batch-weighted means of this stage's statistics, plus a column of non-finite
        # bits (1 input, 2 loss, 4 penalty, 8 gradient); the rows of blocks 0..start-1 arrive
        # from the previous stage after its last micro-batch, and all of them travel on.
        weights = torch.tensor(sizes, dtype=torch.float64) / batch
        host = torch.cat([torch.stack(rows).double().flatten(), torch.stack(flags).double()]).cpu()
        n_own = len(self.owned)
        own = host[: m * n_own * len(_FIELDS)].reshape(m, n_own, len(_FIELDS))
        own = (own * weights[:, None, None]).sum(0)  # absent statistics hold the loss
        bits = torch.zeros(n_own, 1, dtype=torch.float64)
        fl = host[m * n_own * len(_FIELDS):].tolist()
        for i in range(n_own):
            bits[i, 0] = 8.0 * (fl[i] > 0)
        if input_bad is not None and fl[-1] > 0:
            bits[0, 0] += 1.0
        for i, row in enumerate(own.tolist()):
            bits[i, 0] += 2.0 * (not math.isfinite(row[0])) + 4.0 * (not math.isfinite(row[1]))
        table = torch.cat([_mask_absent(own, present), bits], dim=1)
        if not self.is_first:
            earlier = self._take(self._irecv((self.start, len(_FIELDS) + 1), torch.float64, _TAG_STATS), "statistics")
            table = torch.cat([earlier.cpu(), table])
        if not self.is_last:
            self._isend(table, _TAG_STATS, sends)

        bad = {k: [w for b, w in zip((1, 2, 4, 8), _WHAT) if int(code) & b]
               for k, code in enumerate(table[:, -1].tolist()) if code}
        policy = getattr(net, "nonfinite", "raise")
        # Earlier stages cannot learn of a later problem (nothing travels backward): "skip"
        # and "raise" drop this stage's step when any block up to its last one was bad.
        restore = {k for k in self.owned if (k in bad if policy == "warn" else bad)}
        dropped = {id(q) for k in restore for q in net.blocks[k].trainable_parameters()}
        with torch.no_grad():
            for p, old in zip(params, stash):
                if id(p) in dropped:
                    p.grad = old
                elif old is not None:
                    p.grad = old if p.grad is None else old.add_(p.grad)
        return _apply_policy(_stats_from_table(table[:, : len(_FIELDS)]), bad, policy,
                             f"in blocks 0..{self.stop - 1} (pipeline stage {self.rank})")

    # -- whole model
    def sync_model(self) -> None:
        """Collective (every rank): copy each block's parameters and buffers from its owner to all ranks.

        Afterwards every rank holds the trained model (for evaluation or a checkpoint).
        """
        self.flush()
        with torch.no_grad():
            for k, block in enumerate(self.net.blocks):
                src = _global(self.group, self.owner[k])
                for t in [*block.parameters(), *block.buffers()]:
                    buf = t.data.to(self.comm_device)
                    _blocking(dist.broadcast, f"broadcast of block {k}", self.rank, buf, src=src, group=self.group)
                    if buf is not t.data:
                        t.data.copy_(buf)

    def sync_for_eval(self) -> None:
        """Collective (call on every rank): ``sync_model()``."""
        self.sync_model()


def _make_header(h: torch.Tensor, d: Optional[torch.Tensor], device) -> torch.Tensor:
    shape = list(h.shape[1:])
    if 4 + len(shape) > _HEADER:
        raise ValueError(f"pipeline: activations with {len(shape) + 1} dimensions are not supported "
                         f"(at most {_HEADER - 3})")
    vals = [_MAGIC, _DTYPES.index(h.dtype), -1 if d is None else _DTYPES.index(d.dtype), len(shape), *shape]
    vals += [0] * (_HEADER - len(vals))
    return torch.tensor(vals, dtype=torch.int64, device=device)


def _parse_header(vals: list, rank: int):
    if vals[0] != _MAGIC:
        raise PeerError(f"rank {rank}: malformed pipeline header from rank {rank - 1} (ranks out of step?)")
    ndim = vals[3]
    shape = tuple(vals[4: 4 + ndim])
    x_meta = (_DTYPES[vals[1]], shape)
    d_meta = (_DTYPES[vals[2]], shape) if vals[2] >= 0 else None
    return x_meta, d_meta


# ------------------------------------------------------------------------------ throughput model


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a flushed forward-only pipeline: (P-1)/(M+P-1).

    With equal stage times t, micro-batch j leaves stage s at (j+s+1)t, so one batch takes
    (M+P-1)t of which each stage is busy M t.
    """
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages and micro_batches: expected integers >= 1, got {stages}, {micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


def partition(costs: Sequence[float], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` non-empty groups minimising the largest sum.

    Returns the group sizes (a ``PipelineStage`` placement). Exact (dynamic programming).
    """
    costs = [float(c) for c in costs]
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"parts: expected 1 <= parts <= {n} (the number of costs), got {parts}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][i]: the smallest max-group-sum of costs[:i] in p groups; cut[p][i]: last group's start
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for s in range(p - 1, i):
                v = max(best[p - 1][s], prefix[i] - prefix[s])
                if v < best[p][i] - 1e-12:
                    best[p][i], cut[p][i] = v, s
    sizes, i = [], n
    for p in range(parts, 0, -1):
        s = cut[p][i]
        sizes.append(i - s)
        i = s
    return sizes[::-1]


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
