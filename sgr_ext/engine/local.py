"""Plain local step (no penalty) and helpers shared by the lean engines.

``step`` here is the fastest plain local-learning step: one forward, ONE backward that
fills every parameter's ``.grad`` and, when asked, also yields D_k (and A_k for
``track_alignment``) from the same pass. The ``exact`` and ``fast`` engines call it for
the first block and whenever ``lam == 0``.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import fused_head
from sgr_ext.engine.base import BlockResult, StepConfig, alignment
from sgr_ext.ops.reconcile import reconcile, reconcile_and_grad
from sgr_ext._tensor_util import accumulate_dtype

_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
_RANDOM_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu,
    torch.dropout, torch.bernoulli, torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.randint,
    torch.randperm, torch.multinomial, torch.normal,
}


def ready_event(t: torch.Tensor):
    """A CUDA event recorded now on the current stream (None off CUDA): ``t`` is ready after it."""
    if t.is_cuda:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(t.device))
        return ev
    return None


_SCAN: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _scan(block: nn.Module) -> tuple:
    """(random modules, whether a traced forward calls a random function or is untraceable),
    cached per block (module structure is assumed fixed once training starts)."""
    hit = _SCAN.get(block)
    if hit is not None:
        return hit
    from sgr_ext.engine import dual

    mods = [m for m in block.modules() if isinstance(m, _RANDOM_MODULES)]
    funcs = False
    for part in (block.module, block.head) if isinstance(block, LocalBlock) else (block,):
        prog = dual._program(part)
        if prog is None or any(n.op == "call_function" and n.target in _RANDOM_FUNCTIONS for n in prog.nodes):
            funcs = True
    _SCAN[block] = (mods, funcs)
    return mods, funcs


def is_stochastic(block: nn.Module) -> bool:
    """Whether a forward of ``block`` in its current mode draws random numbers (dropout, ...).

    Checks module types and, for traceable modules, the functions their forward calls;
    an untraceable module counts as stochastic (the safe answer).
    """
    mods, funcs = _scan(block)
    return funcs or any(m.training and getattr(m, "p", 1) != 0 for m in mods)


class replay_rng(contextlib.AbstractContextManager):
    """Snapshot the RNG of ``device`` now; ``with`` it, a recomputation draws the same numbers.

    ``replay_rng(device, active=False)`` does nothing (blocks without randomness).
    """

    def __init__(self, device: torch.device, active: bool = True):
        self.device = device
        self.active = active
        if active:
            self.cpu = torch.get_rng_state()
            self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.active:
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
        return self

    def __exit__(self, *exc):
        return False


class FirstPass(NamedTuple):
    """What one forward and one backward of l_k give (every tensor detached except ``u``)."""

    u: torch.Tensor  # (B, *) the block input as a leaf that requires grad
    output: torch.Tensor  # x_k
    loss: torch.Tensor  # 0-dim l_k
    accuracy: Optional[torch.Tensor]
    param_grads: list  # grad of l_k for each of ``params`` (None where unused)
    a: torch.Tensor  # A_k = B dl/du, u's shape (zeros where the loss does not reach u)
    d_out: Optional[torch.Tensor]  # D_k = B dl/dx, or None when not needed
    ready: object  # ``ready_event(output)``


def first_pass(block: LocalBlock, x_prev: torch.Tensor, y: torch.Tensor, cfg: StepConfig,
               need_output_grad: bool, params=(), record=None) -> FirstPass:
    """Forward of block k and one backward of l_k to u, x and ``params``; the graph is freed.

    record: an optional context manager around the block's forward (e.g. recording ReLU masks).
    Call under ``torch.enable_grad()``.
    """
    batch = x_prev.shape[0]
    u = x_prev.detach().requires_grad_(True)
    with record if record is not None else contextlib.nullcontext():
        x = block.module(u)
        if need_output_grad and not x.requires_grad:
            x.requires_grad_()  # the block output does not depend on its input
        loss, acc = fused_head.loss_and_accuracy(block.head, x, y, cfg.loss_fn)
    params = list(params)
    extra = [u] + ([x] if need_output_grad and x is not u else [])
    grads = list(torch.autograd.grad(loss, params + extra, allow_unused=True))
    g_params, g_u = grads[: len(params)], grads[len(params)]
    a = g_u * batch if g_u is not None else torch.zeros_like(u)
    d_out = None
    if need_output_grad:
        g_x = g_u if x is u else grads[len(params) + 1]
        d_out = g_x * batch if g_x is not None else torch.zeros_like(x)
    output = x.detach()
    return FirstPass(u, output, loss.detach(), acc, g_params, a, d_out, ready_event(output))


def penalty_direction(a: torch.Tensor, d_prev: torch.Tensor, cfg: StepConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """R = reconcile(A, D_{k-1}) and w = dR/dA (first derivative only, detached)."""
    return reconcile_and_grad(a, d_prev, distance=cfg.distance, eps=cfg.eps)


def accumulate(params, grads) -> None:
    """``p.grad += g`` for every pair (``p.grad = g`` where it was None); skips None grads."""
    have, add, new = [], [], []
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            new.append((p, g))
        else:
            have.append(p.grad)
            add.append(g.to(p.grad.dtype))
    if have:
        torch._foreach_add_(have, add)
    for p, g in new:
        p.grad = g.to(p.dtype) if g.dtype != p.dtype else g


def grad_norm(grads) -> Optional[torch.Tensor]:
    """0-dim L2 norm over a list of gradients (None entries skipped) in their accumulate
    dtype, or None when every entry is None."""
    gs = [g for g in grads if g is not None]
    if not gs:
        return None
    acc = accumulate_dtype(gs[0].dtype)
    norms = torch._foreach_norm(gs, 2)
    return torch.linalg.vector_norm(torch.stack([n.to(acc) for n in norms]))


def accumulate_penalized(params, g_loss, g_pen, cfg: StepConfig, loss_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``p.grad += g_l + lam_k g_R`` and the penalty's share ``||lam_k g_R|| / ||g_l||`` (0-dim).

    g_loss, g_pen: per parameter, grad_theta l_k and grad_theta R_k (None: zero). lam_k is
    ``cfg.lam`` ("fixed") or ``cfg.lam * ||g_l|| / ||g_R||`` ("grad_ratio": the penalty's
    gradient gets a fixed fraction of the loss gradient's norm, whatever the distance, block,
    batch or stage of training). ``loss_norm``: ||g_l|| when g_l was added elsewhere (then
    ``g_loss`` holds Nones). Norms are device tensors: no host sync.
    """
    nl = grad_norm(g_loss) if loss_norm is None else loss_norm
    nr = grad_norm(g_pen)
    if nr is None:  # the penalty does not reach any parameter
        accumulate(params, g_loss)
        return torch.zeros((), device=params[0].device) if nl is None else torch.zeros_like(nl)
    if nl is None:
        nl = torch.zeros_like(nr)
    tiny = torch.finfo(nr.dtype).tiny
    if cfg.lam_mode == "grad_ratio":
        lam = torch.where(nr > tiny, cfg.lam * nl / nr.clamp_min(tiny), torch.zeros_like(nr))
    else:
        lam = torch.full_like(nr, cfg.lam)
    total = []
    for gl, gr in zip(g_loss, g_pen):
        if gr is None:
            total.append(gl)
        else:
            scaled = gr * lam.to(gr.dtype)
            total.append(scaled if gl is None else gl + scaled)
    accumulate(params, total)
    return lam * nr / nl.clamp_min(tiny)


