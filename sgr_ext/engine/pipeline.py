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

The stream operations go through a small backend (``CudaStreams``) so that the schedule
itself can be tested on a machine without a GPU (tests/test_pipeline.py fakes it).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

class CudaStreams:
    """The stream operations ``BlockPipeline`` uses, on CUDA; two side streams per device,
    created once."""

    def __init__(self):
        self._side: dict = {}

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_cuda

    def current(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def side(self, device: torch.device):
        key = (device.type, device.index)
        if key not in self._side:
            self._side[key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._side[key]

    def use(self, stream):
        return torch.cuda.stream(stream)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        if t.is_cuda:
            t.record_stream(stream)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


CUDA_STREAMS = CudaStreams()


def overlap_enabled(setting: Union[bool, str], x: torch.Tensor, num_blocks: int) -> bool:
    """``setting``: True / False / ``"auto"`` (on for CUDA inputs with at least 2 blocks)."""
    if setting is False or num_blocks < 2 or not x.is_cuda:
        return False
    if torch.cuda.is_current_stream_capturing():
        return False
    return True


class BlockPipeline:
    """``with pipe.block(k, h, d, y): r = engine(...); pipe.done(r)`` per block, then ``pipe.finish()``."""

    def __init__(self, x: torch.Tensor, enabled: bool, streams: CudaStreams = CUDA_STREAMS):
        self.enabled = bool(enabled) and streams.accepts(x)
        if not self.enabled:
            return
        self.device = x.device
        self.backend = streams
        self.main = streams.current(self.device)
        self.streams = streams.side(self.device)
        self.wait_for = self.main.record_event()  # an event of the backend's kind

    @contextlib.contextmanager
    def block(self, k: int, *tensors: Optional[torch.Tensor]):
        if not self.enabled:
            yield
            return
        stream = self.streams[k % 2]
        stream.wait_event(self.wait_for)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.backend.record_stream(t, stream)
        versions = [t._version if isinstance(t, torch.Tensor) else None for t in tensors]
        self.current = stream
        with self.backend.use(stream):
            yield
        for t, v in zip(tensors, versions):
            if isinstance(t, torch.Tensor) and t._version != v:
                self.backend.synchronize(self.device)
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
