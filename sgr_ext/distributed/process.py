"""Process setup and error wrapping: ``setup_from_env`` (torchrun environment -> process group,
with a timeout), ``DistContext``, ``PeerError`` (a failed or timed-out transfer with another
rank) and the collective wrappers both runners use."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.distributed as dist

from sgr_ext.net import LocalNet

if TYPE_CHECKING:  # the runners import this module
    from sgr_ext.distributed.data_parallel import DataParallelLocalNet
    from sgr_ext.distributed.pipeline import PipelineStage


PARALLEL_MODES = ("data", "module")
DEFAULT_TIMEOUT_S = 300.0


class PeerError(RuntimeError):
    """A collective or point-to-point transfer with another rank failed or timed out.

    Usually another process died or hangs; its own error is in its log.
    """


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
        from sgr_ext.distributed.data_parallel import DataParallelLocalNet  # the runners import this module
        from sgr_ext.distributed.pipeline import PipelineStage

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


def require_input_side(net) -> None:
    """The runners' step loops train each block once, from the input side: refuse the others."""
    if net.side != "input" and net.lam > 0:
        raise ValueError(f"net: side={net.side!r} is not supported by the distributed runners yet (their step loop "
                         "trains each block once, from the input side); build the LocalNet with side='input'")
