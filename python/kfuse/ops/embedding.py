"""Embedding bags over one or many tables: the public ops, autograd and torch.library registration.

``kfuse.embedding_bag`` has the semantics of ``torch.nn.functional.embedding_bag`` (``sum``/``mean``);
``kfuse.multi_embedding_bag`` pools many features over many tables in one call (the FBGEMM/TorchRec
layout: flat ``indices``, ``offsets`` of length ``F·B + 1``, feature-major). The definition is
:mod:`kfuse.reference.embedding`; the single-table op is the multi-table one with one feature.

Backends:

- ``cpu``: the C++ kernels (``csrc/embedding/embedding_cpu.cpp``): forward, deterministic backward
  (stable sort by row, one sequential sum per unique row), ``per_sample_weights`` gradient, fused
  optimizers. They check every index and offset before reading a row.
- ``triton`` (``triton_kernels/embedding.py``; CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``;
  no float64): one launch for all features (the tables' addresses in a small metadata tensor);
  backward by a stable sort of (table, row) keys and one program per unique row summing its
  occurrences in position order; out-of-range indices are masked and flagged, and the op reads the
  flag once per forward (one host sync) to raise, or later with ``check="async"`` (:data:`CHECKS`).
- ``cuda``: no csrc CUDA kernels (always unavailable).
- ``reference``: the PyTorch definition in float64 (checks values on the host).

Gradients (deterministic on every backend): dense, in the tables' dtype, or — ``sparse=True``,
eager calls only — ``torch.sparse_coo`` tensors holding each row once, ascending (as
``nn.EmbeddingBag(sparse=True)``, whose rows repeat), flagged coalesced as ``torch.autograd.grad`` returns
them (accumulated into ``.grad``, autograd drops the flag: ``.coalesce()`` then sorts them again), and the
gradient of ``per_sample_weights``.
Registered ops: ``kfuse::embedding_bag_forward`` / ``kfuse::embedding_bag_backward`` (dense
gradients: fixed shapes, so ``torch.compile(fullgraph=True)`` records them).
"""

from __future__ import annotations

import functools
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kfuse import _backends, _checks, _routing
from kfuse.reference.embedding import (
    MEAN,
    POOLINGS,
    SUM,
    acc_dtype,
    multi_embedding_bag_backward_reference,
    multi_embedding_bag_reference,
    out_columns,
    sparse_grad,
)

__all__ = ["BACKENDS", "CHECKS", "backend_reasons", "check_embedding_errors", "embedding_bag", "multi_embedding_bag"]

BACKENDS = _backends.BACKENDS
_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


# ---------------------------------------------------------------- backend choice


def backend_reasons(weight: Tensor) -> dict[str, list[str]]:
    """For each backend, why it cannot run tables like ``weight`` (empty: it can). Depends on the
    tables' device type and dtype only."""
    dev = weight.device
    return {
        "triton": _backends.triton_reasons_no_f64(dev, weight.dtype, "embedding"),
        "cuda": ["kfuse has no CUDA (csrc) embedding kernels"],
        "cpu": _backends.extension_reasons(dev) if dev.type == "cpu" else [f"the tables are on {dev.type}, not cpu"],
        "reference": [],
    }


def _select(op: str, backend: str, weight: Tensor) -> str:
    return _backends.select_for(op, backend, weight.device, weight.dtype, lambda: backend_reasons(weight),
                                _ORDER.get(weight.device.type, ("reference",)))



# ---------------------------------------------------------------- validation


class _Tables(NamedTuple):
    """What the extension's one pass over the tables found (``_C.embedding_tables``): every table a plain
    tensor the kernels read in place, so one of them stands for all in the routing checks."""

    grad_table: int  # the first table that requires grad, −1: none
    key: tuple[int, ...]  # each table's (address, rows, dim), flattened: the Triton metadata cache's key


@dataclass(frozen=True)
class _Bags:
    """A validated call: the normalised non-tensor arguments."""

    feature_table: list[int]
    padding_idx: list[int]  # per table, −1 = none
    pooling: int
    check: str = "sync"  # how the triton backend reports bad input: see CHECKS
    op: str = "embedding_bag"  # what errors name: the op (or module) the user called
    tables: _Tables | None = None  # from _check_weights, for the call it validated

    @property
    def num_features(self) -> int:
        return len(self.feature_table)


def _check_weights(op: str, weights: object, single: bool = False) -> tuple[list[Tensor], _Tables | None]:
    """The tables' layout checks; ``single``: the one-table op, whose argument is ``weight``. Returns the
    tables as a list and, when the extension's one pass found them all ordinary tensors, their
    :class:`_Tables` (else None: the Python checks passed them, or they are subclasses, wrappers, ...)."""
    if isinstance(weights, Tensor) or not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"kfuse.{op}: weights must be a non-empty list of 2-D tensors; got {type(weights).__name__}")
    ws = list(weights)
    first = ws[0]
    # Dynamo cannot trace is_neg() nor the extension; under torch.compile the registered op checks the tables
    # again, eagerly.
    compiling = torch.compiler.is_compiling()
    ext = _ext()
    if isinstance(first, Tensor) and first.dtype in _FLOATS and ext is not None and not compiling:
        found = ext.embedding_tables(ws)  # the common case in C++: ~1 us at 32 tables
        if found is not None:
            return ws, _Tables(*found)
    for t, w in enumerate(ws):  # the rest (~1 us a table): each check names the table it refuses
        name = "weight" if single else f"weights[{t}]"
        if not isinstance(w, Tensor) or w.dim() != 2 or w.layout != torch.strided:
            got = (type(w).__name__ if not isinstance(w, Tensor) else  # (a sparse one showed its 2-D shape only)
                   f"{tuple(w.shape)}{'' if w.layout == torch.strided else f' {w.layout}'}")
            raise ValueError(f"kfuse.{op}: {name} must be a dense 2-D tensor [rows, dim]; got {got}")
        if w.dtype not in _FLOATS:
            raise TypeError(f"kfuse.{op}: {name} has dtype {w.dtype}; supported: float32, float64, float16, "
                            "bfloat16")
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"kfuse.{op}: every table must share weights[0]'s dtype and device ({first.dtype}, "
                             f"{first.device}); weights[{t}] is {w.dtype} on {w.device}")
        if w.shape[1] < 1:
            raise ValueError(f"kfuse.{op}: {name} has dim 0")
        if not w.is_contiguous():
            raise ValueError(f"kfuse.{op}: {name} must be contiguous (the kernels read rows in place; "
                             f"pass {name}.contiguous())")
        if not compiling and w.is_neg():
            raise ValueError(f"kfuse.{op}: {name} is a lazily negated view (torch._neg_view); the kernels read "
                             f"rows in place: pass {name}.resolve_neg()")
    return ws, None


def _check_options(op: str, sparse: object, backend: object) -> None:
    if not isinstance(sparse, bool):  # e.g. a backend name passed where sparse was
        raise TypeError(f"kfuse.{op}: sparse must be a bool; got {sparse!r}")
    _backends.check_backend_name(op, backend)


