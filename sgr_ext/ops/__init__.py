"""Op contracts: validated entry points that dispatch to torch, C++ or Triton paths."""
from sgr_ext.ops.reconcile import reconcile

__all__ = ["reconcile"]
