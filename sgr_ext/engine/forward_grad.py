"""BP-free engine: local learning (and SGR) from forward gradients with activity perturbation.

Nothing here runs a backward pass through the layers of a block. Every gradient is
estimated from directional derivatives computed in forward mode, following Ren,
Kornblith, Liao, Hinton, "Scaling Forward Gradient With Local Losses" (ICLR 2023):
perturb ACTIVITIES (layer outputs), not weights, and measure the effect on the block's
own local (greedy) loss. The only reverse-mode step is, per layer, the product of the
estimated output gradient with that one layer's local Jacobian (the outer product
``est (x) h`` of a Linear/Conv), on a detached input: autograd never spans two layers.

Two backends compute the same estimator from the same tangents: ``forward_jet`` (hand-
written forward mode for nn.Sequential stacks of Linear/Conv/norm/activation/pooling
layers with cross-entropy; the fast path) and PyTorch forward-mode AD (dual tensors for
first-order passes, nested ``torch.func.jvp`` for the second-order one) for any other
block. ``use_jets`` picks; the tests check that both agree.

Notation for one block: u = stop_grad(x_{k-1}) (B, *), x = f(u), logits = g(x), per-sample
losses L_i, l = (1/B) sum_i L_i. A *site* is a module with trainable parameters of its
own (Linear, Conv, BatchNorm/LayerNorm affine, ...); z_j = m_j(h_j) is its output.

Estimators (one tangent draw; ``num_tangents`` independent draws are averaged):

* Parameters (phase "params"). Draw e_j ~ N(0, I) with z_j's shape for every site call,
  run one forward-mode pass with z_j -> z_j + eps * e_j and read s_i = d L_i / d eps (the
  directional derivative of sample i's loss). Then dl/dz_j ~= (1/B) s_i e_{j,i}, and the
  site's parameter gradient is the vector-Jacobian product of that ONE layer,
  (dz_j/dtheta_j)^T (dl/dz_j) -- an outer product ``est (x) h`` for Linear/Conv.
  Unbiased: E[(g.e) e] = g, cross terms between sites vanish in expectation.
* D_k = B dl/dx (phase "output"): tangent e_x on x, a forward pass through the head only:
  D_i ~= s_i e_{x,i}.   A_k = B dl/du (phase "input"): tangent e_u on u through module
  and head: A_i ~= s_i e_{u,i}. Each uses its own tangents, so the parameter estimate's
  variance does not depend on whether D or A is needed.
* SGR penalty (phase "penalty"). With w = dR/dA at the estimate A^ (a loss-level gradient,
  no layers), grad_theta R = d/dtheta Psi, Psi = B <dl/du, w> = sum_i D_w L_i, a mixed
  second derivative. Psi is computed exactly by a forward pass with input tangent w
  (dual numbers (z_j, zdot_j)); theta_j enters Psi only through z_j and zdot_j, so
      grad_{theta_j} Psi = (dz_j/dtheta)^T dPsi/dz_j + (dzdot_j/dtheta)^T dPsi/dzdot_j,
  dPsi/dzdot_j = B dl/dz_j and dPsi/dz_j = (Hessian of Psi in z_j) zdot_j. Both are
  estimated with activity tangents e_j in a NESTED forward pass (jvp of jvp):
      dPsi/dz_j ~= t_i e_{j,i},  t_i = d/deps D_w L_i   (second-order directional derivative)
      dPsi/dzdot_j ~= s_i e_{j,i}, s_i = d/deps L_i
  and the parameter gradient is again one layer's vector-Jacobian product of
  theta_j -> (m_j(h_j), D m_j(h_j)[hdot_j]). The tangents of this phase are independent of
  those that made A^, so for the squared-L2 distance (w linear in A^) the estimate is
  unbiased; for the cosine distance w is a nonlinear function of A^ and the estimate is
  biased (it is unbiased for the gradient of the penalty at a noisy A^ only).

Per-sample contraction (``fg_per_sample=True``, the default): sample i's estimate uses only
its own loss' directional derivative s_i, which divides the variance by about B. It is
unbiased when samples do not interact inside the block (no train-mode BatchNorm); with
train-mode BatchNorm it drops the batch-statistics cross terms. ``fg_per_sample=False``
uses the whole-batch directional derivative (sum_i s_i) for every sample: unbiased for
any block, about B times the variance.

Cost per block and step, in forward passes of the block (each carrying 1 or 3 tangent
components): num_tangents x (1 [params] + 1 [A_k, if needed] + 3 [penalty, if lam > 0])
plus num_tangents head-only passes [D_k, if needed]; the torch.func path adds one plain
probe forward. Memory: the block's site inputs (as local backprop keeps them) plus one
tangent and one accumulator per site output; no autograd graph.

PyTorch's forward-over-forward (second-order forward-mode) formulas for batch_norm (with
batch statistics), layer_norm and instance_norm are wrong in torch 2.x (checked against
finite differences); the nested penalty pass of the torch.func path therefore runs these
three ops as plain differentiable decompositions. BatchNorm running statistics are
updated exactly once per step (by the probe forward, or from the jets' batch statistics).

``_draw`` makes every tangent; tests replace it by deterministic designs with the same
second moment (E[e e^T] = I), under which the averaged estimate equals the exact gradient.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import forward_jet
from sgr_ext.engine.decomposed_norms import _DecomposedNorms
from sgr_ext.engine.base import BlockResult, StepConfig, accuracy, alignment
from sgr_ext.ops.reconcile import reconcile

PHASES = ("params", "output", "input", "penalty")


def _draw(shape: torch.Size, dtype: torch.dtype, device: torch.device, phase: str) -> torch.Tensor:
    """One activity tangent with i.i.d. N(0, 1) entries (phase: one of ``PHASES``)."""
    return torch.randn(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- sites


def _sites(block: LocalBlock) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """Every module with trainable parameters of its own, with those parameters."""
    out = []
    for m in block.modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats and m.training:
            raise ValueError(
                f"grad='forward': {type(m).__name__} with track_running_stats=True in training mode is not supported"
            )
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own:
            out.append((m, own))
    return out


class _Call:
    """One call of a site in the probe forward: its input (args, kwargs) split into float tensors and the rest."""

    __slots__ = ("site", "spec", "leaves", "pos", "shape", "dtype", "device")

    def __init__(self, site: int, args, kwargs, out):
        self.site = site
        leaves, self.spec = tree_flatten((args, kwargs))
        self.pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        self.leaves = list(leaves)
        self.shape, self.dtype, self.device = out.shape, out.dtype, out.device

    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.pos]

    def rebuild(self, tensors):
        leaves = list(self.leaves)
        for i, t in zip(self.pos, tensors):
            leaves[i] = t
        return tree_unflatten(leaves, self.spec)


class _Hooks:
    """Forward hooks on every site: record calls (probe), or perturb the site outputs (passes).

    Modes: "probe" records each call's inputs and output shape; "dual" adds the tangent
    ``tangents[c]`` to the c-th call's output as a PyTorch dual tensor (one forward-AD
    level); "add" adds ``tangents[c]`` -- there, zero tensors that carry the activity
    tangents of an enclosing ``torch.func.jvp`` -- and, when ``collect`` is a list, appends
    the call's float inputs to it; "off" leaves the forward untouched.
    """

    def __init__(self, sites):
        self.mode = "off"
        self.calls: list[_Call] = []
        self.tangents: list[torch.Tensor] = []
        self.collect: Optional[list] = None
        self.index = 0
        self._handles = [
            m.register_forward_hook(self._hook(j), with_kwargs=True) for j, (m, _) in enumerate(sites)
        ]

    def _hook(self, site: int):
        def hook(module, args, kwargs, out):
            if self.mode == "off":
                return None
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise TypeError(
                    f"grad='forward': {type(module).__name__} returned {type(out).__name__}; every module with "
                    "parameters of its own must return one floating-point tensor"
                )
            if self.mode == "probe":
                self.calls.append(_Call(site, args, kwargs, out))
                return None
            c = self.index
            self.index += 1
            if c >= len(self.calls) or self.calls[c].site != site:
                raise RuntimeError("grad='forward': the block's call sequence changed between forward passes")
            if self.collect is not None:
                leaves, _ = tree_flatten((args, kwargs))
                self.collect.extend(leaves[i] for i in self.calls[c].pos)
            if self.mode == "dual":
                primal, tangent = fwAD.unpack_dual(out)
                e = self.tangents[c]
                # make_dual aliases its tangent and later in-place ops (ReLU(inplace=True)) write
                # through it, so the tangent handed over must be a fresh tensor.
                return fwAD.make_dual(primal, e.clone() if tangent is None else tangent + e)
            return out + self.tangents[c]

        return hook

    @contextlib.contextmanager
    def perturbing(self, mode, tangents, collect=None):
        self.mode, self.tangents, self.collect, self.index = mode, tangents, collect, 0
        try:
            yield
            if self.index != len(self.calls):
                raise RuntimeError("grad='forward': the block's call sequence changed between forward passes")
        finally:
            self.mode, self.tangents, self.collect = "off", [], None

    def remove(self):
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def _frozen_running_stats(block: nn.Module):
    """Stop train-mode BatchNorms from updating running statistics (transformed passes may not mutate them)."""
    flipped = []
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            flipped.append(m)
    try:
        yield
    finally:
        for m in flipped:
            m.track_running_stats = True


# --------------------------------------------------------------------------- the step


def _cross_entropy_none(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of (B, C) logits; native forward-mode formulas only (fast under jvp)."""
    if logits.dim() != 2:
        return F.cross_entropy(logits, y, reduction="none").reshape(logits.shape[0], -1).mean(1)
    return torch.logsumexp(logits, 1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def _loss_fn(cfg: StepConfig, y: torch.Tensor, batch: int):
    """logits -> per-sample losses (B,) (per-sample mode) or B * l as a 0-dim tensor (batch mode)."""
    if cfg.loss_fn is F.cross_entropy:
        if cfg.fg_per_sample:
            return lambda logits: _cross_entropy_none(logits, y)
        return lambda logits: _cross_entropy_none(logits, y).sum()
    if not cfg.fg_per_sample:
        return lambda logits: cfg.loss_fn(logits, y) * batch
    one = torch.func.vmap(lambda lg, t: cfg.loss_fn(lg.unsqueeze(0), t.unsqueeze(0)))
    return lambda logits: one(logits, y)


def _directional(fn, v: Optional[torch.Tensor] = None, e: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tangent of fn(v') with v' = v carrying tangent e (or fn() when v is None; the hooks add tangents),
    by PyTorch's dual tensors: one forward-AD level, cheaper than torch.func."""
    with fwAD.dual_level():
        out = fn(None if v is None else fwAD.make_dual(v, e.clone()))
        tangent = fwAD.unpack_dual(out).tangent
    return torch.zeros_like(out) if tangent is None else tangent


def _weights(s: torch.Tensor, like: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast per-sample (B,) or whole-batch (0-dim) directional derivatives against a (B, *) tangent."""
    if s.dim() == 0:
        return s
    if like.dim() == 0 or like.shape[0] != batch:
        raise ValueError(
            f"grad='forward': an activation of shape {tuple(like.shape)} has no batch dimension of size {batch} "
            "first; per-sample tangents need one (use fg_per_sample=False)"
        )
    return s.reshape((batch,) + (1,) * (like.dim() - 1)).to(like.dtype)


def _penalty_direction(a_hat: torch.Tensor, d_prev: torch.Tensor, cfg: StepConfig):
    """(R at the estimate, w = dR/dA there): a loss-level gradient, no layers involved."""
    with torch.enable_grad():
        a_req = a_hat.detach().requires_grad_()
        r = reconcile(a_req, d_prev, distance=cfg.distance, eps=cfg.eps)
        (w,) = torch.autograd.grad(r, a_req)
    return r.detach(), w.to(a_hat.dtype)


def use_jets(block: LocalBlock, cfg: StepConfig) -> bool:
    """Whether the block runs on the hand-written forward mode of ``forward_jet`` (the fast path)."""
    return forward_jet.supports(block, cfg.loss_fn)


def step(
    block: LocalBlock,
    x_prev: torch.Tensor,
    y: torch.Tensor,
    d_prev: Optional[torch.Tensor],
    cfg: StepConfig,
    need_output_grad: bool,
) -> BlockResult:
    """Add a forward-gradient estimate of grad J_k = l_k + lam * R_k to the block's ``p.grad``.

    Same contract as ``double_backward.step``; ``output_grad`` (D_k) and the A_k behind the
    penalty and the alignment statistics are forward-gradient estimates too, and the
    reported penalty is R evaluated at the estimated A_k. ``cfg.num_tangents`` independent
    tangent draws are averaged in every phase. Blocks made of the layers ``forward_jet``
    knows run on it; any other block on ``torch.func.jvp`` (same estimator, same tangents).
    """
    u = x_prev.detach()
    sites = _sites(block)
    with torch.no_grad():
        run = _JetRun if use_jets(block, cfg) else _FuncRun
        out = run(block, sites, u, y, cfg).estimate(d_prev, need_output_grad)
    x, logits, loss, d_hat, a_hat, penalty = out
    cos = ratio = None
    if a_hat is not None:
        cos, ratio = alignment(a_hat, d_prev)
    return BlockResult(
        output=x.detach(),
        output_grad=d_hat,
        loss=loss.detach(),
        penalty=penalty,
        accuracy=accuracy(logits, y),
        cosine=cos,
        norm_ratio=ratio,
    )


class _Run:
    """The four phases of one block step; subclasses supply the forward-mode passes."""

    def __init__(self, block, sites, u, y, cfg: StepConfig):
        self.block, self.sites, self.u, self.y, self.cfg = block, sites, u, y, cfg
        self.batch = u.shape[0]
        self.n = cfg.num_tangents

    def estimate(self, d_prev, need_output_grad):
        cfg = self.cfg
        penalize = d_prev is not None and cfg.lam > 0
        need_input_grad = d_prev is not None and (penalize or cfg.track_alignment)
        with self.context():
            x, logits, losses, cot_l = self.params_phase()
            d_hat = self.boundary_phase("output", x) if need_output_grad else None
            a_hat = self.boundary_phase("input", self.u) if need_input_grad else None
            penalty = cot_r = None  # None: not computed (no A_k estimate)
            if penalize:
                penalty, w = _penalty_direction(a_hat, d_prev, cfg)
                if self.calls:
                    cot_r = self.penalty_phase(w)
            elif a_hat is not None:  # track_alignment: R_k at the estimate, for the statistics
                penalty = reconcile(a_hat, d_prev, distance=cfg.distance, eps=cfg.eps)
            if self.calls:
                self.apply(cot_l, cot_r)
        loss = losses.mean() if losses.dim() else losses / self.batch
        return x, logits, loss, d_hat, a_hat, penalty

    def _fold(self, s, tangents, acc):
        """acc[c] += s (per sample or whole batch) * tangents[c]."""
        for c, e in enumerate(tangents):
            weight = _weights(s, e, self.batch)
            if acc[c] is None:
                acc[c] = weight * e
            else:
                acc[c].addcmul_(weight, e)

    def apply(self, cot_l, cot_r) -> None:
        """One layer's vector-Jacobian product per site call; adds the result to ``p.grad``."""
        lam = self.cfg.lam
        with torch.enable_grad():
            for c, call in enumerate(self.calls):
                module, params = self.sites[call.site]
                if cot_r is None:
                    outs, cots = [self.layer_value(module, call)], [cot_l[c]]
                else:
                    cz, czd, hdot = cot_r[c]
                    z, zd = self.layer_value_and_tangent(module, call, hdot)
                    outs, cots = [z, zd], [cot_l[c] + lam * cz, lam * czd]
                grads = torch.autograd.grad(outs, params, cots, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is None:
                        continue
                    if p.grad is None:
                        p.grad = g.detach().clone()
                    else:
                        p.grad.add_(g)


class _JetRun(_Run):
    """Fast path: explicit forward-mode jets (``forward_jet``); no probe pass, no autograd graph."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[_Call] = []
        self.index = {id(m): j for j, (m, _) in enumerate(self.sites)}

    def context(self):
        return contextlib.nullcontext()

    def loss(self, jet):
        return forward_jet.cross_entropy(jet, self.y, self.cfg.fg_per_sample)

    def _site_hook(self, phase, tangents, record=False, hdots=None):
        def hook(module, jin, jout):
            if record:
                self.calls.append(_Call(self.index[id(module)], (jin.p,), {}, jout.p))
            if hdots is not None:
                hdots.append(jin.a if jin.a is not None else torch.zeros_like(jin.p))
            e = _draw(jout.p.shape, jout.p.dtype, jout.p.device, phase)
            tangents.append(e)
            return forward_jet.Jet(jout.p, jout.a, e if jout.b is None else jout.b + e, jout.ab)

        return hook

    def params_phase(self):
        J = forward_jet
        acc = []
        for k in range(self.n if self.sites else 1):
            tangents: list[torch.Tensor] = []
            stats = [] if k == 0 else None
            hook = self._site_hook("params", tangents, record=k == 0)
            xj = J.run(self.block.module, J.Jet(self.u), hook, stats)
            hj = J.run(self.block.head, xj, hook, stats)
            lj = self.loss(hj)
            if k == 0:
                J.update_running_stats(stats)  # once per step, from the batch statistics of this pass
                x, logits, losses = xj.p, hj.p, lj.p
                acc = [None] * len(self.calls)
            if lj.b is not None:
                self._fold(lj.b, tangents, acc)
        return x, logits, losses, [
            torch.zeros(c.shape, dtype=c.dtype, device=c.device) if a is None else a.div_(self.n * self.batch)
            for a, c in zip(acc, self.calls)
        ]

    def boundary_phase(self, phase, v):
        J = forward_jet
        acc = [None]
        for _ in range(self.n):
            e = _draw(v.shape, v.dtype, v.device, phase)
            if phase == "output":
                lj = self.loss(J.run(self.block.head, J.Jet(v, b=e)))
            else:
                lj = self.loss(J.run(self.block.head, J.run(self.block.module, J.Jet(v, b=e))))
            self._fold(lj.b, [e], acc)
        return acc[0].div_(self.n)

    def penalty_phase(self, w):
        J = forward_jet
        acc_z = [None] * len(self.calls)
        acc_zd = [None] * len(self.calls)
        hdots = None
        for k in range(self.n):
            tangents: list[torch.Tensor] = []
            collect = [] if k == 0 else None
            hook = self._site_hook("penalty", tangents, hdots=collect)
            lj = self.loss(J.run(self.block.head, J.run(self.block.module, J.Jet(self.u, a=w), hook), hook))
            if k == 0:
                hdots = collect
            zero = torch.zeros_like(lj.p)
            self._fold(lj.ab if lj.ab is not None else zero, tangents, acc_z)
            self._fold(lj.b if lj.b is not None else zero, tangents, acc_zd)
        return [(acc_z[c].div_(self.n), acc_zd[c].div_(self.n), [hdots[c]]) for c in range(len(self.calls))]

    def layer_value(self, module, call):
        return forward_jet.layer(module, forward_jet.Jet(call.tensors()[0].detach())).p

    def layer_value_and_tangent(self, module, call, hdot):
        out = forward_jet.layer(module, forward_jet.Jet(call.tensors()[0].detach(), a=hdot[0]))
        return out.p, out.a


class _FuncRun(_Run):
    """General path: any module tree, through PyTorch forward-mode AD (dual tensors, torch.func)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.loss_of = _loss_fn(self.cfg, self.y, self.batch)
        self.hooks = None

    @contextlib.contextmanager
    def context(self):
        self.hooks = _Hooks(self.sites)
        try:
            # Probe: one plain forward. Records each site call's input and output shape, and
            # updates BatchNorm running statistics exactly as an ordinary forward would.
            self.hooks.mode = "probe"
            self._x = self.block.module(self.u)
            self._logits = self.block.head(self._x)
            self.hooks.mode = "off"
            self.calls = self.hooks.calls
            with _frozen_running_stats(self.block):
                yield
        finally:
            self.hooks.remove()

    def params_phase(self):
        losses = self.loss_of(self._logits)
        cot = _param_phase(self.block, self.u, self.loss_of, self.hooks, self.n, self.batch) if self.calls else []
        return self._x, self._logits, losses, cot

    def boundary_phase(self, phase, v):
        fn = self.block.head if phase == "output" else (lambda t: self.block.head(self.block.module(t)))
        return _boundary_phase(fn, v, self.loss_of, self.n, self.batch, phase)

    def penalty_phase(self, w):
        return _penalty_phase(self.block, self.u, w, self.loss_of, self.hooks, self.n, self.batch)

    @staticmethod
    def _runner(module, call):
        def run(*ts):
            args, kwargs = call.rebuild(ts)
            return module(*args, **kwargs)

        return run

    def layer_value(self, module, call):
        return self._runner(module, call)(*[t.detach() for t in call.tensors()])

    def layer_value_and_tangent(self, module, call, hdot):
        primals = tuple(t.detach() for t in call.tensors())
        return jvp(self._runner(module, call), primals, tuple(h.to(p.dtype) for h, p in zip(hdot, primals)))


def _draw_like(c, phase: str) -> torch.Tensor:
    return _draw(c.shape, c.dtype, c.device, phase)


def _param_phase(block, u, loss_of, hooks: _Hooks, n: int, batch: int) -> list[torch.Tensor]:
    """Cotangents est(dl/dz_c) for every site call c, averaged over n tangent draws."""
    acc = [None] * len(hooks.calls)
    for _ in range(n):
        tangents = [_draw_like(c, "params") for c in hooks.calls]

        def f(_):
            with hooks.perturbing("dual", tangents):
                return loss_of(block.head(block.module(u)))

        s = _directional(f)
        for c, e in enumerate(tangents):
            term = _weights(s, e, batch) * e
            acc[c] = term if acc[c] is None else acc[c].add_(term)
    return [a.div_(n * batch) for a in acc]


def _boundary_phase(fn, v: torch.Tensor, loss_of, n: int, batch: int, phase: str) -> torch.Tensor:
    """Estimate B * dl/dv (per sample: grad of L_i w.r.t. v_i) with tangents on v only."""
    acc = None
    for _ in range(n):
        e = _draw(v.shape, v.dtype, v.device, phase)
        s = _directional(lambda vd: loss_of(fn(vd)), v, e)
        term = _weights(s, e, batch) * e
        acc = term if acc is None else acc.add_(term)
    return acc.div_(n)


def _penalty_phase(block, u, w, loss_of, hooks: _Hooks, n: int, batch: int):
    """Cotangents (est dPsi/dz_c, est dPsi/dzdot_c, hdot_c) per site call, Psi = sum_i D_w L_i."""
    calls = hooks.calls
    acc_z = [None] * len(calls)
    acc_zd = [None] * len(calls)
    hdots = None
    for _ in range(n):
        tangents = [_draw_like(c, "penalty") for c in calls]

        def f(*zeros):
            def inner(v):
                collected: list[torch.Tensor] = []
                with hooks.perturbing("add", zeros, collect=collected):
                    out = loss_of(block.head(block.module(v)))
                return out, collected

            (out, _), (out_dot, collected_dot) = jvp(inner, (u,), (w,))
            return out, out_dot, collected_dot

        with _DecomposedNorms():
            zeros = tuple(torch.zeros_like(e) for e in tangents)
            (_, _, hd), (s, t, _) = jvp(f, zeros, tuple(tangents))
        if hdots is None:
            hdots = hd
        for c, e in enumerate(tangents):
            tz = _weights(t, e, batch) * e
            tzd = _weights(s, e, batch) * e
            acc_z[c] = tz if acc_z[c] is None else acc_z[c].add_(tz)
            acc_zd[c] = tzd if acc_zd[c] is None else acc_zd[c].add_(tzd)
    per_call, k = [], 0
    for c, call in enumerate(calls):
        m = len(call.pos)
        per_call.append((acc_z[c].div_(n), acc_zd[c].div_(n), hdots[k:k + m]))
        k += m
    return per_call
