"""``LocalNet`` in an ordinary training loop: ``net(x, y).loss.backward()``.

The local step runs in the forward (``LocalNet.train_step``: every block's forward and
backward, its activations freed before the next block runs). Its parameter gradients are
kept in a side buffer instead of ``p.grad`` and handed to autograd by ``StashedGradients``,
a custom Function whose inputs are the parameters: ``backward`` returns
``grad_output * stashed``, so ``(scale * out.loss).backward()`` adds ``scale`` times the
step's gradients through the usual ``AccumulateGrad`` nodes (parameter hooks, DDP's reducer,
``GradScaler`` and gradient accumulation see an ordinary backward).

``EndToEndTrap`` marks a plain ``net(x)`` made in training mode: backpropagating it would
train end to end through the last head only, so its backward raises instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

END_TO_END_MESSAGE = (
    "LocalNet: the output of net(x) was backpropagated while the net is in training mode. That would train "
    "the model END TO END through the last head only (no auxiliary head, no SGR penalty). For local "
    "learning call `net(x, y).loss.backward()` (or `net.train_step(x, y)`); for inference use net.eval() or "
    "torch.no_grad(); to backpropagate end to end on purpose, call the original model (the blocks share its "
    "parameters)."
)


@dataclass
class LocalNetOutput:
    """What ``net(x, y)`` returns.

    loss: 0-dim, the sum over blocks of J_k = l_k + lam * R_k with the configured lam, for logging
        (float64 for a float64 net, else float32); in training mode with grad enabled, ``loss.backward()`` adds the
        step's gradients to ``p.grad`` scaled by the gradient that reaches it. In eval mode
        or under no_grad: the sum of the heads' losses l_k, with no graph.
    logits: (B, C) the last head's output on x_K, detached.
    stats: the ``StepStats`` of the step (eval mode / no_grad: per-block losses and accuracies).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    stats: object


class StashedGradients(torch.autograd.Function):
    """value -> value; backward: ``grad_output * g_p`` for every parameter p (None: no gradient)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, stash: Sequence[Optional[torch.Tensor]], *params: torch.Tensor):
        ctx.stash = stash
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.stash]
        ctx.stash = None  # the buffers are freed once handed over (a second backward has nothing to add)
        return (None, None, *grads)


class EndToEndTrap(torch.autograd.Function):
    """Identity whose backward raises ``RuntimeError(END_TO_END_MESSAGE)``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        raise RuntimeError(END_TO_END_MESSAGE)


def unique_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Every trainable parameter of ``blocks`` once (blocks may share parameters), in block order."""
    seen, out = set(), []
    for b in blocks:
        for p in b.trainable_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@contextlib.contextmanager
def grads_set_aside(params: Sequence[nn.Parameter]) -> Iterator[list]:
    """Run the body on ``p.grad = None`` for every parameter, then put the previous ``p.grad`` back.

    Yields a list that holds, after the body, the ``p.grad`` the body produced (None where it
    produced none): the step's own gradients, never added to the caller's ``p.grad``.
    """
    saved = [p.grad for p in params]
    produced: list = []
    for p in params:
        p.grad = None
    try:
        yield produced
        produced.extend(p.grad for p in params)
    finally:
        for p, g in zip(params, saved):
            p.grad = g


@contextlib.contextmanager
def no_side_effects(module: nn.Module, device: torch.device) -> Iterator[None]:
    """A forward that leaves no trace: train-mode BatchNorms use batch statistics without updating
    their running statistics, and the global RNG is restored afterwards (dropout still draws)."""
    frozen = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for m in frozen:
            m.track_running_stats = False
        try:
            yield
        finally:
            for m in frozen:
                m.track_running_stats = True


def loss_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 when the parameters are float64, float32 otherwise (also for half precision)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def step_for_backward(net: nn.Module, run_step: Callable, device: torch.device) -> LocalNetOutput:
    """Run a local step with its gradients set aside; return them behind ``loss``'s backward.

    net: the ``LocalNet`` (its blocks, ``config.lam``). run_step: ``run_step(on_block_end) ->
    StepStats``, one ``train_step`` (of the net, or of a data-parallel runner) that calls
    ``on_block_end(k, result)`` after each block. device: where ``loss`` lives.
    """
    params = unique_parameters(net.blocks)
    last = len(net.blocks) - 1
    kept = {}

    def keep_last_output(k, result):
        if k == last:
            kept["x"] = result.output

    with grads_set_aside(params) as stash:
        stats = run_step(keep_last_output)
    with no_side_effects(net.blocks[-1].head, device):
        logits = net.blocks[-1].head(kept.pop("x"))
    total = sum(l + net.config.lam * (r or 0.0) for l, r in zip(stats.losses, stats.penalties))
    value = torch.tensor(total, dtype=loss_dtype(params), device=device)
    return LocalNetOutput(loss=StashedGradients.apply(value, stash, *params), logits=logits, stats=stats)
