"""LoRA linear layers, the definition (Hu et al. 2021, as Hugging Face PEFT computes them).

``y = x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Bᵀ + lora_bias)``

with dropout on the LoRA branch only (``mask / (1 − p)``, inverted scaling). Everything is
computed in float32, or float64 when ``x`` is float64, and ``y`` is returned in ``x``'s dtype;
gradients flow back to every input in its own dtype (plain autograd through the casts).
Written for clarity, not speed: every other backend is tested against these functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[M, K]``."""
    return x.unsqueeze(0) if x.ndim == 1 else x.flatten(0, -2)


def reference_dropout_mask(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """A fresh dropout mask for ``x [..., K]``: bool ``[M, K]`` (M = rows of ``x``), True =
    kept with probability ``1 − p``, drawn from torch's RNG (``generator``, or the default one
    of ``x``'s device)."""
    # float32 whatever torch's default dtype (a bfloat16 default would round p and the draws)
    rows = math.prod(x.shape[:-1])
    return torch.rand(rows, x.shape[-1], device=x.device, generator=generator, dtype=torch.float32) >= p


def lora_shrink_reference(x: Tensor, lora_A: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """``S = dropout(x) Aᵀ``: ``[M, r]`` in the accumulation dtype (float32, float64 for float64 x),
    for ``x [..., K]`` (flattened to ``[M, K]``), ``lora_A [r, K]`` and ``mask`` bool ``[M, K]``
    or ``x.shape`` (None: no dropout)."""
    acc = acc_dtype(x.dtype)
    x2 = _rows(x).to(acc)
    if mask is not None:
        x2 = x2 * mask.reshape(x2.shape).to(acc) / (1.0 - dropout_p)
    return x2 @ lora_A.to(acc).t()


def _base(x2: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool) -> Tensor:
    """``x2 Wᵀ + bias`` in x2's dtype (the accumulation dtype), for ``x2 [M, K]``."""
    w = weight.to(x2.dtype)
    y = x2 @ (w if fan_in_fan_out else w.t())
    return y if bias is None else y + bias.to(x2.dtype)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    lora_bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """``y = x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Bᵀ + lora_bias)``.

    Args:
        x: ``[..., K]``, float16, bfloat16, float32 or float64.
        weight: ``[N, K]`` (``[K, N]`` when ``fan_in_fan_out``, GPT-2's Conv1D), x's dtype.
        lora_A: ``[r, K]``; lora_B: ``[N, r]``; float32 or x's dtype (both the same).
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        bias: ``[N]`` or None, x's dtype. lora_bias: ``[N]`` or None (PEFT's ``lora_B.bias``).
        mask: the dropout mask, bool ``[M, K]`` (M = rows of x) or x's shape, True = kept;
            None = no dropout (evaluation, or p = 0).
        dropout_p: the dropout probability the mask was drawn with (kept values are scaled by
            ``1 / (1 − p)``); unused without a mask.
        fan_in_fan_out: the layout of ``weight``.
    Returns:
        ``y [..., N]`` in x's dtype, computed in float32 (float64 for float64 x).
    """
    acc = acc_dtype(x.dtype)
    x2 = _rows(x).to(acc)
    y = _base(x2, weight, bias, fan_in_fan_out)
    s = lora_shrink_reference(x, lora_A, mask, dropout_p)
    low_rank = s @ lora_B.to(acc).t()
    if lora_bias is not None:
        low_rank = low_rank + lora_bias.to(acc)
    y = y + scaling * low_rank
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def lora_linear_multi_reference(
    x: Tensor,
    weight: Tensor,
    A_stack: Tensor,
    B_stack: Tensor,
    scalings: Tensor,
    ranks: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> Tensor:
    """Several adapters in one batch (serving): row ``m`` of ``x`` uses adapter ``adapter_ids[m]``.

    ``y[m] = x[m] Wᵀ + bias + s_a · (x[m] A_aᵀ) B_aᵀ`` with ``a = adapter_ids[m]``,
    ``A_a = A_stack[a, :ranks[a]]``, ``B_a = B_stack[a, :, :ranks[a]]``, ``s_a = scalings[a]``;
    ``a = -1`` (or any id outside ``[0, L)``) is the base model alone. Entries of the stacks
    past an adapter's rank are ignored (they may hold anything, NaN included). No dropout.

    Args:
        x: ``[..., K]``; weight ``[N, K]`` (``[K, N]`` when ``fan_in_fan_out``), x's dtype.
        A_stack: ``[L, r_max, K]``; B_stack: ``[L, N, r_max]``; float32 or x's dtype.
        scalings: ``[L]`` floating. ranks: ``[L]`` integer, each in ``[0, r_max]`` (larger
            ones count as r_max).
        adapter_ids: integer, one per row of x (``[M]`` or ``x.shape[:-1]``).
        bias: ``[N]`` or None, x's dtype.
    Returns:
        ``y [..., N]`` in x's dtype, computed in float32 (float64 for float64 x).
    """
    acc = acc_dtype(x.dtype)
    x2 = _rows(x).to(acc)
    y = _base(x2, weight, bias, fan_in_fan_out)
    ids = adapter_ids.reshape(-1, 1)
    r_max = A_stack.shape[1]
    lanes = torch.arange(r_max, device=x.device)
    for a in range(A_stack.shape[0]):  # L is a shape: no data-dependent control flow
        in_rank = lanes < ranks[a]
        A = torch.where(in_rank[:, None], A_stack[a].to(acc), 0.0)  # [r_max, K]
        B = torch.where(in_rank[None, :], B_stack[a].to(acc), 0.0)  # [N, r_max]
        delta = scalings[a].to(acc) * ((x2 @ A.t()) @ B.t())
        y = y + torch.where(ids == a, delta, 0.0)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
