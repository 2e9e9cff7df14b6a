"""Attention over a :class:`kfuse.kv.PagedKVCache`: the public ops and their torch.library registration.

``kfuse.paged_decode_attention`` (one new query token per sequence) and
``kfuse.paged_prefill_attention`` (several causal query tokens per sequence, packed); the definition
is :mod:`kfuse.reference.kv`. Inference only: no autograd.

Backends:

- ``triton`` (``triton_kernels/kv.py``): decode is split-K over the block table with the query heads of a
  KV head sharing its K/V loads and a deterministic fixed-order merge; prefill is one program per
  (sequence, query head, block of new tokens), causal, over the block table. CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``.
- ``cpu``: CPU tensors. **For now this is the PyTorch reference** (float64 dense attention per
  sequence); C++ kernels come later.
- ``cuda``: no csrc kernels for these ops yet (always unavailable, with that reason).
- ``reference``: :mod:`kfuse.reference.kv` (syncs the host; any device).

Registered ops (``torch.ops.kfuse.paged_decode_attention`` / ``paged_prefill_attention``) take the
cache's tensors explicitly: the K/V pools, the block table, the layer, int32 ``seq_ids`` (rows of the
table) and int32 ``lens`` (per-call lengths: :meth:`PagedKVCache.kv_len`, which includes the open
step's tokens once the layer has appended), plus a host-side ``max_len`` / ``max_q_len`` (sizes the
Triton grid; no device read). The public functions validate against the cache's host mirror (no sync), then call the
implementations directly (eager) or the registered ops (under ``torch.compile`` and dispatch modes),
per :func:`kfuse._routing.route`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from kfuse import _backends, _routing
from kfuse.kv import PagedKVCache, _as_int_list
from kfuse.reference.kv import paged_decode_attention_reference, paged_prefill_attention_reference

__all__ = ["BACKENDS", "backend_reasons", "paged_decode_attention", "paged_prefill_attention"]

#: The backends of the KV attention ops, besides ``"auto"``.
BACKENDS = _backends.BACKENDS
_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
_DECODE, _PREFILL = "paged_decode_attention", "paged_prefill_attention"


# ---------------------------------------------------------------- backend choice


def backend_reasons(q: Tensor, op: str = _DECODE) -> dict[str, list[str]]:
    """For each backend, why it cannot run ``op`` on ``q`` (empty: it can). Depends on ``op``, q's device
    type and dtype only."""
    triton = _backends.triton_reasons(q.device, q.dtype)
    if q.dtype == torch.float64:
        triton = [*triton, "the Triton KV kernels do not support float64"]
    return {
        "triton": triton,
        "cuda": ["kfuse has no CUDA (csrc) kernels for KV attention yet; the Triton kernel runs CUDA tensors"],
        # Honest: the cpu backend is the PyTorch reference until the C++ kernels land.
        "cpu": [] if q.device.type == "cpu" else [f"q is on {q.device.type}, not cpu"],
        "reference": [],
    }


def _select(op: str, backend: str, q: Tensor) -> str:
    return _backends.select_for(op, backend, q.device, q.dtype, lambda: backend_reasons(q, op),
                                _ORDER.get(q.device.type, ("reference",)))


def _check_backend_name(op: str, backend: object) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"kfuse.{op}: backend must be 'auto' or one of {sorted(BACKENDS)}; got {backend!r}")


# ---------------------------------------------------------------- validation


def _scale(op: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise TypeError(f"kfuse.{op}: scale must be a finite real number or None; got {scale!r}")
    return float(scale)


def _validate(op: str, q: object, cache: object, layer: object, seq_ids: object) -> tuple[list[int], list[int]]:
    """Checks the arguments both ops share; returns ``(ids, kv lengths)`` from the host mirror."""
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"kfuse.{op}: cache must be a kfuse.kv.PagedKVCache; got {type(cache).__name__}")
    if not isinstance(q, Tensor):
        raise TypeError(f"kfuse.{op}: q must be a torch.Tensor; got {type(q).__name__}")
    if q.layout != torch.strided or q.is_nested:
        raise TypeError(f"kfuse.{op}: q must be a dense (strided) tensor")
    if q.dtype != cache.dtype:
        raise TypeError(f"kfuse.{op}: q has dtype {q.dtype}; the cache holds {cache.dtype}")
    if q.device != cache.device:
        raise ValueError(f"kfuse.{op}: q is on {q.device}; the cache is on {cache.device}")
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] < 1 or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"kfuse.{op}: q must be [tokens, num_q_heads, head_dim={cache.head_dim}] with num_q_heads "
                         f"a positive multiple of num_kv_heads={cache.num_kv_heads}; got {tuple(q.shape)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.num_layers:
        raise IndexError(f"kfuse.{op}: layer must be an int in [0, {cache.num_layers}); got {layer!r}")
    try:
        ids = cache._check_ids(seq_ids)  # known, active, distinct (the cache's own checks)
    except (ValueError, IndexError) as e:
        raise type(e)(f"kfuse.{op}: {e}") from None
    return ids, [cache.kv_len(layer, s) for s in ids]


# ---------------------------------------------------------------- implementations


class _TensorCache:
    """The attributes :mod:`kfuse.reference.kv` reads from a cache, over explicit tensors: lets the
    registered ops run the reference without a :class:`PagedKVCache` (reads ``seq_ids``/``lens`` on
    the host)."""

    def __init__(self, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_ids: Tensor, lens: Tensor):
        self.k_pages, self.v_pages, self.block_table = k_pages, v_pages, block_table
        self.page_size, self.num_kv_heads, self.head_dim = k_pages.shape[2], k_pages.shape[3], k_pages.shape[4]
        self._len = dict(zip(seq_ids.tolist(), lens.tolist(), strict=True))

    def kv_len(self, layer: int, seq_id: int) -> int:
        return self._len[seq_id]


def _decode_impl(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                 lens: Tensor, max_len: int, scale: float, backend: str) -> Tensor:
    if backend == "triton":
        from kfuse.triton_kernels import kv as tk  # noqa: PLC0415 (triton is optional)

        return tk.paged_decode(q, k_pages[layer], v_pages[layer], block_table, seq_ids, lens, max_len, scale)
    # reference, and cpu (the reference for now)
    tc = _TensorCache(k_pages, v_pages, block_table, seq_ids, lens)
    return paged_decode_attention_reference(q, tc, layer, seq_ids.tolist(), scale)


def _prefill_impl(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                  lens: Tensor, q_lens: Tensor, max_q_len: int, scale: float, backend: str) -> Tensor:
    if backend == "triton":
        from kfuse.triton_kernels import kv as tk  # noqa: PLC0415 (triton is optional)

        return tk.paged_prefill(q, k_pages[layer], v_pages[layer], block_table, seq_ids, lens, q_lens, max_q_len,
                                scale)
    # reference, and cpu (the reference for now)
    tc = _TensorCache(k_pages, v_pages, block_table, seq_ids, lens)
    return paged_prefill_attention_reference(q, tc, layer, seq_ids.tolist(), q_lens.tolist(), scale)


def _check_op_tensors(op: str, q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int,
                      seq_ids: Tensor, lens: Tensor, rows: int) -> None:
    """The registered ops' shape/dtype/device checks (no value reads: they would sync a GPU)."""
    if k_pages.dim() != 5 or v_pages.shape != k_pages.shape:
        raise ValueError(f"kfuse.{op}: k_pages and v_pages must both be [num_layers, num_pages, page_size, "
                         f"num_kv_heads, head_dim]; got {tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    hkv, d = k_pages.shape[3], k_pages.shape[4]
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] < 1 or q.shape[1] % hkv:
        raise ValueError(f"kfuse.{op}: q must be [tokens, num_q_heads, head_dim={d}] with num_q_heads a positive "
                         f"multiple of num_kv_heads={hkv}; got {tuple(q.shape)}")
    if q.dtype != k_pages.dtype or v_pages.dtype != k_pages.dtype:
        raise TypeError(f"kfuse.{op}: q, k_pages, v_pages must share a dtype; got {q.dtype}, {k_pages.dtype}, "
                        f"{v_pages.dtype}")
    if not 0 <= layer < k_pages.shape[0]:
        raise IndexError(f"kfuse.{op}: layer must be in [0, {k_pages.shape[0]}); got {layer}")
    for name, t in (("block_table", block_table), ("seq_ids", seq_ids), ("lens", lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"kfuse.{op}: {name} must be int32; got {t.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"kfuse.{op}: block_table must be [max_seqs, max_pages]; got {tuple(block_table.shape)}")
    if seq_ids.dim() != 1 or lens.shape != seq_ids.shape or seq_ids.shape[0] != rows:
        raise ValueError(f"kfuse.{op}: seq_ids and lens must be [{rows}]; got {tuple(seq_ids.shape)} and "
                         f"{tuple(lens.shape)}")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages), ("block_table", block_table), ("seq_ids", seq_ids),
                    ("lens", lens)):
        if t.device != q.device:
            raise ValueError(f"kfuse.{op}: {name} is on {t.device} but q is on {q.device}")


