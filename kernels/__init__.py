"""Triton kernels, shipped as fastkd.kernels (one op family per file)."""
