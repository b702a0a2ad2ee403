"""First-step self-check of a step engine against double backward (``LocalNet(verify=...)``).

The exact engine recomputes a block with dual (primal + tangent) values, op by op; an op
without a correct rule would give a plausible but wrong penalty gradient. For a user's own
architecture the check runs, on the first step and again whenever a block's modules (or
their train/eval modes) change, the step engine and the double-backward reference on the
first ``samples`` rows of the batch, and raises ``EngineMismatch`` naming the block and the
relative error when they disagree.

Error measure: ||g_engine - g_ref|| / (||g_ref - g_local|| + tol ||g_ref||), g_local the
plain local gradient, i.e. relative to the penalty's part of the gradient (a small penalty
part cannot hide a wrong penalty) plus the dtype's rounding level ``ROUNDING``. Bound:
``BOUND`` for the exact engine, twice the documented ``finite_diff.ERROR_BOUND`` for fast.

The block's ``p.grad``, its norm layers' running statistics and the RNG are saved and
restored: the real step that follows is unchanged. Cost: three block steps (engine, double
backward, plain local) on ``SAMPLES`` rows, for each block, once (and again per changed
block), plus the double-backward graph of one block on those rows. Measured (2-core CPU,
float32, the 3-block CIFAR-style ResNet of tests/test_engines.py, batch 32): 0.23 s once,
1.5 plain steps. ``LocalNet`` keeps it off by default.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from sgr_ext.engine import double_backward, finite_diff, local
from sgr_ext.engine.base import StepConfig

# rounding level of a gradient in this dtype, relative to its norm
ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}
SAMPLES = 8  # rows of the batch the check runs on
BOUND = 1e-2  # exact engine: at most 1 % of the penalty part (measured ~1e-15 in float64)


class EngineMismatch(RuntimeError):
    """``LocalNet(verify=True)``: the step engine's gradient of block ``block`` differs from
    double backward by ``error`` (relative, see ``sgr_ext.engine.verify``)."""

    def __init__(self, block: int, mode: str, error: float, bound: float):
        super().__init__(
            f"block {block}: mode={mode!r} gives a gradient {error:.2e} off double backward relative to the "
            f"penalty's part (bound {bound:.0e}) on a sub-batch; this block uses an op the {mode} engine does not "
            "handle exactly: use mode='double_backward' (or report the op)")
        self.block, self.mode, self.error, self.bound = block, mode, error, bound


def signature(block: nn.Module) -> tuple:
    """What the check depends on: the block's modules and their train/eval modes."""
    return tuple((id(m), type(m), m.training) for m in block.modules())


def bound_for(mode: str, dtype: torch.dtype) -> float:
    if mode == "fast":
        return 2 * finite_diff.ERROR_BOUND.get(dtype, 0.3)
    return BOUND


def check(k: int, mode: str, engine: Callable, block, x_prev: torch.Tensor, y: torch.Tensor,
          d_prev: torch.Tensor, cfg: StepConfig, samples: int) -> Optional[float]:
    """Compare ``engine`` with double backward on block ``k`` (0-based) for the first
    ``samples`` rows of ``x_prev`` (B, *), ``y`` (B,) and ``d_prev`` (x_prev's shape).
    Raises ``EngineMismatch``; returns the error, or None when nothing could be compared
    (no trainable parameters, a non-finite gradient: the step's own checks report those)."""
    params = block.trainable_parameters()
    if not params:
        return None
    n = min(samples, x_prev.shape[0])
    x, t, d = x_prev[:n].detach(), y[:n], d_prev[:n].detach()
    saved = _State(block, params)
    try:  # every run from the same RNG state: the same dropout masks
        got = _grads(engine, block, params, x, t, d, cfg)
        saved.restore_rng()
        want = _grads(double_backward.step, block, params, x, t, d, cfg)
        saved.restore_rng()
        plain = _grads(local.step, block, params, x, t, d, cfg)
    finally:
        saved.restore()
    if not all(torch.isfinite(g).all() for g in (got, want, plain)):
        return None
    dtype = params[0].dtype
    scale = (want - plain).norm() + ROUNDING.get(dtype, 1e-2) * want.norm()
    if float(scale) == 0.0:
        return None
    error = float((got - want).norm() / scale)
    bound = bound_for(mode, dtype)
    if not error <= bound:
        raise EngineMismatch(k, mode, error, bound)
    return error


def _grads(engine, block, params, x, y, d, cfg) -> torch.Tensor:
    """The flat float64 gradient one engine step adds to ``params``."""
    for p in params:
        p.grad = None
    engine(block, x, y, d, cfg, False)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in params])


class _State:
    """``p.grad``, norm-layer buffers and the RNG of CPU and the block's CUDA device, as they were."""

    def __init__(self, block, params):
        self.grads = [(p, p.grad) for p in params]
        self.buffers = [(b, b.detach().clone()) for m in block.modules()
                        if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers(recurse=False)]
        self.cpu_rng = torch.get_rng_state()
        dev = params[0].device
        self.cuda = (dev, torch.cuda.get_rng_state(dev)) if dev.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        for p, g in self.grads:
            p.grad = g
        for b, v in self.buffers:
            b.copy_(v)
        self.restore_rng()

    def restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
