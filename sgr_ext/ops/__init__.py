"""Op contracts: validated entry points that dispatch to torch, C++ or Triton paths."""
from sgr_ext.ops.linear_ce import linear_cross_entropy
from sgr_ext.ops.reconcile import reconcile

__all__ = ["linear_cross_entropy", "reconcile"]
