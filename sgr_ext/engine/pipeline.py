"""Overlap of consecutive block steps on CUDA (two streams); a no-op elsewhere.

Block k+1 needs only x_k and D_k from block k. Engines that know when those are final
record a CUDA event there (``BlockResult.ready``: after the forward for plain local steps,
after the activation-gradient pass for SGR steps); the rest of block k's work (its weight
gradients, the SGR tangent pass) can then run on the GPU while block k+1's forward runs.

Blocks alternate between two side streams. Each block's stream waits for the previous
block's ready event (or its whole step, for engines without one); every tensor that
crosses streams is ``record_stream``-ed so the caching allocator does not reuse its memory
early; at the end the caller's stream waits for both side streams, so ``p.grad``, the
BatchNorm statistics and the returned statistics are safe to use as usual. Autograd runs
each backward op on the stream of its forward op, so a block's backward stays on its
stream. Gradients are bitwise those of the sequential loop.

Requirement: a block must not modify its input x_{k-1} in place (the previous block's
backward may still read it). ``split`` blocks start with a convolution or a linear layer;
a violation is detected through the tensor version counter and raises a RuntimeError
naming ``overlap=False``.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

_STREAMS: dict = {}


def _side_streams(device: torch.device):
    key = (device.type, device.index)
    if key not in _STREAMS:
        _STREAMS[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[key]


def overlap_enabled(setting: Union[bool, str], x: torch.Tensor, num_blocks: int) -> bool:
    """``setting``: True / False / ``"auto"`` (on for CUDA inputs with at least 2 blocks)."""
    if setting is False or num_blocks < 2 or not x.is_cuda:
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    return True


class BlockPipeline:
    """``with pipe.block(k, h, d, y): r = engine(...); pipe.done(r)`` per block, then ``pipe.finish()``."""

    def __init__(self, x: torch.Tensor, enabled: bool):
        self.enabled = bool(enabled) and x.is_cuda
        if not self.enabled:
            return
        self.device = x.device
        self.main = torch.cuda.current_stream(self.device)
        self.streams = _side_streams(self.device)
        self.wait_for: Optional[torch.cuda.Event] = self.main.record_event()
        self.last: Optional[torch.cuda.Event] = None

    @contextlib.contextmanager
    def block(self, k: int, *tensors: Optional[torch.Tensor]):
        if not self.enabled:
            yield
            return
        stream = self.streams[k % 2]
        stream.wait_event(self.wait_for)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(stream)
        versions = [t._version if isinstance(t, torch.Tensor) else None for t in tensors]
        self.current = stream
        with torch.cuda.stream(stream):
            yield
        for t, v in zip(tensors, versions):
            if isinstance(t, torch.Tensor) and t._version != v:
                torch.cuda.synchronize(self.device)
                raise RuntimeError(
                    f"LocalNet(overlap=...): block {k} modified its input in place while block {k - 1}'s "
                    "backward may still have been reading it on another stream; this step's gradients are "
                    "not reliable. Use LocalNet(..., overlap=False) for this model, or make the block's "
                    "first operation out of place."
                )

    def done(self, result) -> None:
        """Call inside ``block``: the next block may start at ``result.ready`` (or now)."""
        if not self.enabled:
            return
        ready = getattr(result, "ready", None)
        if ready is None:
            ready = self.current.record_event()
        self.wait_for = ready

    def finish(self) -> None:
        if not self.enabled:
            return
        for s in self.streams:
            self.main.wait_stream(s)
