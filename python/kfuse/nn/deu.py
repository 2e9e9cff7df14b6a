"""``kfuse.nn.DEU``: a learned per-neuron activation layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfuse.ops.deu import deu
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
        coeffs: ``[N, 5]`` float32, rows ``(a, b, c, c1, c2)``, initialised as in the paper:
        ``a, b, c ~ U(0, 1)``, ``c1 = c2 = 0``.
    """

    def __init__(self, num_features: int, dim: int = -1, backend: str = "auto") -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int):
            raise TypeError(f"DEU: num_features must be an int; got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"DEU: num_features must be >= 1; got {num_features}")
        self.num_features, self.dim, self.backend = num_features, dim, backend
        self.coeffs = nn.Parameter(deu_init_coeffs(num_features))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.coeffs.copy_(deu_init_coeffs(self.num_features))

    def forward(self, x: Tensor) -> Tensor:
        return deu(x, self.coeffs, self.dim, self.backend)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, dim={self.dim}, backend={self.backend!r}"