# ---------------------------------------------------------------- registered ops


@torch.library.custom_op("kfuse::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int,
                              seq_ids: Tensor, lens: Tensor, max_len: int, scale: float, backend: str) -> Tensor:
    """Registered decode attention: q ``[B, Hq, D]``; the cache's pools ``[num_layers, num_pages, page_size,
    Hkv, D]``; int32 ``block_table``; int32 ``seq_ids``/``lens`` ``[B]``; ``max_len >= max(lens)``."""
    _check_op_tensors(_DECODE, q, k_pages, v_pages, block_table, layer, seq_ids, lens, q.shape[0])
    chosen = _select(_DECODE, backend, q)
    return _decode_impl(q, k_pages, v_pages, block_table, layer, seq_ids, lens, max_len, scale, chosen)


@paged_decode_attention_op.register_fake
def _(q, k_pages, v_pages, block_table, layer, seq_ids, lens, max_len, scale, backend):
    _check_backend_name(_DECODE, backend)
    return q.new_empty(q.shape)


@torch.library.custom_op("kfuse::paged_prefill_attention", mutates_args=())
def paged_prefill_attention_op(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int,
                               seq_ids: Tensor, lens: Tensor, q_lens: Tensor, max_q_len: int, scale: float,
                               backend: str) -> Tensor:
    """Registered prefill attention: q packed ``[sum(q_lens), Hq, D]``; int32 ``q_lens [n]`` (the newest
    tokens of each sequence, already in the cache), ``max_q_len >= max(q_lens)``; the rest as for decode."""
    _check_op_tensors(_PREFILL, q, k_pages, v_pages, block_table, layer, seq_ids, lens, seq_ids.shape[0])
    if q_lens.dtype != torch.int32 or q_lens.shape != seq_ids.shape or q_lens.device != q.device:
        raise ValueError(f"kfuse.{_PREFILL}: q_lens must be int32 [{seq_ids.shape[0]}] on q's device; got "
                         f"{q_lens.dtype} {tuple(q_lens.shape)} on {q_lens.device}")
    chosen = _select(_PREFILL, backend, q)
    return _prefill_impl(q, k_pages, v_pages, block_table, layer, seq_ids, lens, q_lens, max_q_len, scale, chosen)


