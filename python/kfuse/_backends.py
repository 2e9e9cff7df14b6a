"""Backend availability and selection, shared by every op.

Each op has up to four backends: ``triton``, ``cuda`` (csrc CUDA kernels), ``cpu`` (csrc C++
kernels) and ``reference`` (PyTorch). An op asks each backend why it cannot run an input
(an empty list means it can); ``select`` turns those reasons into a choice or an error that
lists them, in the manner of xformers' dispatcher.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
_F = TypeVar("_F", bound=Callable[..., Any])


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input; the message says why."""


def _load_extension() -> tuple[ModuleType | None, str]:
    try:
        from kfuse import _C  # noqa: PLC0415  (torch is imported first, as the extension needs)
    except ImportError as err:
        if not any(Path(__file__).parent.glob("_C.*")):  # not "failed to load (... circular import)"
            return None, ("the compiled extension kfuse._C is not built: build it with `make build` or "
                          "`pip install --no-build-isolation -e .`")
        return None, f"the compiled extension kfuse._C is not built or failed to load ({err})"
    from kfuse._sources import sources_hash

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    if csrc.is_dir() and (built := _C.sources_hash()) != (now := sources_hash(csrc)):
        return None, (
            f"kfuse._C is stale (built from csrc/ {built}, the tree is now {now}); "
            "rebuild with `make build` or `pip install --no-build-isolation -e .`"
        )
    return _C, ""


# Loaded once at import, so backend selection only reads constants: torch.compile traces
# through it without graph breaks.
_EXT, _EXT_WHY = _load_extension()
_EXT_HAS_CUDA = bool(_EXT is not None and _EXT.has_cuda())
#: The oldest torch and Triton the whole test suite has passed on (torch 2.11 ships Triton 3.6; also tested: torch
#: 2.14.1 with Triton 3.8). Under torch 2.8 (Triton 3.4) the eager ops ran but torch.compile, autocast and the
#: Triton kernels' compile failed (2026-12-06), so pyproject.toml asks for these and older ones are named here.
MIN_TORCH, MIN_TRITON = "2.11", "3.6"


def _old_torch_warning() -> None:
    """Warn, once at import, when torch is older than :data:`MIN_TORCH` (pip refuses such an install; a torch
    installed another way still imports kfuse, whose eager ops may run where compiled ones fail)."""
    if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
        warnings.warn(f"kfuse needs torch >= {MIN_TORCH}; found {torch.__version__}: torch.compile, autocast and "
                      "other paths are known to fail on older ones (torch 2.8)", RuntimeWarning, stacklevel=2)


