"""Which path a kfuse op call takes, and the checks behind that choice, shared by every op.

Every public op (``kfuse.deu``, ``kfuse.lora_linear``, ...) has one implementation per backend
and reaches it by one of these routes (docs/CONTRIBUTING.md, "Dispatch"):

1. an input overrides ``__torch_function__`` (an FX ``Proxy``, a function mode): the op hands the
   call to ``torch.overrides.handle_torch_function`` before validating anything, so
   ``torch.fx.symbolic_trace`` records one call of the public function;
2. then, after validation and the backend choice, :func:`route` says which of three paths runs:

   ========================  =================================================================
   :data:`REFERENCE`         the PyTorch reference: the reference backend was chosen, or a
                             ``torch.func`` transform is running (its inputs wrapped or not), or an
                             input carries a forward-mode AD tangent (the kernels define no rules
                             for them)
   :data:`REGISTERED`        the ``torch.library.custom_op`` ops (``kfuse::<op>_forward`` ...):
                             under ``torch.compile`` / ``torch.jit.trace`` (graphs record them),
                             and for tensor subclasses or under a dispatch mode (``make_fx``,
                             ``FakeTensorMode``): such tensors may have no memory for a kernel,
                             and such modes must see the op
   :data:`EAGER`             plain tensors, no dispatch mode: the op calls its implementations
                             directly, through a thin ``autograd.Function`` when
                             :func:`needs_grad` (half the per-call overhead of the custom-op
                             dispatch), or with no autograd node at all when nothing needs a
                             gradient
   ========================  =================================================================

An op's body then reads::

    if torch.overrides.has_torch_function(tensors):
        return torch.overrides.handle_torch_function(op, tensors, *args, **kwargs)
    ...validate, chosen = _backends.select_for(...)...
    path = _routing.route(chosen, tensors)
    if path == _routing.REFERENCE:
        return reference(...)
    if path == _routing.REGISTERED:
        return registered_forward(...)
    if not _routing.needs_grad(tensors):
        return forward_impl(...)
    return EagerFunction.apply(...)

and the backward of the eager ``autograd.Function`` (or of ``register_autograd``) checks
:func:`differentiable_backward` first: a backward that must be differentiable
(``create_graph=True``) or batched (``is_grads_batched=True``) runs the reference's vjp; under
compiled autograd (:func:`tracing`) it calls the registered backward op, so the graph records it.

``tensors`` may contain ``None`` (optional inputs such as a bias); they are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch._C._functorch import (
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    is_legacy_batchedtensor,
    maybe_get_bdim,
)

#: The op runs its PyTorch reference (plain autograd, any transform).
REFERENCE = "reference"
#: The op calls its registered ``torch.library`` ops.
REGISTERED = "registered"
#: The op calls its implementations directly (through its eager ``autograd.Function`` when
#: :func:`needs_grad`).
EAGER = "eager"


_UNLABELLED = contextlib.nullcontext()


def labelled(name: str) -> contextlib.AbstractContextManager:
    """``torch.autograd.profiler.record_function(name)`` while a profiler records, else a null context (one flag
    read). For the eager calls that run their kernels with no autograd node to name them and outside the
    dispatcher (the extension's functions, the Triton launchers): a no-grad call's kernel time had no event of
    its own in a profiler's trace (modes-and-hooks hunt, 2026-12-07)."""
    return (torch.autograd.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled
            else _UNLABELLED)


def plain(t: Tensor | None) -> bool:
    """Whether ``t`` is a plain tensor (``Tensor`` or ``nn.Parameter``, not a subclass) or None."""
    return t is None or type(t) is Tensor or type(t) is torch.nn.Parameter


def tracing() -> bool:
    """Whether ``torch.compile`` (Dynamo, compiled autograd included) or ``torch.jit.trace`` is
    tracing this call: graphs must record the registered ops."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is entered (tensors may carry tangents): one attribute read."""
    return fwad._current_level >= 0


def has_tangent(tensors: Sequence[Tensor | None]) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent (``torch.autograd.forward_ad``)."""
    if not forward_ad_active():  # the common case
        return False
    return any(t is not None and fwad.unpack_dual(t).tangent is not None for t in tensors)


def transform_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running this call: one C call, ~0.04 us."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def functorch_wrapped(tensors: Sequence[Tensor | None]) -> bool:
    """Whether any of ``tensors`` is wrapped by a ``torch.func`` transform (grad, vmap, jvp, ...)."""
    for t in tensors:
        if t is not None and is_functorch_wrapped_tensor(t):
            return True
    return False


def transformed(tensors: Sequence[Tensor | None]) -> bool:
    """Whether the kernels have no rules for this call: a ``torch.func`` transform is running (the op's own tensors
    wrapped or not: a closure's, a module's parameters), or an input is wrapped by one or carries a forward-mode AD
    tangent. The eager autograd.Functions raised functorch's "must override setup_context" inside a transform whose
    tensors the op did not get wrapped (review, 2026-12-06)."""
    return transform_active() or functorch_wrapped(tensors) or has_tangent(tensors)


def functorch_values(t: Tensor) -> list[Tensor]:
    """The plain tensors whose values ``t`` stands for under ``torch.func`` wrappers: ``[t]`` for a plain
    tensor, one per batch entry of each ``vmap`` level (host-side value checks run on these: ``.item()``
    or ``nonzero`` of a batched tensor fail)."""
    if not is_functorch_wrapped_tensor(t):
        return [t]
    inner = get_unwrapped(t)
    bdim = maybe_get_bdim(t) if is_batchedtensor(t) else None
    parts = [inner] if bdim is None else list(inner.unbind(bdim))
    return [v for p in parts for v in functorch_values(p)]


def vmapped(t: Tensor) -> bool:
    """Whether ``t`` is batched by a ``torch.func.vmap`` level (under any other ``torch.func`` wrappers)."""
    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            return True
        t = get_unwrapped(t)
    return False


def needs_grad(tensors: Sequence[Tensor | None]) -> bool:
    """Whether autograd must record the call: grad mode is on and an input requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def route(chosen: str, tensors: Sequence[Tensor | None]) -> str:
    """The path of a validated call whose backend is ``chosen`` (``_backends.select_for``'s
    answer), for the op's tensor inputs ``tensors``: :data:`REFERENCE`, :data:`REGISTERED` or
    :data:`EAGER` (the table in this module's docstring; the checks run in that order)."""
    if chosen == "reference":
        return REFERENCE
    if tracing():
        # Before the functorch queries, which Dynamo cannot trace.
        return REGISTERED
    if transformed(tensors):
        # torch.func transforms and forward-mode AD (with whatever backward or subclass comes
        # with them): the kernels define no rules for them.
        return REFERENCE
    if torch._C._len_torch_dispatch_stack():
        return REGISTERED
    for t in tensors:
        if not plain(t):
            return REGISTERED
    return EAGER


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(x: object) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on ``x``'s device, when it is enabled there and
    would cast ``x`` (float32, float16 or bfloat16; autocast leaves float64 alone); else None. A
    matmul op that calls torch's GEMMs inside (LoRA) must apply autocast's casts itself and run with
    it disabled: otherwise its inner calls are cast one by one and meet in mixed dtypes."""
    if not torch._C._is_any_autocast_enabled():  # the common case: 0.13 us against ~1.5 us for the rest
        return None
    if not isinstance(x, Tensor) or x.dtype not in _AUTOCAST_CASTS or x.device.type not in ("cpu", "cuda"):
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def autocast_off(t: Tensor) -> contextlib.AbstractContextManager:
    """Disables ``torch.autocast`` on ``t``'s device where it is on (CPU or CUDA), else a no-op context. For the
    backward of an op that applied autocast's casts itself (:func:`autocast_dtype`): on the CPU autograd
    runs it on the caller's thread, inside the caller's autocast block, where autocast would cast its
    torch GEMMs one by one and meet in mixed dtypes (LoRA's ``dx.addmm_``: "mat1 and mat2 must have the
    same dtype"; bug hunt). With no autocast on anywhere (the common case) the device is not looked at: ~1 us
    of a backward's host time (a helper's profile, 2026-12-05)."""
    if not torch._C._is_any_autocast_enabled():
        return contextlib.nullcontext()
    device = t.device
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def autocast_cast(dtype: torch.dtype, t: object) -> object:
    """``t`` in autocast's ``dtype`` where autocast would cast it (a float32/16 or bfloat16 tensor),
    else ``t`` unchanged (None, float64, integers, non-tensors: the op's checks see them as given)."""
    return t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_CASTS else t


def differentiable_backward(grad: Tensor) -> bool:
    """Whether a backward must be differentiable or batched, which the kernels' is not: under
    ``create_graph=True`` (grad mode on in the backward), or with a batched ``grad``
    (``is_grads_batched=True``, ``jacobian(vectorize=True)``: autograd's own vmap over the
    backward, whose batched tensors have no memory). Under Dynamo (compiled autograd) grad mode
    only: it cannot trace the functorch queries, and traces no batched backward."""
    return torch.is_grad_enabled() or batched_backward(grad)


def version(t: Tensor) -> int | None:
    """``t``'s version counter, which every in-place write moves (None for an inference tensor: it has none,
    and reading it raises)."""
    return None if t.is_inference() else t._version


def exporting() -> bool:
    """Whether torch.export is tracing: the flag ``torch.compiler.is_exporting()`` returns, read directly.
    torch 2.11's Dynamo traced ``is_exporting()`` itself as True in every trace, torch.compile's too, and the
    fused embedding module refused every compiled call ("runs eagerly only"; the compat run of 2026-12-06);
    the flag reads right in both (torch.export sets it, strict or not). Torch before 2.6 has neither."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return bool(flag)
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def batched_backward(grad: Tensor) -> bool:
    """Whether ``grad`` is batched by autograd's own vmap over a backward (``is_grads_batched=True``,
    ``jacobian(vectorize=True)``: legacy batched tensors) or by a ``torch.func`` transform. Under Dynamo
    never (it cannot trace the queries, and traces no batched backward)."""
    if torch.compiler.is_compiling():
        return False
    return is_functorch_wrapped_tensor(grad) or is_legacy_batchedtensor(grad)


@contextlib.contextmanager
def outside_legacy_vmap() -> Iterator[None]:
    """Runs its block outside autograd's legacy vmap mode (the batched backward of
    ``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``), which
    refuses random ops. For random draws that do not depend on the batched tensors: a backward that
    regenerates its forward's dropout mask from a saved seed. (Private torch API, in torch 2.11 to
    2.14: the nesting depth is read by one increment and decrement.)"""
    depth = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    for _ in range(depth):
        torch._C._vmapmode_decrement_nesting()
    try:
        yield
    finally:
        for _ in range(depth):
            torch._C._vmapmode_increment_nesting()
