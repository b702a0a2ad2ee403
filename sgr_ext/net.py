"""``LocalNet``: a chain of gradient-isolated ``LocalBlock``s trained with SGR."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sgr_ext import _checks, autograd_bridge, defaults
from sgr_ext._options import GRADS, LAM_MODES, NONFINITE_POLICIES, SIDES
from sgr_ext.blocks import LocalBlock
from sgr_ext.engine import ENGINES, StepConfig, forward_grad, local, output_side
from sgr_ext.engine.base import accuracy
from sgr_ext.engine import verify as engine_verify
from sgr_ext.engine.pipeline import BlockPipeline, overlap_enabled
from sgr_ext.nonfinite import NonFiniteError  # noqa: F401  (public here too)
from sgr_ext.nonfinite import StepGuard as _StepGuard


EAGER_STEP = ("sgr_ext: a local-learning step always runs eagerly (its per-block autograd calls and host sync "
              "cannot be captured in one graph); compile the model code around it, or the blocks' modules")


def eager_step(fn: Callable) -> Callable:
    """``torch.compiler.disable`` with the reason above (torch < 2.8 takes no reason)."""
    try:
        return torch.compiler.disable(fn, reason=EAGER_STEP)
    except TypeError:
        return torch.compiler.disable(fn)


@dataclass
class StepStats:
    """Per-block statistics of one ``train_step``, index k = block k (0-based).

    losses: l_k.  penalties: R_k, the penalty at boundary k, None where it was not computed
    (block 0; lam == 0 without ``track_alignment``): an absent penalty is not a perfect
    reconciliation (under ``side="output"`` it is dist(D_{k-1}, A_k) and trains block k-1).  accuracies: fraction of the
    batch each head classifies right (None where the head is not a classifier).
    cosines, norm_ratios: mean cos(A_k, D_{k-1}) and |A_k| / |D_{k-1}| per boundary,
    None where A_k was not computed (block 0; lam == 0 without ``track_alignment``).
    penalty_shares: ||lam_k grad R_k|| / ||grad l|| over the parameters of the block the
    boundary-k penalty trains (block k; block k-1 under ``side="output"``), how much the penalty
    moves that block's update (the target ``lam`` under ``lam_mode="grad_ratio"``); None where not
    measured (block 0, lam == 0, or ``lam_mode="fixed"`` without ``track_share`` on the input side).
    skipped: True when the ``nonfinite="skip"`` policy dropped the whole step (no ``p.grad``
    was changed). nonfinite_blocks: the blocks whose input, loss, penalty or gradients were
    NaN/Inf (their ``p.grad`` were left as before the step), empty when all were finite.
    """

    losses: list[float] = field(default_factory=list)
    penalties: list[Optional[float]] = field(default_factory=list)
    accuracies: list[Optional[float]] = field(default_factory=list)
    cosines: list[Optional[float]] = field(default_factory=list)
    norm_ratios: list[Optional[float]] = field(default_factory=list)
    penalty_shares: list[Optional[float]] = field(default_factory=list)
    skipped: bool = False
    nonfinite_blocks: list[int] = field(default_factory=list)


def _item(t: Optional[torch.Tensor]) -> Optional[float]:
    return None if t is None else float(t)


class LocalNet(nn.Module):
    """Local learning with Successive Gradient Reconciliation over K blocks.

    Args:
        blocks: the K ``LocalBlock``s in order; the last block's head is the classifier.
        lam: strength >= 0 (0 gives plain local learning). None (the default): the setting the
            accuracy study chose on validation (``sgr_ext.defaults``: ``side="handback"``,
            ``lam_mode="grad_ratio"``, lam 1.0). A number: the weight lambda of R_k
            (``lam_mode="fixed"``), or the penalty gradient's norm as a fraction of the loss
            gradient's, per block and step (``lam_mode="grad_ratio"``).
        distance: ``"l2"``, ``"l2_rel"`` or ``"cosine"`` (see ``sgr_ext.reconcile``).
        lam_mode: (default ``"fixed"`` when ``lam`` is given) ``"fixed"``: J_k = l_k + lam R_k,
            the definition (DESIGN.md section 1).
            ``"grad_ratio"``: block k's update is grad l_k + lam_k grad R_k with
            lam_k = lam ||grad l_k|| / ||grad R_k||, so one number means the same strength for
            every distance, block, model, batch size and stage of training. Costs the weight
            gradients of the first backward (the penalty's parameter gradient is taken apart
            from the loss's); ``grad="backward"`` only.
        track_share: also measure ``StepStats.penalty_shares`` under ``lam_mode="fixed"``
            (same cost as ``"grad_ratio"``; ``grad="backward"`` only).
        side: (default ``"input"`` when ``lam`` is given) which block the boundary-k term
            trains. ``"input"``: block k, whose input
            gradient A_k is pulled towards D_{k-1} (DESIGN.md section 1). ``"output"``: block k-1,
            whose output gradient D_{k-1} is pulled towards A_k (``sgr_ext.engine.output_side``):
            what block k needs reaches block k-1, still without a gradient crossing a boundary.
            Costs a recompute of block k-1 (forward and double backward) after block k's
            forward, and keeps x_{k-2} one block longer; ``grad="backward"``, no CUDA overlap.
            ``"handback"``: the control experiment for ``"output"``, no distance: block k-1 also
            descends lam_k l_k through x_{k-1} (``output_side.handback_step``; ``distance`` unused).
        loss_fn: ``loss_fn(head_output, y) -> 0-dim`` batch MEAN loss; cross-entropy by
            default. The batch scaling of A_k and D_k assumes mean reduction.
        mode: ``"exact"`` (default): the exact penalty gradient from one tangent-carrying
            recompute, no double-backward graph (``sgr_ext.engine.tangent``);
            ``"fast"``: a finite-difference approximation, plain-local memory
            (``sgr_ext.engine.finite_diff``); ``"double_backward"``: the reference
            definition (``create_graph=True``). All equal for ``lam == 0`` (plain local).
        eps: cosine-distance epsilon.
        track_alignment: also measure cos(A_k, D_{k-1}) and the norm ratio when
            ``lam == 0`` (costs one input-gradient per block).
        grad: ``"backward"`` (module-local backprop, the engine ``mode`` selects) or
            ``"forward"`` (BP-free: every gradient, D_k, A_k and the penalty's parameter
            gradient estimated by forward gradients with activity perturbation, see
            ``sgr_ext.engine.forward_grad``; ``mode`` is then ignored).
        num_tangents: random tangent draws averaged per estimate (``grad="forward"`` only).
        fg_per_sample: per-sample (True) or whole-batch (False) directional derivatives
            in the forward-gradient estimates (``grad="forward"`` only).
        nonfinite: what ``train_step`` does when the input, or a block's loss, penalty, boundary
            gradient D_k or parameter gradient is NaN/Inf: ``"raise"`` (default) ``NonFiniteError``;
            ``"skip"`` drop the whole step (``stats.skipped``) and warn; ``"warn"`` keep the
            finite blocks' gradients, drop the others' (``stats.nonfinite_blocks``) and warn.
            Under every policy no NaN/Inf is left in any ``p.grad``: the affected blocks'
            gradients (and BatchNorm running statistics) are restored to their values
            before the step.
        overlap: False (default), True or ``"auto"`` (the same as True): on CUDA, run
            consecutive blocks on two side streams so that block k+1's forward overlaps block
            k's remaining backward (``sgr_ext.engine.pipeline``); same gradients; no effect on
            CPU. Off by default: the caching allocator does not reuse memory across streams,
            so ``max_memory_reserved`` may double, and no GPU has yet shown the time it saves
            (``benchmarks/gpu_check.py`` measures both, on and off).
        verify: check the engine against double backward on the first step, and again for a
            block whose modules or train/eval modes changed: the engine (``mode="exact"`` or
            ``"fast"``) and the reference run on the first ``sgr_ext.engine.verify.SAMPLES`` rows of the batch,
            and ``sgr_ext.engine.verify.EngineMismatch`` names the block and the relative error
            when they disagree beyond a dtype-aware bound. For architectures outside the
            tested op set. Cost (``sgr_ext.engine.verify``): three sub-batch block steps per block,
            once (measured: about 1.5 full steps, on the first step only); off by default. Only
            ``side="input"`` runs the engines it checks: ``"output"`` and ``"handback"`` compute
            with torch autograd (one block's double backward, or a plain backward), so there
            ``verify`` has nothing to compare and does nothing.
    """

    def __init__(
        self,
        blocks: Sequence[LocalBlock],
        *,
        lam: Optional[float] = None,
        distance: str = "l2",
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        mode: str = "exact",
        eps: float = 1e-8,
        track_alignment: bool = False,
        grad: str = "backward",
        num_tangents: int = 1,
        fg_per_sample: bool = True,
        nonfinite: str = "raise",
        overlap=False,
        lam_mode: Optional[str] = None,
        track_share: bool = False,
        verify: bool = False,
        side: Optional[str] = None,
    ):
        super().__init__()
        if not (isinstance(blocks, nn.Module) or hasattr(blocks, "__iter__")) or isinstance(blocks, str):
            raise TypeError(f"blocks: expected a sequence of LocalBlock (or an nn.ModuleList), got {type(blocks).__name__}")
        blocks = list(blocks) if not isinstance(blocks, nn.Module) else list(blocks.children())
        if not blocks:
            raise ValueError("blocks: expected at least one LocalBlock, got none")
        for i, b in enumerate(blocks):
            if not isinstance(b, LocalBlock):
                raise TypeError(f"blocks[{i}]: expected a LocalBlock, got {type(b).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        if not isinstance(track_alignment, bool):
            raise TypeError(f"track_alignment: expected a bool, got {type(track_alignment).__name__}")
        _check_one_device(blocks)
        if not isinstance(fg_per_sample, bool):
            raise TypeError(f"fg_per_sample: expected a bool, got {type(fg_per_sample).__name__}")
        if not isinstance(track_share, bool):
            raise TypeError(f"track_share: expected a bool, got {type(track_share).__name__}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify: expected a bool, got {type(verify).__name__}")
        self.verify = verify
        self._verified: dict[int, tuple] = {}  # block -> the module signature last checked
        if lam is None and grad == "forward":
            raise ValueError("lam: the default (sgr_ext.defaults, chosen with backprop inside the blocks) does not "
                             "apply to grad='forward'; pass lam (and side='input') explicitly")
        lam, lam_mode, side = defaults.resolve(lam, lam_mode, side)
        self.blocks = nn.ModuleList(blocks)
        self.mode = _checks.choice("mode", mode, ENGINES)
        self.config = StepConfig(
            lam=_checks.nonneg_finite("lam", lam),
            distance=_checks.distance(distance),
            eps=_checks.nonneg_finite("eps", eps),
            loss_fn=loss_fn if loss_fn is not None else F.cross_entropy,
            track_alignment=track_alignment,
            num_tangents=_checks.positive_int("num_tangents", num_tangents),
            fg_per_sample=fg_per_sample,
            lam_mode=_checks.choice("lam_mode", lam_mode, LAM_MODES),
            track_share=track_share,
        )
        self.grad = _checks.choice("grad", grad, GRADS)
        self.side = _checks.choice("side", side, SIDES)
        if self.side != "input" and (self.grad == "forward" or overlap is True):
            raise ValueError(f"side={self.side!r} needs grad='backward' and overlap False or 'auto': block k-1's penalty "
                             "is computed by backprop once block k's input gradient is known")
        if self.grad == "forward" and self.config.split_grads:
            raise ValueError("lam_mode='grad_ratio' and track_share=True need grad='backward': the forward-gradient "
                             "engine estimates the loss and penalty gradients together")
        self.nonfinite = _checks.choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if overlap not in (True, False, "auto"):
            raise ValueError(f"overlap: expected True, False or 'auto', got {overlap!r}")
        self.overlap = overlap
        self._probed_classes: Optional[dict] = None  # classes of heads without a Linear, once run
        if self.config.loss_fn is F.cross_entropy:
            _check_head_classes(self.blocks)

    @property
    def lam(self) -> float:
        return self.config.lam

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None):
        """``net(x)``: plain inference, the last head applied to f_K(...f_1(x)), (B, C).
        ``net(x, y)``: one local-learning step for an ordinary training loop (``LocalNetOutput``).

        ``net(x, y)`` in training mode with grad enabled runs ``train_step(x, y)`` (every block's
        local step, activations freed per block) with its gradients set aside, NOT in ``p.grad``;
        ``out.loss.backward()`` then adds them to ``p.grad`` times the gradient reaching
        ``out.loss`` (``(s * out.loss).backward()`` adds s times them: GradScaler, ``loss / n_accum``
        and parameter hooks work as in any loop). ``backward`` only scales: the work was done here.
        In eval mode or under no_grad, ``net(x, y)`` only evaluates (``loss`` = sum of the heads' l_k).
        A plain ``net(x)`` in training mode with grad enabled is marked: backpropagating it raises
        (it would train end to end through the last head only).
        """
        if y is not None:
            if self.training and torch.is_grad_enabled():
                return self._step_for_backward(x, y)
            return self._evaluate(x, y)
        for block in self.blocks:
            x = block(x)
        out = self.blocks[-1].head(x)
        if self.training and isinstance(out, torch.Tensor) and out.requires_grad:
            out = autograd_bridge.EndToEndTrap.apply(out)
        return out

    def _step_for_backward(self, x: torch.Tensor, y: torch.Tensor) -> autograd_bridge.LocalNetOutput:
        return autograd_bridge.step_for_backward(self, lambda hook: self.train_step(x, y, on_block_end=hook), x.device)

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> autograd_bridge.LocalNetOutput:
        self._check_step_input(x, y)
        if self.config.loss_fn is F.cross_entropy and y.dtype != torch.int64:
            y = y.long()
        losses, accs = [], []
        for block in self.blocks:
            x = block(x)
            out = block.head(x)
            losses.append(self.config.loss_fn(out, y).reshape(()))
            accs.append(accuracy(out, y))
        values = torch.stack([t.double() for t in losses + [a for a in accs if a is not None]]).tolist()
        k = len(losses)
        acc_iter = iter(values[k:])
        stats = StepStats(losses=values[:k], penalties=[0.0] * k,
                          accuracies=[None if a is None else next(acc_iter) for a in accs],
                          cosines=[None] * k, norm_ratios=[None] * k, penalty_shares=[None] * k)
        loss = torch.stack(losses).sum().to(autograd_bridge.loss_dtype(list(self.parameters())))
        return autograd_bridge.LocalNetOutput(loss=loss, logits=out.detach(), stats=stats)

    def _check_step_input(self, x, y) -> None:
        _checks.tensor("x", x)
        batch = _checks.batch("x", x)
        p0 = next(self.blocks[0].module.parameters(), None)
        if p0 is not None:
            _checks.module_input("x", x, p0, "blocks[0]")
        _checks.layer_input("x", x, _checks.first_layer(self.blocks[0].module), "blocks[0]")
        if isinstance(y, torch.Tensor) and y.device != x.device:
            raise ValueError(f"y: expected a tensor on x's device ({x.device}), got {y.device}")
        if self.config.loss_fn is F.cross_entropy:
            _checks.labels("y", y, batch)
        elif isinstance(y, torch.Tensor) and (y.dim() == 0 or y.shape[0] != batch):
            raise ValueError(f"y: expected a batch of {batch} targets along dimension 0, got {tuple(y.shape)}")

    def step_engine(self) -> Callable:
        """The per-block step function ``train_step`` calls (also used by ``sgr_ext.distributed``)."""
        return forward_grad.step if self.grad == "forward" else ENGINES[self.mode]

    # torch.compile cannot capture a step: K autograd calls and the step's host sync break
    # the graph, and dynamo's partial capture of the engines' create_graph/requires_grad_
    # choreography gave silently wrong penalty gradients (torch 2.14). So the step always
    # runs eagerly (under fullgraph=True, dynamo says so); the ops compile on their own.
    @eager_step
    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, on_block_end: Optional[Callable] = None) -> StepStats:
        """One local-learning step: ADD grad of J_k = l_k + lam * R_k to every block's ``p.grad``.

        x: (B, *) input batch; y: (B,) int64 class labels for the default loss.
        on_block_end: optional ``on_block_end(k, result)``, called right after block k's step
            with its ``BlockResult`` once its gradients are in ``p.grad`` (``sgr_ext.distributed``
            starts block k's gradient all-reduce there, overlapping block k+1's compute).
        Block k's activations are released when its step returns; only x_k and D_k
        travel forward. The optimizer step (and zero_grad) stays the caller's.
        NaN/Inf in x or in a block's loss, penalty, D_k or parameter gradient is handled by
        the ``nonfinite`` policy (see the class docstring): ``"raise"`` raises
        ``NonFiniteError`` naming the first such block, after every block has run and every
        ``p.grad`` was restored. Detection costs one host sync per step, the step's only one:
        all statistics, flags and the labels' range are read back together; an out-of-range
        label raises ``ValueError`` there, with every ``p.grad`` restored.
        """
        self._check_step_input(x, y)
        if on_block_end is not None and not callable(on_block_end):
            raise TypeError(f"on_block_end: expected None or a callable (k, result), got {type(on_block_end).__name__}")
        if self.config.loss_fn is F.cross_entropy and y.dtype != torch.int64:
            y = y.long()  # int32/int16/uint8 class indices: cross_entropy takes int64
        engine = self.step_engine()
        needs_d = self.config.lam > 0 or self.config.track_alignment
        guard = _StepGuard(self.blocks, x)
        if self.config.loss_fn is F.cross_entropy:
            y = self._watch_label_range(x, y, guard)
        if self.side != "input" and self.config.lam > 0:
            return self._collect(self._output_side_blocks(x, y, engine, guard, on_block_end), guard)
        results = []
        h, d = x, None
        last = len(self.blocks) - 1
        pipe = BlockPipeline(x, overlap_enabled(self.overlap, x, len(self.blocks)))
        for k, block in enumerate(self.blocks):
            with pipe.block(k, h, d, y):  # CUDA: block k's stream; no-op otherwise
                self._verify_block(k, block, engine, h, y, d)
                r = engine(block, h, y, d, self.config, need_output_grad=needs_d and k < last)
                pipe.done(r)
                guard.check_block(k, r)
                if on_block_end is not None:
                    on_block_end(k, r)
            h, d = r.output, r.output_grad
            results.append(r.statistics())
            del r
        pipe.finish()
        return self._collect(results, guard)

    def _watch_label_range(self, x: torch.Tensor, y: torch.Tensor, guard: "_StepGuard") -> torch.Tensor:
        """The label-range check without a host sync of its own: y's min and max travel to the
        host with the step's statistics (``_StepGuard.read``), where an out-of-range label
        raises after every p.grad was restored. Until then the blocks see y clamped into
        range, so that no kernel indexes out of bounds (on CUDA: a device-side assert)."""
        counts = self._head_classes(x)
        if not counts:
            return y
        guard.num_classes = min(counts.values())
        guard.label_bounds = torch.aminmax(y)
        return y.clamp(0, guard.num_classes - 1)


    def _verify_block(self, k: int, block: LocalBlock, engine: Callable, h, y, d) -> None:
        """``verify=True``: compare the engine with double backward on block k, once per module
        signature (only blocks with a penalty gradient: the others run the plain local step)."""
        if not self.verify or d is None or self.config.lam == 0 or self.grad != "backward":
            return
        if self.mode == "double_backward":
            return
        sig = engine_verify.signature(block)
        if self._verified.get(k) != sig:
            engine_verify.check(k, self.mode, engine, block, h, y, d, self.config, engine_verify.SAMPLES)
            self._verified[k] = sig
    def _output_side_blocks(self, x, y, engine, guard: "_StepGuard", on_block_end) -> list:
        """The step loop for ``side="output"``: block k runs as plain local learning (keeping
        A_k), then block k-1 gets its penalty from A_k (``output_side.step``). Block k-1's
        statistics, non-finite check and ``on_block_end`` wait for that. Index k of the
        penalties and shares is boundary k (acting on block k-1)."""
        cfg = replace(self.config, lam=0.0, track_alignment=True, keep_input_grad=True, track_share=False)
        results, pending = [], None  # pending: (block, its input, RNG snapshot, result) of block k-1
        h, d, last = x, None, len(self.blocks) - 1
        for k, block in enumerate(self.blocks):
            rng = local.replay_rng(h.device, active=k < last and local.is_stochastic(block))
            r = engine(block, h, y, d, cfg, need_output_grad=k < last)
            if pending is not None:
                p_block, p_input, p_rng, p_result = pending
                side_step = output_side.step if self.side == "output" else output_side.handback_step
                r.penalty, r.share = side_step(p_block, p_input, y, r.input_grad, self.config, p_rng)
                self._finish_block(k - 1, p_result, results, guard, on_block_end)
            r.input_grad = None
            pending = (block, h, rng, r)
            h, d = r.output, r.output_grad
        self._finish_block(last, pending[3], results, guard, on_block_end)
        return results

    @staticmethod
    def _finish_block(k: int, r, results: list, guard: "_StepGuard", on_block_end) -> None:
        guard.check_block(k, r)
        if on_block_end is not None:
            on_block_end(k, r)
        results.append(r.statistics())

    def _check_label_range(self, x: torch.Tensor, y: torch.Tensor, probe: bool = True) -> None:
        counts = self._head_classes(x, probe)
        if counts:
            _checks.labels("y", y, x.shape[0], min(counts.values()))

    def _head_classes(self, x: torch.Tensor, probe: bool = True) -> dict[int, int]:
        """{block: number of classes its head predicts}. Read off each head's last Linear; a
        head without one is run once (``probe``), the first time, on one sample in eval mode
        (no running-statistics update, no random draws) and the result is kept."""
        counts = {k: m.out_features for k, b in enumerate(self.blocks) for m in [_last_linear(b.head)] if m is not None}
        if len(counts) == len(self.blocks) or not probe:
            return counts
        if self._probed_classes is None:
            # two samples: a module may use batch statistics even in eval mode
            self._probed_classes = self._probe_head_classes(x[:2], skip=set(counts))
        counts.update(self._probed_classes)
        _check_same_classes(sorted(counts.items()))
        return counts

    def _probe_head_classes(self, x: torch.Tensor, skip: set) -> dict[int, int]:
        modes = [(m, m.training) for m in self.modules()]
        found = {}
        try:
            self.eval()
            with torch.no_grad():
                for k, b in enumerate(self.blocks):
                    x = b.module(x)
                    if k not in skip:
                        out = b.head(x)
                        if isinstance(out, torch.Tensor) and out.dim() >= 2:
                            found[k] = out.shape[1]
        except Exception:  # a best-effort check: the step itself reports real errors
            pass
        finally:
            for m, training in modes:
                m.training = training
        return found

    def _collect(self, results, guard: "_StepGuard") -> StepStats:
        stats = StepStats()
        values, bad, labels = guard.read(results)  # the step's one host sync
        if labels is not None and (labels[0] < 0 or labels[1] >= guard.num_classes):
            guard.restore(range(len(results)))
            _checks.label_range("y", guard.num_classes, *labels)
        for k, row in enumerate(values):
            stats.losses.append(row[0])
            stats.penalties.append(row[1])
            stats.accuracies.append(row[2])
            stats.cosines.append(row[3])
            stats.norm_ratios.append(row[4])
            stats.penalty_shares.append(row[5])
        if not bad:
            return stats
        stats.nonfinite_blocks = sorted(bad)
        first = stats.nonfinite_blocks[0]
        if self.nonfinite == "warn":
            guard.restore(stats.nonfinite_blocks)
        else:
            guard.restore(range(len(results)))
        if self.nonfinite == "raise":
            raise NonFiniteError(first, bad[first][0])
        stats.skipped = self.nonfinite == "skip"
        where = ", ".join(f"block {k} ({'/'.join(bad[k])})" for k in stats.nonfinite_blocks)
        action = (
            "the step was skipped (every p.grad left as before it)" if stats.skipped
            else "those blocks' p.grad were left as before the step; the other blocks' gradients were kept"
        )
        warnings.warn(f"LocalNet.train_step: non-finite values in {where}; {action}", RuntimeWarning, stacklevel=3)
        return stats


def _check_one_device(blocks) -> None:
    """LocalNet hands x_k from block to block as it is: every parameter must be on one device."""
    first = None
    for k, b in enumerate(blocks):
        for part in ("module", "head"):
            p = next(getattr(b, part).parameters(), None)
            if p is None:
                continue
            if first is None:
                first = (f"blocks[{k}].{part}", p.device)
            elif p.device != first[1]:
                raise ValueError(f"blocks[{k}].{part}: parameters on {p.device}, but {first[0]}'s are on {first[1]}; "
                                 "LocalNet runs every block on one device (move the whole LocalNet with .to())")


def _last_linear(head: nn.Module) -> Optional[nn.Linear]:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _check_head_classes(blocks) -> None:
    """Every head's class count, read off its last Linear where it has one, must agree."""
    _check_same_classes([(k, m.out_features) for k, b in enumerate(blocks) for m in [_last_linear(b.head)] if m is not None])


def _check_same_classes(counts: list) -> None:
    """counts: (block, classes) pairs in block order."""
    first = None
    for k, c in counts:
        if first is None:
            first = (k, c)
        elif c != first[1]:
            raise ValueError(
                f"blocks[{k}].head: predicts {c} classes, but blocks[{first[0]}].head predicts "
                f"{first[1]}; with the cross-entropy loss every head must output the same classes"
            )