def _triton_why() -> str:
    """Why no Triton kernel can run at all ("" when Triton is installed and new enough). Reads the installed
    package's metadata, not the module: importing Triton costs ~0.5 s, which ``import kfuse`` does not pay."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # another distribution's triton (a nightly's pytorch-triton)
        return ""
    if torch.torch_version.TorchVersion(version) < MIN_TRITON:
        return f"triton {version} is installed; kfuse's Triton kernels need triton >= {MIN_TRITON}"
    return ""


_old_torch_warning()
_TRITON_WHY = _triton_why()


def extension() -> ModuleType | None:
    """The compiled extension ``kfuse._C``, or None when it is missing or stale."""
    return _EXT


def extension_reasons(device: torch.device) -> list[str]:
    """Why the compiled kernels cannot run on ``device`` (empty when they can)."""
    ext, why = _EXT, _EXT_WHY
    if ext is None:
        return [why]
    if device.type == "cuda" and not _EXT_HAS_CUDA:
        return ["kfuse._C was built without CUDA kernels (set KFUSE_CUDA=1 and rebuild)"]
    if device.type not in ("cpu", "cuda"):
        return [f"no compiled kernels for device type {device.type!r}"]
    return []


def triton_interpret() -> bool:
    """Whether Triton runs its interpreter: TRITON_INTERPRET read as Triton 3.x reads it (1, true, on,
    yes, y, any case, unstripped: "true" was taken for off here while Triton interpreted, and "1 " for on
    while Triton compiled; bug and globals hunts)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host ints, for launchers' grids and splits. Not ``triton.cdiv``: since Triton
    3.5 that is a ``constexpr_function``, whose host call unwraps its arguments and imports as it
    goes (3.5 µs a call with Triton 3.8 on the CI machine's CPU). Without them the LoRA forward
    launcher's own Python went from 44 / 64 µs to 19 / 21 µs at M = 1 / 128 (``bench/host_launchers.py``,
    bench/results/2026-12-04-h200/README.md)."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for ``n`` ≤ 1), of host ints; see :func:`cdiv` for why not
    ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` (``t`` itself when it has that dtype already, as ``Tensor.to`` gives), without the call
    when there is nothing to convert: a no-op ``.to`` costs ~0.8 us warm (~2 us measured in the KV cache's host
    path) and several times that with Python's data out of the caches after a GEMM (LoRA's cpu forward at M = 1
    lost ~10 us to four of them)."""
    return t if t.dtype == dtype else t.to(dtype)


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """What a kernel reading flat row-major memory takes (``None`` passes through): ``t`` with its lazy
    negation applied, then contiguous. Kernels read memory through data pointers, which a negative-bit view
    (``torch._neg_view``) shares with the tensor it negates, and ``.contiguous()`` and a same-dtype ``.to()``
    keep the bit (layout hunt, 2026-12-05: sign-flipped embedding, DEU-backward, attention and multi-LoRA
    outputs); kernels reading through strides take ``t.resolve_neg()`` alone. Both are no-ops, no copies,
    for ordinary contiguous tensors."""
    return None if t is None else t.resolve_neg().contiguous()


def _first_tensor(args: tuple) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def on_input_device(launcher: _F) -> _F:
    """Runs a Triton launcher under the CUDA device of its first tensor argument (or of the first
    tensor of its first list argument). Triton launches on the *current* device
    (``driver.active.get_current_device()``), not on its tensors': tensors on ``cuda:1`` while
    ``cuda:0`` is current would be handed to kernels running on ``cuda:0``. Costs one
    ``current_device()`` call; nothing for CPU tensors (the interpreter)."""
    @functools.wraps(launcher)
    def launch(*args: Any, **kwargs: Any) -> Any:
        t = _first_tensor(args)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return launch  # type: ignore[return-value]


def triton_reasons(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the Triton kernels cannot run on ``device``/``dtype`` (empty when they can)."""
    if _TRITON_WHY:
        return [_TRITON_WHY]
    loaded = sys.modules.get("kfuse.triton_kernels")
    if loaded is not None and loaded.INTERPRETED != triton_interpret():
        return [f"the Triton kernels were loaded {'with' if loaded.INTERPRETED else 'without'} TRITON_INTERPRET=1, "
                "which triton.jit reads once: set or clear it before kfuse first runs a Triton kernel"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and triton_interpret():
        if dtype == torch.bfloat16:
            # The Triton interpreter returns wrong values for bf16 on CPU (triton 3.8/3.9).
            return ["bfloat16 is unsupported by the Triton interpreter on CPU"]
        return []
    return [f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors); got {device.type}"]


_warned: set[tuple[str, str]] = set()  # (op, reasons) already warned about


_SKIP_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` (for a ``warnings.warn`` in the function calling this) of the first frame
    outside kfuse and torch: the user's line, however many kfuse layers (an op, its ``_select``, a
    module's ``forward`` through ``nn.Module.__call__``) lie between."""
    level, frame = 2, sys._getframe(2)  # stacklevel 2: the caller of the function that warns
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIP_DIRS):
        level, frame = level + 1, frame.f_back
    return level


