"""Buffers that must keep their dtype through ``module.half()`` / ``.to(dtype)`` (shared by the modules)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def apply_keeping_dtype(module: nn.Module, apply: Callable[[], object], names: list[str],
                        dtype: Callable[[], torch.dtype]) -> None:
    """Runs ``apply`` (the module's ``super()._apply(fn, recurse)``), then gives each buffer in ``names``
    that it cast away from ``dtype()`` that dtype back, with its values from before the cast (or
    uninitialised memory, where they were on ``meta``) on the buffer's new device. For state a cast
    would lose: an optimizer's float32 moments, float32 scalings, a float64 CDF."""
    before: dict[str, Tensor] = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    apply()
    want = dtype()
    for name, old in before.items():
        now = module._buffers[name]
        if now.dtype != want:
            module._buffers[name] = (torch.empty_like(now, dtype=want) if old.is_meta else
                                     old.to(device=now.device, dtype=want))
