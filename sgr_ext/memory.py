"""Peak memory of a region of training work, on CUDA and on CPU."""
from __future__ import annotations

import weakref

import torch
from torch import nn


class PeakMemory:
    """Context manager: ``with PeakMemory(device) as m: ...; m.peak_mb``.

    CUDA: the caching allocator's peak inside the region above what was allocated at
    entry (``max_memory_allocated - memory_allocated`` before), as DESIGN.md §5 defines.
    CPU: PyTorch keeps no allocator statistics there, so the peak is taken over the bytes
    of tensors autograd holds for backward (saved-tensor hooks; parameters and storages
    shared by several saved tensors counted once). That is the memory local learning
    saves, and ``metric`` names which one was measured.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.metric = "cuda_max_allocated" if self.device.type == "cuda" else "saved_activations"
        self.peak_bytes = 0
        self._live: dict[int, list] = {}  # storage ptr -> [number of live saved tensors, nbytes]
        self._current = 0
        self._hooks = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def held_bytes(self) -> int:
        """CPU: bytes saved for backward inside the region that are still alive (0 once every
        graph the region built is gone; more means something keeps a graph)."""
        return self._current

    def __enter__(self) -> "PeakMemory":
        if self.metric == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.metric == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or t.device.type != "cpu":
            return t
        # keep a detached alias: returning ``t`` itself would let a node that saves its own output
        # hold its output's grad_fn, i.e. itself, and a branch never backpropagated would leak
        t = t.detach()
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [0, storage.nbytes()]
            self._current += entry[1]
            self.peak_bytes = max(self.peak_bytes, self._current)
        entry[0] += 1
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self._current -= entry[1]
            del self._live[key]
