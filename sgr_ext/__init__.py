"""sgr_ext: memory-efficient local learning with Successive Gradient Reconciliation.

The public names are imported on first use (``sgr_ext._lazy``): ``import sgr_ext`` does not
import torch, so the ``sgr-ext`` command line reports a bad argument without waiting for it.
"""
from typing import TYPE_CHECKING

from sgr_ext import _lazy

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the names are, for type checkers and IDEs
    from sgr_ext.blocks import LocalBlock
    from sgr_ext.net import LocalNet, NonFiniteError, StepStats
    from sgr_ext.ops._backends import BackendUnavailable, info
    from sgr_ext.ops.reconcile import reconcile
    from sgr_ext.split import split

__getattr__, __dir__ = _lazy.attach(__name__, {
    "BackendUnavailable": "sgr_ext.ops._backends",
    "LocalBlock": "sgr_ext.blocks",
    "LocalNet": "sgr_ext.net",
    "NonFiniteError": "sgr_ext.net",
    "StepStats": "sgr_ext.net",
    "info": "sgr_ext.ops._backends",
    "reconcile": "sgr_ext.ops.reconcile",
    "split": "sgr_ext.split",
})

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