def _validate(op: str, weights: list[Tensor], indices: object, offsets: object, feature_table: object, mode: object,
              per_sample_weights: object, padding_idx: object, check: object = "sync",
              tables: _Tables | None = None) -> _Bags:
    """Shape, dtype and device checks that read no tensor values (so no GPU sync); ``tables``: what
    :func:`_check_weights` found of ``weights``."""
    check_mode(f"kfuse.{op}", check)
    w0 = weights[0]
    for name, t in (("indices", indices), ("offsets", offsets)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in _INTS:
            raise ValueError(f"kfuse.{op}: {name} must be a 1-D int32 or int64 tensor; got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}"
                             f"{tuple(t.shape) if isinstance(t, Tensor) else ''}")
        if t.device != w0.device:
            raise ValueError(f"kfuse.{op}: {name} is on {t.device}; the tables are on {w0.device}")
        if t.layout != torch.strided:  # (a sparse one failed deep inside: "unsupported memory format"; fuzz)
            raise ValueError(f"kfuse.{op}: {name} must be a dense (strided) tensor; got {t.layout}")
    if offsets.dtype != indices.dtype:
        raise TypeError(f"kfuse.{op}: offsets ({offsets.dtype}) and indices ({indices.dtype}) must share a dtype")
    ft = list(range(len(weights))) if feature_table is None else feature_table
    if isinstance(ft, Tensor):
        if _routing.tracing():  # (Dynamo's "could not guard on data-dependent expression" from .tolist(); hunt)
            raise ValueError(f"kfuse.{op}: feature_table must be a list of ints under torch.compile (a tensor's "
                             "values are not known while tracing); got a tensor")
        ft = ft.tolist()
    # (The first test, C loops over plain ints, is the common case: 2.0 against 4.1 µs at 32 features.)
    if feature_table is not None and not (
            isinstance(ft, list) and ft and set(map(type, ft)) == {int} and min(ft) >= 0 and max(ft) < len(weights)):
        if not isinstance(ft, (list, tuple)) or not ft or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                   and 0 <= t < len(weights) for t in ft):
            raise ValueError(f"kfuse.{op}: feature_table must be a non-empty list of table numbers in "
                             f"[0, {len(weights)}); got {feature_table!r}")
    if offsets.shape[0] < 1 or (offsets.shape[0] - 1) % len(ft):
        raise ValueError(f"kfuse.{op}: offsets must have F·B + 1 entries (F = {len(ft)} features); got "
                         f"{offsets.shape[0]}")
    if mode not in POOLINGS:
        raise ValueError(f"kfuse.{op}: mode must be 'sum' or 'mean' (kfuse has no 'max'); got {mode!r}")
    pooling = POOLINGS[mode]
    if per_sample_weights is not None:
        psw = per_sample_weights
        if isinstance(psw, Tensor) and psw.layout != torch.strided:
            raise ValueError(f"kfuse.{op}: per_sample_weights must be a dense (strided) tensor; got {psw.layout}")
        if not isinstance(psw, Tensor) or psw.dim() != 1 or psw.shape[0] != indices.shape[0]:
            raise ValueError(f"kfuse.{op}: per_sample_weights must be 1-D with one weight per index "
                             f"({indices.shape[0]}); got {tuple(psw.shape) if isinstance(psw, Tensor) else psw!r}")
        if psw.device != w0.device:
            raise ValueError(f"kfuse.{op}: per_sample_weights is on {psw.device}; the tables are on {w0.device}")
        # embedding_bag: torch.nn.functional.embedding_bag's rule, the table's dtype (no silent cast); the
        # multi-table op also takes them in the accumulation dtype, as FBGEMM and TorchRec pass float32
        # weights with half tables.
        allowed = (w0.dtype,) if op == "embedding_bag" else (w0.dtype, acc_dtype(w0.dtype))
        if psw.dtype not in allowed:
            also = f" or {allowed[1]}" if len(set(allowed)) > 1 else ", as in torch.nn.functional.embedding_bag"
            raise TypeError(f"kfuse.{op}: per_sample_weights must have the tables' dtype ({w0.dtype}){also}; "
                            f"got {psw.dtype}")
        if pooling == MEAN:
            raise ValueError(f"kfuse.{op}: per_sample_weights is only supported with mode='sum' (as in "
                             "torch.nn.functional.embedding_bag)")
    pads = _padding(op, padding_idx, weights)
    return _Bags([int(t) for t in ft], pads, pooling, check, op, tables)


def _as_index(v: object) -> object:
    """``v`` as a Python int when it is an integer other than a bool (an int, a numpy integer, a 0-d
    integer tensor: what torch takes for an index argument; :func:`kfuse._checks.int_or_none`), else ``v``
    unchanged (for the caller to refuse, or to read as one entry per table)."""
    i = _checks.int_or_none(v)
    return v if i is None else i


def _padding(op: str, padding_idx: object, weights: list[Tensor]) -> list[int]:
    """Per-table padding rows (−1 = none); an int applies to every table; negative counts from the end."""
    if padding_idx is None or (type(padding_idx) is list and len(padding_idx) == len(weights)
                               and all(p is None for p in padding_idx)):
        # (The module's padding_idx without padding is a None per table: ~1 us each through the loop below.)
        return [-1] * len(weights)
    one = _as_index(padding_idx)
    if isinstance(one, int):
        items = [one] * len(weights)
    else:
        try:  # one entry per table: a list, tuple, range, 1-D tensor or array
            items = None if isinstance(padding_idx, (str, bytes)) else [_as_index(p) for p in padding_idx]
        except TypeError:  # not iterable (a float, a 0-d float tensor)
            items = None
        if items is None:  # (a type problem, not a length's: error-message hunt)
            raise TypeError(f"kfuse.{op}: padding_idx must be an int, None or one entry per table ({len(weights)}); "
                            f"got {type(padding_idx).__name__} {padding_idx!r}")
    if len(items) != len(weights):
        raise ValueError(f"kfuse.{op}: padding_idx must be an int, None or one entry per table ({len(weights)}); "
                         f"got {padding_idx!r}")
    out = []
    for t, (p, w) in enumerate(zip(items, weights, strict=True)):
        if p is None:
            out.append(-1)
            continue
        if isinstance(p, bool) or not isinstance(p, int):  # (1.5 and True were "not within" a range they are in)
            raise TypeError(f"kfuse.{op}: padding_idx {p!r} for table {t} must be an int or None; got "
                            f"{type(p).__name__}")
        if not -w.shape[0] <= p < w.shape[0]:
            raise ValueError(f"kfuse.{op}: padding_idx {p!r} for table {t} must be within [-{w.shape[0]}, "
                             f"{w.shape[0]})")
        out.append(p % w.shape[0])
    return out


def _past_the_end(op: str, offsets: Tensor, n: int) -> None:
    """Raise if bag starts ``offsets`` (``include_last_offset=False``) lie past the end of input. The
    backends see ``n`` appended as the last offset and would report that offset, which the caller never
    passed, as out of order."""
    off = offsets.long().cpu()
    past = (off > n).nonzero()
    if past.numel():
        i = int(past[0])
        raise ValueError(f"kfuse.{op}: offsets[{i}] = {int(off[i])} is past the end of input (len {n})") from None


def _check_values(op: str, rows: Sequence[int], indices: Tensor, offsets: Tensor, bags: _Bags) -> None:
    """The index and offset checks, on the host (the reference backend; the C++ kernels make their own), for
    tables of ``rows`` rows each (:func:`_rows`)."""
    off = offsets.long().cpu()
    idx = indices.long().cpu()
    if off[0] != 0:
        raise ValueError(f"kfuse.{op}: offsets must start at 0; got offsets[0] = {int(off[0])}")
    if off[-1] != idx.numel():
        raise ValueError(f"kfuse.{op}: offsets must end at len(indices) = {idx.numel()}; got offsets[-1] = "
                         f"{int(off[-1])}")
    bad = (off[1:] < off[:-1]).nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"kfuse.{op}: offsets must be non-decreasing: offsets[{i}] = {int(off[i])} < "
                         f"offsets[{i - 1}] = {int(off[i - 1])}")
    batch = (off.numel() - 1) // bags.num_features
    for f, t in enumerate(bags.feature_table):
        lo, hi = int(off[f * batch]), int(off[(f + 1) * batch])
        seg = idx[lo:hi]
        bad = ((seg < 0) | (seg >= rows[t])).nonzero()
        if bad.numel():
            i = lo + int(bad[0])
            raise IndexError(f"kfuse.{op}: indices[{i}] = {int(idx[i])} is out of range [0, {rows[t]}) "
                             f"for feature {f} (table {t})")


# ---------------------------------------------------------------- bad input found by the GPU kernels

