"""Per-block step engines, one per ``LocalNet`` mode."""
from sgr_ext.engine import double_backward
from sgr_ext.engine.base import BlockResult, StepConfig

ENGINES = {"exact": double_backward.step}

__all__ = ["ENGINES", "BlockResult", "StepConfig"]
