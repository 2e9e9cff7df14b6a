"""``kfuse.nn.DEU``: a learned per-neuron activation layer."""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from kfuse.ops.deu import BACKENDS, deu
from kfuse.reference.deu import deu_init_coeffs


class DEU(nn.Module):
    """Differential Equation Unit activations, one learned activation per neuron.

    Args:
        num_features: N, the size of the neuron axis.
        dim: the neuron axis of the input (``-1`` for ``[..., N]``, ``1`` for NCHW).
        backend: passed to :func:`kfuse.deu` (``"auto"`` by default).
    Shape:
        input ``[..., N, ...]`` with N at ``dim``; output the same.
    Parameters:
        coeffs: ``[N, 5]`` float32, one row ``(a, b, c, c1, c2)`` per neuron, initialised as in the paper:
        ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``.
    """

    def __init__(self, num_features: int, dim: int = -1, backend: str = "auto") -> None:
        super().__init__()
        for name, v in (("num_features", num_features), ("dim", dim)):
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise TypeError(f"DEU: {name} must be an int; got {type(v).__name__}")
        num_features, dim = operator.index(num_features), operator.index(dim)
        if num_features < 1:
            raise ValueError(f"DEU: num_features must be >= 1; got {num_features}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"DEU: backend must be 'auto' or one of {list(BACKENDS)}; got {backend!r}")
        self.num_features, self.dim, self.backend = num_features, dim, backend
        self.coeffs = nn.Parameter(deu_init_coeffs(num_features))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraws ``coeffs`` from the paper's initialisation (in place)."""
        self.coeffs.copy_(deu_init_coeffs(self.num_features))

    def forward(self, x: Tensor) -> Tensor:
        """``kfuse.deu(x, coeffs, dim, backend)``; ``x`` must have ``num_features`` at ``dim``."""
        if isinstance(x, Tensor) and -x.ndim <= self.dim < x.ndim and x.shape[self.dim] != self.num_features:
            hint = " (NCHW feature maps need dim=1)" if self.dim == -1 and x.ndim == 4 else ""
            raise ValueError(f"DEU(num_features={self.num_features}, dim={self.dim}): the input of shape "
                             f"{tuple(x.shape)} has {x.shape[self.dim]} features at dim {self.dim}{hint}")
        return deu(x, self.coeffs, self.dim, self.backend)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, dim={self.dim}, backend={self.backend!r}"
