"""C++ sources of the CPU kernels, installed as ``sgr_ext.csrc`` and compiled on first use."""