@paged_prefill_attention_op.register_fake
def _(q, k_pages, v_pages, block_table, layer, seq_ids, lens, q_lens, max_q_len, scale, backend):
    _check_backend_name(_PREFILL, backend)
    return q.new_empty(q.shape)


# ---------------------------------------------------------------- public ops


def paged_decode_attention(q: Tensor, cache: PagedKVCache, layer: int, seq_ids, scale: float | None = None,
                           backend: str = "auto") -> Tensor:
    """Decode attention over a paged cache: ``o[b] = softmax(q[b]·K[b]ᵀ·scale)·V[b]`` over the first
    ``cache.kv_len(layer, seq_ids[b])`` positions of each sequence, read through the block table.

    Args:
        q: ``[B, Hq, D]``, the cache's dtype and device; ``Hq`` a multiple of ``cache.num_kv_heads``
            (grouped-query attention), ``D = cache.head_dim``.
        cache: the :class:`kfuse.kv.PagedKVCache`.
        layer: int in ``[0, num_layers)``.
        seq_ids: ``B`` distinct active sequence ids (ints or a 1-D CPU integer tensor).
        scale: softmax scale; default ``1/sqrt(D)``.
        backend: ``"auto"`` (``triton`` for CUDA tensors, ``cpu`` for CPU ones), ``"triton"``, ``"cpu"``
            (currently the PyTorch reference) or ``"reference"``; ``"cuda"`` always raises.
    Returns:
        ``[B, Hq, D]`` in q's dtype; zeros for a sequence of length 0.

    Validation reads the cache's host mirror (no sync). No autograd.
    """
    ids, lens = _validate(_DECODE, q, cache, layer, seq_ids)
    if q.shape[0] != len(ids):
        raise ValueError(f"kfuse.{_DECODE}: q has {q.shape[0]} rows; seq_ids has {len(ids)} (one token per sequence)")
    sc = _scale(_DECODE, scale, cache.head_dim)
    chosen = _select(_DECODE, backend, q)
    path = _routing.route(chosen, (q,))
    if path == _routing.REFERENCE and not _routing.tracing():
        return paged_decode_attention_reference(q, cache, layer, ids, sc)
    ids_t, lens_t = cache._dev(ids, torch.int32), cache._dev(lens, torch.int32)
    max_len = max(lens, default=0)
    if path != _routing.EAGER:  # registered; also the reference under a trace (it reads device values)
        return paged_decode_attention_op(q, cache.k_pages, cache.v_pages, cache.block_table, layer, ids_t, lens_t,
                                         max_len, sc, chosen)
    return _decode_impl(q, cache.k_pages, cache.v_pages, cache.block_table, layer, ids_t, lens_t, max_len, sc, chosen)


