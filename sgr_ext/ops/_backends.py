"""Which kernel paths exist on this machine, and the one-time C++ build.

The C++ kernels in ``csrc/*.cpp`` are compiled together, on first use, into one
library that registers its ops under ``torch.ops.sgr_ext_cpp`` (TORCH_LIBRARY_FRAGMENT).
A machine without a compiler gets one warning and the torch path; never a silent
half-install.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from importlib import resources
from pathlib import Path

import torch

CPP_NAMESPACE = "sgr_ext_cpp"


class BackendUnavailable(RuntimeError):
    """A kernel path that was asked for explicitly (``impl=...``) cannot run here."""


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


# Availability is a property of the process, not of the traced values: torch.compile
# evaluates these once at trace time instead of tracing into the env / import lookups.
@torch.compiler.assume_constant_result
def triton_installed_constant() -> bool:
    return triton_installed()


@torch.compiler.assume_constant_result
def interpret_mode_constant() -> bool:
    return interpret_mode()


@torch.compiler.assume_constant_result
def cpp_built_constant() -> bool:
    return cpp_ops() is not None


def require_triton(op: str, device: torch.device, cpu_alternative: str) -> None:
    """Raise BackendUnavailable unless ``op(impl='triton')`` can run on ``device``
    (``cpu_alternative`` names the impls to use for CPU tensors instead)."""
    if not triton_installed_constant():
        raise BackendUnavailable(f"{op}(impl='triton'): triton is not installed")
    if device.type == "cpu" and not interpret_mode_constant():
        raise BackendUnavailable(
            f"{op}(impl='triton'): the tensors are on the CPU; Triton kernels need CUDA tensors, "
            "or TRITON_INTERPRET=1 (set before sgr_ext's kernels are first used) to run them in the "
            f"CPU interpreter. Use {cpu_alternative} for CPU tensors."
        )
    if device.type not in ("cuda", "cpu"):
        raise BackendUnavailable(f"{op}(impl='triton'): no Triton backend for device {device}")


def require_cpp(op: str, device: torch.device) -> None:
    """Raise BackendUnavailable unless ``op(impl='cpp')`` can run on ``device``."""
    if device.type != "cpu":
        raise BackendUnavailable(f"{op}(impl='cpp'): the C++ kernels run on CPU tensors only, got device {device}")
    if not cpp_built_constant():
        raise BackendUnavailable(
            f"{op}(impl='cpp'): the C++ library is not available (SGR_EXT_NO_CPP=1, or the build "
            "failed: see the warning and sgr_ext.info()); use impl=None or 'torch'"
        )


def triton_runs_on(device: torch.device) -> bool:
    """Triton can run on ``device``: a CUDA device, or CPU tensors under TRITON_INTERPRET=1."""
    if not triton_installed():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpret_mode())


def _cpp_sources() -> list[str]:
    root = resources.files("sgr_ext.csrc")
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".cpp"))


def _build_name(sources: list[str], flags: list[str]) -> str:
    """A build (and cache directory) name per source files (path and content), flags and
    torch version: two installs (a checkout and a venv, two versions) never rebuild over
    each other's cache, which also made processes that start together wait on a rebuild."""
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.encode())
        digest.update(Path(src).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    return f"sgr_ext_cpp_{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def cpp_ops():
    """``torch.ops.sgr_ext_cpp`` after building ``csrc/`` once (cached on disk by torch), or None.

    Set ``SGR_EXT_NO_CPP=1`` to skip the build.
    """
    if os.environ.get("SGR_EXT_NO_CPP", "0") == "1":
        return None
    sources = _cpp_sources()
    if not sources:
        return None
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp", "-march=native" if os.environ.get("SGR_EXT_NATIVE") == "1" else "-O3"]
        load(
            name=_build_name(sources, flags),
            sources=sources,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("SGR_EXT_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # any build failure means: fall back, loudly, once
        warnings.warn(
            f"sgr_ext: the C++ kernels could not be built ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "CPU tensors use the plain torch path. Install a C++ compiler and ninja to enable them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return getattr(torch.ops, CPP_NAMESPACE)


def info() -> dict:
    """What is installed and active: {"torch", "triton", "triton_interpret", "cuda", "cpp",
    "ops"}; "ops" maps each op contract of ``sgr_ext.ops`` to the ``impl`` values it takes."""
    # imported here: the op modules import this one
    from sgr_ext.ops.dual_batchnorm import IMPLS as dual_batchnorm_impls
    from sgr_ext.ops.linear_ce import IMPLS as linear_ce_impls
    from sgr_ext.ops.reconcile import IMPLS as reconcile_impls

    triton_version = None
    if triton_installed():
        import triton

        triton_version = triton.__version__
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": interpret_mode(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpp": cpp_ops() is not None,
        "ops": {
            "reconcile": reconcile_impls,
            "linear_cross_entropy": linear_ce_impls,
            "dual_batchnorm": dual_batchnorm_impls,
        },
    }
