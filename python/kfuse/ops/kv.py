"""Attention over a :class:`kfuse.kv.PagedKVCache`: the public ops and their torch.library registration.

``kfuse.paged_decode_attention`` (one new query token per sequence) and
``kfuse.paged_prefill_attention`` (several causal query tokens per sequence, packed); the definition
is :mod:`kfuse.reference.kv`. Inference only: no autograd.

Backends:

- ``triton`` (``triton_kernels/kv.py``): decode is split-K over the block table with the query heads of a
  KV head sharing its K/V loads and a deterministic fixed-order merge; prefill is one program per
  (sequence, query head, block of new tokens), causal, over the block table. CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1``. On CUDA a prefill whose sequences are all fresh prompts of one
  length (at least ``_FLASH_MIN_Q_LEN``) runs torch's flash attention over the gathered pages instead
  (``_takes_flash``, ``_prefill_flash``).
- ``cpu`` (``csrc/kv/kv_attention_cpu.cpp``): CPU tensors, float32/float64/float16/bfloat16. One OpenMP
  task per (sequence, KV head, chunk of ``kfuse._C.kv_decode_chunk`` positions) for decode, merged in
  chunk order, or per (sequence, KV head, block of new tokens) for prefill; the query heads of a KV
  head share each K/V tile; online softmax in fp32 (fp64 for float64). Half-precision prefills of at
  least ``_SDPA_MIN_Q_LEN`` new tokens (each sequence's own) run torch's SDPA over its gathered pages instead
  (its CPU flash attention; see ``_prefill_sdpa``). Bit-identical whatever the thread count and the
  rest of the batch.
- ``cuda``: no csrc kernels for these ops yet (always unavailable, with that reason).
- ``reference``: :mod:`kfuse.reference.kv` (syncs the host; any device).

Registered ops (``torch.ops.kfuse.paged_decode_attention`` / ``paged_prefill_attention``) take the
cache's tensors explicitly: the K/V pools, the block table, the layer, int32 ``seq_ids`` (rows of the
table) and int32 ``lens`` (per-call lengths: :meth:`PagedKVCache.kv_len`, which includes the open
step's tokens once the layer has appended), plus a host-side ``max_len`` / ``max_q_len`` (size the
Triton grid and pick the prefill's flash route; no device read). The public functions validate against
the cache's host mirror (no sync), then call the implementations directly (eager) or the registered ops
(under ``torch.compile`` and dispatch modes), per :func:`kfuse._routing.route`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kfuse import _backends, _checks, _flops, _routing
from kfuse.kv import Ids, PagedKVCache, _as_int_list, _layer_index
from kfuse.reference.kv import gather_kv, paged_decode_attention_reference, paged_prefill_attention_reference

__all__ = ["BACKENDS", "backend_reasons", "paged_decode_attention", "paged_prefill_attention"]

#: The backends of the KV attention ops, besides ``"auto"``.
BACKENDS = _backends.BACKENDS
_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
_DECODE, _PREFILL = "paged_decode_attention", "paged_prefill_attention"


# ---------------------------------------------------------------- backend choice


def backend_reasons(q: Tensor, op: str = _DECODE) -> dict[str, list[str]]:
    """For each backend, why it cannot run ``op`` on ``q`` (empty: it can). Depends on ``op``, q's device
    type and dtype only."""
    return {
        "triton": _backends.triton_reasons_no_f64(q.device, q.dtype, "KV"),
        "cuda": ["kfuse has no CUDA (csrc) kernels for KV attention yet; the Triton kernel runs CUDA tensors"],
        "cpu": _backends.extension_reasons(q.device) + ([] if q.device.type == "cpu" else
                                                        [f"q is on {q.device.type}, not cpu"]),
        "reference": [],
    }


def _select(op: str, backend: str, q: Tensor) -> str:
    return _backends.select_for(op, backend, q.device, q.dtype, lambda: backend_reasons(q, op),
                                _ORDER.get(q.device.type, ("reference",)))



# ---------------------------------------------------------------- validation


def _scale(op: str, scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _checks.real(f"kfuse.{op}", "scale", scale, finite=True)


@dataclass
class _Call:
    """A validated call's sequences: ``ids``, ``lens`` (kv lengths) as int32 tensors on the cache's
    device, ``max_len`` (host int: sizes the Triton grid, picks the prefill's route), and ``host_ids`` /
    ``host_lens`` (CPU integer tensors, None under a trace)."""

    ids: Tensor
    lens: Tensor
    max_len: int
    host_ids: Tensor | None
    host_lens: Tensor | None


def _validate(op: str, q: object, cache: object, layer: object, seq_ids: object) -> tuple[int, _Call]:
    """Checks the arguments both ops share against the cache's host state (no sync): ``(layer as an int, the
    call's sequences)`` (:func:`_sequences`)."""
    if isinstance(q, torch.fx.Proxy):
        raise TypeError(f"kfuse.{op}: q is a torch.fx Proxy: torch.fx.symbolic_trace cannot record a call that takes "
                        "a PagedKVCache (an object, not a tensor); trace with torch.compile or torch.jit.trace")
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
    # the cache's own check; an int (numpy and 0-d tensor integers too) for the step's lookups and the registered op
    layer = _layer_index(f"kfuse.{op}", layer, cache.num_layers)
    if q.requires_grad and torch.is_grad_enabled():
        # The kernels have no backward (the cache holds K/V detached): rather than an output that
        # silently carries no gradient to q (and the reference backend's that would), refuse.
        raise RuntimeError(f"kfuse.{op}: inference only (no autograd), but q requires grad: call it under "
                           "torch.no_grad() or torch.inference_mode(), or pass q.detach()")
    return layer, _sequences(op, cache, layer, seq_ids)


def _sequences(op: str, cache: PagedKVCache, layer: int, seq_ids: object) -> _Call:
    """The call's sequences: ``seq_ids`` checked against the cache's host state (no sync) and their lengths at
    ``layer``.

    Under ``torch.compile`` Dynamo cannot trace the host state's checks (numpy, ``array``, C++): the
    graph then takes ``seq_ids`` as given (they become constants of the graph), reads the lengths
    from ``cache.seq_lens`` (and the open step's pending counts) when it runs, and sizes the grid for
    the longest sequence the block table can hold; the call checks nothing of the sequences then."""
    if _routing.tracing():
        # Tensors stay tensors: iterating one fixed its length (a graph per batch size, even with dynamic=True);
        # and whether this layer appended in the open step is read from a tensor: Dynamo guarded on the whole
        # set of appended layers, so every layer of a step compiled anew (past 8 layers fullgraph failed).
        # Both from a compile hunt.
        if isinstance(seq_ids, Tensor):
            ids = seq_ids.to(device="cpu", dtype=torch.int64)
        else:
            ids = torch.tensor([int(s) for s in seq_ids], dtype=torch.int64, device="cpu")
        lens = cache.seq_lens.index_select(0, ids.to(cache.device))
        st = cache._step
        if st is not None:
            lens = lens + (st["pending"].index_select(0, ids) * st["appended"][layer]).to(cache.device, torch.int32)
        return _Call(ids.to(cache.device, torch.int32), lens, cache.max_pages_per_seq * cache.page_size, None, None)
    st = cache._step
    if st is None and not cache._mirrored:
        # A CPU cache (no device copy) with no step open: the committed lengths, in the one extension call that
        # checks the ids (PagedKVCache._call_rows); its rows are already the int32 tensors the kernels read.
        try:
            ids, rows, longest = cache._call_rows(seq_ids)
        except (TypeError, ValueError, IndexError) as e:
            raise type(e)(f"kfuse.{op}: {e}") from None
        return _Call(rows[0], rows[1], longest, ids, rows[1])
    in_step = st is not None and layer in st["layers"]
    memo = st.get("attn") if in_step else None
    # A model passes one validated ids tensor to every layer of a step: the same object, unchanged since
    # (its version counter), needs no second check: the cache's checks and kv_lens took this function
    # from 2.1 to 14.2 us a call (32 sequences, this 2-core CPU), ~0.2 ms of a 16-layer decode step's
    # host time (bench/host_backtrack.py). The call holds the device copy made when they were checked,
    # so even a write the version misses cannot reach the kernels.
    # Inference tensors (made under torch.inference_mode) have no version counter: checked every call.
    version = _routing.version(seq_ids) if isinstance(seq_ids, Tensor) else None
    if memo is not None and version is not None and memo[0] is seq_ids and memo[1] == version:
        return memo[2]
    try:
        ids = cache._ids(seq_ids)  # known, active, distinct (the cache's own checks)
    except (TypeError, ValueError, IndexError) as e:
        raise type(e)(f"kfuse.{op}: {e}") from None
    lens = cache._kv_lens(layer, ids)
    if in_step:
        # Every layer that has appended in the open step reads the same lengths (committed + the step's
        # tokens), so a model's layers share one device copy of ids and lengths per step instead of
        # making two host-to-device copies each (a GPU decode step of a 16-layer model: 32 -> 2).
        if memo is not None and torch.equal(memo[2].host_ids, ids):
            call = _Call(memo[2].ids, memo[2].lens, memo[2].max_len, memo[2].host_ids, lens)
        else:  # a copy of ids: they may be the caller's tensor, which it may write before the next layer
            call = _to_device(cache, ids.clone(), lens)
        st["attn"] = (seq_ids if version is not None else None, version, call)
        return call
    return _to_device(cache, ids, lens)


def _to_device(cache: PagedKVCache, ids: Tensor, lens: Tensor) -> _Call:
    """The call for validated ``ids`` and their ``lens`` (CPU int64 ``[n]``): both cross to the device in
    one host-to-device copy (int32 ``[2, n]``)."""
    dev = cache._dev(torch.stack([ids, lens]), torch.int32)
    return _Call(dev[0], dev[1], int(lens.max()) if lens.numel() else 0, ids, lens)


# ---------------------------------------------------------------- implementations


class _TensorCache:
    """The attributes :mod:`kfuse.reference.kv` reads from a cache, over explicit tensors, one row per call
    row (that row's sequence's block-table row and length: read it with ids ``range(n)``): lets the
    registered ops run the reference without a :class:`PagedKVCache`, a sequence at two lengths included
    (keyed by sequence id, the last row's length served both; registered-ops hunt). Reads ``lens`` on the
    host."""

    def __init__(self, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_ids: Tensor, lens: Tensor):
        self.k_pages, self.v_pages = k_pages, v_pages
        self.block_table = block_table.index_select(0, seq_ids.long())
        self.page_size, self.num_kv_heads, self.head_dim = k_pages.shape[2], k_pages.shape[3], k_pages.shape[4]
        self._len = lens.tolist()

    def kv_len(self, layer: int, row: int) -> int:
        return self._len[row]


def _check_values(op: str, rows: int, k_pages: Tensor, block_table: Tensor, seq_ids: Tensor, lens: Tensor,
                  q_lens: Tensor | None = None) -> None:
    """The value checks of the C++ kernels (csrc/bindings.cpp: ``check_kv_attention``, ``kv_prefill_attention``)
    for the paths that read ``seq_ids``, ``lens``, ``q_lens`` and the block table on the host themselves
    (the reference, the cpu backend's SDPA prefill): ids within the table, lengths within its rows, every
    page a length needs a page, ``0 <= q_lens <= lens`` summing to q's rows. Unchecked, a bad id read
    another sequence, a bad q_len returned uninitialised or fully masked rows (registered-ops hunt)."""
    num_pages, page = k_pages.shape[1], k_pages.shape[2]
    max_seqs, stride = block_table.shape
    ids, ln, table = seq_ids.tolist(), lens.tolist(), block_table.cpu()
    for b, (s, n) in enumerate(zip(ids, ln, strict=True)):
        if not (0 <= s < max_seqs and 0 <= n <= stride * page):
            raise ValueError(f"kfuse.{op}: seq_ids[{b}] = {s} or lens[{b}] = {n} out of range (a table of "
                             f"{max_seqs} rows of {stride} pages of {page})")
        pages = table[s, :-(-n // page)]
        bad = ((pages < 0) | (pages >= num_pages)).nonzero()
        if bad.numel():
            j = int(bad[0])
            raise ValueError(f"kfuse.{op}: block_table[{s}, {j}] = {int(pages[j])} is not a page, but lens[{b}] = "
                             f"{n} needs it")
    if q_lens is not None:
        ql = q_lens.tolist()
        for i, (t, n) in enumerate(zip(ql, ln, strict=True)):
            if not 0 <= t <= n:
                raise ValueError(f"kfuse.{op}: q_lens[{i}] = {t} must be in [0, lens[{i}] = {n}]")
        if sum(ql) != rows:
            raise ValueError(f"kfuse.{op}: q has {rows} rows; q_lens sums to {sum(ql)}")


def _decode_impl(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                 lens: Tensor, max_len: int, scale: float, backend: str) -> Tensor:
    q = q.resolve_neg()  # kernels read memory: no lazy negation (_backends.dense)
    if backend == "triton":
        from kfuse.triton_kernels import kv as tk  # noqa: PLC0415 (triton is optional)

        # (the kernels read ids and lengths at ptr + b: strided ones, valid input of the registered op, were read
        # wrong; layout hunt, 2026-12-07)
        return tk.paged_decode(q, k_pages[layer], v_pages[layer], block_table, *map(_backends.dense, (seq_ids, lens)),
                               max_len, scale)
    if backend == "cpu":
        # (strided ids, lengths or table are valid input: the reference took them, the kernel refused them)
        return _backends.extension().kv_decode_attention(q.contiguous(), k_pages[layer], v_pages[layer],
                                                         *map(_backends.dense, (block_table, seq_ids, lens)), scale)
    _check_values(_DECODE, q.shape[0], k_pages, block_table, seq_ids, lens)
    tc = _TensorCache(k_pages, v_pages, block_table, seq_ids, lens)
    return paged_decode_attention_reference(q, tc, layer, range(seq_ids.shape[0]), scale)


def _prefill_impl(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                  lens: Tensor, q_lens: Tensor, max_q_len: int, max_len: int, scale: float, backend: str) -> Tensor:
    q = q.resolve_neg()  # kernels read memory: no lazy negation (_backends.dense)
    if backend == "triton":
        if _takes_flash(q, seq_ids.shape[0], max_q_len, max_len, k_pages, block_table):
            return _prefill_flash(q, k_pages[layer], v_pages[layer], block_table, seq_ids, scale)
        from kfuse.triton_kernels import kv as tk  # noqa: PLC0415 (triton is optional)

        return tk.paged_prefill(q, k_pages[layer], v_pages[layer], block_table,
                                *map(_backends.dense, (seq_ids, lens, q_lens)), max_q_len, scale)
    if backend == "cpu":
        if q.dtype in (torch.float16, torch.bfloat16) and max_q_len >= _SDPA_MIN_Q_LEN:
            _check_values(_PREFILL, q.shape[0], k_pages, block_table, seq_ids, lens, q_lens)
            return _prefill_sdpa(q, k_pages, v_pages, block_table, layer, seq_ids, lens, q_lens, scale)
        meta = map(_backends.dense, (block_table, seq_ids, lens, q_lens))
        return _backends.extension().kv_prefill_attention(q.contiguous(), k_pages[layer], v_pages[layer], *meta,
                                                          scale)
    _check_values(_PREFILL, q.shape[0], k_pages, block_table, seq_ids, lens, q_lens)
    tc = _TensorCache(k_pages, v_pages, block_table, seq_ids, lens)
    return paged_prefill_attention_reference(q, tc, layer, range(seq_ids.shape[0]), q_lens.tolist(), scale)


# On CUDA (the triton backend), a call whose sequences are all fresh prompts of one length T (each sequence's new
# tokens are the whole of it) of at least this many tokens runs torch's flash attention over the gathered pages
# (_prefill_flash): on the H200 (2026-12-04) the Triton prefill kernel took 2.61x SDPA's flash time at 8 x 1024
# tokens, bf16, 32/8 heads, D 128, while gathering the pages reads and writes K and V once (34 MB each way at that
# shape: ~17 us at the H200's 4.1 TB/s copy rate, beside flash's 162 us), so this route should take ~1.1x. Not yet
# timed on a GPU: bench/tune_kv.py's flash_ab times both paths at T 16 ... 4096 (and the report's triton-kernel row
# the kernel) to set this bound. Everything else (ragged prompts, new tokens behind cached ones, float32, which
# has no flash kernel) runs the Triton kernel.
_FLASH_MIN_Q_LEN = 128


def _takes_flash(q: Tensor, n: int, max_q_len: int, max_len: int, k_pages: Tensor, block_table: Tensor) -> bool:
    """Whether a triton-backend prefill of ``n`` sequences runs :func:`_prefill_flash`: every sequence a fresh
    prompt of the same ``T = max_q_len >= _FLASH_MIN_Q_LEN`` tokens, and q one :func:`_flash_runs` takes. The
    prompts are known fresh from host ints alone (no sync): q's rows ``= n · max_q_len`` makes every ``q_len``
    ``max_q_len`` (each is at most it and they sum to the rows), and ``max_len = max_q_len`` then makes every kv
    length ``T`` (each is at least its ``q_len`` and at most ``max_len``). Under ``torch.compile`` ``max_len`` is
    the table's capacity, so compiled calls keep the Triton kernel (unless T is that capacity).

    Bits: a sequence's output then depends on the rest of the call (flash on a call of fresh prompts of one
    length, the Triton kernel beside a ragged or cached one; and flash splits the keys by the batch size), where
    the Triton kernel's and the cpu backend's do not. Both paths are deterministic run to run."""
    return (n > 0 and max_q_len >= _FLASH_MIN_Q_LEN and q.shape[0] == n * max_q_len and max_len == max_q_len
            and _backends.cdiv(max_q_len, k_pages.shape[2]) <= block_table.shape[1] and k_pages.shape[1] > 0
            and block_table.shape[0] > 0 and _flash_runs(q, k_pages.shape[3]))


# _flash_runs' answers by (device, dtype, query heads, KV heads, head dim, flash turned on).
_FLASH_RUNS: dict[tuple, bool] = {}


def _flash_runs(q: Tensor, hkv: int) -> bool:
    """Whether torch's flash attention takes q (CUDA, half precision) with ``hkv`` KV heads: torch's own
    predicate (``torch.backends.cuda.can_use_flash_attention``: a GPU and a build it supports, flash not turned
    off by ``torch.backends.cuda.enable_flash_sdp(False)``, the head dim, grouped-query heads), asked once per
    device, dtype, heads, head dim and flag, on a small probe."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (q.device, q.dtype, q.shape[1], hkv, q.shape[2], torch.backends.cuda.flash_sdp_enabled())
    ok = _FLASH_RUNS.get(key)
    if ok is None:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention  # noqa: PLC0415

        pq, pkv = q.new_empty(1, q.shape[1], 16, q.shape[2]), q.new_empty(1, hkv, 16, q.shape[2])
        ok = _FLASH_RUNS.setdefault(key, bool(can_use_flash_attention(SDPAParams(pq, pkv, pkv, None, 0.0, True,
                                                                                 True))))
    return ok


def _prefill_flash(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_ids: Tensor,
                   scale: float) -> Tensor:
    """Causal attention of ``n`` fresh prompts of ``T`` tokens each (:func:`_takes_flash`): their pages gathered
    into ``[n, T, Hkv, D]`` (an ``index_select`` of the table's rows, then of each pool's pages) and torch's flash
    attention kernel (grouped-query heads, causal: top-left, which is bottom-right when every position is new).

    Args:
        q: packed ``[n·T, Hq, D]``; k_pages, v_pages: one layer's pools ``[num_pages, page_size, Hkv, D]``
            (``num_pages >= 1``); block_table: int32 ``[max_seqs >= 1, max_pages]``, at least ``ceil(T /
            page_size)`` pages wide; seq_ids: int32 ``[n]``; scale: softmax scale.
    Returns:
        ``[n·T, Hq, D]`` in q's dtype, contiguous (the registered op's fake). Row ids and page ids are clamped
        into the table and the pools, as the Triton kernels bound theirs: values the public op never passes read
        other K/V, never out of bounds (an ``index_select`` out of range is a device-side assert on a GPU)."""
    n, (rows, hq, d) = seq_ids.shape[0], q.shape
    t, (num_pages, page, hkv) = rows // n, k_pages.shape[:3]
    width = _backends.cdiv(t, page)
    table = block_table.index_select(0, seq_ids.long().clamp(0, block_table.shape[0] - 1))
    pages = table[:, :width].reshape(-1).clamp(0, num_pages - 1).long()
    k, v = (p.index_select(0, pages).view(n, width * page, hkv, d)[:, :t].transpose(1, 2) for p in (k_pages, v_pages))
    qh = q.contiguous().view(n, t, hq, d).transpose(1, 2)
    with _routing.autocast_off(q):  # (see _prefill_sdpa)
        if q.is_cuda:
            # The flash kernel itself: SDPA held to it by sdpa_kernel sets process-wide flags, which two threads'
            # calls (a model shared by threads, each with its own cache) left off for every other backend (review).
            o = torch.ops.aten._scaled_dot_product_flash_attention(qh, k, v, 0.0, True, False, scale=scale)[0]
        else:  # the tests' run on the CPU (_flash_runs declared true there): torch's CPU SDPA, flash there too
            o = torch.nn.functional.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale,
                                                                 enable_gqa=True)
    return o.transpose(1, 2).reshape(rows, hq, d).contiguous()


# Half-precision sequences with at least this many new tokens run on torch's SDPA over their gathered pages on the
# cpu backend (each by its own count: see _prefill_sdpa): its CPU flash attention blocks the GEMMs (AMX for bf16
# where the CPU has it), where the C++ kernel converts to fp32 and runs 16-position FMA tiles at ~50 GFLOP/s in every
# dtype (CPU perf hunt, 2026-12-06). 32 q / 8 kv heads, D 128, 2 threads, an AVX512-BF16/AMX VM, C++ / SDPA time:
# bf16 1.29x at 64 new tokens, 2.27x at 128, 3.87x at 512, 4.70x at 1024, 5.53x for 256 after 768 cached;
# fp16 1.04x, 1.10x, 1.19x, 1.76x, 1.86x; below 64, 0.7-1.2x. fp32 stays C++ (0.63-0.92x up to 512 tokens,
# 1.26x at 1024), float64 too (the C++ kernel's fp64 softmax). bench/results/2026-12-06-cpu-prefill-sdpa.md.
_SDPA_MIN_Q_LEN = 64


def _prefill_sdpa(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                  lens: Tensor, q_lens: Tensor, scale: float) -> Tensor:
    """The cpu backend's half-precision prefills, sequence by sequence on its own ``q_len``: at least
    ``_SDPA_MIN_Q_LEN`` new tokens, its pages gathered (``[kv_len, Hkv, D]``: the reference's ``gather_kv``) and
    torch's ``scaled_dot_product_attention`` with grouped-query heads, causal from the bottom right (the new tokens
    are the newest ``q_len`` of ``kv_len``); the shorter ones in one C++ kernel call. The choice is each
    sequence's own, so its output depends on it alone (by the call's longest, a short sequence beside a long
    one took SDPA and alone the C++ kernel: other bits; review). CPU tensors (``seq_ids``, ``lens``,
    ``q_lens`` read on the host; the caller has checked their values: _check_values). The output is
    contiguous, as the registered op's fake says (``empty_like`` kept a permuted q's layout, which
    torch.compile's view of it then refused; registered-ops hunt). q is read contiguous, as the C++ kernel reads it:
    torch's CPU SDPA leaves its flash kernel for a q whose rows are not unit-stride, so a strided q gave other bits
    (layout hunt, 2026-12-06). Autocast is off around SDPA: under ``torch.autocast("cpu", dtype=torch.bfloat16)``
    an fp16 cache's prefill ran in bf16 (0.013 from the kernels' result; the kernels ignore autocast)."""
    q = q.contiguous()
    out = q.new_empty(q.shape)
    rows_cache, off, short = _TensorCache(k_pages, v_pages, block_table, seq_ids, lens), 0, []
    for i, (n, t) in enumerate(zip(lens.tolist(), q_lens.tolist(), strict=True)):
        if t < _SDPA_MIN_Q_LEN:
            short += [(i, off, t)] if t else []
            off += t
            continue
        k, v = (x.transpose(0, 1)[None] for x in gather_kv(rows_cache, layer, i))  # [1, Hkv, n, D]
        qs = q[off:off + t].transpose(0, 1)[None]  # [1, Hq, t, D]
        # is_causal is top-left: the same as bottom-right only when every position is new
        mask = None if t == n else torch.ones(t, n, dtype=torch.bool, device=q.device).tril(n - t)
        with _routing.autocast_off(q):  # the cache's dtype, as the kernels: autocast ran an fp16 cache in bf16
            o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=mask is None,
                                                                 scale=scale, enable_gqa=True)
        out[off:off + t] = o[0].transpose(0, 1)
        off += t
    if short:
        sel = torch.tensor([i for i, _, _ in short], device=q.device)
        rows = torch.cat([torch.arange(o0, o0 + t, device=q.device) for _, o0, t in short])
        meta = (_backends.dense(block_table), seq_ids[sel], lens[sel], q_lens[sel])
        out[rows] = _backends.extension().kv_prefill_attention(q[rows].contiguous(), k_pages[layer], v_pages[layer],
                                                               *meta, scale)
    return out


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
    _backends.check_backend_name(_DECODE, backend)
    _checks.one_device(f"kfuse.{_DECODE}", q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                       seq_ids=seq_ids, lens=lens)
    return q.new_empty(q.shape)


@torch.library.custom_op("kfuse::paged_prefill_attention", mutates_args=())
def paged_prefill_attention_op(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int,
                               seq_ids: Tensor, lens: Tensor, q_lens: Tensor, max_q_len: int, max_len: int,
                               scale: float, backend: str) -> Tensor:
    """Registered prefill attention: q packed ``[sum(q_lens), Hq, D]``; int32 ``q_lens [n]`` (the newest
    tokens of each sequence, already in the cache), ``max_q_len >= max(q_lens)``, ``max_len >= max(lens)``
    (host ints: with ``max_len = max_q_len`` and ``n · max_q_len`` rows every sequence is a fresh prompt of
    ``max_q_len`` tokens, which CUDA runs on flash attention: ``_takes_flash``); the rest as for decode."""
    _check_op_tensors(_PREFILL, q, k_pages, v_pages, block_table, layer, seq_ids, lens, seq_ids.shape[0])
    if q_lens.dtype != torch.int32 or q_lens.shape != seq_ids.shape or q_lens.device != q.device:
        raise ValueError(f"kfuse.{_PREFILL}: q_lens must be int32 [{seq_ids.shape[0]}] on q's device; got "
                         f"{q_lens.dtype} {tuple(q_lens.shape)} on {q_lens.device}")
    chosen = _select(_PREFILL, backend, q)
    return _prefill_impl(q, k_pages, v_pages, block_table, layer, seq_ids, lens, q_lens, max_q_len, max_len, scale,
                         chosen)


@paged_prefill_attention_op.register_fake
def _(q, k_pages, v_pages, block_table, layer, seq_ids, lens, q_lens, max_q_len, max_len, scale, backend):
    _backends.check_backend_name(_PREFILL, backend)
    _checks.one_device(f"kfuse.{_PREFILL}", q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                       seq_ids=seq_ids, lens=lens, q_lens=q_lens)
    return q.new_empty(q.shape)


# FLOPs under torch.utils.flop_counter.FlopCounterMode (kfuse/_flops.py): q·kᵀ and p·v, 2 · 2 · D per query head
# and key attended (the keys each query sees, causal in prefill; a host read of the lengths: a sync on a GPU,
# under the counter only).
def _decode_flops(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                  lens: Tensor, max_len: int, scale: float, backend: str, **_: object) -> int:
    return 4 * q.shape[1] * q.shape[2] * int(lens.long().sum())


def _prefill_flops(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, layer: int, seq_ids: Tensor,
                   lens: Tensor, q_lens: Tensor, max_q_len: int, max_len: int, scale: float, backend: str,
                   **_: object) -> int:
    n, t = lens.long().cpu(), q_lens.long().cpu()
    return 4 * q.shape[1] * q.shape[2] * int((t * (n - t) + t * (t + 1) // 2).sum())


_flops.register(torch.ops.kfuse.paged_decode_attention, _decode_flops)
_flops.register(torch.ops.kfuse.paged_prefill_attention, _prefill_flops)


# ---------------------------------------------------------------- public ops


def paged_decode_attention(q: Tensor, cache: PagedKVCache, layer: int, seq_ids: Ids, scale: float | None = None,
                           backend: str = "auto") -> Tensor:
    """Decode attention over a paged cache: ``o[b] = softmax(q[b]·K[b]ᵀ·scale)·V[b]`` over the first
    ``cache.kv_len(layer, seq_ids[b])`` positions of each sequence, read through the block table.

    Args:
        q: ``[B, Hq, D]``, the cache's dtype and device; ``Hq`` a multiple of ``cache.num_kv_heads``
            (grouped-query attention), ``D = cache.head_dim``.
        cache: the :class:`kfuse.kv.PagedKVCache`.
        layer: int in ``[0, num_layers)``.
        seq_ids: ``B`` distinct active sequence ids (ints or a 1-D CPU integer tensor; under ``torch.compile``
            pass a tensor: Dynamo specialises a list's length, one graph per batch size).
        scale: softmax scale; default ``1/sqrt(D)``.
        backend: ``"auto"`` (``triton`` for CUDA tensors, ``cpu`` for CPU ones), ``"triton"``, ``"cpu"``
            (the C++ kernels) or ``"reference"``; ``"cuda"`` always raises.
    Returns:
        ``[B, Hq, D]`` in q's dtype; zeros for a sequence of length 0.

    Validation reads the cache's host mirror (no sync). No autograd: a q that requires grad raises
    unless grad mode is off (``torch.no_grad()``, ``torch.inference_mode()``).
    """
    layer, call = _validate(_DECODE, q, cache, layer, seq_ids)
    if q.shape[0] != call.ids.shape[0]:
        raise ValueError(f"kfuse.{_DECODE}: q has {q.shape[0]} rows; seq_ids has {call.ids.shape[0]} (one token per "
                         "sequence)")
    sc = _scale(_DECODE, scale, cache.head_dim)
    chosen = _select(_DECODE, backend, q)
    path = _routing.route(chosen, (q,))
    if path == _routing.REFERENCE and call.host_ids is not None:
        return paged_decode_attention_reference(q, cache, layer, call.host_ids.tolist(), sc)
    args = (q, cache.k_pages, cache.v_pages, cache.block_table, layer, call.ids, call.lens, call.max_len, sc, chosen)
    if path != _routing.EAGER:  # registered; also the reference under a trace (it reads device values)
        return paged_decode_attention_op(*args)
    with _routing.labelled(f"kfuse.{_DECODE}"):
        return _decode_impl(*args)


def paged_prefill_attention(q: Tensor, cache: PagedKVCache, layer: int, seq_ids: Ids, q_lens: Ids,
                            scale: float | None = None, backend: str = "auto") -> Tensor:
    """Prefill / append attention over a paged cache: ``q_lens[i]`` new tokens of ``seq_ids[i]``, packed in
    ``q`` ``[sum(q_lens), Hq, D]``, are the newest ``q_lens[i]`` of the sequence's ``kv_len(layer, s)``
    tokens (already appended to this layer); the token at position ``p`` attends causally to ``0 … p``.

    Args: as :func:`paged_decode_attention`, plus ``q_lens`` (ints ``>= 0``, one per sequence, summing
    to q's rows, each at most the sequence's ``kv_len``). Backends as for decode.
    Returns ``[sum(q_lens), Hq, D]`` in q's dtype.
    """
    layer, call = _validate(_PREFILL, q, cache, layer, seq_ids)
    n = call.ids.shape[0]
    if _routing.tracing() and isinstance(q_lens, Tensor):
        # Its values are unknown while tracing, and the grid, the checks and the packed rows' starts need them
        # (Dynamo failed on the checks: "Could not guard on data-dependent expression"; compile hunt).
        raise TypeError(f"kfuse.{_PREFILL}: under torch.compile q_lens must be a list of ints (a tensor's values "
                        "are unknown while tracing); pass q_lens.tolist()")
    ql = [int(x) for x in q_lens] if _routing.tracing() else _as_int_list(q_lens, f"kfuse.{_PREFILL}: q_lens")
    if len(ql) != n or any(x < 0 for x in ql) or sum(ql) != q.shape[0]:
        raise ValueError(f"kfuse.{_PREFILL}: q_lens {ql} must have one entry >= 0 per sequence ({n}) "
                         f"summing to q's {q.shape[0]} rows")
    if call.host_lens is not None:
        for s, t, have in zip(call.host_ids.tolist(), ql, call.host_lens.tolist(), strict=True):
            if t > have:
                raise ValueError(f"kfuse.{_PREFILL}: q_lens: {t} new tokens for sequence {s} but only {have} are "
                                 f"cached at layer {layer} (append first)")
    sc = _scale(_PREFILL, scale, cache.head_dim)
    chosen = _select(_PREFILL, backend, q)
    path = _routing.route(chosen, (q,))
    if path == _routing.REFERENCE and call.host_ids is not None:
        return paged_prefill_attention_reference(q, cache, layer, call.host_ids.tolist(), ql, sc)
    if call.host_ids is None:
        ql_t = torch.tensor(ql, dtype=torch.int32, device=q.device)
    else:
        ql_t = cache._dev(ql, torch.int32)
    args = (q, cache.k_pages, cache.v_pages, cache.block_table, layer, call.ids, call.lens, ql_t, max(ql, default=0),
            call.max_len, sc, chosen)
    if path != _routing.EAGER:  # registered; also the reference under a trace (it reads device values)
        return paged_prefill_attention_op(*args)
    with _routing.labelled(f"kfuse.{_PREFILL}"):
        return _prefill_impl(*args)
