"""Lean exact engine (``mode="exact"``): the penalty gradient from one tangent-carrying pass.

For block k with loss l(theta, u) (u = stop_grad(x_{k-1})), A = B dl/du and
R = (1/B) sum_i dist(A_i, D_{k-1,i}). With w = stop_grad(dR/dA) (the first derivative of
``reconcile`` only), the chain rule gives

    grad_theta R = grad_theta <A, w> = B grad_theta [ d/de l(theta, u + e w) ]_{e=0}
                 = B grad_theta ldot(w),

the parameter gradient of the loss's directional derivative along the INPUT tangent w.
So grad_theta J = grad_theta [ l + lam B ldot(w) ], and one step is:

1. forward, and a backward w.r.t. u and x_k only (no weight gradients): A_k, D_k; the
   graph is freed. BatchNorm running statistics are updated here, once.
2. w = dR/dA from ``reconcile`` (its first derivative; no double backward).
3. recompute forward carrying the tangent (``sgr_ext.engine.dual``: primal and tangent
   packed along the batch, so conv/linear run once on 2B rows; train-mode BN uses the
   primal batch statistics and their tangents; ReLU masks; pooling linear), then ONE
   backward of l + lam B ldot w.r.t. the parameters.

No create_graph graph is ever built. What the tangent pass holds for backward: the
block input's tangent (the primal is the caller's x_{k-1}), each BatchNorm input (primal
and tangent), ReLU masks as bools; a conv fed by BN -> ReLU recomputes its input in
backward instead of saving it (``dual.DualBNReLUConv``), global average pooling hands
back an expanded (stride-0) gradient. Peak memory is therefore about twice that of plain
local learning (primal AND tangent activations must coexist at full batch, because
train-mode BatchNorm couples the samples; only recomputation could go lower): 2.15-2.4x
of the live CPU allocations, against 2.7-2.9x for the double-backward engine
(tests/test_engines.py) and 4.3x on an H100 (DESIGN.md).

Accuracy: the result equals the double-backward reference up to rounding (measured
~1e-15 relative in float64, 2e-7..7e-7 in float32; tests/test_engines.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import dual, fused_head, local
from sgr_ext.engine.base import BlockResult, StepConfig, alignment
from sgr_ext._tensor_util import accumulate_dtype


def tangent_scale(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A power of two s with |s w| ~ |u|, as a 0-dim tensor (no host sync).

    ldot is linear in the tangent, so carrying s*w and dividing by s is exact in binary
    floating point, and keeps the tangent in the activations' range (matters for fp16/bf16).
    """
    acc = accumulate_dtype(u.dtype)
    nu = torch.linalg.vector_norm(u.detach(), dtype=acc)
    nw = torch.linalg.vector_norm(w, dtype=acc)
    e = torch.nan_to_num(torch.log2(nu / nw), nan=0.0).round().clamp(-60.0, 60.0)
    return torch.exp2(e)


def _narrow_tangents(u: torch.Tensor) -> bool:
    """The tangent pass runs in a 16-bit type (u's dtype, or autocast's), whose range a raw
    w = dR/dA may leave; float32/float64 carry w as it is (saves two norms per block)."""
    dev = u.device.type
    return u.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(dev)


def step(
    block: LocalBlock,
    x_prev: torch.Tensor,
    y: torch.Tensor,
    d_prev: Optional[torch.Tensor],
    cfg: StepConfig,
    need_output_grad: bool,
) -> BlockResult:
    """Add grad of J_k = l_k + lam * R_k to ``p.grad`` (exact; see the module docstring).

    Same contract as ``sgr_ext.engine.double_backward.step``.
    """
    if d_prev is None or cfg.lam == 0:
        return local.step(block, x_prev, y, d_prev, cfg, need_output_grad)
    batch = x_prev.shape[0]
    rng = local.replay_rng(x_prev.device, active=local.is_stochastic(block))
    params = block.trainable_parameters()
    split = cfg.split_grads and bool(params)
    share = None
    with torch.enable_grad():
        # 1. A_k and D_k (and grad l_k when the two gradients are kept apart); the graph is
        # freed by autograd.grad
        u, output, loss, acc, g_loss, a, d_out, ready = local.first_pass(
            block, x_prev, y, cfg, need_output_grad, params if split else ())

        # 2. the penalty and its first derivative w = dR/dA
        penalty, w = local.penalty_direction(a, d_prev, cfg)
        cos, ratio = alignment(a, d_prev)
        del a

        # 3. one tangent-carrying forward and one backward of l + lam B ldot (of B ldot alone,
        # i.e. grad R_k, when split)
        if params:
            s = tangent_scale(u, w) if _narrow_tangents(u) else 1.0
            z = dual.pack(u.detach(), w * s)
            del w
            with dual.frozen_norm_stats(block), rng:
                out = dual.run_module(block.module, z)
                del z
                l, ldot = _tangent_terms(block, out, y, cfg)
                del out
                if ldot is None:  # no penalty gradient
                    objective = None if split else l
                else:
                    objective = ldot * (batch / s) if split else l + ldot * (cfg.lam * batch / s)
                del l, ldot
            if split:
                g_pen = [None] * len(params)
                if objective is not None and objective.requires_grad:
                    g_pen = torch.autograd.grad(objective, params, allow_unused=True)
                share = local.accumulate_penalized(params, g_loss, g_pen, cfg)
                del g_loss, g_pen
            elif objective.requires_grad:
                objective.backward(inputs=params)
            del objective
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


def _tangent_terms(block: LocalBlock, out, y: torch.Tensor, cfg: StepConfig):
    """(l, ldot) of the head on the block output ``out``, a ``dual.Dual`` (primal and tangent);
    ldot is None when the head output carries no tangent (or ``out`` is a plain tensor: the
    block output does not depend on its input)."""
    if not isinstance(out, dual.Dual):
        return cfg.loss_fn(block.head(out), y), None
    fused = fused_head.fused_parts(block.head, out.shape[0], cfg.loss_fn)
    if fused is None:
        head_out = dual.run_module(block.head, out)
    else:  # the last Linear and the loss in one op: no (N, V) logits
        body, linear = fused
        h = dual.run_module(body, out) if body is not None else out
        if isinstance(h, dual.Dual) and h.ndim == 2:
            return fused_head.dual_loss(h.primal, h.tangent, linear, y)
        head_out = dual.run_module(linear, h) if isinstance(h, dual.Dual) else linear(h)
    if isinstance(head_out, dual.Dual):
        return dual.dual_loss(head_out, y, cfg.loss_fn)
    return cfg.loss_fn(head_out, y), None
