"""Triton kernels of kfuse: one module per op family, kernels plus thin launchers."""

from kfuse._backends import triton_interpret

#: Whether ``TRITON_INTERPRET=1`` was set when these kernels were first imported: ``triton.jit`` reads it
#: once, at decoration, so setting or clearing it later does not change how they run
#: (``kfuse._backends.triton_reasons`` says so instead of letting a launch fail obscurely). The launchers
#: read it for their interpreter tiles, where reading the environment cost ~1.5 µs a call.
INTERPRETED = triton_interpret()
