"""FLOP formulas of kfuse's registered ops for ``torch.utils.flop_counter.FlopCounterMode``.

Without them the mode counted 0 FLOPs for a fused LoRA layer or a paged attention call, so a model's
measured FLOPs (and MFU) lost its fused layers (modes-and-hooks hunt, 2026-12-07). Each op module calls
:func:`register` for its ops; the formula takes the op's arguments as passed (tensors, not shapes: several
counts depend on values, e.g. the lengths attended) and returns the multiply-adds × 2 the kernels do.

``torch.utils.flop_counter`` costs ~175 ms to import (it loads torch's decompositions), more than kfuse's own
import, so it is not imported here: the formulas are registered when it is, by a one-shot import hook, or at
once where it already is. A ``FlopCounterMode`` copies the registry when it is made, and it can only be made
after its module is imported: every mode sees the formulas.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_MODULE = "torch.utils.flop_counter"
_PENDING: list[tuple[Any, Callable[..., int]]] = []


def register(op: Any, formula: Callable[..., int]) -> None:
    """Count ``formula(*args, out_val=out, **kwargs)`` FLOPs for each call of the registered ``op``
    (``torch.ops.kfuse.<name>``) under ``FlopCounterMode``."""
    module = sys.modules.get(_MODULE)
    if module is not None:
        _register(module, op, formula)
        return
    _PENDING.append((op, formula))
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def _register(module: ModuleType, op: Any, formula: Callable[..., int]) -> None:
    module.register_flop_formula(op, get_raw=True)(formula)


class _Hook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the import of ``torch.utils.flop_counter`` it removes itself, lets the other
    finders find the module, and registers the pending formulas once the module has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        except Exception:  # the import goes on without the formulas, through the other finders (which say why)
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            while _PENDING:
                _register(module, *_PENDING.pop(0))

        spec.loader.exec_module = exec_module  # (this module's own loader object: path finders make one per module)
        return spec
