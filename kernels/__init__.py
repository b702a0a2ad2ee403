"""Triton kernels, installed as ``sgr_ext.kernels``. Importing this package never requires a GPU."""