#: How the ``triton`` backend reports bad indices or offsets (the ``cpu`` and ``reference`` backends check
#: on the host before reading a row, and always raise at the call). Either way the kernels never read or
#: write out of bounds: a bad index contributes nothing, a bad offset is clamped.
#:
#: - ``"sync"`` (default): the call reads the kernel's error flag and raises there: one host sync per
#:   forward, so the host cannot run ahead of the GPU.
#: - ``"async"``: the flag goes to pinned host memory with the call's stream; a later call of either op
#:   (any check mode) raises the error once the flag has arrived, naming the earlier call's argument, and
#:   :func:`check_embedding_errors` raises it on demand (at the end of an epoch, say). The pending flags
#:   are the process's, not a thread's: with several threads (a server's requests), a call may raise
#:   another thread's earlier error, so where threads must not see each other's bad input use ``"sync"``.
#:
#: Under CUDA-graph capture (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``) neither reads
#: a flag, which a capture cannot do: a replay reports nothing (the kernels still mask bad input). A call on
#: another thread meanwhile may poll an ``"async"`` flag's event, which the default capture mode ("global")
#: refuses: capture with ``capture_error_mode="thread_local"`` where other threads call these ops.
CHECKS = ("sync", "async")


def check_mode(where: str, check: object) -> None:
    """``ValueError`` unless ``check`` is one of :data:`CHECKS` (``where``: the op or module, for the message)."""
    if check not in CHECKS:
        raise ValueError(f"{where}: check must be one of {CHECKS}; got {check!r}")


def _rows(weights: list[Tensor]) -> list[int]:
    """Each table's row count: what :func:`_check_values` needs of the tables."""
    return [w.shape[0] for w in weights]


@dataclass
class _Deferred:
    """A ``check="async"`` call's error flag on its way to the host, and its arguments to name the error by."""

    flag: Tensor  # int32 [2]: on the host (pinned) for CUDA calls; the interpreter's own CPU flag
    event: object  # torch.cuda.Event recorded after the copy, or None (already on the host)
    rows: list[int]  # the tables' row counts, not the tables: a pending call held them (64 MB of a deleted
    # module's table until the next call; leak hunt)
    indices: Tensor
    offsets: Tensor
    bags: _Bags
    # The calling op's own argument names for the error (embedding_bag's input and offsets), or None.
    rename: Callable[[Exception], Exception | None] | None = None


_DEFERRED: list[_Deferred] = []
# Guards _DEFERRED: a record leaves it only once its flag has been taken for checking, so no thread can find
# the list emptied by another thread's look at flags still on their way (concurrency hunt, 2026-12-05:
# check_embedding_errors() returned cleanly after this thread's bad call while another thread's poll held
# every pending record aside; 33 of 300 tries).
_DEFERRED_LOCK = threading.Lock()
# The calling thread's last _Deferred record: embedding_bag names its own record's error, not one another
# thread appended meanwhile (concurrency review 2026-12-05: it took _DEFERRED[-1]).
_LAST = threading.local()


def _defer(flag: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags) -> None:
    event = None
    if flag.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return  # a replay runs the kernel, not this bookkeeping
        host = torch.empty(2, dtype=torch.int32, device="cpu", pin_memory=True)
        host.copy_(flag, non_blocking=True)  # on the flag's device's current stream
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flag.device))  # that stream, whichever device is current
        flag = host
    rows = _rows(weights) if bags.tables is None else list(bags.tables.key[1::3])
    record = _Deferred(flag, event, rows, indices, offsets, bags)
    with _DEFERRED_LOCK:
        _DEFERRED.append(record)
    _LAST.record = weakref.ref(record)  # (a reference would keep its tensors after it is reported)


def check_embedding_errors(wait: bool = True) -> None:
    """Raise the first bad input found by ``check="async"`` calls of :func:`multi_embedding_bag` and
    :func:`embedding_bag` not yet reported (each error is raised once).

    Args:
        wait: wait for every pending call's flag (one sync with each call's stream); False looks only at
            flags already on the host (no sync: what every call of these ops does first).
    Raises:
        IndexError (an index outside its table) or ValueError (bad offsets), as the call would have with
        ``check="sync"``, naming that call's argument. RuntimeError when waiting during CUDA-graph capture.
    """
    # During a CUDA-graph capture (default mode) an event query or wait invalidates the capture: a forward
    # captured after a check="async" warm-up call polled that call's event (GPU review, 2026-12-05). Flags
    # still on their way are left for a call after the capture.
    capturing = (any(d.event is not None for d in _DEFERRED) and torch.cuda.is_available()
                 and torch.cuda.is_current_stream_capturing())
    if capturing and wait:
        raise RuntimeError("kfuse.check_embedding_errors: cannot wait for check='async' flags during CUDA-graph "
                           "capture (it would invalidate the capture); call it before or after")
    while True:
        with _DEFERRED_LOCK:  # the oldest record to check: any when waiting, else one whose flag has arrived
            i = next((i for i, d in enumerate(_DEFERRED)
                      if wait or d.event is None or (not capturing and d.event.query())), None)
            if i is None:
                return
            d = _DEFERRED.pop(i)
        if d.event is not None:
            d.event.synchronize()  # (outside the lock: other threads' calls go on meanwhile)
        if d.flag.tolist() != [_tk().NO_ERROR, _tk().NO_ERROR]:
            err = _deferred_error(d)
            err = (d.rename(err) if d.rename is not None else None) or err
            raise type(err)(f"{err} [found after that call returned: check='async'; positions count the "
                            "call's flattened indices]") from None


def poll_errors() -> None:
    """:func:`check_embedding_errors` without waiting, when a ``check="async"`` call is pending: what every
    call of the ops does first."""
    if _DEFERRED:
        check_embedding_errors(wait=False)


def _raise_bad_input(flag: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags) -> None:
    """Raise for a kernel flag that recorded bad input (read at the call): the host checks name the
    argument, as the other backends do."""
    _check_values(bags.op, _rows(weights), indices, offsets, bags)
    _tk().check_flag(flag, indices, offsets)


def _deferred_error(d: _Deferred) -> Exception:
    """The error a ``check="async"`` call's flag recorded. The tensors may have changed since the kernel
    read them (a staging buffer refilled), so the host checks' message is used only where it names the
    flag's own position; otherwise the flag's position alone, without a value."""
    bad_index, bad_offset = d.flag.tolist()
    op = d.bags.op
    if bad_offset != _tk().NO_ERROR:
        token = f"offsets[{bad_offset}]"
        err: Exception = ValueError(
            f"kfuse.{op}: offsets[{bad_offset}] broke the offsets' rules (from 0, non-decreasing, to "
            "len(indices)) when that call read them (they have changed since)")
    else:
        token = f"indices[{bad_index}] ="
        err = IndexError(f"kfuse.{op}: indices[{bad_index}] was out of range of its feature's table when that "
                         "call read it (it has changed since)")
    try:
        _check_values(op, d.rows, d.indices, d.offsets, d.bags)
    except (IndexError, ValueError) as now:
        if token in str(now):
            return now
    return err


# ---------------------------------------------------------------- implementations


def _ext():
    return _backends.extension()


def _tk():
    from kfuse.triton_kernels import embedding as tk  # noqa: PLC0415 (triton is optional)

    return tk


def _kernel_psw(psw: Tensor | None, weights: list[Tensor]) -> Tensor | None:
    """``per_sample_weights`` (in the tables' dtype) as every backend takes them: in the accumulation dtype
    (an exact conversion)."""
    return None if psw is None else psw.to(acc_dtype(weights[0].dtype))