def select(op: str, requested: str, reasons: dict[str, list[str]], order: tuple[str, ...], *,
           stacklevel: int | None = None) -> str:
    """Pick a backend for ``op``.

    Args:
        op: the op's name, for messages.
        requested: a backend name or ``"auto"``.
        reasons: for every backend, why it cannot run this input (empty list: it can).
        order: preference order for ``"auto"`` (fastest first).
        stacklevel: of the reference fallback's warning; default: the first frame outside kfuse
            and torch (the user's call).
    Raises:
        ValueError: unknown backend name.
        BackendUnavailableError: the requested backend cannot run this input.
    """
    if not isinstance(requested, str):
        raise TypeError(f"kfuse.{op}: backend must be a str, 'auto' or one of {sorted(reasons)}; "
                        f"got {type(requested).__name__}")
    if requested != "auto" and requested not in reasons:
        raise ValueError(f"kfuse.{op}: backend must be 'auto' or one of {sorted(reasons)}; got {requested!r}")
    if requested != "auto":
        if why := reasons[requested]:
            raise BackendUnavailableError(
                f"kfuse.{op}: backend {requested!r} cannot run this input: " + "; ".join(why)
            )
        return requested
    for name in order:
        if not reasons[name]:
            # Once per distinct set of reasons. Not while torch.compile traces: Dynamo cannot
            # trace warnings.warn, so fullgraph=True failed on every call (and dropped the
            # _warned entry with the aborted trace, so every recompile failed too).
            if name == "reference" and not torch.compiler.is_compiling():
                skipped = "; ".join(f"{b}: {', '.join(r)}" for b, r in reasons.items() if r)
                if (op, skipped) not in _warned:
                    _warned.add((op, skipped))
                    warnings.warn(f"kfuse.{op}: falling back to the PyTorch reference ({skipped})",
                                  stacklevel=_user_stacklevel() if stacklevel is None else stacklevel)
            return name
    raise BackendUnavailableError(
        f"kfuse.{op}: no backend can run this input: "
        + "; ".join(f"{b}: {', '.join(r)}" for b, r in reasons.items())
    )


_chosen: dict[tuple, str] = {}  # select_for's memo: (op, requested, device type, dtype, interpreter) -> backend


def select_for(op: str, requested: str, device: torch.device, dtype: torch.dtype,
               reasons: Callable[[], dict[str, list[str]]], order: tuple[str, ...]) -> str:
    """``select(op, requested, reasons(), order)`` for an input on ``device`` of ``dtype``,
    memoised: an op whose backends' reasons depend on nothing else of the input (the extension
    is loaded once; ``TRITON_INTERPRET`` is part of the key) skips building them on every call.
    Building DEU's took 3.5 of the 19 µs of an eager forward of a [4, 32] tensor (2 CPU cores).
    Errors are not memoised (they raise again), nor is anything while ``torch.compile`` traces.
    """
    if torch.compiler.is_compiling() or not isinstance(requested, str):
        return select(op, requested, reasons(), order)
    # TRITON_INTERPRET matters only where Triton may be chosen for a CPU tensor; reading it costs
    # ~0.6 us (CPU "auto" orders leave Triton out).
    maybe_triton = device.type == "cpu" and (requested == "triton" or (requested == "auto" and "triton" in order))
    key = (op, requested, device.type, dtype, maybe_triton and triton_interpret())
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = _chosen[key] = select(op, requested, reasons(), order)
    return chosen


def triton_reasons_no_f64(device: torch.device, dtype: torch.dtype, family: str) -> list[str]:
    """:func:`triton_reasons` for an op family whose Triton kernels have no float64 variant."""
    why = triton_reasons(device, dtype)
    return [*why, f"the Triton {family} kernels do not support float64"] if dtype == torch.float64 else why


def check_backend_name(op: str, backend: object) -> None:
    """``ValueError`` unless ``backend`` is ``"auto"`` or one of :data:`BACKENDS` (the registered ops'
    fake kernels check it at trace time, before any reasons exist); ``TypeError`` for a non-str, as
    :func:`select` raises."""
    if not isinstance(backend, str):
        raise TypeError(f"kfuse.{op}: backend must be a str, 'auto' or one of {sorted(BACKENDS)}; got "
                        f"{type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"kfuse.{op}: backend must be 'auto' or one of {sorted(BACKENDS)}; got {backend!r}")


def availability() -> dict[str, str]:
    """For each backend, ``"available"`` or why it is not (on this machine, any op)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    out = {"reference": "available"}
    out["cpu"] = "; ".join(extension_reasons(cpu)) or "available"
    if not torch.cuda.is_available():
        out["cuda"] = "no CUDA device"
        why_triton = triton_reasons(cpu, torch.float32)
        out["triton"] = ("; ".join(why_triton) or "available (interpreter, CPU tensors)")
    else:
        out["cuda"] = "; ".join(extension_reasons(cuda)) or "available"
        out["triton"] = "; ".join(triton_reasons(cuda, torch.float32)) or "available"
    return out
