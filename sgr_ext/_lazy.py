"""Public names of a package imported on first use (PEP 562 module ``__getattr__``).

``import sgr_ext`` (and ``import sgr_ext.trainer``) then costs no torch import: ``sgr-ext``
imports the package to parse and check its arguments, and a bad argument should be reported
at once, not after torch's import (seconds). ``from sgr_ext import LocalNet`` and
``sgr_ext.LocalNet`` import the defining module when first asked for.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Callable


class _Package(types.ModuleType):
    """A package whose public name may equal a submodule's (``sgr_ext.split``, the function, from
    the module ``sgr_ext/split.py``): importing that submodule makes the import system bind the
    package attribute to the module, so the public value is bound instead."""

    def __setattr__(self, name: str, value) -> None:
        if (name in self.__dict__.get("_lazy_names", ()) and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            value = getattr(value, name)
        super().__setattr__(name, value)


def attach(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` (its ``__name__``), whose public ``names`` (name ->
    the module that defines it) are imported on first access.

    Any other name that is a submodule imports it: importing the public names eagerly used to
    import most submodules along the way, and code reads e.g. ``sgr_ext.heads.conv_head`` after
    a bare ``import sgr_ext``.
    """
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif not name.startswith("__"):
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise  # the submodule exists but an import inside it failed
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__) | set(names))

    module._lazy_names = tuple(names)
    module.__class__ = _Package
    return __getattr__, __dir__
