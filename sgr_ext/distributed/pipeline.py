"""``PipelineStage``: module-parallel (pipelined, forward-only) local learning, this rank's
contiguous group of blocks; ``partition`` balances a placement, ``pipeline_bubble`` is the
schedule's idle fraction."""
from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sgr_ext.distributed.process import _blocking, _comm_device, _global, _group_rank, _start, _wait, require_input_side
from sgr_ext.distributed.stats_table import _FIELDS, _WHAT, _mask_absent, _present, _stat_row, _stats_from_table
from sgr_ext.distributed.wire import _HEADER, _TAG_D, _TAG_HEADER, _TAG_STATS, _TAG_X, _make_header, _parse_header
from sgr_ext.net import LocalNet, StepStats, eager_step
from sgr_ext.nonfinite import apply_policy, grads_bad


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
        require_input_side(net)
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
            flags = [grads_bad([p.grad for p in net.blocks[k].trainable_parameters()], self.device)
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
        return apply_policy(_stats_from_table(table[:, : len(_FIELDS)]), bad, policy,
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
