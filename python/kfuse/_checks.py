"""Checks of scalar arguments shared by the ops, modules and generator: each error names the
argument and what it got (type-confusion bug hunt, 2026-12-04: a string ``include_last_offset``
was taken as True, ``10**400`` for a real number raised a bare OverflowError, a numpy bool was
refused as "must be a bool; got bool")."""

from __future__ import annotations

import math
import numbers
import operator

import torch


def type_name(v: object) -> str:
    """``v``'s type, module-qualified outside builtins (numpy 2 calls its bool ``bool``)."""
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def check_bool(where: str, name: str, v: object) -> bool:
    """``v`` if it is a Python bool; a TypeError naming ``name`` otherwise (as torch's argument
    parser, which refuses strings and numbers for its bool arguments)."""
    if not isinstance(v, bool):
        raise TypeError(f"{where}: {name} must be a bool; got {type_name(v)} {v!r}")
    return v


def int_or_none(v: object) -> int | None:
    """``v`` as an int when it is an integer of any kind other than a bool (``__index__``: numpy, 0-d integer
    tensors), else None: for checks that keep their own messages (error-message hunt: np.int64(2) layers and
    sizes were refused as "must be an int", which they are)."""
    if isinstance(v, (bool, list, tuple, str, bytes)) or v is None:
        # (torch 2.11's Dynamo, the GPU machine's, failed on operator.index of a list with its own internal error,
        # not TypeError: a compiled module with one padding_idx per table; `make compat`, 2026-12-05)
        return None
    if isinstance(v, int):  # as it is, first: under torch.compile operator.index specialised a traced layer
        return v            # number (one graph a layer), and torch 2.11's Dynamo cannot trace hasattr of one
    if not hasattr(v, "__index__"):
        return None
    if isinstance(v, torch.Tensor) and (v.dim() != 0 or v.dtype == torch.bool):  # ([1] and True: review)
        return None
    try:
        return operator.index(v)
    except TypeError:  # (a float tensor has __index__ and refuses it)
        return None


def integer(where: str, name: str, v: object, minimum: int | None = None) -> int:
    """``v`` as an int: an integer of any kind (``__index__``: numpy, 0-d integer tensors) that is not
    a bool, and at least ``minimum``; a TypeError or ValueError naming ``name`` otherwise (never a
    float or string truncated: ``int(10.9)`` made a 10-row table)."""
    i = int_or_none(v)
    if i is None:
        raise TypeError(f"{where}: {name} must be an int; got {type_name(v)} {v!r}")
    if minimum is not None and i < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}; got {i}")
    return i


def real(where: str, name: str, v: object, *, finite: bool = False) -> float:
    """``v`` as a float: a real number that is not a bool, within float's range, and finite when
    ``finite``; a TypeError or ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number; got {type_name(v)}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{where}: {name} is out of float's range; got {v!r}") from None
    if finite and not math.isfinite(f):
        raise ValueError(f"{where}: {name} must be finite; got {f}")
    return f


def one_device(where: str, **named: object) -> None:
    """Every tensor among ``named``'s values (lists of tensors too; None and non-tensors skipped) on the first
    one's device; a ValueError naming the first that is not. The registered ops' fake kernels check it: a call
    mixing a meta tensor with real ones dispatches to them, and their empty outputs came back as real,
    uninitialised tensors (bad-input fuzz, 2026-12-05)."""
    first: tuple[str, object] | None = None
    for name, v in named.items():
        for i, t in enumerate(v if isinstance(v, (list, tuple)) else (v,)):
            if not hasattr(t, "device") or not hasattr(t, "dim"):  # a tensor (fake ones too)
                continue
            label = f"{name}[{i}]" if isinstance(v, (list, tuple)) else name
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise ValueError(f"{where}: {label} is on {t.device} but {first[0]} is on {first[1]}; every tensor "
                                 "must be on one device")