def _flat(indices: Tensor, offsets: Tensor, psw: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The kernels read indices, offsets and per-sample weights as flat arrays; strided views (``idx[::2]``)
    are valid input, as for torch, so every implementation takes its tensors through here."""
    return _backends.dense(indices), _backends.dense(offsets), _backends.dense(psw)


def _cpu(where: str, kernel: Callable[..., object], *args: object) -> Any:
    """``kernel(*args)``, a C++ CPU kernel: its errors for bad indices or offsets (IndexError, ValueError, which
    name the argument) get ``where``, the op's name, in front, as the other backends' do (layout hunt,
    2026-12-05: ``indices[0] = 5 is out of range ...`` alone)."""
    try:
        return kernel(*args)
    except (IndexError, ValueError) as e:
        raise type(e)(f"{where}: {e}") from None


def _plain_features(weights: object, feature_table: object, padding_idx: object) -> bool:
    """Whether a call's features are its tables one for one, without padding: ``feature_table`` None or
    ``[0, 1, …, T - 1]`` (ints), ``padding_idx`` None or one None per table (what MultiTableEmbeddingBag
    passes for its defaults)."""
    if type(weights) is not list:
        return False
    n = len(weights)
    if feature_table is not None and not (type(feature_table) is list and len(feature_table) == n
                                          and all(type(t) is int and t == k for k, t in enumerate(feature_table))):
        return False
    return padding_idx is None or (type(padding_idx) is list and len(padding_idx) == n
                                   and all(p is None for p in padding_idx))


def _cpu_fast(weights: object, indices: object, offsets: object, mode: object, backend: object, sparse: object,
              check: object, append_last: bool = False, per_sample_weights: object = None,
              op: str = "multi_embedding_bag") -> Tensor | None:
    """The common eager call on the CPU, handed to the extension in one call (``_C.embedding_forward_fast``, which
    makes the checks that choose it: ordinary CPU tables, indices and offsets, no jit trace or dispatch mode):
    ``sum`` or ``mean`` pooling, each feature its own table, no per-sample weights or padding (the callers check
    those), no ``torch.compile`` or forward-mode AD (checked here). Tables that need a gradient take the same call
    under autograd (:class:`_CpuFastEmbeddingBag`; per-sample weights that need one take the full path).
    ``sparse`` (a bool) shapes only the gradient: ``nn.EmbeddingBag(sparse=True)`` under ``no_grad`` took 121 µs at
    512 bags of 20 (100k x 64) against 91 (CPU hunt, 2026-12-07). The extension checks every layout and value it
    reads; when it declines or refuses, None: the full path then runs (and names the error). ``append_last``:
    ``offsets`` holds the bags' starts only (``include_last_offset=False``); ``offsets`` None: one table and 2-D
    ``indices`` (bags of equal length); ``per_sample_weights``: input's shape, the table's dtype (``sum``;
    :func:`embedding_bag`'s rule); ``op``: what a backward's errors name.
    Why: on a single table the full path's Python (12 µs a call with warm caches, ~85 µs cold after a kernel
    that streamed megabytes) made ``kfuse.embedding_bag`` 1.2-4.7x torch's time where the kernel alone matches
    or beats it (bench/results/2026-12-06-cpu-embedding-single-table.md); with gradients, ~130 µs of Python a
    forward made ``nn.EmbeddingBag`` 1.7x torch's (2026-12-07: 100k x 64, 512 bags of 20, 1 thread)."""
    if (type(backend) is not str or (backend != "auto" and backend != "cpu") or type(sparse) is not bool
            or type(check) is not str or check not in CHECKS or type(mode) is not str or mode not in POOLINGS
            or type(weights) is not list
            or torch.compiler.is_compiling() or _routing.forward_ad_active()):
        return None
    ext = _ext()
    if ext is None:
        return None
    try:
        with _routing.labelled(f"kfuse.{op}"):
            out = ext.embedding_forward_fast(weights, indices, offsets, POOLINGS[mode], append_last,
                                             per_sample_weights)
            if (out is not None or not torch.is_grad_enabled() or _routing.transform_active()
                    or (isinstance(per_sample_weights, Tensor) and per_sample_weights.requires_grad)):
                return out  # (torch.func's wrapped tensors: the extension declined them; the full path's reference)
            return _CpuFastEmbeddingBag.apply(indices, offsets, _plain_bags(len(weights), POOLINGS[mode], op),
                                              sparse, append_last, per_sample_weights, *weights)
    except (RuntimeError, ValueError, IndexError, TypeError, _Declined):
        return None


_PLAIN_BAGS: dict[tuple[int, int, str], _Bags] = {}


def _plain_bags(num_tables: int, pooling: int, op: str) -> _Bags:
    """The :class:`_Bags` of a :func:`_cpu_fast` call (one feature per table, no padding), made once per kind."""
    key = (num_tables, pooling, op)
    bags = _PLAIN_BAGS.get(key)
    if bags is None:
        bags = _PLAIN_BAGS[key] = _Bags(list(range(num_tables)), [-1] * num_tables, pooling, "sync", op)
    return bags


def _forward_impl(weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags, psw: Tensor | None,
                  backend: str) -> Tensor:
    indices, offsets, psw = _flat(indices, offsets, psw)
    if backend == "cpu":
        return _cpu(f"kfuse.{bags.op}", _ext().embedding_forward, weights, indices, offsets, bags.feature_table,
                    bags.padding_idx, bags.pooling, psw)
    if backend == "triton":
        tk = _tk()
        out, flag = tk.forward(weights, indices, offsets, bags.feature_table, bags.padding_idx, bags.pooling, psw,
                               checked_tables=True,  # every caller checked them (_check_weights)
                               tables_key=None if bags.tables is None else bags.tables.key)
        # The kernel never reads out of bounds (bad indices are masked, offsets clamped) and records the
        # first bad position in `flag`. check="sync" reads it now: the call's one host sync (on an H200 the
        # op took 0.213 ms where its kernel took 0.043, bench/results/2026-12-04-h200/); "async" later.
        if bags.check == "async":
            _defer(flag, weights, indices, offsets, bags)
        elif flag.is_cuda and torch.cuda.is_current_stream_capturing():
            pass  # the read would invalidate the capture (a registered op always checks "sync"; GPU review)
        elif flag.tolist() != [tk.NO_ERROR, tk.NO_ERROR]:
            _raise_bad_input(flag, weights, indices, offsets, bags)
        return out
    _check_values(bags.op, _rows(weights), indices, offsets, bags)
    return multi_embedding_bag_reference(weights, indices, offsets, bags.feature_table, bags.pooling, psw,
                                         bags.padding_idx)


def _reference_vjp(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags,
                   psw: Tensor | None, need_w: list[bool], need_psw: bool,
                   create_graph: bool = False) -> tuple[list[Tensor | None], Tensor | None]:
    """Dense gradients of the reference (each in its input's dtype) by autograd."""
    with torch.enable_grad():
        def leaf(t: Tensor, need: bool) -> Tensor:  # keeps the graph to t when it must be differentiable
            return t if create_graph and t.requires_grad else t.detach().requires_grad_(need)

        ws = [leaf(w, n) for w, n in zip(weights, need_w, strict=True)]
        p = None if psw is None else leaf(psw, need_psw)
        out = multi_embedding_bag_reference(ws, indices, offsets, bags.feature_table, bags.pooling, p,
                                            bags.padding_idx)
        inputs = [w for w, n in zip(ws, need_w, strict=True) if n] + ([p] if need_psw else [])
        got = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True, create_graph=create_graph))
    grads: list[Tensor | None] = []
    for w, n in zip(ws, need_w, strict=True):
        g = got.pop(0) if n else None
        grads.append(torch.zeros_like(w) if n and g is None else g)
    g_psw = got.pop(0) if need_psw else None
    return grads, (torch.zeros_like(psw) if need_psw and g_psw is None else g_psw)


def _sparse_impl(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags,
                 psw: Tensor | None, backend: str) -> list[tuple[Tensor, Tensor]]:
    """Per table: (unique rows int64 ``[U]`` ascending, summed gradients ``[U, dim]`` accumulation dtype)."""
    indices, offsets, psw = _flat(indices, offsets, psw)
    grad_out = _backends.dense(grad_out)
    if backend == "cpu":
        return _cpu(f"kfuse.{bags.op}", _ext().embedding_backward_sparse, grad_out, weights, indices, offsets,
                    bags.feature_table, bags.padding_idx, bags.pooling, psw)
    if backend == "triton":
        return _tk().backward_sparse(grad_out, weights, indices, offsets, bags.feature_table,
                                     bags.padding_idx, bags.pooling, psw)
    _check_values(bags.op, _rows(weights), indices, offsets, bags)
    dense, _ = multi_embedding_bag_backward_reference(grad_out, weights, indices, offsets, bags.feature_table,
                                                      bags.pooling, psw, bags.padding_idx)
    acc = acc_dtype(weights[0].dtype)
    return [(rows, vals.to(acc)) for rows, vals in (
        sparse_grad(g, indices, offsets, bags.feature_table, t, bags.padding_idx[t]) for t, g in enumerate(dense))]


