"""Packaging: ``kernels/`` installs as ``sgr_ext.kernels`` and ``csrc/`` as ``sgr_ext.csrc``.

The C++ kernels are compiled just in time on first use (torch.utils.cpp_extension +
ninja, cached per torch version), so ``pip install .`` needs no compiler and no
torch at build time; ``sgr_ext.info()`` reports what got built.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["sgr_ext", "sgr_ext.*"]) + ["sgr_ext.kernels", "sgr_ext.csrc"]

setup(
    packages=packages,
    package_dir={"sgr_ext.kernels": "kernels", "sgr_ext.csrc": "csrc"},
    package_data={"sgr_ext.csrc": ["*.cpp", "*.h"], "sgr_ext": ["py.typed"]},
    include_package_data=False,
)
