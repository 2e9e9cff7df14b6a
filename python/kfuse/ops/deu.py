"""DEU activations: the public op, its torch.library registration and autograd.

``kfuse.deu(x, coeffs, dim)`` applies each neuron's own activation, the closed-form
solution of ``a·y'' + b·y' + c·y = H(t)`` (see ``kfuse.reference.deu`` for the definition).
Every backend views ``x`` as ``[M, N, K]`` (N = neurons along ``dim``) and returns
``grad_coeffs`` reduced per tile in a fixed order, so it is deterministic.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from kfuse import _backends, _checks, _routing
from kfuse.reference.deu import deu_gravitation_grad, deu_reference

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Preference for backend="auto", fastest first. On an H200 (bench/results/2026-11-26-h200-deu.md)
# the CUDA kernels beat the Triton ones on every [B, N] case (8192x4096 fp32 fwd 0.112 vs 0.145 ms,
# fwd+bwd 0.56 vs 0.98 ms) and tie on NCHW forwards.
_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Memory layout. The kernels see a [M, N, K] contiguous tensor (the backends take a contiguous
# tensor and the neuron dim, and split it so). A tensor dense in some order of
# its dims (channels-last NCHW, a transposed [B, N, T]) is one without a copy: list its dims
# outermost first, then M and K are the sizes outside and inside the neuron dim in memory. y and
# grad_x are laid out like x, as PyTorch's elementwise ops do; a channels-last model stays so.
# (Copying a channels-last [32, 64, 56, 56] fp32 x to NCHW made the CPU forward 5x slower:
# 21.2 ms vs 3.9 ms.) An order of None means row-major, the common case, kept to the cheapest
# calls: the general path costs 7 us more per eager fwd and 20 us per fwd+bwd (2 CPU cores).
Order = list[int] | None


def _order(x: Tensor) -> Order:
    """x's dims outermost first in memory if x is dense in that order and not row-major; None
    if x is contiguous, or not dense (it is then copied to row-major)."""
    if x.is_contiguous():
        return None
    order = sorted(range(x.ndim), key=lambda i: -x.stride(i))  # stable: ties (size-1 dims) keep their rank
    return order if x.permute(order).is_contiguous() else None


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def _in_order(t: Tensor, order: Order) -> Tensor:
    """``t`` itself if it is dense in ``order``, else a copy that is."""
    if order is None:
        return t.contiguous()
    p = t.permute(order)
    return t if p.is_contiguous() else p.contiguous().permute(_inverse(order))


def _empty_in_order(x: Tensor, order: Order) -> Tensor:
    """An uninitialised tensor like ``x``, dense in ``order`` (the strides ``_in_order`` gives).
    Not a view, so that autograd lets a caller modify y in place (y += skip)."""
    if order is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    strides, step = [0] * x.ndim, 1
    for d in reversed(order):
        strides[d] = step
        step *= max(x.shape[d], 1)  # as contiguous() does for size-0 dims
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device)


def _mnk(shape: torch.Size, dim: int) -> tuple[int, int, int]:
    """``[M, N, K]``: the sizes before ``dim``, at it, and after it."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def _triton_forward(x: Tensor, coeffs: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    from kfuse.triton_kernels import deu as tk  # noqa: PLC0415 (triton is optional)

    out = torch.empty_like(x) if out is None else out
    mnk = _mnk(x.shape, dim)
    tk.deu_forward(x.view(mnk), coeffs, out.view(mnk))
    return out


