"""State helpers shared by the modules: buffers that must keep their dtype through ``module.half()`` /
``.to(dtype)``, and loads whose own reading of the state_dict comes after the load pre-hooks."""

from __future__ import annotations

import functools
from collections import OrderedDict
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


def pre_hooks_first(load: Callable[..., None]) -> Callable[..., None]:
    """For a module's ``_load_from_state_dict`` override that reads ``state_dict`` before torch's: runs the
    module's load_state_dict pre-hooks first, and not again inside. Torch runs them in
    ``Module._load_from_state_dict``, after the override had read the dict: a hook renaming an old checkpoint's
    keys came too late (the stacks of a MultiLoRALinear were not resized: a size-mismatch error; a LoRALinear
    loading a PEFT-style dict with strict=False kept merged=True over a base weight, 34 off; re-entrancy hunt,
    2026-12-07)."""

    @functools.wraps(load)
    def run(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        hooks = module._load_state_dict_pre_hooks
        for hook in list(hooks.values()):
            hook(state_dict, prefix, *args)
        module._load_state_dict_pre_hooks = OrderedDict()
        try:
            load(module, state_dict, prefix, *args)
        finally:
            module._load_state_dict_pre_hooks = hooks

    return run
