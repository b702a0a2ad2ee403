"""``DataParallelLocalNet``: every rank holds the whole net; block k's gradients are all-reduced
as soon as its step ends, overlapping block k+1's compute."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from sgr_ext.distributed.process import _blocking, _global, _group_rank, _start, _wait, require_input_side, shard_batch
from sgr_ext.distributed.stats_table import _FIELDS, _bad_blocks, _mask_absent, _present, _stat_row, _stats_from_table
from sgr_ext import autograd_bridge
from sgr_ext.net import LocalNet, StepStats, eager_step
from sgr_ext.nonfinite import NonFiniteError, apply_policy, restore_grads, save_grads


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
        require_input_side(net)
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
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> "autograd_bridge.LocalNetOutput":
        """``runner(x, y)``: ``train_step`` for an ordinary loop, as ``LocalNet``'s ``net(x, y)``.

        The full-batch (all-reduced) gradients are set aside; ``runner(x, y).loss.backward()``
        adds them to ``p.grad`` times the gradient reaching ``loss`` (the same on every rank).
        ``loss`` and ``stats`` are the full batch's; ``logits`` are this rank's shard's.
        """
        return autograd_bridge.step_for_backward(
            self.net, lambda hook: self.train_step(x, y, on_block_end=hook), x.device)

    @eager_step
    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, on_block_end=None) -> StepStats:
        """One data-parallel step; see the class docstring. Call on every rank with the same batch.

        on_block_end: optional ``on_block_end(k, result)`` with this rank's block-k result (its
        shard's x_k), called before block k's gradients are reduced.
        """
        if self.shard_input:
            if x.shape[0] < self.world_size:
                raise ValueError(f"x: a batch of {x.shape[0]} cannot be sharded over {self.world_size} ranks")
            x, y = shard_batch(x, y, self.rank, self.world_size)
        if not self._sync or self.world_size == 1:
            return self.net.train_step(x, y, on_block_end=on_block_end)

        blocks = self.net.blocks
        n_blocks = len(blocks)
        b_local = float(x.shape[0])
        saved = save_grads(blocks)
        input_bad = (~torch.isfinite(x).all()) if x.is_floating_point() else None
        buckets: list = []  # (block, flat, params, work)
        results: dict = {}
        extras: list = []

        def reduce_block(k: int, r) -> None:
            if on_block_end is not None:
                on_block_end(k, r)
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
            self.net.train_step(x, y, on_block_end=reduce_block)
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
            restore_grads(blocks, restore, saved)
        return apply_policy(_stats_from_table(table), bad, self.policy, "on at least one rank")

    @property
    def policy(self) -> str:
        return getattr(self.net, "nonfinite", "raise")
