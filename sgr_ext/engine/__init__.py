"""Per-block step engines, one per ``LocalNet`` mode.

- ``"exact"`` (default, ``tangent.step``): exact penalty gradient from one tangent-carrying
  recompute; no double-backward graph.
- ``"fast"`` (``finite_diff.step``): one-sided finite difference of the parameter gradient
  along the penalty direction; about plain-local memory, one extra forward+backward.
- ``"double_backward"`` (``double_backward.step``): the reference definition
  (``create_graph=True``), kept for testing and comparison.

Every engine has the signature
``step(block, x_prev, y, d_prev, cfg, need_output_grad) -> BlockResult``.
"""
from sgr_ext.engine import double_backward, finite_diff, local, tangent
from sgr_ext.engine.base import BlockResult, StepConfig

ENGINES = {
    "exact": tangent.step,
    "fast": finite_diff.step,
    "double_backward": double_backward.step,
}

__all__ = ["ENGINES", "BlockResult", "StepConfig", "local"]
