"""LoRA linear layers: the public ops, their torch.library registration and autograd.

``kfuse.lora_linear`` computes ``y = x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Bᵀ + lora_bias)``
(see ``kfuse.reference.lora`` for the definition) with autograd for every input;
``kfuse.lora_linear_multi`` serves a batch whose rows use different adapters (forward only).

Backends: ``triton`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``cpu`` (torch's
BLAS calls in the cheapest order, written here in Python; the dropout mask from the extension) and ``reference``.
There are no CUDA (csrc) kernels for LoRA: the ``cuda`` backend always says so. Routes: ``kfuse._routing``; a plain,
valid call skips their Python checks through one extension call (:func:`_gate`, :func:`_multi_gate`).

Dropout masks are never stored: the forward draws a seed (an int64 tensor ``[1]`` on x's device,
from torch's default generator of that device, so ``torch.manual_seed`` reproduces it and
nothing syncs on the GPU), and the backward regenerates the mask from it
(:func:`dropout_mask`). Saved for the backward: x, ``S = dropout(x) Aᵀ`` (``[M, r]``, float32;
float64 for float64 x), the seed, and the parameters W, A, B.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from kfuse import _backends, _checks, _flops, _routing
from kfuse.reference.lora import (
    acc_dtype,
    lora_linear_multi_reference,
    lora_linear_reference,
    lora_shrink_reference,
    reference_dropout_mask,
)

__all__ = [
    "BACKENDS", "backend_reasons", "dropout_mask", "lora_backward", "lora_forward", "lora_linear",
    "lora_linear_multi", "lora_multi_forward",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (torch.int32, torch.int64)
# Preference for backend="auto", fastest first. CPU tensors: the BLAS calls below (the Triton
# interpreter is for tests only).
_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

#: The backends of the LoRA ops, besides ``"auto"`` (``backend_reasons`` keys).
BACKENDS = _backends.BACKENDS


# ---------------------------------------------------------------- validation


def _check_tensor(op: str, name: str, t: object, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"kfuse.{op}: {name} must be a torch.Tensor{' or None' if optional else ''}; "
                        f"got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise TypeError(f"kfuse.{op}: {name} must be a dense (strided) tensor; got a {kind} tensor")


def _check_devices(op: str, x: Tensor, named: tuple[tuple[str, Tensor | None], ...]) -> None:
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"kfuse.{op}: {name} is on {t.device} but x is on {x.device}; "
                             "move them to the same device")


def _check_x_weight(op: str, x: Tensor, weight: Tensor, fan_in_fan_out: bool) -> tuple[int, int]:
    """(K, N) of a valid pair; raises naming the argument otherwise."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"kfuse.{op}: x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"kfuse.{op}: x must have at least one dimension ([..., K]); got a 0-d tensor")
    K = x.shape[-1]
    if weight.dtype != x.dtype:
        raise TypeError(f"kfuse.{op}: weight must have x's dtype ({x.dtype}); got {weight.dtype}")
    if weight.ndim != 2 or weight.shape[0 if fan_in_fan_out else 1] != K:
        want = f"[K, N] = [{K}, N] (fan_in_fan_out=True)" if fan_in_fan_out else f"[N, K] = [N, {K}]"
        raise ValueError(f"kfuse.{op}: weight must have shape {want} for x of shape {tuple(x.shape)}; "
                         f"got {list(weight.shape)}")
    return K, weight.shape[1 if fan_in_fan_out else 0]