def _triton_backward(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    from kfuse.triton_kernels import deu as tk  # noqa: PLC0415 (triton is optional)

    mnk = _mnk(x.shape, dim)
    gx, gc = tk.deu_backward(grad_y.view(mnk), x.view(mnk), coeffs)
    return gx.view(x.shape), gc


def _kernels(backend: str):
    """(forward, backward) of a compiled/Triton backend, for contiguous tensors and a neuron dim:
    ``forward(x, coeffs, dim, out=None) -> y`` (into ``out`` when given; contiguous like x),
    ``backward(grad_y, x, coeffs, dim) -> (grad_x, grad_coeffs)``; coeffs ``[N, 5]`` contiguous
    in the accumulation dtype."""
    if backend == "triton":
        return _triton_forward, _triton_backward
    ext = _backends.extension()
    return ext.deu_forward, ext.deu_backward


def _forward_impl(x: Tensor, coeffs: Tensor, dim: int, backend: str) -> Tensor:
    # y itself is not a view (the kernels fill a new tensor, or a permuted view of one): autograd
    # lets a caller modify it in place (y += skip, ReLU(inplace=True)), which it forbids for a
    # view made inside an autograd.Function.
    forward, _ = _kernels(backend)
    x = x.resolve_neg()  # kernels read memory: no lazy negation (_backends.dense)
    order = _order(x)
    coeffs = _backends.dense(coeffs.to(_acc_dtype(x)))
    if order is None:
        return forward(x.contiguous(), coeffs, dim)
    y = _empty_in_order(x, order)
    forward(_in_order(x, order).permute(order), coeffs, order.index(dim), y.permute(order))
    return y


def _backward_impl(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int, backend: str) -> tuple[Tensor, Tensor]:
    _, backward = _kernels(backend)
    grad_y, x = grad_y.resolve_neg(), x.resolve_neg()
    order = _order(x)
    acc = _backends.dense(coeffs.to(_acc_dtype(x)))
    if order is None:
        gx, gc = backward(grad_y.contiguous(), x.contiguous(), acc, dim)
    else:
        gx, gc = backward(_in_order(grad_y, order).permute(order), _in_order(x, order).permute(order), acc,
                          order.index(dim))
        gx = gx.permute(_inverse(order))
    return gx, gc.to(coeffs.dtype)


def _op_backend(backend: str, x: Tensor) -> str:
    """The backend a registered op runs: ``backend`` checked and resolved as :func:`deu` does it
    (``"auto"`` included). The ops are public through ``torch.ops.kfuse``: an unknown name raises
    ``ValueError``, an unavailable one ``BackendUnavailableError``, and ``"reference"`` runs the
    reference (any string used to run the C++ kernels)."""
    order = _ORDER.get(x.device.type, ("reference",))
    return _backends.select_for("deu", backend, x.device, x.dtype, lambda: backend_reasons(x), order)


def _laid_out_like_x(t: Tensor, x: Tensor) -> Tensor:
    """``t`` (x's shape) in the layout the kernel backends give (``_empty_in_order``), as the
    registered ops' fake kernels promise."""
    out = _empty_in_order(x, _order(x))
    return t if out.stride() == t.stride() else out.copy_(t)


@torch.library.custom_op("kfuse::deu_forward", mutates_args=())
def deu_forward(x: Tensor, coeffs: Tensor, dim: int, backend: str) -> Tensor:
    """Registered op behind :func:`deu` (under ``torch.compile``, tracing and dispatch modes).

    ``dim`` non-negative, inputs validated by :func:`deu`; ``backend`` as :func:`deu` takes it;
    ``y`` is laid out as ``_order(x)`` says.
    """
    dim = _validate(x, coeffs, dim)  # (again: the ops are public, torch.ops.kfuse, and reach the kernels)
    backend = _op_backend(backend, x)
    if backend == "reference":
        return _laid_out_like_x(deu_reference(x, coeffs, dim), x)
    return _forward_impl(x, coeffs, dim, backend)


@deu_forward.register_fake
def _(x: Tensor, coeffs: Tensor, dim: int, backend: str) -> Tensor:
    _op_backend(backend, x)
    _checks.one_device("kfuse.deu_forward", x=x, coeffs=coeffs)
    return _empty_in_order(x, _order(x))


@torch.library.custom_op("kfuse::deu_backward", mutates_args=())
def deu_backward(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int, backend: str) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`deu_forward`: ``(grad_x laid out like y, grad_coeffs like coeffs)``."""
    dim = _validate(x, coeffs, dim)
    if not isinstance(grad_y, Tensor) or grad_y.shape != x.shape or grad_y.dtype != x.dtype \
            or grad_y.device != x.device:
        got = (f"{list(grad_y.shape)} {grad_y.dtype} on {grad_y.device}" if isinstance(grad_y, Tensor)
               else type(grad_y).__name__)
        raise ValueError(f"kfuse.deu_backward: grad_y must have x's shape, dtype and device ({list(x.shape)} "
                         f"{x.dtype} on {x.device}); got {got}")
    backend = _op_backend(backend, x)
    if backend == "reference":
        gx, gc = _reference_vjp(grad_y, x, coeffs, dim)
        return _laid_out_like_x(gx, x), gc.contiguous()
    return _backward_impl(grad_y, x, coeffs, dim, backend)


@deu_backward.register_fake
def _(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int, backend: str) -> tuple[Tensor, Tensor]:
    # grad_coeffs is contiguous whatever coeffs' strides (a transposed parameter): as the kernels
    # return it.
    _op_backend(backend, x)
    _checks.one_device("kfuse.deu_backward", grad_y=grad_y, x=x, coeffs=coeffs)
    return _empty_in_order(x, _order(x)), coeffs.new_empty(coeffs.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, coeffs, dim, backend = inputs
    ctx.save_for_backward(x, coeffs)
    ctx.dim, ctx.backend = dim, backend


def _backward(ctx, grad_y: Tensor):
    x, coeffs = ctx.saved_tensors
    if _routing.differentiable_backward(grad_y):
        return (*_reference_vjp(grad_y, x, coeffs, ctx.dim), None, None)
    gx, gc = deu_backward(grad_y, x, coeffs, ctx.dim, ctx.backend)  # the op lays grad_y out itself
    return gx, gc, None, None


deu_forward.register_autograd(_backward, setup_context=_setup_context)


def _reference_vjp(grad_y: Tensor, x: Tensor, coeffs: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Differentiable gradients (for create_graph=True): the reference's, whose graph reaches x,
    coeffs and grad_y, so second derivatives are right (at the reference's speed)."""
    _, vjp = torch.func.vjp(lambda x, coeffs: deu_reference(x, coeffs, dim), x, coeffs)
    return vjp(grad_y)


class _EagerDeu(torch.autograd.Function):
    """Eager fast path: the registered ops' implementations without the custom-op dispatch.

    Python dispatch through ``custom_op`` doubles the per-call overhead (fwd+bwd of a tiny
    tensor: 107 µs through the ops vs 50 µs here, 2 CPU cores); on the H200 host it made a
    8192×4096 fp32 fwd+bwd CPU-bound (605 µs per step for 360 µs of kernels). Under
    ``torch.compile`` the ops are used instead, so graphs capture them.
    """

    # ctx in forward, not a separate setup_context: PyTorch's path for the latter (which
    # torch.func needs) costs 17 us more per call (fwd of [4, 8]: 27 vs 10 us, 2 CPU cores);
    # torch.func transforms take the reference instead (deu()).
    @staticmethod
    def forward(ctx, x: Tensor, coeffs: Tensor, dim: int, backend: str) -> Tensor:
        _setup_context(ctx, (x, coeffs, dim, backend), None)
        return _forward_impl(x, coeffs, dim, backend)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, coeffs = ctx.saved_tensors
        if _routing.differentiable_backward(grad_y):
            return (*_reference_vjp(grad_y, x, coeffs, ctx.dim), None, None)
        if torch.compiler.is_compiling():  # compiled autograd traces this: the graph records the op
            gx, gc = deu_backward(grad_y, x, coeffs, ctx.dim, ctx.backend)
        else:
            gx, gc = _backward_impl(grad_y, x, coeffs, ctx.dim, ctx.backend)
        return gx, gc, None, None


#: The values of :func:`deu`'s ``degenerate_grad``.
DEGENERATE_GRADS = ("exact", "gravitation")


class _GravitationDeu(torch.autograd.Function):
    """``deu(..., degenerate_grad="gravitation")`` in eager mode, on any backend: the backend's
    forward and exact backward, then :func:`kfuse.reference.deu.deu_gravitation_grad` replaces
    the gradients of near-zero a, b, c (in PyTorch, float64, on the degenerate neurons only).
    One host sync per backward (whether any neuron is degenerate)."""

    @staticmethod
    def forward(ctx, x: Tensor, coeffs: Tensor, dim: int, backend: str) -> Tensor:
        _setup_context(ctx, (x, coeffs, dim, backend), None)
        return deu_reference(x, coeffs, dim) if backend == "reference" else _forward_impl(x, coeffs, dim, backend)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, coeffs = ctx.saved_tensors
        if ctx.needs_input_grad[1] and _routing.batched_backward(grad_y):
            # A batched backward (is_grads_batched=True, jacobian(vectorize=True)) runs this under vmap,
            # where the replacement's host check cannot run: it failed inside torch ("Batching rule not
            # implemented for aten::detach"; autograd hunt).
            raise ValueError("kfuse.deu: degenerate_grad='gravitation' does not run in a batched backward "
                             "(is_grads_batched=True, jacobian/hessian with vectorize=True): take the gradients one "
                             "at a time (vectorize=False) or use degenerate_grad='exact'")
        if ctx.backend == "reference" or _routing.differentiable_backward(grad_y):
            gx, gc = _reference_vjp(grad_y, x, coeffs, ctx.dim)
        else:
            gx, gc = _backward_impl(grad_y, x, coeffs, ctx.dim, ctx.backend)
        if ctx.needs_input_grad[1]:
            # The replaced entries are constants for a second derivative (create_graph=True).
            with torch.no_grad():
                fixed = deu_gravitation_grad(grad_y, x, coeffs, ctx.dim, gc.detach())
            gc = gc + (fixed - gc.detach())
        return gx, gc, None, None


def _validate(x: Tensor, coeffs: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"kfuse.deu: x must be a torch.Tensor; got {type(x).__name__}")
    if not isinstance(coeffs, Tensor):
        raise TypeError(f"kfuse.deu: coeffs must be a torch.Tensor; got {type(coeffs).__name__}")
    for name, t in (("x", x), ("coeffs", coeffs)):
        if t.layout != torch.strided or t.is_nested:
            kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
            raise TypeError(f"kfuse.deu: {name} must be a dense (strided) tensor; got a {kind} tensor")
    if x.dtype not in _FLOATS:
        raise TypeError(f"kfuse.deu: x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if coeffs.dtype not in _FLOATS:
        raise TypeError(f"kfuse.deu: coeffs must be float16, bfloat16, float32 or float64; got {coeffs.dtype}")
    if x.ndim == 0:
        raise ValueError("kfuse.deu: x must have at least one dimension (the neuron axis)")
    if isinstance(dim, (bool, Tensor)) or not hasattr(dim, "__index__"):  # a Tensor has __index__
        raise TypeError(f"kfuse.deu: dim must be an int; got {type(dim).__name__}")
    if not -x.ndim <= operator.index(dim) < x.ndim:
        raise IndexError(f"kfuse.deu: dim must be an int in [{-x.ndim}, {x.ndim - 1}] for x of shape "
                         f"{tuple(x.shape)}; got {dim!r}")
    dim = operator.index(dim) % x.ndim
    if coeffs.ndim != 2 or coeffs.shape[0] != x.shape[dim] or coeffs.shape[1] != 5:
        raise ValueError(f"kfuse.deu: coeffs must have shape [x.shape[dim], 5] = [{x.shape[dim]}, 5] "
                         f"(one row a, b, c, c1, c2 per neuron); got {list(coeffs.shape)}")
    if coeffs.device != x.device:
        raise ValueError(f"kfuse.deu: coeffs is on {coeffs.device} but x is on {x.device}; "
                         "move them to the same device")
    return dim


#: The backends of :func:`deu`, besides ``"auto"``: all four kinds (``backend_reasons`` keys).
BACKENDS = _backends.BACKENDS


def backend_reasons(x: Tensor) -> dict[str, list[str]]:
    """For each backend, why it cannot run :func:`deu` on ``x`` (empty list: it can)."""
    ext = _backends.extension_reasons(x.device)
    return {
        "triton": _backends.triton_reasons(x.device, x.dtype),
        "cuda": ext + ([] if x.device.type == "cuda" else [f"x is on {x.device.type}, not cuda"]),
        "cpu": ext + ([] if x.device.type == "cpu" else [f"x is on {x.device.type}, not cpu"]),
        "reference": [],
    }


def deu(x: Tensor, coeffs: Tensor, dim: int = -1, backend: str = "auto",
        degenerate_grad: str = "exact") -> Tensor:
    """Per-neuron DEU activation (Torkamani et al., AAAI 2020), differentiable in x and coeffs.

    Neuron ``n`` (index along ``dim``) computes ``y = f(x; a, b, c, c1, c2)`` with its own row
    ``coeffs[n] = (a, b, c, c1, c2)``: the solution of ``a·y'' + b·y' + c·y = H(x)``, with a
    parameter counting as zero when ``|p| < 0.01``, exponentials capped at ``exp(14)`` and the
    output clamped to ``[-1000, 1000]``.

    Args:
        x: ``[..., N, ...]`` float16, bfloat16, float32 or float64; any device.
        coeffs: ``[N, 5]`` floating, on x's device. Gradients come back in its dtype.
        dim: the neuron axis: ``-1`` for ``[B, N]`` / ``[B, T, N]``, ``1`` for NCHW.
        backend: ``"auto"`` (fastest available), ``"triton"``, ``"cuda"``, ``"cpu"`` or
            ``"reference"``. An explicit backend that cannot run raises
            :class:`kfuse.BackendUnavailableError` naming the reasons.
        degenerate_grad: ``"exact"`` (default): the exact derivatives of the function.
            ``"gravitation"``: the official DEU code's gradient for near-zero a, b, c (see
            :func:`kfuse.reference.deu.deu_gravitation_grad`), so that a coefficient that enters
            the zero band ``|p| < 0.01`` can leave it; ``y``, ``grad_x`` and the other gradients
            are unchanged. Every backend runs it (the replaced entries are computed in PyTorch,
            float64, on the degenerate neurons only, after one host sync per backward), in eager
            mode: where a gradient is needed under ``torch.compile``/``torch.jit.trace``, ``torch.func``
            transforms, forward-mode AD, dispatch modes or tensor subclasses, or in a batched backward
            (``is_grads_batched=True``, ``vectorize=True``), it raises ``ValueError``
            (which ``torch.compile(fullgraph=True)`` reports as its own ``Unsupported`` error).
    Returns:
        ``y``, same shape and dtype as ``x``, computed in float32 (float64 for float64 input).
        The kernel backends lay ``y`` and ``grad_x`` out like ``x`` when ``x`` is dense in some
        order of its dims (contiguous, channels-last, a transpose), and run on it in place;
        otherwise ``x`` is copied to a contiguous tensor first.

    Inputs are expected finite. With the kernel backends a NaN or ±inf element of ``x`` gives NaN
    in that element of ``y``; its gradients are unspecified (NaN or 0) but stay within that
    element and its neuron's row of ``grad_coeffs``. A NaN or infinite ``a``, ``b`` or ``c``
    gives NaN for the whole neuron, as in the reference.

    At exactly the exponent cap or the output clamp every backend takes the derivative from
    inside (the spec's closed interval; ``torch.clamp``'s gradient there changed in torch 2.14).
    Near them float32 may land on the other side than float64 (a jump in the gradient).

    Autograd: first derivatives run the backend's kernels; higher ones (``create_graph=True``)
    and batched ones (``is_grads_batched=True``) run the reference's. Inside ``torch.func``
    transforms (grad, vmap, jvp, hessian, ...) the reference runs, whatever the backend; but
    ``torch.compile(fullgraph=True)`` of such a transform fails with a kernel backend (Dynamo
    cannot see the transform, and the registered op has no rule for it): use
    ``backend="reference"`` there, or ``fullgraph=False``. Inputs with forward-mode AD tangents
    (``torch.autograd.forward_ad``) run the reference in eager mode.
    """
    if torch.overrides.has_torch_function((x, coeffs)):  # torch.fx.symbolic_trace's Proxy, ...
        return torch.overrides.handle_torch_function(deu, (x, coeffs), x, coeffs, dim, backend, degenerate_grad)
    dim = _validate(x, coeffs, dim)
    if degenerate_grad not in DEGENERATE_GRADS:
        raise ValueError(f"kfuse.deu: degenerate_grad must be one of {list(DEGENERATE_GRADS)}; got {degenerate_grad!r}")
    order = _ORDER.get(x.device.type, ("reference",))
    chosen = _backends.select_for("deu", backend, x.device, x.dtype, lambda: backend_reasons(x), order)
    # The routes of docs/CONTRIBUTING.md's table (kfuse._routing). Under torch.compile the op takes
    # x as it is (it lays it out itself: Dynamo cannot sort symbolic strides, as _order does, so a
    # dynamic channels-last x failed to compile).
    path = _routing.route(chosen, (x, coeffs))
    if degenerate_grad == "gravitation" and _routing.needs_grad((x, coeffs)):
        if path == _routing.REGISTERED or _routing.tracing() or _routing.transformed((x, coeffs)):
            raise ValueError(
                "kfuse.deu: degenerate_grad='gravitation' runs in eager mode only (plain tensors, "
                "no torch.compile/jit tracing, torch.func transform, forward-mode AD or dispatch mode); "
                "use degenerate_grad='exact' there")
        return _GravitationDeu.apply(x if chosen == "reference" else _in_order(x, _order(x)), coeffs, dim, chosen)
    if path == _routing.REFERENCE:
        return deu_reference(x, coeffs, dim)
    if path == _routing.EAGER:
        if not _routing.needs_grad((x, coeffs)):
            with _routing.labelled("kfuse.deu"):  # nothing to differentiate: no autograd node (-2 us)
                return _forward_impl(x, coeffs, dim, chosen)
        return _EagerDeu.apply(_in_order(x, _order(x)), coeffs, dim, chosen)  # saved dense for backward
    # A dispatch mode (make_fx, FakeTensorMode, FlopCounterMode) or a tensor subclass must see the
    # registered op: _EagerDeu hands the extension raw pointers, which such tensors may not have
    # (FakeTensorMode crashed) and such modes cannot see (make_fx recorded no kernel).
    return deu_forward(x, coeffs, dim, chosen)
