"""Fast approximate engine (``mode="fast"``): a finite difference of the parameter gradient.

The exact penalty gradient is grad_theta R = B * (d/de) grad_theta l(theta, u + e w) at
e = 0, with w = stop_grad(dR/dA) (see ``sgr_ext.engine.tangent``). This engine replaces the
derivative by a one-sided difference with step h:

    grad_theta J ~= g1 + (lam B / h) (g2 - g1),
    g1 = grad_theta l(theta, u),   g2 = grad_theta l(theta, u + h w),

computed by two plain passes run one after the other:

1. forward at u, one backward giving g1, A_k and D_k together (exactly the plain local
   step plus the input gradient); BN running statistics updated here, once; the ReLU
   masks are recorded (one bool per unit);
2. w = dR/dA; forward at u + h w with BN running statistics frozen (train-mode BN uses the
   perturbed batch's statistics, as the definition's l(theta, u + e w) does) and the ReLU
   masks of pass 1 replayed, one backward for g2 only.

Why replay the masks: grad_theta l jumps wherever the perturbation flips a ReLU, so a
plain difference quotient does not tend to the derivative autograd defines (masks fixed)
as h -> 0; the jump terms give an O(1) bias that shrinks only with the batch size (the
4-8 % error of a naive finite difference). With the masks replayed the quotient is a smooth
function of h again. Max-pooling switches are not replayed (an O(h)-probability term).

Memory: the two graphs never coexist; on top of plain local learning it holds D_k, the
perturbed input (built in w's buffer), the output x_k and the bool masks (1.4-1.8x the
plain local peak of live CPU allocations, tests/test_engines.py). Time: about two plain local steps.

Step size: ||h w|| = h_rel ||u|| with h_rel from the compute dtype (``H_REL``; under
autocast the autocast dtype counts): truncation error grows like h_rel (first order,
checked), rounding error like eps / h_rel.

Error, relative to the exact penalty part of the gradient
||g_fast - g_exact|| / ||g_exact(lam) - g_exact(0)|| (documented bound ``ERROR_BOUND``,
checked in tests/test_engines.py): float32 7e-4..2e-3 (bound 1e-2), float64 1e-8..3e-7
(bound 1e-4), measured on MLP, conv+BN and residual blocks, l2 and cosine; on 272 random
blocks (tests/test_differential.py) float64 median 1.3e-7, max 2.6e-5. With lam = 1
that is 1e-4..2e-3 of the whole gradient in float32. In bfloat16 both passes carry bf16
rounding (h_rel = 3e-2): expect errors of a few percent of the penalty part, the same
order as the bf16 error of the gradient itself. Max-pooling switches crossed by the
perturbation add an O(h)-probability term.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import dual, fused_head, local
from sgr_ext.engine.base import BlockResult, StepConfig, alignment
from sgr_ext._tensor_util import accumulate_dtype

# relative perturbation size ||h w|| / ||u|| per compute dtype
H_REL = {
    torch.float64: 1e-7,
    torch.float32: 3e-4,
    torch.bfloat16: 3e-2,
    torch.float16: 1e-2,
}


_RELUS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class _ReluMasks(TorchFunctionMode):
    """Record the ReLU masks of a forward, then replay them in a second forward.

    ``grad_theta l`` jumps where a perturbation flips a ReLU, so a difference quotient across
    flips does not converge to the derivative autograd computes (masks held fixed) as h -> 0.
    Replaying the unperturbed masks makes pass 2 the same piecewise-linear branch as pass 1.
    Calls are matched by order (the same forward code runs twice).
    """

    def __init__(self):
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.replay = False
        self.i = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELUS:
            return func(*args, **kwargs)
        x = args[0]
        inplace = func in (torch.relu_, torch.Tensor.relu_) or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        if not self.replay:
            out = func(*args, **kwargs)
            self.masks.append(out > 0)
            return out
        if self.i >= len(self.masks) or self.masks[self.i].shape != x.shape:
            raise RuntimeError("fast mode: the block's forward did not repeat its ReLU calls; use mode='exact'")
        mask = self.masks[self.i]
        self.masks[self.i] = None
        self.i += 1
        return x.mul_(mask) if inplace else x * mask


# documented bound on the relative error of the PENALTY part of the gradient,
# ||g_fast - g_exact|| / ||g_exact(lam) - g_exact(0)||, checked in tests/test_engines.py
# (typical values are 5-10x smaller; bf16 is dominated by bf16 rounding of both passes)
ERROR_BOUND = {
    torch.float64: 1e-4,  # random blocks (tests/test_differential.py): median 1.3e-7, max 2.6e-5
    torch.float32: 1e-2,
    torch.bfloat16: 0.3,
    torch.float16: 0.1,
}


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The precision the block computes in: the autocast dtype when autocast is on."""
    dev = t.device.type
    if t.dtype in (torch.float32, torch.float64) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def step(
    block: LocalBlock,
    x_prev: torch.Tensor,
    y: torch.Tensor,
    d_prev: Optional[torch.Tensor],
    cfg: StepConfig,
    need_output_grad: bool,
    *,
    h_rel: Optional[float] = None,
) -> BlockResult:
    """Add an approximation of grad J_k = grad (l_k + lam R_k) to ``p.grad``.

    Same contract as ``sgr_ext.engine.double_backward.step``; ``h_rel`` overrides the
    relative step size (default ``H_REL[compute dtype]``).
    """
    if d_prev is None or cfg.lam == 0:
        return local.step(block, x_prev, y, d_prev, cfg, need_output_grad)
    batch = x_prev.shape[0]
    h_rel = float(h_rel if h_rel is not None else H_REL.get(compute_dtype(x_prev), 1e-3))
    rng = local.replay_rng(x_prev.device, active=local.is_stochastic(block))
    params = block.trainable_parameters()
    share = None
    with torch.enable_grad():
        # 1. g1, A_k, D_k from one forward and one backward
        masks = _ReluMasks()
        u, output, loss, acc, g1, a, d_out, ready = local.first_pass(
            block, x_prev, y, cfg, need_output_grad, params, record=masks)

        # 2. penalty direction and the perturbed pass
        penalty, w = local.penalty_direction(a, d_prev, cfg)
        cos, ratio = alignment(a, d_prev)
        del a
        if params:
            acc_dt = accumulate_dtype(u.dtype)
            tiny = torch.finfo(acc_dt).tiny
            nu = torch.linalg.vector_norm(u.detach(), dtype=acc_dt).clamp_min(tiny)
            nw = torch.linalg.vector_norm(w, dtype=acc_dt).clamp_min(tiny)
            h = h_rel * nu / nw
            masks.replay = True
            with dual.frozen_norm_stats(block), rng, masks:
                if w.dtype == u.dtype and w.shape == u.shape and w.is_contiguous() == u.is_contiguous():
                    u2 = w.mul_(h.to(w.dtype)).add_(u.detach())  # reuse w's memory
                else:
                    u2 = u.detach() + (w * h).to(u.dtype)
                del w
                loss2, _ = fused_head.loss_and_accuracy(block.head, block.module(u2), y, cfg.loss_fn, with_accuracy=False)
            del masks
            with torch.enable_grad():
                del u2
                g2 = torch.autograd.grad(loss2, params, allow_unused=True)
                del loss2
            if cfg.split_grads:  # grad R_k ~ B (g2 - g1) / h
                share = local.accumulate_penalized(params, g1, _combine(g1, g2, batch / h, keep=False), cfg)
            else:
                local.accumulate(params, _combine(g1, g2, (cfg.lam * batch) / h))
            del g1, g2
    return BlockResult(
        output=output,
        output_grad=None if d_out is None else d_out.detach(),
        loss=loss,
        penalty=penalty,
        accuracy=acc,
        cosine=cos,
        norm_ratio=ratio,
        ready=ready,
        share=share,
    )


def _combine(g1, g2, c: torch.Tensor, keep: bool = True) -> list:
    """g1 + c (g2 - g1) per parameter (None where both are None); the difference first.
    ``keep=False``: c (g2 - g1) alone."""
    out = [None] * len(g1)
    idx = [i for i in range(len(g1)) if g1[i] is not None or g2[i] is not None]
    if not idx:
        return out
    a = [g1[i] if g1[i] is not None else torch.zeros_like(g2[i]) for i in idx]
    b = [g2[i] if g2[i] is not None else torch.zeros_like(g1[i]) for i in idx]
    diff = torch._foreach_sub(b, a)
    torch._foreach_mul_(diff, c.to(a[0].dtype))
    if keep:
        torch._foreach_add_(diff, a)
    for i, t in zip(idx, diff):
        out[i] = t
    return out