def _check_adapter_dtype(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if t.dtype != torch.float32 and t.dtype != x.dtype:
        raise TypeError(f"kfuse.{op}: {name} must be float32 or x's dtype ({x.dtype}); got {t.dtype}")


def _check_bias(op: str, name: str, t: Tensor | None, N: int, dtype: torch.dtype, whose: str) -> None:
    if t is None:
        return
    if t.ndim != 1 or t.shape[0] != N:
        raise ValueError(f"kfuse.{op}: {name} must have shape [N] = [{N}]; got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"kfuse.{op}: {name} must have {whose} dtype ({dtype}); got {t.dtype}")


def _validate(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: object, bias: Tensor | None,
              lora_bias: Tensor | None, dropout_p: object, fan_in_fan_out: bool,
              op: str = "lora_linear") -> tuple[float, float]:
    """Checks :func:`lora_linear`'s arguments; returns ``(scaling, dropout_p)`` as floats."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_tensor(op, name, t)
    _check_tensor(op, "bias", bias, optional=True)
    _check_tensor(op, "lora_bias", lora_bias, optional=True)
    _checks.check_bool(f"kfuse.{op}", "fan_in_fan_out", fan_in_fan_out)
    scaling = _checks.real(f"kfuse.{op}", "scaling", scaling)
    p = _checks.real(f"kfuse.{op}", "dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"kfuse.{op}: dropout_p must be in [0, 1); got {p}")
    K, N = _check_x_weight(op, x, weight, fan_in_fan_out)
    if lora_A.ndim != 2 or lora_A.shape[1] != K or lora_A.shape[0] < 1:
        raise ValueError(f"kfuse.{op}: lora_A must have shape [r, K] = [r, {K}] with r >= 1 "
                         f"(K = x.shape[-1]); got {list(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_B.ndim != 2 or lora_B.shape[0] != N or lora_B.shape[1] != r:
        raise ValueError(f"kfuse.{op}: lora_B must have shape [N, r] = [{N}, {r}] (N from weight, r from "
                         f"lora_A); got {list(lora_B.shape)}")
    _check_adapter_dtype(op, "lora_A", lora_A, x)
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"kfuse.{op}: lora_B must have lora_A's dtype ({lora_A.dtype}); got {lora_B.dtype}")
    _check_bias(op, "bias", bias, N, x.dtype, "x's")
    _check_bias(op, "lora_bias", lora_bias, N, lora_A.dtype, "lora_A's")
    _check_devices(op, x, (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias),
                           ("lora_bias", lora_bias)))
    return scaling, p


def _validate_multi(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
                    adapter_ids: Tensor, bias: Tensor | None, fan_in_fan_out: bool,
                    op: str = "lora_linear_multi") -> None:
    """Checks :func:`lora_linear_multi`'s arguments (shapes, dtypes, devices; not the values)."""
    for name, t in (("x", x), ("weight", weight), ("A_stack", A_stack), ("B_stack", B_stack),
                    ("scalings", scalings), ("ranks", ranks), ("adapter_ids", adapter_ids)):
        _check_tensor(op, name, t)
    _check_tensor(op, "bias", bias, optional=True)
    _checks.check_bool(f"kfuse.{op}", "fan_in_fan_out", fan_in_fan_out)
    K, N = _check_x_weight(op, x, weight, fan_in_fan_out)
    if A_stack.ndim != 3 or A_stack.shape[2] != K:
        raise ValueError(f"kfuse.{op}: A_stack must have shape [L, r_max, K] = [L, r_max, {K}]; "
                         f"got {list(A_stack.shape)}")
    L, r_max = A_stack.shape[0], A_stack.shape[1]
    if B_stack.ndim != 3 or tuple(B_stack.shape) != (L, N, r_max):
        raise ValueError(f"kfuse.{op}: B_stack must have shape [L, N, r_max] = [{L}, {N}, {r_max}] (L, r_max "
                         f"from A_stack, N from weight); got {list(B_stack.shape)}")
    _check_adapter_dtype(op, "A_stack", A_stack, x)
    if B_stack.dtype != A_stack.dtype:
        raise TypeError(f"kfuse.{op}: B_stack must have A_stack's dtype ({A_stack.dtype}); got {B_stack.dtype}")
    if scalings.ndim != 1 or scalings.shape[0] != L:
        raise ValueError(f"kfuse.{op}: scalings must have shape [L] = [{L}]; got {list(scalings.shape)}")
    if not scalings.dtype.is_floating_point:
        raise TypeError(f"kfuse.{op}: scalings must be a floating tensor; got {scalings.dtype}")
    if ranks.ndim != 1 or ranks.shape[0] != L:
        raise ValueError(f"kfuse.{op}: ranks must have shape [L] = [{L}]; got {list(ranks.shape)}")
    if ranks.dtype not in _INTS:
        raise TypeError(f"kfuse.{op}: ranks must be int32 or int64; got {ranks.dtype}")
    if adapter_ids.dtype not in _INTS:
        raise TypeError(f"kfuse.{op}: adapter_ids must be int32 or int64; got {adapter_ids.dtype}")
    lead = tuple(x.shape[:-1])
    if tuple(adapter_ids.shape) != lead and (adapter_ids.ndim != 1 or adapter_ids.shape[0] != math.prod(x.shape[:-1])):
        per_sequence = f", or one per sequence, [x.shape[0]] = [{x.shape[0]}]" if x.ndim > 2 else ""
        raise ValueError(f"kfuse.{op}: adapter_ids must hold one id per row of x: shape x.shape[:-1] = {list(lead)} "
                         f"or [M] = [{math.prod(x.shape[:-1])}]{per_sequence}; got {list(adapter_ids.shape)}")
    _check_bias(op, "bias", bias, N, x.dtype, "x's")
    _check_devices(op, x, (("weight", weight), ("A_stack", A_stack), ("B_stack", B_stack), ("scalings", scalings),
                           ("ranks", ranks), ("adapter_ids", adapter_ids), ("bias", bias)))


# Up to this many ids (a decode batch), the CPU backend groups the rows by adapter from a list on the host
# rather than with argsort / unique_consecutive / advanced indexing (~20 small ops, 3-8 µs each), and the
# value checks read a short tensor's bounds from a list: 1 row over 8 adapters took 96 µs where a torch
# loop over the used adapters took 54 (F.linear alone 7; CPU hunt, 2026-12-07).
_HOST_GROUP_ROWS = 64


def _bounds(t: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer CPU tensor (adapter ids): one host read of its values when short."""
    if t.numel() <= _HOST_GROUP_ROWS:
        v = t.reshape(-1).tolist()
        return min(v), max(v)
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def _check_multi_values(ranks: Tensor, adapter_ids: Tensor, L: int, r_max: int, op: str = "lora_linear_multi") -> None:
    """The value checks of CPU tensors (free there; on a GPU they would sync the host)."""
    if adapter_ids.numel():
        lo, hi = _bounds(adapter_ids)
        if lo < -1 or hi >= L:
            raise IndexError(f"kfuse.{op}: adapter_ids must be in [-1, L) = [-1, {L}) (-1 = the base model only); "
                             f"got values in [{lo}, {hi}]")
    if ranks.numel():  # (aminmax even when short: the work must not depend on how many adapters are loaded)
        lo, hi = (int(v) for v in torch.aminmax(ranks))
        if lo < 0 or hi > r_max:
            raise ValueError(f"kfuse.{op}: ranks must be in [0, r_max] = [0, {r_max}] (r_max = A_stack.shape[1]); "
                             f"got values in [{lo}, {hi}]")


def _value_checkable(tensors: tuple[Tensor, ...]) -> bool:
    """Whether the value checks can run now: plain CPU tensors, nothing tracing (under a trace
    the registered op checks them when it runs, or the reference path asserts them: see
    :func:`_check_multi_reference`)."""
    return (tensors[0].device.type == "cpu" and not _routing.tracing() and all(_routing.plain(t) for t in tensors)
            and not torch._C._len_torch_dispatch_stack())


def _check_multi_reference(ranks: Tensor, adapter_ids: Tensor, L: int, r_max: int, tensors: tuple) -> None:
    """The value checks on the reference path, which reads out-of-range ids as the base model and ranks
    past r_max as r_max: eagerly where they can run; under torch.func transforms on the values beneath
    (an int() of a batched tensor failed with a vmap .item() error); under a CPU trace as asserts in the
    graph (the compiled reference, taken when an input requires grad, checked nothing: bug hunt). A GPU
    trace asserts nothing (a device assert there costs what the GPU kernels' check would)."""
    if adapter_ids.device.type != "cpu":
        return
    # Dynamo first: it cannot trace the functorch query.
    if not _routing.tracing() and _routing.functorch_wrapped(tensors):
        for r in _routing.functorch_values(ranks):
            for ids in _routing.functorch_values(adapter_ids):
                _check_multi_values(r, ids, L, r_max)
    elif _value_checkable(tensors):
        _check_multi_values(ranks, adapter_ids, L, r_max)
    else:  # a trace, or tensor subclasses / dispatch modes (make_fx, fake tensors)
        torch._assert_async(((adapter_ids >= -1) & (adapter_ids < L)).all(),
                            f"kfuse.lora_linear_multi: adapter_ids must be in [-1, L) = [-1, {L})")
        torch._assert_async(((ranks >= 0) & (ranks <= r_max)).all(),
                            f"kfuse.lora_linear_multi: ranks must be in [0, r_max] = [0, {r_max}]")


# ---------------------------------------------------------------- backend choice


def backend_reasons(x: Tensor) -> dict[str, list[str]]:
    """For each backend, why it cannot run the LoRA ops on ``x`` (empty list: it can). Depends on
    x's device type and dtype only (``_backends.select_for`` memoises on them)."""
    return {
        "triton": _backends.triton_reasons_no_f64(x.device, x.dtype, "LoRA"),
        "cuda": ["kfuse has no CUDA (csrc) kernels for LoRA; the Triton kernels run CUDA tensors"],
        "cpu": [] if x.device.type == "cpu" else [f"x is on {x.device.type}, not cpu"],
        "reference": [],
    }


def _select(op: str, backend: str, x: Tensor) -> str:
    return _backends.select_for(op, backend, x.device, x.dtype, lambda: backend_reasons(x),
                                _ORDER.get(x.device.type, ("reference",)))



# ---------------------------------------------------------------- dropout seeds and masks


def _draw_seed(device: torch.device) -> Tensor:
    """A dropout seed: int64 ``[1]`` on ``device``, from that device's default generator
    (reproducible under ``torch.manual_seed``; no host sync on a GPU)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _no_seed(device: torch.device) -> Tensor:
    """The registered ops' stand-in for "no dropout": int64 ``[0]``."""
    return torch.empty(0, dtype=torch.int64, device=device)


def _save(ctx, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, S: Tensor, seed: Tensor | None) -> None:
    """What the backward needs of the forward, by ``ctx.needs_input_grad`` (x, weight, lora_A, lora_B first): x for
    dA and dW only, S for dB only (dx needs neither). Saved whatever was needed, they kept an M × K activation
    alive where torch's own linear frees it: x under a frozen layer trained through (dx only), x, S under BitFit
    (biases only; modes-and-hooks hunt, 2026-12-07). The shapes stand in for them (:func:`_saved`)."""
    need = ctx.needs_input_grad
    keep_x, keep_s = need[1] or need[2], need[3]
    ctx.save_for_backward(x if keep_x else None, weight, lora_A, lora_B, S if keep_s else None, seed)
    ctx.absent = (None if keep_x else (x.shape, x.dtype), None if keep_s else (S.shape, S.dtype))


def _saved(ctx) -> tuple[Tensor, ...]:
    """:func:`_save`'s tensors, a zero-stride stand-in (one element) for x or S where they were not kept: their
    shapes and dtypes are read, their values not."""
    x, weight, lora_A, lora_B, S, seed = ctx.saved_tensors
    x_meta, s_meta = ctx.absent
    if x_meta is not None:
        x = torch.zeros((), dtype=x_meta[1], device=weight.device).expand(x_meta[0])
    if s_meta is not None:
        S = torch.zeros((), dtype=s_meta[1], device=weight.device).expand(s_meta[0])
    return x, weight, lora_A, lora_B, S, seed


def _generator_mask(seed: Tensor, M: int, K: int, p: float) -> Tensor:
    g = torch.Generator(device=seed.device)
    g.manual_seed(int(seed.item()))
    # A batched backward (is_grads_batched) regenerates the mask inside autograd's vmap mode, which
    # refuses random ops; the mask depends on the seed only.
    with _routing.outside_legacy_vmap():
        # float32 whatever torch's default dtype: a float64 default drew another mask (the backward under another
        # default than its forward regenerated a different one), a bfloat16 default rounded p and the draws
        return torch.rand(M, K, generator=g, device=seed.device, dtype=torch.float32) >= p


def _cpu_mask(seed: Tensor, M: int, K: int, p: float) -> Tensor:
    """The cpu backend's mask: the Triton kernels' Philox draw, from the extension (``_C.lora_dropout_keep``:
    OpenMP; torch.rand on a seeded generator took 19 % of a GPT-2 LoRA training step with dropout,
    ``bench/results/2026-12-06-cpu-lora-dropout.md``), or :func:`_generator_mask` without it (or off the CPU)."""
    ext = _backends.extension()
    if ext is None or seed.device.type != "cpu":
        return _generator_mask(seed, M, K, p)
    return ext.lora_dropout_keep(int(seed.item()), M, K, p)


def _dropout_mul(seed: Tensor, p: float, ts: list[Tensor], inplace: list[bool]) -> list[Tensor]:
    """Each of ``ts`` (``[M, K]`` float32/float64, one shape) times the cpu backend's mask for ``seed``
    (:func:`_cpu_mask`'s), in place where ``inplace``. With the extension the mask is made row by row inside the
    products, once for all of them (``_C.lora_dropout_mul``): no bool ``[M, K]`` tensor, none of the float copies of
    it a product with it made (16 a step of the LoRA demo's GPT-2, ~6 % of it), one draw for the backward's two
    products (``bench/results/2026-12-07-cpu-lora-dropout-mul.md``)."""
    ext = _backends.extension()
    if ext is None or ts[0].device.type != "cpu":
        keep = _cpu_mask(seed, ts[0].shape[0], ts[0].shape[1], p)
        return [t.mul_(keep) if ip else t * keep for t, ip in zip(ts, inplace, strict=True)]
    # (a view of a transposed x is made contiguous, and then masked in place; the products the backward masks are
    # new and contiguous. A lazily negated x, contiguous too, was read with the wrong sign: layout hunt, 2026-12-07)
    srcs = [_backends.dense(t) for t in ts]
    own = [ip or d is not t for d, t, ip in zip(srcs, ts, inplace, strict=True)]  # a copy is ours to write
    return ext.lora_dropout_mul(int(seed.item()), srcs, p, own)


def dropout_mask(seed: Tensor, M: int, K: int, p: float, backend: str) -> Tensor:
    """The dropout mask ``backend``'s forward and backward use for ``seed``.

    Args:
        seed: int64 ``[1]``, as the forward saved it (on x's device).
        M, K: the mask's shape (rows of the flattened x, features).
        p: the dropout probability.
        backend: ``"triton"`` or ``"cpu"`` (the same Philox draw: ``triton_kernels/lora.py``'s ``_keep``; the
            ``cpu`` backend without the compiled extension draws as ``reference`` does), or ``"reference"`` (a
            ``torch.Generator`` on the seed's device seeded with it:
            ``torch.rand(M, K, generator=g, dtype=torch.float32) >= p``).
    Returns:
        bool ``[M, K]`` on the seed's device, True = kept (probability ``1 − p``).
    """
    if backend == "triton":
        return _tk().lora_dropout_mask(seed, M, K, p)
    if backend == "cpu":
        return _cpu_mask(seed, M, K, p)
    return _generator_mask(seed, M, K, p)


# ---------------------------------------------------------------- implementations


def _flat(t: Tensor) -> Tensor:
    """``t [..., C]`` as ``[M, C]`` (a view when it can be; C = 0 and M = 0 included). Not
    ``reshape(Size.numel(), C)``: that specialised a dynamic batch size in torch.export."""
    if t.ndim == 2:
        return t
    return t.unsqueeze(0) if t.ndim == 1 else t.flatten(0, -2)


_TK = None


def _tk():
    global _TK
    if _TK is None:  # an import statement per call cost ~0.4 us
        from kfuse.triton_kernels import lora as tk  # noqa: PLC0415 (triton is optional)

        _TK = tk
    return _TK


_to = _backends.as_dtype  # (short: the cpu backend converts at every other line)


def _combined_bias(bias: Tensor | None, lora_bias: Tensor | None, scaling: float, acc: torch.dtype) -> Tensor | None:
    """``bias + scaling · lora_bias`` ([N], acc dtype), or None when neither is given."""
    if lora_bias is None:
        return None if bias is None else _to(bias, acc)
    lb = _to(lora_bias, acc) * scaling
    return lb if bias is None else lb.add_(_to(bias, acc))


def _has_inf(y: Tensor) -> bool:
    """Whether ``y`` (a CPU tensor) holds an inf. ``aminmax`` first, one vectorised pass: ``isinf(y).any()`` alone
    cost 10-19x as much (2 threads, this project's Intel VM: 110 against 12 us at 128 x 1024 bf16, 1.78 against
    0.18 ms at 1024 x 2048), a third of the bf16 forward's time beside PEFT's at 1024 x 2048 x 2048. Its extremes are
    finite unless y holds an inf or a NaN; only then the exact test (a NaN alone is no reason for the fp32 GEMM)."""
    if y.numel() == 0:  # (aminmax refuses an empty tensor)
        return False
    lo, hi = torch.aminmax(y)
    return not (-math.inf < float(lo) and float(hi) < math.inf) and bool(torch.isinf(y).any())


def _base_mm(a: Tensor, a_acc: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``bias + a @ b`` in ``a_acc``'s dtype (``a_acc``: ``a`` cast to it, which the caller has anyway;
    ``bias`` in it too). Half ``a`` and ``b``: torch's half GEMM (fp32 accumulation, its output rounded to
    half), cast up, as PEFT's own ``F.linear``. Casting W to fp32 instead (as up to 2026-12-06 above 32
    rows) made a temporary fp32 copy of W at every forward and dx (68 MB for a bf16 4096 x 4096 W; memory
    hunt), and cost more than the half GEMM at decode sizes everywhere (4-10x torch's half x Wᵀ at M =
    1..16; perf hunt) and at every M on CPUs with bf16 arithmetic (2048 x 2048 bf16, r 16, 2 threads, an
    AVX512-BF16/AMX VM: the forward 3.2-4.0x faster now, 1.2-1.3x PEFT's time against 4.2-5.4x; fp16 there,
    which it has no fast GEMM for, 22% faster to 8% slower: bench/results/2026-12-06-cpu-lora-half.md). On the AMD VM
    of 2026-12-02 the casts and an fp32 GEMM took 0.6-0.8x the half GEMM's time (256 x 1024 x 1024)."""
    if a.dtype != a_acc.dtype:
        y = torch.mm(a, b)
        # Rounded to half, a product past its range is inf where the fp32 sum with the rest (the bias, the LoRA
        # term) is finite, as it is on the other backends (numerical hunt): then the fp32 GEMM below.
        if not _has_inf(y):
            y = _to(y, a_acc.dtype)
            return y if bias is None else y.add_(bias)
    b = _to(b, a_acc.dtype)
    return torch.mm(a_acc, b) if bias is None else torch.addmm(bias, a_acc, b)


def _torch_forward(x2: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, bias: Tensor | None,
                   lora_bias: Tensor | None, p: float, fifo: bool, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``cpu`` backend (torch's BLAS calls; runs on any device): ``(y [M, N] x's dtype, S [M, r] acc)``.

    ``y = addmm(bias + s·lora_bias, x, Wᵀ)``, then ``y += s · S Bᵀ`` in place (``addmm_`` with
    ``alpha=s``): no M×N temporary, no scaled copy of B. Half-precision x and W: the base GEMM in
    half (see :func:`_base_mm`), the rest in float32 (x cast, S kept in fp32), y rounded to half at the
    end.
    """
    acc = acc_dtype(x2.dtype)
    xa = _to(x2, acc)
    b = _combined_bias(bias, lora_bias, scaling, acc)
    y = _base_mm(x2, xa, weight if fifo else weight.t(), b)
    if seed is None:
        S = torch.mm(xa, _to(A, acc).t())
    else:  # dropout's 1/(1-p) on S ([M, r]) rather than on x ([M, K])
        # (in place when xa is x's float copy, half x; x itself is never written)
        S = torch.mm(_dropout_mul(seed, p, [xa], [xa is not x2])[0], _to(A, acc).t()).mul_(1.0 / (1.0 - p))
    if scaling != 0.0:
        y.addmm_(S, _to(B, acc).t(), alpha=scaling)
    else:  # BLAS skips the product when alpha is 0; a NaN/inf adapter must still reach y, as in PEFT
        y.add_(torch.mm(S, _to(B, acc).t()).mul_(scaling))
    return _to(y, x2.dtype), S


# torch's CPU GEMMs (MKL 2024.2 in torch 2.14's wheels) are slow where a rank-r matrix with 2 <= r <= ~10 is row-major
# (leading dimension r) in the backward's dy B ([M, N] x [N, r]) and dyᵀ S ([N, M] x [M, r] -> [N, r]): the same
# products with that matrix transposed (leading dimension N) ran 1.1-9x faster from M = 64 rows (2368 rows, r = 4,
# N = 384, fp32, 2 threads, AMD EPYC Zen 4: 579 -> 192 and 899 -> 196 us), but slower at r = 1 and r >= 12 (MKL's
# other kernels: 0.5-1.0x) and below ~64 rows (0.15-0.7x: at M = 1 dy B took 4 us, 26 through the transposed copy).
# Measured on that one machine only: bench/lora_cpu_skinny.py prints the grid (its figures:
# bench/results/2026-12-07-cpu-lora-skinny-gemm.md). The forward's x Aᵀ and S Bᵀ and the backward's G A and Gᵀ x
# were in the fast layouts already.
_SKINNY_RANKS = range(2, 9)
_SKINNY_MIN_M = 64


def _torch_backward(dy2: Tensor, x2: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, S: Tensor,
                    seed: Tensor | None, p: float, fifo: bool, needs: tuple[bool, ...]) -> list[Tensor | None]:
    """Gradients of :func:`_torch_forward`: ``[dx, dW, dA, dB, dbias, dlora_bias]`` (None where
    ``needs`` is False), each in its input's dtype."""
    need_x, need_w, need_a, need_b, need_bias, need_lb = needs
    acc = acc_dtype(x2.dtype)
    dya = _to(dy2, acc)
    skinny = dy2.shape[0] >= _SKINNY_MIN_M and A.shape[0] in _SKINNY_RANKS
    out: list[Tensor | None] = [None] * 6
    if need_x or need_a:
        # G = s/(1-p) · dy B  [M, r]: the gradient of S, with dropout's scale folded in (B through a contiguous Bᵀ
        # where that is faster: _SKINNY_RANKS).
        Ba = _to(B, acc)
        G = torch.mm(dya, Ba.t().contiguous().t() if skinny else Ba).mul_(
            scaling / (1.0 - p) if seed is not None else scaling)
        Aa = _to(A, acc)
        ga = torch.mm(G, Aa) if need_x and seed is not None else None  # dx's low-rank term, to be masked
        xa = _to(x2, acc) if need_a else None  # dA's input (x itself when float32: then never masked in place)
        if seed is not None:  # mask ⊙ (G A) and mask ⊙ x with one draw of the mask for both
            pairs = [(t, ip) for t, ip in ((ga, True), (xa, xa is not x2)) if t is not None]
            masked = iter(_dropout_mul(seed, p, [t for t, _ in pairs], [ip for _, ip in pairs]))
            ga, xa = (None if t is None else next(masked) for t in (ga, xa))
        if need_x:
            dx = _base_mm(dy2, dya, weight.t() if fifo else weight)
            if ga is None:
                dx.addmm_(G, Aa)
            else:
                dx.add_(ga)
            out[0] = _to(dx, x2.dtype)
        if need_a:
            out[2] = _to(torch.mm(G.t(), xa), A.dtype)
    if need_w:
        xa = _to(x2, acc)
        out[1] = _to(torch.mm(xa.t(), dya) if fifo else torch.mm(dya.t(), xa), weight.dtype)
    if need_b:  # dB = s · dyᵀ S [N, r] (made as (Sᵀ dy)ᵀ where that is faster: _SKINNY_RANKS)
        out[3] = (_to(torch.mm(S.t(), dya).mul_(scaling), B.dtype).t().contiguous() if skinny
                  else _to(torch.mm(dya.t(), S).mul_(scaling), B.dtype))
    if need_bias or need_lb:
        colsum = dya.sum(0)
        if need_bias:
            out[4] = _to(colsum, x2.dtype)  # bias has x's dtype (validated)
        if need_lb:
            out[5] = _to(colsum * scaling, A.dtype)  # the adapters' dtype; not in place: dbias may be colsum
    return out


def _triton_forward(x2: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, bias: Tensor | None,
                    lora_bias: Tensor | None, p: float, fifo: bool, seed: Tensor | None,
                    save_s: bool) -> tuple[Tensor, Tensor | None]:
    # W, A and B are read in place through their strides (either layout of W, no copy).
    dense = _backends.dense
    return _tk().lora_forward(dense(x2), weight.resolve_neg(), fifo, A.resolve_neg(), B.resolve_neg(), scaling,
                              dense(bias), dense(lora_bias), seed, p, save_s)


def _triton_backward(dy2: Tensor, x2: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, S: Tensor,
                     seed: Tensor | None, p: float, fifo: bool, needs: tuple[bool, ...]) -> list[Tensor | None]:
    need_x, need_w, need_a, need_b, need_bias, need_lb = needs
    dense = _backends.dense
    x2 = dense(x2) if need_a else x2  # (read for dA only: see _save)
    dx, dA, dB, colsum = _tk().lora_backward(dense(dy2), x2, weight.resolve_neg(), fifo, A.resolve_neg(),
                                             B.resolve_neg(), scaling, dense(S) if need_b else S, seed,
                                             p, need_x, need_a, need_b, need_bias or need_lb)
    out: list[Tensor | None] = [dx if need_x else None, None, dA.to(A.dtype) if need_a else None,
                                dB.to(B.dtype) if need_b else None, None, None]
    if need_bias:
        out[4] = colsum.to(x2.dtype)
    if need_lb:
        out[5] = (colsum * scaling).to(A.dtype)
    if need_w:  # dW = dyᵀ x: torch's GEMM (the LoRA case freezes W; correct, not fast)
        out[1] = _torch_backward(dy2, x2, weight, A, B, scaling, S, None, p, fifo,
                                 (False, True, False, False, False, False))[1]
    return out


def _forward_impl(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, bias: Tensor | None,
                  lora_bias: Tensor | None, p: float, fifo: bool, backend: str, seed: Tensor | None,
                  save_s: bool) -> tuple[Tensor, Tensor | None]:
    """``(y [..., N] in x's dtype, S [M, r] acc or None)`` for ``x [..., K]`` by ``backend``;
    dropout with mask ``dropout_mask(seed, M, K, p, backend)`` when ``seed`` is not None."""
    K = x.shape[-1]
    x2 = _flat(x)
    N = weight.shape[1] if fifo else weight.shape[0]
    if backend == "triton":
        y2, S = _triton_forward(x2, weight, A, B, scaling, bias, lora_bias, p, fifo, seed, save_s)
    elif backend == "reference":  # the registered ops with backend="reference"
        mask = None if seed is None else dropout_mask(seed, x2.shape[0], K, p, backend)
        y2 = lora_linear_reference(x2, weight, A, B, scaling, bias, lora_bias, mask=mask, dropout_p=p,
                                   fan_in_fan_out=fifo)
        S = lora_shrink_reference(x2, A, mask, p)
    else:  # cpu
        y2, S = _torch_forward(x2, weight, A, B, scaling, bias, lora_bias, p, fifo, seed)
    y = y2 if x.ndim == 2 else y2.view(*x.shape[:-1], N)
    return y, S


def _backward_impl(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, S: Tensor,
                   seed: Tensor | None, p: float, fifo: bool, needs: tuple[bool, ...],
                   backend: str) -> list[Tensor | None]:
    """``[dx, dW, dA, dB, dbias, dlora_bias]`` (None where ``needs`` is False) for ``dy [..., N]``."""
    K = x.shape[-1]
    x2 = _flat(x)
    dy2 = _flat(dy)
    if backend == "triton":
        grads = _triton_backward(dy2, x2, weight, A, B, scaling, S, seed, p, fifo, needs)
    elif backend == "reference":
        mask = None if seed is None else dropout_mask(seed, x2.shape[0], K, p, backend)
        # Contiguous, as the fake kernel says and the other backends' GEMMs give: the vjp lays each gradient out
        # like its input, and a compiled backward of transposed weights failed Inductor's stride check (export hunt).
        grads = [None if g is None else g.contiguous()
                 for g in _reference_vjp(dy2, x2, weight, A, B, scaling, p, fifo, mask, needs, None, None)]
    else:
        grads = _torch_backward(dy2, x2, weight, A, B, scaling, S, seed, p, fifo, needs)
    if grads[0] is not None:
        grads[0] = grads[0].view(x.shape)
    return grads


def _reference_vjp(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scaling: float, p: float,
                   fifo: bool, mask: Tensor | None, needs: tuple[bool, ...], bias_dtype: torch.dtype | None,
                   lora_bias_dtype: torch.dtype | None) -> list[Tensor | None]:
    """The reference's gradients ``[dx, dW, dA, dB, dbias, dlora_bias]`` for the given mask,
    differentiable (for ``create_graph=True``: its graph reaches every input and ``dy``). The
    biases enter linearly, so zeros stand in for them (they are not saved)."""
    N = dy.shape[-1]
    bias = torch.zeros(N, dtype=bias_dtype or x.dtype, device=x.device) if needs[4] else None
    lora_bias = torch.zeros(N, dtype=lora_bias_dtype or A.dtype, device=x.device) if needs[5] else None
    primals = (x, weight, A, B, bias, lora_bias)
    live = [i for i, t in enumerate(primals) if t is not None]

    def f(*ts: Tensor) -> Tensor:
        args = list(primals)
        for i, t in zip(live, ts, strict=True):
            args[i] = t
        return lora_linear_reference(args[0], args[1], args[2], args[3], scaling, args[4], args[5], mask=mask,
                                     dropout_p=p, fan_in_fan_out=fifo)

    _, vjp = torch.func.vjp(f, *(primals[i] for i in live))
    out: list[Tensor | None] = [None] * 6
    for i, g in zip(live, vjp(dy), strict=True):
        out[i] = g if needs[i] else None
    return out


# ---------------------------------------------------------------- registered ops


@torch.library.custom_op("kfuse::lora_forward", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def lora_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None,
                 lora_bias: Tensor | None, dropout_p: float, fan_in_fan_out: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Registered op behind :func:`lora_linear` (``torch.ops.kfuse.lora_forward``), differentiable.

    Dropout applies when ``dropout_p > 0`` (the caller passes 0 in evaluation). The arguments are
    :func:`lora_linear`'s; ``backend`` is ``"auto"`` or a backend name (checked).

    Returns:
        ``y`` ``[..., N]`` in x's dtype; ``S = dropout(x) Aᵀ`` ``[M, r]`` float32 (float64 for
        float64 x); the dropout seed, int64 ``[1]`` on x's device (``[0]`` without dropout). S
        and the seed are outputs so that compiled graphs save them for the backward.
    """
    scaling, p = _validate(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out,
                           "lora_forward")
    chosen = _select("lora_forward", backend, x)
    seed = _draw_seed(x.device) if p > 0 else None
    y, S = _forward_impl(x, weight, lora_A, lora_B, scaling, bias, lora_bias, p, fan_in_fan_out, chosen, seed, True)
    return y, S, _no_seed(x.device) if seed is None else seed


@lora_forward.register_fake
def _(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None,
      lora_bias: Tensor | None, dropout_p: float, fan_in_fan_out: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _backends.check_backend_name("lora_forward", backend)
    _checks.one_device("kfuse.lora_forward", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias,
                       lora_bias=lora_bias)
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    y = x.new_empty((*x.shape[:-1], N))
    S = x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]), dtype=acc_dtype(x.dtype))
    seed = x.new_empty((1 if dropout_p > 0 else 0,), dtype=torch.int64)
    return y, S, seed


@torch.library.custom_op("kfuse::lora_backward", mutates_args=())
def lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, S: Tensor,
                  seed: Tensor, dropout_p: float, fan_in_fan_out: bool, need_x: bool, need_weight: bool,
                  need_A: bool, need_B: bool, need_bias: bool, need_lora_bias: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`lora_forward` (``torch.ops.kfuse.lora_backward``).

    Args:
        grad_y: ``[..., N]`` like y. x, weight, lora_A, lora_B, scaling, dropout_p,
            fan_in_fan_out: the forward's. S, seed: the forward's outputs.
        need_*: which gradients to compute.
    Returns:
        ``(dx, dweight, dA, dB, dbias, dlora_bias)``, each in its input's dtype (dbias in x's,
        dlora_bias in lora_A's); an empty ``[0]`` tensor where not needed.
    """
    if not isinstance(grad_y, Tensor) or grad_y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"kfuse.lora_backward: grad_y must have y's shape [..., N] with x's leading dims "
                         f"{list(x.shape[:-1])}; got {getattr(grad_y, 'shape', type(grad_y).__name__)}")
    scaling, p = _validate(x, weight, lora_A, lora_B, scaling, None, None, dropout_p, fan_in_fan_out, "lora_backward")
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    if grad_y.shape[-1] != N or grad_y.dtype != x.dtype or grad_y.device != x.device:
        raise ValueError(f"kfuse.lora_backward: grad_y must be [..., N = {N}] in x's dtype and device ({x.dtype}, "
                         f"{x.device}); got {list(grad_y.shape)} {grad_y.dtype} on {grad_y.device}")
    chosen = _select("lora_backward", backend, x)
    M, r = math.prod(x.shape[:-1]), lora_A.shape[0]
    if tuple(S.shape) != (M, r) or S.dtype != acc_dtype(x.dtype):
        raise ValueError(f"kfuse.lora_backward: S must be [M, r] = [{M}, {r}] {acc_dtype(x.dtype)}; "
                         f"got {list(S.shape)} {S.dtype}")
    if seed.dtype != torch.int64 or seed.numel() != (1 if p > 0 else 0):
        raise ValueError("kfuse.lora_backward: seed must be the forward's (int64 [1] with dropout, [0] without)")
    needs = (need_x, need_weight, need_A, need_B, need_bias, need_lora_bias)
    grads = _backward_impl(grad_y, x, weight, lora_A, lora_B, scaling, S, seed if p > 0 else None, p,
                           fan_in_fan_out, needs, chosen)
    empty = (x, weight, lora_A, lora_B, x, lora_A)  # the dtype of each gradient
    return tuple(g if g is not None else e.new_empty(0) for g, e in zip(grads, empty, strict=True))


@lora_backward.register_fake
def _(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, S: Tensor,
      seed: Tensor, dropout_p: float, fan_in_fan_out: bool, need_x: bool, need_weight: bool, need_A: bool,
      need_B: bool, need_bias: bool, need_lora_bias: bool,
      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _backends.check_backend_name("lora_backward", backend)
    _checks.one_device("kfuse.lora_backward", grad_y=grad_y, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, S=S,
                       seed=seed)
    N = grad_y.shape[-1]
    shapes = (x.shape, weight.shape, lora_A.shape, lora_B.shape, (N,), (N,))
    likes = (x, weight, lora_A, lora_B, x, lora_A)
    needs = (need_x, need_weight, need_A, need_B, need_bias, need_lora_bias)
    return tuple(t.new_empty(s if n else (0,)) for t, s, n in zip(likes, shapes, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out, backend = inputs
    _, S, seed = output
    _save(ctx, x, weight, lora_A, lora_B, S, seed)
    ctx.mark_non_differentiable(S, seed)
    ctx.scaling, ctx.p, ctx.fifo = float(scaling), float(dropout_p), fan_in_fan_out
    ctx.backend = _select("lora_forward", backend, x)  # the forward's choice, for "auto" too
    ctx.bias_dtypes = (None if bias is None else bias.dtype, None if lora_bias is None else lora_bias.dtype)


def _registered_backward(ctx, grad_y: Tensor, _grad_S: Tensor | None, _grad_seed: Tensor | None):
    x, weight, lora_A, lora_B, S, seed = _saved(ctx)
    n = ctx.needs_input_grad
    needs = (n[0], n[1], n[2], n[3], n[5], n[6])
    if _routing.differentiable_backward(grad_y):
        mask = dropout_mask(seed, S.shape[0], x.shape[-1], ctx.p, ctx.backend) if ctx.p > 0 else None
        grads = _reference_vjp(grad_y, x, weight, lora_A, lora_B, ctx.scaling, ctx.p, ctx.fifo, mask, needs,
                               *ctx.bias_dtypes)
    else:
        out = lora_backward(grad_y, x, weight, lora_A, lora_B, ctx.scaling, S, seed, ctx.p, ctx.fifo, *needs,
                            ctx.backend)
        grads = [g if need else None for g, need in zip(out, needs, strict=True)]
    dx, dw, da, db, dbias, dlb = grads
    return dx, dw, da, db, None, dbias, dlb, None, None, None


lora_forward.register_autograd(_registered_backward, setup_context=_setup_context)


@torch.library.custom_op("kfuse::lora_multi_forward", mutates_args=())
def lora_multi_forward(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
                       adapter_ids: Tensor, bias: Tensor | None, fan_in_fan_out: bool, backend: str) -> Tensor:
    """Registered op behind :func:`lora_linear_multi` (``torch.ops.kfuse.lora_multi_forward``),
    forward only; the arguments are :func:`lora_linear_multi`'s. Returns ``y [..., N]``."""
    _validate_multi(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out,
                    "lora_multi_forward")
    chosen = _select("lora_multi_forward", backend, x)
    return _multi_impl(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out, chosen)


@lora_multi_forward.register_fake
def _(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
      adapter_ids: Tensor, bias: Tensor | None, fan_in_fan_out: bool, backend: str) -> Tensor:
    _backends.check_backend_name("lora_multi_forward", backend)
    _checks.one_device("kfuse.lora_multi_forward", x=x, weight=weight, A_stack=A_stack, B_stack=B_stack,
                       scalings=scalings, ranks=ranks, adapter_ids=adapter_ids, bias=bias)
    return x.new_empty((*x.shape[:-1], weight.shape[1] if fan_in_fan_out else weight.shape[0]))


# Autocast kernels of the registered forwards: the casts the public ops apply (see lora_linear), so that
# graphs that call the ops directly (torch.export, compiled graphs) run under torch.autocast as eager
# does. Without them autocast cast the torch GEMMs inside the ops one by one: an exported LoRALinear
# failed with "self and mat2 must have the same dtype" under autocast, and an exported MultiLoRALinear
# returned float32 where eager returns the autocast dtype (bug hunt).
def _lora_forward_autocast(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                           bias: Tensor | None, lora_bias: Tensor | None, dropout_p: float, fan_in_fan_out: bool,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    cast = torch.get_autocast_dtype(x.device.type)
    x, weight, bias = (_routing.autocast_cast(cast, t) for t in (x, weight, bias))
    lora_A, lora_B, lora_bias = _autocast_adapters(cast, lora_A, lora_B, lora_bias)
    with torch.autocast(x.device.type, enabled=False):
        return lora_forward(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out, backend)


def _lora_multi_forward_autocast(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor,
                                 ranks: Tensor, adapter_ids: Tensor, bias: Tensor | None, fan_in_fan_out: bool,
                                 backend: str) -> Tensor:
    cast = torch.get_autocast_dtype(x.device.type)
    x, weight, bias = (_routing.autocast_cast(cast, t) for t in (x, weight, bias))
    A_stack, B_stack = _autocast_adapters(cast, A_stack, B_stack)
    with torch.autocast(x.device.type, enabled=False):
        return lora_multi_forward(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out,
                                  backend)


def _lora_backward_autocast(grad_y: Tensor, *args: object) -> tuple[Tensor, ...]:
    # The backward runs in the forward's dtypes (see _routing.autocast_off).
    with torch.autocast(grad_y.device.type, enabled=False):
        return lora_backward(grad_y, *args)


for _key in ("AutocastCPU", "AutocastCUDA"):
    torch.library.impl("kfuse::lora_forward", _key, _lora_forward_autocast)
    torch.library.impl("kfuse::lora_backward", _key, _lora_backward_autocast)
    torch.library.impl("kfuse::lora_multi_forward", _key, _lora_multi_forward_autocast)


# FLOPs under torch.utils.flop_counter.FlopCounterMode (kfuse/_flops.py): the GEMMs' multiply-adds × 2.
def _mnkr(x: Tensor, weight: Tensor, r: int, fifo: bool) -> tuple[int, int, int, int]:
    return math.prod(x.shape[:-1]), weight.shape[1] if fifo else weight.shape[0], x.shape[-1], r


def _forward_flops(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Tensor | None,
                   lora_bias: Tensor | None, dropout_p: float, fan_in_fan_out: bool, backend: str, **_: object) -> int:
    M, N, K, r = _mnkr(x, weight, lora_A.shape[0], fan_in_fan_out)
    return 2 * M * N * K + 2 * M * K * r + 2 * M * r * N  # x Wᵀ, S = x Aᵀ, S Bᵀ


def _backward_flops(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                    S: Tensor, seed: Tensor, dropout_p: float, fan_in_fan_out: bool, need_x: bool, need_weight: bool,
                    need_A: bool, need_B: bool, need_bias: bool, need_lora_bias: bool, backend: str,
                    **_: object) -> int:
    M, N, K, r = _mnkr(x, weight, lora_A.shape[0], fan_in_fan_out)
    flops = 2 * M * N * r if need_x or need_A else 0  # G = dy B
    flops += (2 * M * N * K + 2 * M * r * K) if need_x else 0  # dy W + G A
    flops += 2 * r * M * K if need_A else 0  # Gᵀ x
    flops += 2 * N * M * r if need_B else 0  # dyᵀ S
    return flops + (2 * N * M * K if need_weight else 0)  # dyᵀ x


def _multi_flops(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
                 adapter_ids: Tensor, bias: Tensor | None, fan_in_fan_out: bool, backend: str, **_: object) -> int:
    """Each row's own adapter rank (a host read of ids and ranks: a sync on a GPU, under the counter only)."""
    M, N, K, _r = _mnkr(x, weight, A_stack.shape[1], fan_in_fan_out)
    ids = adapter_ids.reshape(-1).long().cpu()
    rank = ranks.long().cpu().clamp(0, A_stack.shape[1])
    rows = rank[ids.clamp(min=0)] * (ids >= 0)
    return 2 * M * N * K + 2 * (K + N) * int(rows.sum())


_flops.register(torch.ops.kfuse.lora_forward, _forward_flops)
_flops.register(torch.ops.kfuse.lora_backward, _backward_flops)
_flops.register(torch.ops.kfuse.lora_multi_forward, _multi_flops)


# ---------------------------------------------------------------- eager autograd


class _EagerLoRA(torch.autograd.Function):
    """Eager fast path: the registered ops' implementations without the custom-op dispatch (as
    ``ops/deu.py``'s ``_EagerDeu``, where the dispatch doubled the per-call overhead). Takes and
    returns 2-D tensors: :func:`lora_linear` flattens x outside, so that y is no view made
    inside the Function (autograd forbids modifying those in place: ``y += residual``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None,
                lora_bias: Tensor | None, scaling: float, p: float, fifo: bool, backend: str) -> Tensor:
        seed = _draw_seed(x.device) if p > 0 else None
        y, S = _forward_impl(x, weight, lora_A, lora_B, scaling, bias, lora_bias, p, fifo, backend, seed, True)
        _save(ctx, x, weight, lora_A, lora_B, S, seed)
        ctx.scaling, ctx.p, ctx.fifo, ctx.backend = scaling, p, fifo, backend
        ctx.bias_dtypes = (None if bias is None else bias.dtype, None if lora_bias is None else lora_bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        with _routing.autocast_off(grad_y):  # the forward's dtypes, not autocast's
            return _EagerLoRA._backward(ctx, grad_y)

    @staticmethod
    def _backward(ctx, grad_y: Tensor):
        x, weight, lora_A, lora_B, S, seed = _saved(ctx)
        needs = tuple(ctx.needs_input_grad[:6])
        if _routing.differentiable_backward(grad_y):
            mask = None if seed is None else dropout_mask(seed, x.shape[0], x.shape[1], ctx.p, ctx.backend)
            grads = _reference_vjp(grad_y, x, weight, lora_A, lora_B, ctx.scaling, ctx.p, ctx.fifo, mask, needs,
                                   *ctx.bias_dtypes)
        elif torch.compiler.is_compiling():  # compiled autograd traces this: the graph records the op
            out = lora_backward(grad_y, x, weight, lora_A, lora_B, ctx.scaling, S,
                                _no_seed(x.device) if seed is None else seed, ctx.p, ctx.fifo, *needs, ctx.backend)
            grads = [g if need else None for g, need in zip(out, needs, strict=True)]
        else:
            grads = _backward_impl(grad_y, x, weight, lora_A, lora_B, ctx.scaling, S, seed, ctx.p, ctx.fifo, needs,
                                   ctx.backend)
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------- public ops


def _autocast_adapters(cast: torch.dtype, *adapters: Tensor | None) -> tuple:
    """Adapter tensors under autocast to ``cast``: float32 ones stay float32 (the ops take float32
    adapters beside half x and keep ``S`` and the low-rank term in float32), half ones follow the autocast
    dtype; the first adapter's dtype decides for all (the ops then check they agree)."""
    first = adapters[0]
    if isinstance(first, Tensor) and first.dtype == torch.float32:
        return adapters
    return tuple(_routing.autocast_cast(cast, t) for t in adapters)


def _gate(x: object, weight: object, lora_A: object, lora_B: object, scaling: object, bias: object,
          lora_bias: object, dropout_p: object, training: object, fan_in_fan_out: object) -> int:
    """:func:`lora_linear`'s eager-path gate: 1 or 2 (autograd records the call) when the call is valid and plain,
    so that ``_validate`` would pass it and ``_routing.route`` send it down the eager path; 0 otherwise, or without
    the extension (the full path then decides, and names any error). The scalars' checks here (Python floats and
    bools; no torch.func transform, trace, autocast or torch-function mode: a change to ``_routing.route`` must
    come here too); the tensors' in one call of the extension (``_C.lora_gate``: types, layouts, dispatch keys,
    dtypes, shapes, devices, jit trace, dispatch modes). Why: in Python those checks took ~25-30 us of a call run
    after a GEMM had streamed W through the caches (M = 1, 1024 x 1024 fp32 on the cpu backend, 2 threads: 109 us
    a call against 80 with them skipped, PEFT-style's 79), several times their ~8 us with warm caches."""
    if (type(scaling) is not float or type(dropout_p) is not float or not 0.0 <= dropout_p < 1.0
            or type(training) is not bool or type(fan_in_fan_out) is not bool or not _plain_context()):
        return 0
    ext = _backends.extension()
    return 0 if ext is None else ext.lora_gate(x, weight, lora_A, lora_B, bias, lora_bias, fan_in_fan_out)


def _plain_context() -> bool:
    """No autocast, torch-function mode, compilation, forward-mode AD or torch.func transform is on: the context the
    gates' eager paths assume (a change to ``_routing.route`` must come here too)."""
    return not (torch._C._is_any_autocast_enabled() or torch._C._is_torch_function_mode_enabled()
                or torch.compiler.is_compiling() or _routing.forward_ad_active() or _routing.transform_active())


def _multi_gate(x: object, weight: object, A_stack: object, B_stack: object, scalings: object, ranks: object,
                adapter_ids: object, bias: object, fan_in_fan_out: object) -> bool:
    """:func:`lora_linear_multi`'s eager-path gate, as :func:`_gate` is :func:`lora_linear`'s: True when the call is
    valid and plain (``_validate_multi`` would pass it, ``_routing.route`` send it down the eager path, and no input
    requires grad), False otherwise or without the extension (the full path then decides, and names any error).
    The tensors' checks in one call of the extension (``_C.lora_multi_gate``). Why: the op's own Python took 21-25 us
    a call over its launcher's 16, now 12.6 (128 rows over 8 adapters, kernels stubbed, CPU tensors' value checks
    aside; ``bench/results/2026-12-07-cpu-lora-multi-gate.md``), and an eager call on the H200 took 0.097 ms against
    0.021 ms of kernels (2026-12-04): the host is its time."""
    if type(fan_in_fan_out) is not bool or not _plain_context():
        return False
    ext = _backends.extension()
    return ext is not None and bool(ext.lora_multi_gate(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids,
                                                        bias, fan_in_fan_out))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    bias: Tensor | None = None,
    lora_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> Tensor:
    """A LoRA-adapted linear layer, as PEFT's ``lora.Linear`` computes it:
    ``y = x Wᵀ + bias + scaling · ((dropout(x) Aᵀ) Bᵀ + lora_bias)``.

    Args:
        x: ``[..., K]``, float16, bfloat16, float32 (float64 on the ``cpu`` and ``reference``
            backends).
        weight: the base weight, x's dtype: ``[N, K]``, or ``[K, N]`` when ``fan_in_fan_out``
            (GPT-2's Conv1D; used as it is, never copied).
        lora_A: ``[r, K]``; lora_B: ``[N, r]``; both float32 or both x's dtype.
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        bias: ``[N]`` in x's dtype, or None. lora_bias: ``[N]`` in the adapters' dtype, or None
            (PEFT's ``lora_B.bias``; scaled by ``scaling`` like the rest of the LoRA branch).
        dropout_p: dropout probability on the LoRA branch's input, in ``[0, 1)``; applied only
            when ``training`` and ``p > 0``, with kept values scaled by ``1 / (1 − p)``.
        training: whether dropout applies.
        fan_in_fan_out: the layout of ``weight``.
        backend: ``"auto"`` (``triton`` for CUDA tensors, ``cpu`` for CPU ones), ``"triton"``,
            ``"cpu"`` or ``"reference"``; ``"cuda"`` names no LoRA kernels and always raises. An
            explicit backend that cannot run raises :class:`kfuse.BackendUnavailableError`
            naming the reasons.
    Returns:
        ``y [..., N]`` in x's dtype, accumulated in float32 (float64 for float64 x).

    Under ``torch.autocast`` on x's device, the op applies autocast's casts itself, as it would to
    ``F.linear``: x, weight and bias go to the autocast dtype (float64 is left alone); float32 adapters
    stay float32 (S in float32), half ones go to the autocast dtype; y comes in the autocast dtype.

    Autograd: gradients for every input that requires one (``dW`` too, when the base weight is
    trainable: correct, not fast), each in its input's dtype. Dropout masks come from torch's
    RNG (``torch.manual_seed`` reproduces them); the backward regenerates the mask from a
    seed, so the saved tensors are x, ``S = dropout(x) Aᵀ`` (``[M, r]`` float32), the seed and
    the parameters. Higher-order gradients (``create_graph=True``) and batched backwards run the
    reference's vjp with the backend's mask. ``torch.func`` transforms and forward-mode AD run the
    reference, whose dropout draws its own mask (``torch.rand``; reproducible under
    ``torch.manual_seed`` too, but not the mask an eager call with the same seed drops): as
    ``backend="reference"`` does, where autograd keeps the mask.
    """
    tensors = (x, weight, lora_A, lora_B, bias, lora_bias)
    gate = _gate(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, training, fan_in_fan_out)
    if gate:  # a valid call of plain tensors: _validate's checks and route's hold (see _gate)
        p = dropout_p if training else 0.0
        chosen = _select("lora_linear", backend, x)
        path = _routing.REFERENCE if chosen == "reference" else _routing.EAGER
    else:
        if torch.overrides.has_torch_function(tensors):  # torch.fx.symbolic_trace's Proxy, ...
            return torch.overrides.handle_torch_function(
                lora_linear, tuple(t for t in tensors if t is not None), x, weight, lora_A, lora_B, scaling,
                bias=bias, lora_bias=lora_bias, dropout_p=dropout_p, training=training,
                fan_in_fan_out=fan_in_fan_out, backend=backend)
        cast = _routing.autocast_dtype(x)
        if cast is not None:
            x, weight, bias = (_routing.autocast_cast(cast, t) for t in (x, weight, bias))
            lora_A, lora_B, lora_bias = _autocast_adapters(cast, lora_A, lora_B, lora_bias)
            with torch.autocast(x.device.type, enabled=False):
                return lora_linear(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, training,
                                   fan_in_fan_out, backend)
        _checks.check_bool("kfuse.lora_linear", "training", training)
        scaling, p = _validate(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out)
        if not training:
            p = 0.0
        chosen = _select("lora_linear", backend, x)
        path = _routing.route(chosen, tensors)
    if path == _routing.REFERENCE:
        mask = reference_dropout_mask(x, p) if p > 0 else None
        return lora_linear_reference(x, weight, lora_A, lora_B, scaling, bias, lora_bias, mask=mask, dropout_p=p,
                                     fan_in_fan_out=fan_in_fan_out)
    x2 = _flat(x)  # viewed back outside the ops (see _EagerLoRA)
    if path == _routing.REGISTERED:
        y = lora_forward(x2, weight, lora_A, lora_B, scaling, bias, lora_bias, p, fan_in_fan_out, chosen)[0]
    elif (gate == 2) if gate else _routing.needs_grad(tensors):
        y = _EagerLoRA.apply(x2, weight, lora_A, lora_B, bias, lora_bias, scaling, p, fan_in_fan_out, chosen)
    else:  # nothing to differentiate: no autograd node, nothing saved
        with _routing.labelled("kfuse.lora_linear"):
            seed = _draw_seed(x.device) if p > 0 else None
            y = _forward_impl(x2, weight, lora_A, lora_B, scaling, bias, lora_bias, p, fan_in_fan_out, chosen, seed,
                              False)[0]
    return y if x.ndim == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _torch_multi(x2: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
                 ids: Tensor, bias: Tensor | None, fifo: bool) -> Tensor:
    """The ``cpu`` backend of :func:`lora_linear_multi` (host-side grouping: CPU tensors only).
    Rows are grouped by adapter; each group costs two small GEMMs on its rows, with the
    adapter's true rank (entries past it are never read)."""
    acc = acc_dtype(x2.dtype)
    xa = _to(x2, acc)
    y = _base_mm(x2, xa, weight if fifo else weight.t(), None if bias is None else _to(bias, acc))
    L = A_stack.shape[0]
    if L and ids.numel():
        # Only the adapters the batch uses, each with its rows in increasing order (the same groups either
        # way, so the same bits): a loop over all L loaded ones cost ~2 µs each (8192 loaded, 8 used: 30x
        # a torch loop over the 8; perf hunt). Few rows are grouped from a list (_HOST_GROUP_ROWS).
        if ids.numel() <= _HOST_GROUP_ROWS:
            by_id: dict[int, list[int]] = {}
            for row, a in enumerate(ids.tolist()):
                by_id.setdefault(a, []).append(row)
            groups = [(a, torch.tensor(rows), int(ranks[a]), float(scalings[a])) for a, rows in by_id.items() if a >= 0]
        else:
            order = torch.argsort(ids, stable=True)
            present, counts = torch.unique_consecutive(ids[order], return_counts=True)
            used = present.clamp(min=0)
            groups = [(a, rows, r, scale) for a, rows, r, scale in zip(
                present.tolist(), order.split(counts.tolist()), ranks[used].tolist(),
                scalings.double()[used].tolist(), strict=True) if a >= 0]
        for a, rows, r, scale in groups:
            # (a rank-0 adapter still adds s·0, NaN for a NaN s, as the other backends: numerics hunt)
            s = torch.mm(xa.index_select(0, rows), _to(A_stack[a, :r], acc).t())
            y.index_add_(0, rows, torch.mm(s, _to(B_stack[a, :, :r], acc).t()), alpha=scale)
    return _to(y, x2.dtype)


def _multi_impl(x: Tensor, weight: Tensor, A_stack: Tensor, B_stack: Tensor, scalings: Tensor, ranks: Tensor,
                adapter_ids: Tensor, bias: Tensor | None, fifo: bool, backend: str) -> Tensor:
    N = weight.shape[1] if fifo else weight.shape[0]
    L, r_max = A_stack.shape[0], A_stack.shape[1]
    x2, ids = _flat(x), adapter_ids.reshape(-1)
    if x.device.type == "cpu":  # before any kernel; free on CPU tensors
        _check_multi_values(ranks, ids, L, r_max)
    if backend == "triton":
        # No host sync (CUDA-graph safe), so the values are not checked on a GPU: the kernels
        # treat ids outside [-1, L) as -1 (base output) and clamp ranks to [0, r_max].
        dense = _backends.dense
        y2 = _tk().lora_multi_forward(dense(x2), weight.resolve_neg(), fifo, A_stack.resolve_neg(),
                                      B_stack.resolve_neg(), dense(scalings.to(torch.float32)), dense(ranks),
                                      dense(ids), dense(bias))
    elif backend == "reference" or x.device.type != "cpu":  # the reference is shape-static
        y2 = lora_linear_multi_reference(x2, weight, A_stack, B_stack, scalings, ranks, ids, bias, fifo)
    else:
        y2 = _torch_multi(x2, weight, A_stack, B_stack, scalings, ranks, ids, bias, fifo)
    return y2 if x.ndim == 2 else y2.view(*x.shape[:-1], N)


_warned_grad = False


def lora_linear_multi(
    x: Tensor,
    weight: Tensor,
    A_stack: Tensor,
    B_stack: Tensor,
    scalings: Tensor,
    ranks: Tensor,
    adapter_ids: Tensor,
    bias: Tensor | None = None,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> Tensor:
    """A linear layer serving several LoRA adapters in one batch: row ``m`` of x uses adapter
    ``adapter_ids[m]`` (``-1``: the base model only).

    ``y[m] = x[m] Wᵀ + bias + scalings[a] · (x[m] A_stack[a, :r]ᵀ) B_stack[a, :, :r]ᵀ`` with
    ``a = adapter_ids[m]``, ``r = ranks[a]``. Entries of the stacks past an adapter's rank are
    never used (they may hold anything). No dropout.

    Args:
        x: ``[..., K]``, float16, bfloat16, float32 (float64 on ``cpu`` and ``reference``).
        weight: ``[N, K]`` (``[K, N]`` when ``fan_in_fan_out``), x's dtype.
        A_stack: ``[L, r_max, K]``; B_stack: ``[L, N, r_max]``; float32 or x's dtype (the same).
        scalings: ``[L]`` floating. ranks: ``[L]`` int32/int64, in ``[0, r_max]``.
        adapter_ids: int32/int64, one per row of x: ``x.shape[:-1]`` or ``[M]``; or, for x of 3 or more
            dims, one per leading index, ``[x.shape[0]]`` (a sequence's rows share its id); in ``[-1, L)``.
        bias: ``[N]`` in x's dtype, or None.
        fan_in_fan_out: weight stored ``[K, N]`` (GPT-2's ``Conv1D``), read as it is, without a copy.
        backend: as for :func:`lora_linear`.
    Returns:
        ``y [..., N]`` in x's dtype, accumulated in float32 (float64 for float64 x).

    Values of ``adapter_ids`` and ``ranks`` are checked on CPU tensors only (``IndexError`` /
    ``ValueError``): on a GPU the check would synchronise the host. There, an id outside
    ``[-1, L)`` gives that row the base output, and ranks are clamped to ``[0, r_max]``. No
    host synchronisation and no data-dependent shapes on the CUDA path (CUDA-graph safe).

    Under ``torch.autocast``: the casts of :func:`lora_linear` (x, weight, bias; half stacks).

    Forward only: when an input requires a gradient (grad mode on), the differentiable
    reference runs instead (slow; it warns once): serve under ``torch.no_grad()`` or
    ``torch.inference_mode()``.
    """
    if _multi_gate(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out):
        chosen = _select("lora_linear_multi", backend, x)
        if chosen != "reference":  # (its path checks the values its own way: _check_multi_reference)
            with _routing.labelled("kfuse.lora_linear_multi"):
                y = _multi_impl(_flat(x), weight, A_stack, B_stack, scalings, ranks, adapter_ids.reshape(-1), bias,
                                fan_in_fan_out, chosen)
            return y if x.ndim == 2 else y.view(*x.shape[:-1], y.shape[-1])
    tensors = (x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias)
    if torch.overrides.has_torch_function(tensors):
        return torch.overrides.handle_torch_function(
            lora_linear_multi, tuple(t for t in tensors if t is not None), x, weight, A_stack, B_stack, scalings,
            ranks, adapter_ids, bias=bias, fan_in_fan_out=fan_in_fan_out, backend=backend)
    if (isinstance(x, Tensor) and isinstance(adapter_ids, Tensor) and x.ndim > 2 and adapter_ids.ndim == 1
            and adapter_ids.shape[0] == x.shape[0] and adapter_ids.shape[0] != math.prod(x.shape[:-1])):
        # One id per leading index (a sequence of [B, T, K]): the same for all its rows. Here, not in
        # MultiLoRALinear.forward: torch.fx.symbolic_trace records this call, and dropped the module's
        # expansion (export hunt, 2026-12-05).
        adapter_ids = adapter_ids.view(-1, *([1] * (x.ndim - 2))).expand(x.shape[:-1])
        tensors = (x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias)
    cast = _routing.autocast_dtype(x)
    if cast is not None:
        x, weight, bias = (_routing.autocast_cast(cast, t) for t in (x, weight, bias))
        A_stack, B_stack = _autocast_adapters(cast, A_stack, B_stack)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear_multi(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out,
                                     backend)
    _validate_multi(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias, fan_in_fan_out)
    chosen = _select("lora_linear_multi", backend, x)
    path = _routing.route(chosen, tensors)
    if path != _routing.REFERENCE and _routing.needs_grad(tensors):
        global _warned_grad
        if not _routing.tracing() and not _warned_grad:  # tracing first: Dynamo guarded on the flag (a recompile)
            _warned_grad = True
            warnings.warn("kfuse.lora_linear_multi is forward-only: inputs that require grad run the (slow) "
                          "differentiable reference; call it under torch.no_grad() to run the kernels", stacklevel=2)
        path = _routing.REFERENCE
    if path == _routing.REFERENCE:
        _check_multi_reference(ranks, adapter_ids, A_stack.shape[0], A_stack.shape[1], tensors[:7])
        return lora_linear_multi_reference(x, weight, A_stack, B_stack, scalings, ranks, adapter_ids, bias,
                                           fan_in_fan_out)
    x2 = _flat(x)
    ids = adapter_ids.reshape(-1)
    if path == _routing.REGISTERED:
        y = lora_multi_forward(x2, weight, A_stack, B_stack, scalings, ranks, ids, bias, fan_in_fan_out, chosen)
    else:
        y = _multi_impl(x2, weight, A_stack, B_stack, scalings, ranks, ids, bias, fan_in_fan_out, chosen)
    return y if x.ndim == 2 else y.view(*x.shape[:-1], y.shape[-1])
