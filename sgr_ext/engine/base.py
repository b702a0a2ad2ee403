"""What every per-block step engine takes and returns."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True)
class StepConfig:
    lam: float
    distance: str
    eps: float
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    track_alignment: bool = False
    # BP-free engine (engine/forward_grad.py) only: tangent draws averaged per phase, and
    # per-sample (True) or whole-batch (False) directional derivatives.
    num_tangents: int = 1
    fg_per_sample: bool = True
    # "fixed": J_k = l_k + lam R_k. "grad_ratio": block k's penalty gradient is rescaled each
    # step so that ||lam_k grad R_k|| = lam ||grad l_k|| (lam is then a ratio of gradient norms).
    lam_mode: str = "fixed"
    # measure ||lam_k grad R_k|| / ||grad l_k|| per block (always measured under "grad_ratio")
    track_share: bool = False
    # return A_k in BlockResult.input_grad (LocalNet(side="output") hands it back to block k-1)
    keep_input_grad: bool = False

    @property
    def split_grads(self) -> bool:
        """Whether an engine computes grad l_k and grad R_k separately (costs the weight
        gradients of the first backward, which the combined objective does not need)."""
        return self.lam_mode != "fixed" or self.track_share


@dataclass
class BlockResult:
    """Outcome of one block's local step; every tensor is detached from any graph.

    output: x_k, (B, *) in the block's output dtype; the next block's input.
    output_grad: D_k = B * dl_k/dx_k with x_k's shape, or None when no later block needs it.
    loss: 0-dim, l_k.  penalty: 0-dim, R_k, or None where it was not computed (the first
        block; lam == 0 without ``track_alignment``, where A_k is not computed either).
    accuracy: 0-dim fraction of argmax(head) == y, or None when the head is not a classifier.
    cosine, norm_ratio: 0-dim mean over samples of cos(A_k, D_{k-1}) and |A_k|/|D_{k-1}|,
        or None when A_k was not computed.
    share: 0-dim ||lam_k grad_theta R_k|| / ||grad_theta l_k|| over the block's parameters, the
        penalty's share of the update, or None when not measured (``StepConfig.split_grads``).
    input_grad: A_k = B dl_k/du_k (detached), only under ``StepConfig.keep_input_grad``.
    ready: optional ``torch.cuda.Event`` recorded (on the block's stream) as soon as
        ``output`` and ``output_grad`` were computed, before the block's remaining backward
        work: the next block may start after it (``sgr_ext.engine.pipeline``). None: the
        outputs are ready when the engine returns.
    """

    output: torch.Tensor
    output_grad: Optional[torch.Tensor]
    loss: torch.Tensor
    penalty: Optional[torch.Tensor]
    accuracy: Optional[torch.Tensor] = None
    cosine: Optional[torch.Tensor] = None
    norm_ratio: Optional[torch.Tensor] = None
    ready: Optional[Any] = None
    share: Optional[torch.Tensor] = None
    input_grad: Optional[torch.Tensor] = None

    def statistics(self) -> "BlockResult":
        """This result without x_k and D_k: what a step keeps of a block once the next block
        has them (holding every x_k and D_k would cost the sum of all boundary activations)."""
        return replace(self, output=None, output_grad=None, input_grad=None)


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
    if logits.dim() != 2:
        return None
    return (logits.argmax(dim=1) == y).float().mean()


@torch.no_grad()
def alignment(a: torch.Tensor, d: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample cosine similarity and norm ratio |a_i| / |d_i| of two (B, *) tensors."""
    a2 = a.reshape(a.shape[0], -1).float()
    d2 = d.reshape(d.shape[0], -1).float()
    na, nd = a2.norm(dim=1), d2.norm(dim=1)
    cos = (a2 * d2).sum(dim=1) / (na * nd + eps)
    return cos.mean(), (na / (nd + eps)).mean()
