"""Op contracts: validated entry points that dispatch to torch, C++ or Triton paths."""
from sgr_ext.ops.dual_batchnorm import dual_batchnorm_apply, dual_batchnorm_backward, dual_batchnorm_forward
from sgr_ext.ops.linear_ce import linear_cross_entropy
from sgr_ext.ops.reconcile import reconcile

__all__ = [
    "dual_batchnorm_apply",
    "dual_batchnorm_backward",
    "dual_batchnorm_forward",
    "linear_cross_entropy",
    "reconcile",
]