def _psw_impl(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags,
              psw: Tensor, backend: str) -> Tensor:
    indices, offsets, psw = _flat(indices, offsets, psw)
    grad_out = _backends.dense(grad_out)
    if backend == "cpu":
        return _cpu(f"kfuse.{bags.op}", _ext().embedding_backward_psw, grad_out, weights, indices, offsets,
                    bags.feature_table, bags.padding_idx)
    if backend == "triton":
        return _tk().backward_psw(grad_out, weights, indices, offsets, bags.feature_table,
                                  bags.padding_idx)
    _check_values(bags.op, _rows(weights), indices, offsets, bags)
    g_psw = multi_embedding_bag_backward_reference(grad_out, weights, indices, offsets, bags.feature_table,
                                                   bags.pooling, psw, bags.padding_idx)[1]
    return g_psw.to(psw.dtype)


def _densify(rows: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    # Zeros in weight's dtype, then the (few) rows cast: a float32 [rows, D] zeros cast afterwards
    # peaked at 3x a half table's gradient (fp16, 4M x 64: 1536 MiB against torch's 544; bug hunt).
    out = torch.zeros(weight.shape, dtype=weight.dtype, device=vals.device)
    return out.index_copy_(0, rows.to(vals.device), vals.to(weight.dtype))


def _sparsify(rows: Tensor, vals: Tensor, weight: Tensor) -> Tensor:
    # Unique ascending rows by construction: a valid coalesced tensor (no invariant check needed).
    return torch.sparse_coo_tensor(rows.to(weight.device).unsqueeze(0), vals.to(weight.dtype), weight.shape,
                                   is_coalesced=True, check_invariants=False)


def _backward_impl(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags,
                   psw: Tensor | None, need_w: list[bool], need_psw: bool, sparse: bool,
                   backend: str) -> tuple[list[Tensor | None], Tensor | None]:
    grads: list[Tensor | None] = [None] * len(weights)
    if any(need_w) and backend == "cpu":
        # Dense: written in place, no row-sparse copy first. Sparse: the COO tensors built by the extension (in
        # Python, ~14 µs a table with warm caches).
        flat_indices, flat_offsets, flat_psw = _flat(indices, offsets, psw)
        kernel = _ext().embedding_backward_sparse_coo if sparse else _ext().embedding_backward_dense
        grads = _cpu(f"kfuse.{bags.op}", kernel, _backends.dense(grad_out), weights, flat_indices, flat_offsets,
                     bags.feature_table, bags.padding_idx, bags.pooling, flat_psw, need_w)
    elif any(need_w):
        parts = _sparse_impl(grad_out, weights, indices, offsets, bags, psw, backend)
        make = _sparsify if sparse else _densify
        grads = [make(r, v, w) if n else None for (r, v), w, n in zip(parts, weights, need_w, strict=True)]
    g_psw = _psw_impl(grad_out, weights, indices, offsets, bags, psw, backend) if need_psw else None
    return grads, g_psw


# ---------------------------------------------------------------- registered ops


@torch.library.custom_op("kfuse::embedding_bag_forward", mutates_args=())
def embedding_bag_forward(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int],
                          padding_idx: list[int], pooling: int, per_sample_weights: Tensor | None,
                          backend: str, caller: str = "") -> Tensor:
    """Registered forward: tables ``weights`` (one dtype), ``indices [N]`` / ``offsets [F·B + 1]`` (int32
    or int64, the same), ``per_sample_weights [N]`` in the accumulation dtype or None; returns
    ``[B, Σ_f dim_{feature_table[f]}]`` in the tables' dtype. ``caller``: the public op whose compiled graph
    holds this call, which names its errors in that op's terms (:func:`_caller_error`); "" for none."""
    try:
        weights, bags = _check_op_args("embedding_bag_forward", weights, indices, offsets, feature_table,
                                       padding_idx, pooling, per_sample_weights)
        chosen = _select("embedding_bag_forward", backend, weights[0])
        return _forward_impl(weights, indices, offsets, bags, per_sample_weights, chosen)
    except (ValueError, IndexError) as err:
        named = _caller_error(err, caller, indices, offsets, weights)
        if named is None:
            raise
        raise named from None


