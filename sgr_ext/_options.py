"""The choices of ``LocalNet``'s string options and the checks of plain (non-tensor) values.

Torch-free on purpose: ``sgr-ext`` checks its arguments with these (through
``sgr_ext.trainer.config``) before it imports torch, so a bad argument is reported in a
fraction of a second instead of after torch's import (seconds). ``_checks`` re-exports the
checks next to its tensor checks; every check raises ``TypeError`` (wrong kind of object) or
``ValueError`` (wrong value) with a message that names the argument.
"""
from __future__ import annotations

import math
from typing import Iterable

DISTANCES = ("l2", "l2_rel", "cosine")
LAM_MODES = ("fixed", "grad_ratio")
SIDES = ("input", "output", "handback")
GRADS = ("backward", "forward")
NONFINITE_POLICIES = ("raise", "skip", "warn")


def choice(name: str, value, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def distance(value) -> str:
    return choice("distance", value, DISTANCES)


def nonneg_finite(name: str, value) -> float:
    """A real number >= 0 that is not NaN or infinite (lam, eps, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name}: expected a finite number >= 0, got an int with {len(str(value))} digits") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    return value


def positive_int(name: str, value, *, at_most: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name}: expected at most {at_most}{what}, got {value}")
    return value
