"""Triton kernels of kfuse: one module per op family, kernels plus thin launchers."""
