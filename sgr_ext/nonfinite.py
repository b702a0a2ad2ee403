"""The non-finite policy of a local-learning step, shared by ``LocalNet.train_step`` and the
distributed runners (``sgr_ext.distributed``).

A step checks, without a host sync until its statistics are read, whether the input or a
block's loss, penalty, boundary gradient D_k or parameter gradient is NaN/Inf, and then
applies ``nonfinite`` = ``"raise"`` (``NonFiniteError``), ``"skip"`` (every ``p.grad`` left as
before the step) or ``"warn"`` (only the bad blocks' ``p.grad`` left as before).
``StepGuard`` does this for one process; ``grads_bad`` / ``save_grads`` / ``restore_grads`` /
``apply_policy`` are the pieces the distributed runners combine with their reductions.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # net.py imports this module
    from sgr_ext.net import StepStats


class NonFiniteError(FloatingPointError):
    """The input, or a loss, penalty or gradient of block ``block`` (0-based) was NaN/Inf.

    ``what``: ``"input"`` (block 0 only), ``"loss"``, ``"penalty"``, ``"boundary gradient"`` (D_k,
    the gradient the block hands forward) or ``"gradient"`` (its parameter gradient).
    """

    def __init__(self, block: int, what: str):
        super().__init__(f"block {block}: non-finite {what}")
        self.block = block
        self.what = what


_WHAT = ("input", "loss", "penalty", "boundary gradient", "gradient")


def _host_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class StepGuard:
    """Non-finite detection and rollback for one ``train_step``.

    Before the step: a copy of every existing ``p.grad`` of the blocks' trainable parameters
    (None stays None: nothing is copied in the usual ``zero_grad(set_to_none=True)`` loop) and
    of the running statistics of train-mode normalisation layers. Per block, flags (device
    tensors, no sync) for a non-finite loss, penalty, D_k and parameter gradient (the gradient flag
    is the sum of per-tensor L1 norms of the block's ``p.grad``, in float64, after the block's
    step: non-finite exactly when some entry is). ``read`` brings statistics, flags and (when
    ``label_bounds`` is set) the labels' range to the host in one transfer; ``restore(blocks)`` puts those blocks' saved state back.
    """

    def __init__(self, blocks, x: torch.Tensor):
        self.blocks = blocks
        self.params = [b.trainable_parameters() for b in blocks]
        self.grads: dict[int, Optional[torch.Tensor]] = {}
        for ps in self.params:
            for p in ps:
                if id(p) not in self.grads:
                    self.grads[id(p)] = None if p.grad is None else p.grad.detach().clone()
        self.buffers = []
        for b in blocks:
            bufs = [t for m in b.modules()
                    if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
                    for t in m.buffers(recurse=False)]
            self.buffers.append([(t, t.detach().clone()) for t in bufs])
        self.device = x.device
        self.input_bad = (~torch.isfinite(x).all()) if (x.is_floating_point() or x.is_complex()) else None
        self.grad_bad: list[Optional[torch.Tensor]] = []
        self.d_bad: list[Optional[torch.Tensor]] = []
        self.num_classes: Optional[int] = None
        self.label_bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (min, max) of y, on the device

    def check_block(self, k: int, r) -> None:
        self.d_bad.append(None if r.output_grad is None else ~torch.isfinite(r.output_grad).all())
        grads = [p.grad for p in self.params[k] if p.grad is not None]
        grads = [g._values() if g.is_sparse else g for g in grads]
        if not grads:
            self.grad_bad.append(None)
            return
        norms = torch._foreach_norm(grads, 1, dtype=_host_dtype(grads[0].device))
        total = torch.stack([n.to(norms[0].device) for n in norms]).sum()
        self.grad_bad.append(~torch.isfinite(total))

    def read(self, results) -> tuple[list[list[Optional[float]]], dict[int, list[str]], Optional[tuple[int, int]]]:
        """Per block [loss, penalty, accuracy, cosine, norm_ratio, share] (None where absent),
        {block: [what, ...]} for the non-finite ones and (min, max) of the labels when
        ``label_bounds`` was set; one device-to-host transfer."""
        dt = _host_dtype(self.device)
        vals, slots = [], []  # slots: per block, the index in vals of each statistic (None: absent)

        def put(t) -> Optional[int]:
            if t is None:
                return None
            vals.append(t.detach().reshape(()).to(device=self.device, dtype=dt))
            return len(vals) - 1

        for k, r in enumerate(results):
            stat = [put(r.loss), put(r.penalty), put(r.accuracy), put(r.cosine), put(r.norm_ratio), put(r.share)]
            flags = [
                put(self.input_bad) if k == 0 else None,
                put(~torch.isfinite(r.loss)),
                put(None if r.penalty is None else ~torch.isfinite(r.penalty)),
                put(self.d_bad[k]),
                put(self.grad_bad[k]),
            ]
            slots.append((stat, flags))
        label_slots = [put(t) for t in self.label_bounds] if self.label_bounds is not None else None
        host = torch.stack(vals).tolist() if vals else []
        values, bad = [], {}
        for k, (stat, flags) in enumerate(slots):
            values.append([None if i is None else host[i] for i in stat])
            what = [w for w, i in zip(_WHAT, flags) if i is not None and host[i]]
            if what:
                bad[k] = what
        labels = None if label_slots is None else (int(host[label_slots[0]]), int(host[label_slots[1]]))
        return values, bad, labels

    @torch.no_grad()
    def restore(self, blocks) -> None:
        for k in blocks:
            for p in self.params[k]:
                saved = self.grads[id(p)]
                if saved is not None and p.grad is not None and p.grad.shape == saved.shape and not p.grad.is_sparse:
                    p.grad.copy_(saved)
                else:
                    p.grad = None if saved is None else saved.clone()
            for t, saved in self.buffers[k]:
                t.copy_(saved)


def grads_bad(grads, device) -> torch.Tensor:
    """0-dim bool tensor: some entry of these gradients is NaN/Inf (no host sync)."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(grads, 1)
    return ~torch.isfinite(torch.stack([n.to(torch.float64) for n in norms]).sum())


def save_grads(blocks, which=None) -> dict:
    """id(p) -> a copy of p.grad (None stays None: nothing is copied after zero_grad(set_to_none=True))."""
    which = range(len(blocks)) if which is None else which
    return {id(p): (None if p.grad is None else p.grad.detach().clone())
            for k in which for p in blocks[k].trainable_parameters()}


def restore_grads(blocks, which, saved: dict) -> None:
    for k in sorted(which):
        for p in blocks[k].trainable_parameters():
            if id(p) in saved:
                old = saved[id(p)]
                p.grad = None if old is None else old.clone()


def apply_policy(stats: StepStats, bad: dict, policy: str, where: str) -> StepStats:
    """LocalNet's ``nonfinite`` policy on ``bad`` ({block: [what]}) for a ``StepStats`` (updated and
    returned); the caller restored the gradients. ``where`` says on which ranks."""
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
