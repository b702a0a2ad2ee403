"""sgr_ext: memory-efficient local learning with Successive Gradient Reconciliation."""
from sgr_ext.blocks import LocalBlock
from sgr_ext.net import LocalNet, NonFiniteError, StepStats
from sgr_ext.ops._backends import BackendUnavailable, info
from sgr_ext.ops.reconcile import reconcile
from sgr_ext.split import split

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "LocalBlock",
    "LocalNet",
    "NonFiniteError",
    "StepStats",
    "info",
    "reconcile",
    "split",
    "__version__",
]