def _caller_error(err: Exception, caller: str, indices: Tensor, offsets: Tensor, weights: list[Tensor]
                  ) -> Exception | None:
    """``err`` in the terms of the public op ``caller`` (None: it stands). A compiled graph runs the registered
    op, outside the public op's own renaming: ``kfuse.embedding_bag`` under torch.compile named the flat
    ``indices[3]`` of a 2-D input and, as out of order, the last offset it had appended itself (fuzz, 2026-12-08).
    ``caller``: ``"multi_embedding_bag"``, ``"embedding_bag:1d:<include_last_offset 0/1>"`` or
    ``"embedding_bag:2d:<input's columns>"``."""
    parts = caller.split(":")
    public = parts[0]
    if public not in ("multi_embedding_bag", "embedding_bag"):
        return None
    named = None
    if public == "embedding_bag" and len(parts) == 3 and weights and all(isinstance(t, Tensor)
                                                                         for t in (indices, offsets)):
        n, two_d, value = indices.shape[0], parts[1] == "2d", int(parts[2])
        shape = (n // value if value else 0, value) if two_d else (n,)
        last = not two_d and value == 1
        user_offsets = None if two_d else offsets if last else offsets[:-1]
        named = _rename_for_embedding_bag(err, input_shape=shape, offsets=user_offsets, include_last_offset=last,
                                          rows=weights[0].shape[0], host_values=not two_d)
    if named is not None:
        return named
    message = str(err).replace("kfuse.embedding_bag_forward:", f"kfuse.{public}:", 1)
    return type(err)(message) if message != str(err) else None


def _check_op_args(op: str, weights: object, indices: object, offsets: object, feature_table: object,
                   padding_idx: object, pooling: object, per_sample_weights: object) -> tuple[list[Tensor], _Bags]:
    """The registered ops' checks (they are public, ``torch.ops.kfuse``): the public ops' own, on their
    arguments in the ops' form (``pooling`` 0 or 1; ``padding_idx`` one row per table, −1 = none). Called
    directly with bad ones, the reference backend raised bare errors from inside (``pooling=5``: a tuple
    index out of range) or took what the C++ kernels refuse (bad-input fuzz, 2026-12-05)."""
    ws, _ = _check_weights(op, weights)
    mode = {SUM: "sum", MEAN: "mean"}.get(pooling) if type(pooling) is int else None
    if mode is None:
        raise ValueError(f"kfuse.{op}: pooling must be 0 (sum) or 1 (mean); got {pooling!r}")
    if not isinstance(padding_idx, (list, tuple)) or len(padding_idx) != len(ws) or not all(
            type(p) is int and -1 <= p < w.shape[0] for p, w in zip(padding_idx, ws, strict=False)):
        raise ValueError(f"kfuse.{op}: padding_idx must hold one row per table ({len(ws)}), each -1 (none) or in "
                         f"[0, rows); got {padding_idx!r}")
    acc = acc_dtype(ws[0].dtype)
    if isinstance(per_sample_weights, Tensor) and per_sample_weights.dtype != acc:
        # (the public ops convert them; the tables' half dtype reached the backends as it was: the cpu one
        # refused it from C++, the reference computed in half: review of the change)
        raise TypeError(f"kfuse.{op}: per_sample_weights must be in the accumulation dtype ({acc}); got "
                        f"{per_sample_weights.dtype}")
    pads = [None if p == -1 else p for p in padding_idx]
    return ws, _validate(op, ws, indices, offsets, list(feature_table), mode, per_sample_weights, pads)


@embedding_bag_forward.register_fake
def _(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights, backend, caller=""):
    _backends.check_backend_name("embedding_bag_forward", backend)
    _checks.one_device("kfuse.embedding_bag_forward", weights=list(weights), indices=indices, offsets=offsets,
                       per_sample_weights=per_sample_weights)
    width = out_columns([w.shape[1] for w in weights], list(feature_table))[-1]
    return weights[0].new_empty(((offsets.shape[0] - 1) // len(feature_table), width))


@torch.library.custom_op("kfuse::embedding_bag_backward", mutates_args=())
def embedding_bag_backward(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor,
                           feature_table: list[int], padding_idx: list[int], pooling: int,
                           per_sample_weights: Tensor | None, need_psw: bool,
                           backend: str) -> tuple[list[Tensor], Tensor]:
    """Registered backward: the tables' dense gradients (each like its table) and the gradient of
    ``per_sample_weights`` (``[N]``, or ``[0]`` when ``need_psw`` is False)."""
    op = "embedding_bag_backward"
    ws, bags = _check_op_args(op, weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights)
    want = ((offsets.shape[0] - 1) // bags.num_features, out_columns([w.shape[1] for w in ws], bags.feature_table)[-1])
    if not isinstance(grad_out, Tensor) or tuple(grad_out.shape) != want or grad_out.dtype != ws[0].dtype \
            or grad_out.device != ws[0].device:
        got = (f"{list(grad_out.shape)} {grad_out.dtype} on {grad_out.device}" if isinstance(grad_out, Tensor)
               else type(grad_out).__name__)
        raise ValueError(f"kfuse.{op}: grad_out must be {list(want)} in the tables' dtype and device ({ws[0].dtype}, "
                         f"{ws[0].device}); got {got}")
    if need_psw and per_sample_weights is None:
        raise ValueError(f"kfuse.{op}: need_psw=True needs per_sample_weights")
    chosen = _select(op, backend, ws[0])
    grads, g_psw = _backward_impl(grad_out, ws, indices, offsets, bags, per_sample_weights, [True] * len(ws),
                                  need_psw, False, chosen)
    return grads, g_psw if g_psw is not None else grad_out.new_empty(0)


@embedding_bag_backward.register_fake
def _(grad_out, weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights, need_psw, backend):
    _backends.check_backend_name("embedding_bag_backward", backend)
    _checks.one_device("kfuse.embedding_bag_backward", grad_out=grad_out, weights=list(weights), indices=indices,
                       offsets=offsets, per_sample_weights=per_sample_weights)
    psw = per_sample_weights.new_empty(per_sample_weights.shape) if need_psw else grad_out.new_empty(0)
    return [w.new_empty(w.shape) for w in weights], psw


def _save_tables(ctx, indices: Tensor, offsets: Tensor, psw: Tensor | None, weights: Sequence[Tensor]) -> None:
    """Saves the backward's inputs. The tables' values are read only for the per_sample_weights gradient.
    Without it, leaf tables (parameters) are kept on ctx for their shapes, outside autograd's version check:
    one updated in place between forward and backward (another optimizer's step on a shared table) gets its
    gradient, as with torch's embedding_bag (func hunt: the cpu backend refused it, the reference did not).
    Computed tables stay saved, so that checkpointing, saved-tensor hooks and the end of the backward release
    them as before (review: kept on ctx, they lived as long as the output)."""
    keep = not (psw is not None and psw.requires_grad) and all(w.grad_fn is None for w in weights)
    ctx.save_for_backward(indices, offsets, psw, *(() if keep else weights))
    ctx.tables = list(weights) if keep else None


def _saved_tables(ctx) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
    indices, offsets, psw, *weights = ctx.saved_tensors
    return indices, offsets, psw, weights if ctx.tables is None else ctx.tables


def _setup_context(ctx, inputs, output) -> None:
    weights, indices, offsets, feature_table, padding_idx, pooling, psw, backend, _caller = inputs
    _save_tables(ctx, indices, offsets, psw, weights)
    ctx.bags = _Bags(list(feature_table), list(padding_idx), pooling)
    ctx.backend = _select("embedding_bag_forward", backend, weights[0])


def _read_only(need_w: list[bool], bags: _Bags) -> list[bool]:
    """``need_w`` for the tables some feature reads: a table no feature reads gets no gradient (None), as in
    autograd. It got zeros from the kernels, which a weight-decaying optimizer then applied to a table the
    model never used (edge-semantics hunt, 2026-12-07)."""
    read = set(bags.feature_table)
    return [n and t in read for t, n in enumerate(need_w)]


def _registered_backward(ctx, grad_out: Tensor):
    indices, offsets, psw, weights = _saved_tables(ctx)
    need_w = list(ctx.needs_input_grad[0]) if isinstance(ctx.needs_input_grad[0], (list, tuple)) else \
        [bool(ctx.needs_input_grad[0])] * len(weights)
    need_w = _read_only(need_w, ctx.bags)
    need_psw = psw is not None and ctx.needs_input_grad[6]
    if _routing.differentiable_backward(grad_out):
        grads, g_psw = _reference_vjp(grad_out, weights, indices, offsets, ctx.bags, psw, need_w, need_psw,
                                      create_graph=True)
    else:
        grads, g_psw = embedding_bag_backward(grad_out, weights, indices, offsets, ctx.bags.feature_table,
                                              ctx.bags.padding_idx, ctx.bags.pooling, psw, need_psw, ctx.backend)
        grads = [g if need else None for g, need in zip(grads, need_w, strict=True)]
        g_psw = g_psw if need_psw else None
    return grads, None, None, None, None, None, g_psw, None, None


embedding_bag_forward.register_autograd(_registered_backward, setup_context=_setup_context)


class _EagerEmbeddingBag(torch.autograd.Function):
    """Eager path: the implementations without the custom-op dispatch; dense or sparse gradients."""

    @staticmethod
    def forward(ctx, indices: Tensor, offsets: Tensor, bags: _Bags, sparse: bool, backend: str,
                psw: Tensor | None, *weights: Tensor) -> Tensor:
        _save_tables(ctx, indices, offsets, psw, weights)
        ctx.bags, ctx.sparse, ctx.backend = bags, sparse, backend
        return _forward_impl(list(weights), indices, offsets, bags, psw, backend)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        indices, offsets, psw, weights = _saved_tables(ctx)
        need_w = _read_only(list(ctx.needs_input_grad[6:]), ctx.bags)
        need_psw = psw is not None and ctx.needs_input_grad[5]
        if _routing.differentiable_backward(grad_out):
            if ctx.bags.check == "async":
                # The kernels skipped bad indices, which the reference below would index with (torch's own
                # error, or a device assert): the forward's error first (once), or the host's check.
                check_embedding_errors()
                _check_values(ctx.bags.op, _rows(weights), indices, offsets, ctx.bags)
            grads, g_psw = _reference_vjp(grad_out, weights, indices, offsets, ctx.bags, psw, need_w, need_psw,
                                          create_graph=True)
        elif torch.compiler.is_compiling() and not ctx.sparse:
            # Compiled autograd traces this: the graph records the registered op (dense gradients), as
            # ops/deu.py's and ops/lora.py's eager backwards do. Sparse gradients stay eager-only.
            grads, g_psw = embedding_bag_backward(grad_out, weights, indices, offsets, ctx.bags.feature_table,
                                                  ctx.bags.padding_idx, ctx.bags.pooling, psw, need_psw, ctx.backend)
            grads = [g if need else None for g, need in zip(grads, need_w, strict=True)]
            g_psw = g_psw if need_psw else None
        else:
            grads, g_psw = _backward_impl(grad_out, weights, indices, offsets, ctx.bags, psw, need_w, need_psw,
                                          ctx.sparse, ctx.backend)
        return None, None, None, None, None, g_psw, *grads


class _Declined(Exception):
    """The extension declined a :class:`_CpuFastEmbeddingBag` call: the full path runs it."""


class _CpuFastEmbeddingBag(_EagerEmbeddingBag):
    """:func:`_cpu_fast`'s calls whose tables need a gradient: the extension's checks and forward in one call (grad
    mode is off in here), saving what :class:`_EagerEmbeddingBag`'s backward reads; same inputs but ``append_last``
    (a bool) in place of ``backend`` (``cpu``)."""

    @staticmethod
    def forward(ctx, indices: Tensor, offsets: Tensor | None, bags: _Bags, sparse: bool, append_last: bool,
                psw: Tensor | None, *weights: Tensor) -> Tensor:
        got = _ext().embedding_forward_fast(list(weights), indices, offsets, bags.pooling, append_last, psw, True)
        if got is None:
            raise _Declined
        out, flat_indices, full_offsets, kernel_psw = got
        _save_tables(ctx, flat_indices, full_offsets, kernel_psw, weights)
        ctx.bags, ctx.sparse, ctx.backend = bags, sparse, "cpu"
        return out


# ---------------------------------------------------------------- public ops


def _run(op: str, weights: list[Tensor], indices: Tensor, offsets: Tensor, bags: _Bags, psw: Tensor | None,
         sparse: bool, backend: str, caller: str) -> Tensor:
    """Route a validated call (``psw`` already in the accumulation dtype; ``caller``: the registered op's, which
    see)."""
    chosen = _select(op, backend, weights[0])
    if bags.tables is not None and not _routing.forward_ad_active():
        # Every table is a plain tensor, unwrapped (_check_weights' C++ pass), so one stands for all in the
        # routing checks: the first requiring grad, if any (~10 us at 32 tables). Tangents it did not look for.
        tensors = (weights[max(bags.tables.grad_table, 0)], indices, offsets, psw)
    else:
        tensors = (*weights, indices, offsets, psw)
    path = _routing.route(chosen, tensors)
    if (path == _routing.REFERENCE and sparse and chosen == "reference" and _routing.needs_grad(tensors)
            and not _routing.tracing() and not _routing.transformed(tensors)):
        # The reference's forward and backward, with sparse gradients (not under torch.func transforms,
        # which the autograd.Function cannot take: they get dense ones, as the other backends give; bug hunt).
        path = _routing.EAGER
    if weights[0].device.type == "meta" or (path == _routing.REFERENCE and _routing.tracing()):
        # Shapes only: the registered op's fake kernel (the reference slices features by their offsets'
        # values, which meta tensors do not have: 'Tensor.item() cannot be called'; bug hunt). Under
        # torch.compile too, whose graph then holds the registered op (checked at run time, as the other
        # backends'): inlined, the reference skipped its value checks (offsets going down gave wrong bags,
        # silently) and broke the graph at every feature's slice (fullgraph=True failed from 2 features on;
        # compile hunt, 2026-12-07).
        path = _routing.REGISTERED
    if path == _routing.REFERENCE:
        if bags.num_features > 1 and _routing.vmapped(offsets):
            # The reference slices the features by their offsets' values, which a vmap over offsets cannot
            # read (functorch's .item() error from deep inside; func hunt). One feature needs no slicing.
            raise ValueError(f"kfuse.{op}: vmap over offsets needs one feature (here {bags.num_features}); loop "
                             "over the batch instead")
        # vmap over indices or offsets: each batch entry's values (nonzero of a batched tensor failed)
        idx_values, off_values = _routing.functorch_values(indices), _routing.functorch_values(offsets)
        for k in range(max(len(idx_values), len(off_values))):
            _check_values(op, _rows(weights), idx_values[k % len(idx_values)], off_values[k % len(off_values)], bags)
        return multi_embedding_bag_reference(weights, indices, offsets, bags.feature_table, bags.pooling, psw,
                                             bags.padding_idx)
    if path == _routing.REGISTERED:
        if sparse:
            raise ValueError(f"kfuse.{op}: sparse=True gradients are eager-only (torch.compile, tensor subclasses "
                             "and dispatch modes, selective activation checkpointing's context_fn among them, get "
                             "the registered ops, whose gradients are dense)")
        return embedding_bag_forward(weights, indices, offsets, bags.feature_table, bags.padding_idx, bags.pooling,
                                     psw, chosen, caller)
    if _routing.needs_grad(tensors):
        return _EagerEmbeddingBag.apply(indices, offsets, bags, sparse, chosen, psw, *weights)
    with _routing.labelled(f"kfuse.{op}"):
        return _forward_impl(weights, indices, offsets, bags, psw, chosen)


def multi_embedding_bag(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int] | None = None,
                        mode: str = "sum", per_sample_weights: Tensor | None = None,
                        padding_idx: int | list[int | None] | None = None, *, sparse: bool = False,
                        backend: str = "auto", check: str = "sync") -> Tensor:
    """Pooled embedding lookups of ``F`` features over ``T`` tables in one call.

    Args:
        weights: ``T`` tables, ``weights[t] [rows_t, dim_t]``, contiguous, one dtype (float32, float16,
            bfloat16; float64 on ``cpu``/``reference``) and device.
        indices: ``[N]`` int32 or int64, every index in ``[0, rows)`` of its feature's table.
        offsets: ``[F·B + 1]``, indices' dtype, non-decreasing from 0 to ``N``: bag ``b`` of feature ``f``
            is ``indices[offsets[f·B + b] : offsets[f·B + b + 1]]`` (FBGEMM/TorchRec layout).
        feature_table: ``F`` table numbers (feature ``f`` reads table ``feature_table[f]``; several
            features may share one); default ``range(T)``.
        mode: ``"sum"`` or ``"mean"`` (over the bag's non-padding indices; empty bags give zeros).
        per_sample_weights: ``[N]`` in the tables' dtype or, for half tables, float32 (``sum`` only), applied
            in the accumulation dtype.
        padding_idx: skipped row per table (an int for all tables, or one entry per table, None = none;
            negative counts from the end).
        sparse: (keyword-only, a bool) table gradients as ``torch.sparse_coo`` tensors of unique ascending rows
            (eager calls only; see the module's notes on their coalesced flag).
        backend: (keyword-only) ``"auto"`` (``triton`` for CUDA tables, ``cpu`` for CPU ones), ``"triton"``,
            ``"cpu"`` or ``"reference"``; ``"cuda"`` always raises.
        check: (keyword-only) ``"sync"`` or ``"async"``: when the ``triton`` backend reports bad input
            (:data:`CHECKS`; calls the registered op makes, under ``torch.compile``, use ``"sync"``).
    Returns:
        ``[B, Σ_f dim_{feature_table[f]}]`` in the tables' dtype (accumulated in float32; float64 for
        float64 tables), features' columns in order.

    Bad indices or offsets raise ``IndexError``/``ValueError`` naming the argument, and no row out of range is
    ever read (with ``check="async"`` on a GPU the error comes from a later call: :data:`CHECKS`).
    Gradients are bitwise reproducible (whatever the thread count).
    """
    relevant = (*(weights if isinstance(weights, (list, tuple)) else (weights,)), indices, offsets, per_sample_weights)
    if torch.overrides.has_torch_function(relevant):  # torch.fx.symbolic_trace's Proxy, ...
        return torch.overrides.handle_torch_function(
            multi_embedding_bag, relevant, weights, indices, offsets, feature_table, mode, per_sample_weights,
            padding_idx, sparse=sparse, backend=backend, check=check)
    poll_errors()
    if per_sample_weights is None and _plain_features(weights, feature_table, padding_idx):
        out = _cpu_fast(weights, indices, offsets, mode, backend, sparse, check)
        if out is not None:
            return out
    op = "multi_embedding_bag"
    ws, tables = _check_weights(op, weights)
    _check_options(op, sparse, backend)
    bags = _validate(op, ws, indices, offsets, feature_table, mode, per_sample_weights, padding_idx, check, tables)
    return _run(op, ws, indices, offsets, bags, _kernel_psw(per_sample_weights, ws), sparse, backend,
                "multi_embedding_bag")


def check_torch_only(op: str, max_norm: object, norm_type: object, scale_grad_by_freq: object,
                     mode: object) -> None:
    """torch's embedding-bag arguments kfuse does not implement: accepted at their defaults (torch's own
    module passes them so), else an error naming them; a mode that is not a string is most likely
    torch's positional max_norm in kfuse's mode slot."""
    if max_norm is not None or scale_grad_by_freq is not False or norm_type != 2.0:
        raise NotImplementedError(f"kfuse.{op}: max_norm, norm_type and scale_grad_by_freq are not supported (only "
                                  f"their defaults None, 2.0, False); got max_norm={max_norm!r}, norm_type="
                                  f"{norm_type!r}, scale_grad_by_freq={scale_grad_by_freq!r}")
    if not isinstance(mode, str):
        raise ValueError(f"kfuse.{op}: mode must be 'sum' or 'mean'; got {mode!r} (kfuse's positional order puts "
                         "mode where torch has max_norm: pass torch's optional arguments by keyword)")


def embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None, mode: str = "mean",
                  per_sample_weights: Tensor | None = None, include_last_offset: bool = False,
                  padding_idx: int | None = None, *, sparse: bool = False, backend: str = "auto",
                  check: str = "sync", max_norm: float | None = None, norm_type: float = 2.0,
                  scale_grad_by_freq: bool = False) -> Tensor:
    """``torch.nn.functional.embedding_bag`` for ``sum`` and ``mean`` on kfuse's kernels.

    Args:
        input: ``[N]`` indices with ``offsets``, or ``[B, L]`` fixed-size bags (then ``offsets`` is None);
            int32 or int64.
        weight: ``[rows, dim]`` table (float32, float16, bfloat16; float64 on ``cpu``/``reference``).
        offsets: ``[B]`` bag starts (from 0; empty only when input is), or ``[B + 1]`` ending at ``N`` with
            ``include_last_offset``; int32 or int64 (when input's dtype differs, both are taken as
            int64, as torch does).
        mode: ``"mean"`` (the default, as torch's) or ``"sum"``.
        per_sample_weights (same shape as input, ``sum`` only, in weight's dtype: unlike
            :func:`multi_embedding_bag`, not float32 with half tables, as torch refuses them), padding_idx, sparse,
            backend, check: as :func:`multi_embedding_bag` (the first four as torch's).
        max_norm, norm_type, scale_grad_by_freq: torch's, taken by keyword at their defaults only
            (not implemented: anything else raises). The positional order is kfuse's (mode fourth).
    Returns:
        ``[B, dim]`` in weight's dtype.
    """
    relevant = (input, weight, offsets, per_sample_weights)
    if torch.overrides.has_torch_function(relevant):  # torch.fx.symbolic_trace's Proxy, ...
        return torch.overrides.handle_torch_function(
            embedding_bag, relevant, input, weight, offsets, mode, per_sample_weights, include_last_offset,
            padding_idx, sparse=sparse, backend=backend, check=check, max_norm=max_norm, norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq)
    poll_errors()
    if (padding_idx is None and max_norm is None and scale_grad_by_freq is False and norm_type == 2.0
            and (include_last_offset is True or include_last_offset is False)):
        out = _cpu_fast([weight], input, offsets, mode, backend, sparse, check, not include_last_offset,
                        per_sample_weights, "embedding_bag")
        if out is not None:
            return out
    op = "embedding_bag"
    check_torch_only(op, max_norm, norm_type, scale_grad_by_freq, mode)
    ws, tables = _check_weights(op, [weight], single=True)
    _check_options(op, sparse, backend)
    _checks.check_bool(f"kfuse.{op}", "include_last_offset", include_last_offset)  # "False" is truthy
    for name, t in (("input", input), ("offsets", offsets), ("per_sample_weights", per_sample_weights)):
        if isinstance(t, Tensor) and t.layout != torch.strided:  # (before the ops that build offsets)
            raise ValueError(f"kfuse.{op}: {name} must be a dense (strided) tensor; got {t.layout}")
        if isinstance(t, Tensor) and t.device != weight.device:  # (the shared checks named "indices" and "the
            # tables", which this op has not: error-message hunt)
            raise ValueError(f"kfuse.{op}: {name} is on {t.device}; weight is on {weight.device}")
    if not isinstance(input, Tensor) or input.dtype not in _INTS or input.dim() not in (1, 2):
        got = f"{input.dim()}-D {input.dtype}" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"kfuse.{op}: input must be a 1-D or 2-D int32/int64 tensor; got {got}")
    psw = per_sample_weights
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError(f"kfuse.{op}: offsets must be None when input is 2-D (fixed-size bags)")
        batch, length = input.shape
        offs = torch.arange(0, batch * length + 1, max(length, 1), dtype=input.dtype, device=input.device)
        offs = offs[: batch + 1] if length else torch.zeros(batch + 1, dtype=input.dtype, device=input.device)
        if isinstance(psw, Tensor) and psw.shape != input.shape:
            raise ValueError(f"kfuse.{op}: per_sample_weights must have input's shape {tuple(input.shape)}; got "
                             f"{tuple(psw.shape)}")
        indices, psw = input.reshape(-1), psw.reshape(-1) if isinstance(psw, Tensor) else psw
    else:
        if not isinstance(offsets, Tensor) or offsets.dim() != 1 or offsets.dtype not in _INTS:
            raise ValueError(f"kfuse.{op}: offsets must be a 1-D int32/int64 tensor when input is 1-D")
        if offsets.shape[0] == 0 and include_last_offset:
            raise ValueError(f"kfuse.{op}: offsets must not be empty with include_last_offset=True")
        if offsets.shape[0] == 0 and input.shape[0]:
            # torch returns [0, dim] here and its gradients read memory that is not the input's.
            raise ValueError(f"kfuse.{op}: offsets is empty, so input's {input.shape[0]} indices are in no bag "
                             "(offsets[0] = 0 starts the first bag)")
        if offsets.dtype != input.dtype:
            # torch's rule (promoteIndicesAndOffsets): both to int64. Casting int64 offsets down to int32
            # indices would wrap (2**32 + 1 -> 1) and hide an invalid offset.
            input, offsets = input.long(), offsets.long()
        offs = offsets
        if not include_last_offset:
            offs = torch.cat([offs, offs.new_full((1,), input.shape[0])])
        indices = input
    bags = _validate(op, ws, indices, offs, [0], mode, psw, padding_idx, check, tables)
    rename = functools.partial(_rename_for_embedding_bag, input_shape=tuple(input.shape), offsets=offsets,
                               include_last_offset=include_last_offset, rows=weight.shape[0])
    _LAST.record = None
    try:
        caller = (f"embedding_bag:2d:{input.shape[1]}" if input.dim() == 2 else
                  f"embedding_bag:1d:{int(include_last_offset)}")
        out = _run(op, ws, indices, offs, bags, _kernel_psw(psw, ws), sparse, backend, caller)
    except (ValueError, IndexError) as err:
        # Offsets are read on the host on errors only, and on plain eager tensors only: fake, traced or
        # vmapped offsets have no values to read (vmap refused the read's nonzero with its own error, in place
        # of the backend's clear one: function-transforms hunt, 2026-12-07), and the backend's error stands.
        named = rename(err, host_values=not _routing.tracing() and _routing.plain(offsets)
                       and not _routing.functorch_wrapped((offsets,)))
        if named is None:
            raise
        raise named from None
    record = getattr(_LAST, "record", None)
    record = record() if record is not None else None
    _LAST.record = None
    if record is not None:  # this call's check="async" record: its error is named as this op's
        record.rename = functools.partial(rename, host_values=True)
    return out


def _rename_for_embedding_bag(err: Exception, *, input_shape: tuple[int, ...], offsets: Tensor | None,
                              include_last_offset: bool, rows: int, host_values: bool) -> Exception | None:
    """``embedding_bag``'s own names for a backend's error (None: ``err`` stands). The backends name the
    flat index of the multi-table layout ("indices[i] ... feature 0 (table 0)"); this op's argument is
    input, one table, maybe 2-D. They see ``len(input)`` appended as the last offset, and would report
    that offset, which the caller never passed, as out of order (``host_values``: the offsets may be read)."""
    if isinstance(err, IndexError):
        bad = re.search(r"indices\[(\d+)\] (= (-?\d+) is|was) out of range", str(err))
        if bad is None:
            return None
        i = int(bad.group(1))
        where = f"{i // input_shape[1]}, {i % input_shape[1]}" if len(input_shape) == 2 else str(i)
        if bad.group(3) is None:  # a check="async" flag whose input has changed since
            return IndexError(f"kfuse.embedding_bag: input[{where}] was out of range [0, {rows}) (weight's rows) "
                              "when that call read it (it has changed since)")
        return IndexError(f"kfuse.embedding_bag: input[{where}] = {bad.group(3)} is out of range [0, {rows}) "
                          "(weight's rows)")
    if isinstance(err, ValueError) and host_values and len(input_shape) == 1 and not include_last_offset:
        try:
            _past_the_end("embedding_bag", offsets, input_shape[0])
        except ValueError as named:
            return named
    return None