def step(
    block: LocalBlock,
    x_prev: torch.Tensor,
    y: torch.Tensor,
    d_prev: Optional[torch.Tensor],
    cfg: StepConfig,
    need_output_grad: bool,
) -> BlockResult:
    """Plain local step of one block: ``p.grad += grad l_k``; no penalty (lam ignored).

    Same contract as ``sgr_ext.engine.double_backward.step`` with ``lam == 0``: returns
    x_k, D_k when ``need_output_grad``, and the alignment statistics when
    ``cfg.track_alignment`` and ``d_prev`` is given. One forward and one backward.
    """
    with torch.enable_grad():
        batch = x_prev.shape[0]
        need_input_grad = d_prev is not None and cfg.track_alignment
        u = x_prev.detach().requires_grad_(need_input_grad)
        x = block.module(u)
        if need_output_grad and not x.requires_grad:
            x.requires_grad_()  # a parameter-free module on a constant input: x is a leaf
        loss, acc = fused_head.loss_and_accuracy(block.head, x, y, cfg.loss_fn)
        # x_k is final once the head has run (a head may work on it in place)
        ready = None if need_output_grad else ready_event(x)
        params = block.trainable_parameters()
        inputs = list(params) + ([x] if need_output_grad else []) + ([u] if need_input_grad else [])
        d_out = a = None
        if inputs and loss.requires_grad:
            torch.autograd.backward(loss, inputs=inputs)
            if need_output_grad:
                d_out = x.grad * batch if x.grad is not None else torch.zeros_like(x)
                x.grad = None
            if need_input_grad:
                a = u.grad * batch if u.grad is not None else torch.zeros_like(u)
        if ready is None:
            ready = ready_event(x)
    cos = ratio = penalty = None
    if a is not None:  # track_alignment: A_k is at hand, so R_k costs one reduction
        cos, ratio = alignment(a, d_prev)
        penalty = reconcile(a.detach(), d_prev, distance=cfg.distance, eps=cfg.eps).detach()
    return BlockResult(
        output=x.detach(),
        output_grad=None if d_out is None else d_out.detach(),
        loss=loss.detach(),
        penalty=penalty,
        accuracy=acc,
        cosine=cos,
        norm_ratio=ratio,
        ready=ready,
        input_grad=a.detach() if cfg.keep_input_grad and a is not None else None,
    )
