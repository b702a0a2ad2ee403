"""Output-side reconciliation (``LocalNet(side="output")``): the penalty at boundary k acts on
block k-1, pulling its output gradient D_{k-1} towards the next block's input gradient A_k.

DESIGN.md section 1 puts the penalty on module k: A_k is pulled towards stop_grad(D_{k-1}), so the
later block is constrained to agree with the earlier one's greedy objective, and no information
about what block k needs ever reaches block k-1. Here the same distance, on the same two
gradients of the same tensor x_{k-1}, is minimised over block k-1's parameters instead:

    R'_{k-1} = (1/B) sum_i dist(D_{k-1,i}(theta_{k-1}), stop_grad(A_{k,i}))

Block k-1's head then learns to hand its module the gradient block k's loss would (the way a
synthetic-gradient model is fitted to the true gradient), and the module follows it. No gradient
crosses a boundary (A_k is a constant), no parameter is added; the price is that block k-1's
penalty waits for block k's first pass, so block k-1's input x_{k-2} is kept one block longer
and block k-1 is recomputed (forward + double backward of that one block).
"""
from __future__ import annotations

import contextlib

import torch

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import dual, fused_head, local
from sgr_ext.engine.base import StepConfig
from sgr_ext.ops.reconcile import reconcile


@contextlib.contextmanager
def _recompute(block: LocalBlock, rng: local.replay_rng, device: torch.device):
    """Block k-1's forward replayed: its RNG snapshot, frozen norm statistics, grad on; the RNG
    left where it stood before (later blocks draw what they would have drawn without it)."""
    resume = local.replay_rng(device, active=rng.active)
    try:
        with torch.enable_grad(), dual.frozen_norm_stats(block), rng:
            yield
    finally:
        with resume:
            pass


def step(block: LocalBlock, x_prev: torch.Tensor, y: torch.Tensor, a_next: torch.Tensor, cfg: StepConfig,
         rng: local.replay_rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Add grad_theta of lam R' (see the module docstring) to block k-1's ``p.grad``.

    block: block k-1; x_prev: its input x_{k-2}, (B, *); a_next: A_k = B dl_k/dx_{k-1}, shaped
    like block k-1's output; rng: the RNG snapshot taken before block k-1's own step (its forward
    is replayed exactly; train-mode norm layers use the batch statistics, running statistics are
    not updated again). Returns (R', share) as 0-dim tensors, share = ||lam_k grad R'|| / ||grad l||.
    Under ``lam_mode="grad_ratio"`` lam_k = lam ||grad l_{k-1}|| / ||grad R'||.
    """
    params = block.trainable_parameters()
    batch = x_prev.shape[0]
    with _recompute(block, rng, x_prev.device):
        x = block.module(x_prev.detach())
        if not x.requires_grad:
            x.requires_grad_()  # a parameter-free module on a constant input
        loss, _ = fused_head.loss_and_accuracy(block.head, x, y, cfg.loss_fn, with_accuracy=False)
        (g_x,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = reconcile(g_x * batch, a_next, distance=cfg.distance, eps=cfg.eps)
        g_loss = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        g_pen = (torch.autograd.grad(penalty, params, allow_unused=True) if penalty.requires_grad
                 else [None] * len(params))
    share = local.accumulate_penalized(params, [None] * len(params), g_pen, cfg, loss_norm=local.grad_norm(g_loss))
    return penalty.detach(), share


def handback_step(block: LocalBlock, x_prev: torch.Tensor, y: torch.Tensor, a_next: torch.Tensor, cfg: StepConfig,
                  rng: local.replay_rng) -> tuple[torch.Tensor, torch.Tensor]:
    """``side="handback"``, the control for the output side: no distance at all, block k-1 also
    descends the next block's loss through one boundary, ``p.grad += lam_k grad_theta l_k`` with
    grad_theta l_k = J_theta(x_{k-1})^T A_k / B (block k-1 then trains on l_{k-1} + lam_k l_k).
    Same arguments and RNG/norm-statistics handling as ``step``; returns (<D_{k-1}, A_k> / B,
    share), D_{k-1} = B dl_{k-1}/dx_{k-1}: the reported "penalty" is their mean inner product.
    """
    params = block.trainable_parameters()
    batch = x_prev.shape[0]
    with _recompute(block, rng, x_prev.device):
        x = block.module(x_prev.detach())
        # the head on a cut copy of x: its graph is freed by the first backward, and the
        # module's graph serves the two vector-Jacobian products below
        x_cut = x.detach().requires_grad_()
        loss, _ = fused_head.loss_and_accuracy(block.head, x_cut, y, cfg.loss_fn, with_accuracy=False)
        g = torch.autograd.grad(loss, [x_cut, *params], allow_unused=True)
        del loss
        g_x, g_loss = g[0], list(g[1:])
        if g_x is None:
            g_x = torch.zeros_like(x_cut)
        g_hand = [None] * len(params)
        if x.grad_fn is not None:
            g_mod = torch.autograd.grad(x, params, grad_outputs=g_x, retain_graph=True, allow_unused=True)
            g_hand = torch.autograd.grad(x, params, grad_outputs=a_next / batch, allow_unused=True)
            g_loss = [a if b is None else (b if a is None else a + b) for a, b in zip(g_loss, g_mod)]
    share = local.accumulate_penalized(params, [None] * len(params), g_hand, cfg, loss_norm=local.grad_norm(g_loss))
    inner = (g_x.detach().flatten(1) * a_next.flatten(1)).sum(1).mean()
    return inner, share
