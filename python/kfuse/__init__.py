"""kfuse: fused PyTorch kernels (Triton, CUDA and C++ CPU) with PyTorch references.

Ops: :func:`kfuse.deu` (per-neuron Differential Equation Unit activations).
Modules: :class:`kfuse.nn.DEU`. ``python -m kfuse`` checks and times every backend.
``kfuse.availability()`` says which backends this machine can run, and why not.
"""

import torch  # noqa: F401  (the extension needs torch loaded first)

from kfuse import nn, reference
from kfuse._backends import BackendUnavailableError, availability
from kfuse.ops.deu import deu

__all__ = ["BackendUnavailableError", "availability", "deu", "nn", "reference"]
__version__ = "0.1.0"
