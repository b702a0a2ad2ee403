"""The pipeline's wire format: the header that announces the dtypes and the per-sample shape
of the activations x and boundary gradients D that follow it, and the message tags."""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext.distributed.process import PeerError


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_HEADER = 16
_MAGIC = 0x5347  # "SG"
_TAG_HEADER, _TAG_X, _TAG_D, _TAG_STATS = 11, 12, 13, 14


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