def paged_prefill_attention(q: Tensor, cache: PagedKVCache, layer: int, seq_ids, q_lens, scale: float | None = None,
                            backend: str = "auto") -> Tensor:
    """Prefill / append attention over a paged cache: ``q_lens[i]`` new tokens of ``seq_ids[i]``, packed in
    ``q`` ``[sum(q_lens), Hq, D]``, are the newest ``q_lens[i]`` of the sequence's ``kv_len(layer, s)``
    tokens (already appended to this layer); the token at position ``p`` attends causally to ``0 … p``.

    Args: as :func:`paged_decode_attention`, plus ``q_lens`` (ints ``>= 0``, one per sequence, summing
    to q's rows, each at most the sequence's ``kv_len``). Backends as for decode (``cpu`` is the
    PyTorch reference for now).
    Returns ``[sum(q_lens), Hq, D]`` in q's dtype.
    """
    ids, lens = _validate(_PREFILL, q, cache, layer, seq_ids)
    ql = _as_int_list(q_lens, f"kfuse.{_PREFILL}: q_lens")
    if len(ql) != len(ids) or any(x < 0 for x in ql) or sum(ql) != q.shape[0]:
        raise ValueError(f"kfuse.{_PREFILL}: q_lens {ql} must have one entry >= 0 per sequence ({len(ids)}) "
                         f"summing to q's {q.shape[0]} rows")
    for s, t, n in zip(ids, ql, lens, strict=True):
        if t > n:
            raise ValueError(f"kfuse.{_PREFILL}: q_lens: {t} new tokens for sequence {s} but only {n} are cached at "
                             f"layer {layer} (append first)")
    sc = _scale(_PREFILL, scale, cache.head_dim)
    chosen = _select(_PREFILL, backend, q)
    path = _routing.route(chosen, (q,))
    if path == _routing.REFERENCE and not _routing.tracing():
        return paged_prefill_attention_reference(q, cache, layer, ids, ql, sc)
    ids_t, lens_t, ql_t = (cache._dev(x, torch.int32) for x in (ids, lens, ql))
    max_q = max(ql, default=0)
    if path != _routing.EAGER:  # registered; also the reference under a trace (it reads device values)
        return paged_prefill_attention_op(q, cache.k_pages, cache.v_pages, cache.block_table, layer, ids_t, lens_t,
                                          ql_t, max_q, sc, chosen)
    return _prefill_impl(q, cache.k_pages, cache.v_pages, cache.block_table, layer, ids_t, lens_t, ql_t, max_q, sc,
                         chosen)
