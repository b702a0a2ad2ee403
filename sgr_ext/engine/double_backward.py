"""Reference exact engine: the penalty's parameter gradient by double backward.

Keeps the forward graph and the create_graph backward graph of one block alive at
once, so it costs about as much memory as global backprop over that block. It is
the definition every faster engine is tested against.
"""
from __future__ import annotations

from typing import Optional

import torch

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import fused_head, local
from sgr_ext.engine.base import BlockResult, StepConfig, alignment
from sgr_ext.ops.reconcile import reconcile


def step(
    block: LocalBlock,
    x_prev: torch.Tensor,
    y: torch.Tensor,
    d_prev: Optional[torch.Tensor],
    cfg: StepConfig,
    need_output_grad: bool,
) -> BlockResult:
    """Add grad of J_k = l_k + lam * R_k to ``p.grad`` of the block's parameters.

    x_prev: (B, *) input x_{k-1}; it is detached here (u_k = stop_grad(x_{k-1})).
    d_prev: D_{k-1} with x_prev's shape, or None for the first block.
    need_output_grad: whether to return D_k for the next block.
    """
    batch = x_prev.shape[0]
    penalize = d_prev is not None and cfg.lam > 0
    need_input_grad = d_prev is not None and (penalize or cfg.track_alignment)

    u = x_prev.detach().requires_grad_(need_input_grad)
    x = block.module(u)
    if need_output_grad and not x.requires_grad:
        x.requires_grad_()  # a parameter-free module on a constant input: x is a leaf
    loss, acc = fused_head.loss_and_accuracy(block.head, x, y, cfg.loss_fn)
    params = block.trainable_parameters()

    wrt = ([x] if need_output_grad else []) + ([u] if need_input_grad else [])
    grads = list(torch.autograd.grad(loss, wrt, create_graph=penalize, retain_graph=True)) if wrt else []
    d_out = (grads.pop(0) * batch).detach() if need_output_grad else None
    a = grads.pop(0) * batch if need_input_grad else None

    objective = loss
    penalty = None  # not computed: no A_k (first block, or lam == 0 without track_alignment)
    if a is not None:
        penalty = reconcile(a if penalize else a.detach(), d_prev, distance=cfg.distance, eps=cfg.eps)
    if penalize:
        objective = loss + cfg.lam * penalty
    share = None
    if params and penalize and cfg.split_grads:
        g_loss = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        g_pen = torch.autograd.grad(penalty, params, allow_unused=True)
        share = local.accumulate_penalized(params, g_loss, g_pen, cfg)
    elif params:
        objective.backward(inputs=params)

    cos = ratio = None
    if a is not None:
        cos, ratio = alignment(a, d_prev)
    return BlockResult(
        output=x.detach(),
        output_grad=d_out,
        loss=loss.detach(),
        penalty=None if penalty is None else penalty.detach(),
        accuracy=acc,
        cosine=cos,
        norm_ratio=ratio,
        share=share,
        input_grad=a.detach() if cfg.keep_input_grad and a is not None else None,
    )
