"""Paged KV cache with per-sequence rollback, fork and copy-on-write.

The metadata is kept by C++ kernels on the host, which log their writes; the device copy replays them
(one copy and one scatter per operation); K/V writes go to flat slots (one launch for both pools on CUDA).
Attention over the cache: :mod:`kfuse.reference.kv`.

Device state (all on ``cache.device``)
--------------------------------------
- ``k_pages, v_pages``: ``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``, ``dtype``.
- ``block_table``: int32 ``[max_seqs, max_pages_per_seq]``; entry ``j`` of row ``s`` is the page that
  holds positions ``j·page_size … (j+1)·page_size − 1`` of sequence ``s``, or −1.
- ``seq_lens``: int32 ``[max_seqs]``, committed lengths; the single source of truth for a length.
- ``page_refcount``: int32 ``[num_pages]``, number of block-table entries that reference each page.
- ``free_stack``: int32 ``[num_pages + 1]`` and ``free_top``: int32 ``[1]``; the free pages are
  ``free_stack[:free_top]`` (the last is allocated first). The extra slot is a write sink for the
  fixed-shape scatter in rollback.

Host state and synchronisation
------------------------------
The metadata also lives on the host, as CPU int32 tensors of the same layout (``_h_table``, ``_h_lens``,
``_h_ref``, ``_h_free``, ``_h_top``: views of one buffer ``_h_flat``, plus ``_h_npages``: table entries
per row, and ``_h_active``), updated in place by C++ kernels (``csrc/kv/kv_cache_cpu.cpp`` through
``kfuse._C.KVHostState``). For a CPU cache they *are* the device state (one copy). For a CUDA cache
the device tensors are views of a copy of ``_h_flat`` onto which every operation's writes are
replayed: the C++ kernels log the offset of each int32 they write, and the device receives the
distinct offsets with their final values (one pinned copy, one ``index_copy_``; tests compare the
two copies after every operation). Every request is
validated against the host state, and every allocation decision (which pages, copy-on-write or not)
is made from it, so no operation reads device memory: none of ``add_sequence``, ``append``,
``advance``, ``rollback``, ``fork``, ``free`` or ``stats`` synchronises with a GPU. Host-decided index
tensors reach the device through pinned memory and ``non_blocking`` copies (the caching host allocator
keeps the pinned buffer alive until the copy has run). Passing CUDA tensors *as arguments* (``seq_ids``,
``new_lens``, ``counts``) does sync, because they are read on the host to validate them; pass Python
ints or CPU tensors. A replay's shape depends on the data, so :meth:`PagedKVCache.graphed_rollback`
captures another device half instead, :meth:`PagedKVCache._rollback_device`: a fixed sequence of
fixed-shape tensor ops (gather, ``where``, ``scatter_add_``, ``scatter_reduce_``, ``cumsum``,
``index_copy_``) on device index tensors that recomputes the rollback with no data-dependent shapes.
Cost: O(n · max_pages_per_seq) elementwise work for ``n`` sequences; no K/V bytes move. The host half
is O(n + dropped pages).

Append on CUDA is one Triton launch a layer (``triton_kernels/kv.py`` ``paged_append``): a scatter of
whole ``[num_kv_heads, head_dim]`` rows of K and of V to flat slots, where ``index_copy_`` takes a
launch per pool (the H200's append row, 7.1 µs of device time, was five launches and copies; this
and the single host-to-device copy of a step make it three). Elsewhere (CPU, or Triton unavailable)
it is one ``index_copy_`` per pool. The metadata ops have no kernels of their own: every decision
must be made on the host anyway, to validate requests without a device sync; what reaches the device
is a scatter of the decided int32 writes, one ``index_copy_``. The C++ host kernels are the CPU
kernels of both (a CPU cache has only the host copy).

Steps: lengths advance once per step, for all layers
----------------------------------------------------
A step is opened by the first ``append`` after ``advance``: ``append(layer, seq_ids, k, v, counts)``
writes the new tokens at positions ``seq_lens[s] …`` and allocates their pages (and copies a shared,
partially filled last page first: copy-on-write) for all layers at once; every layer must then
``append`` exactly once with the same ``seq_ids`` and ``counts``, and ``advance(seq_ids, counts)``
commits the new lengths. Appending a layer twice, different ids/counts within a step, or advancing
before every layer has appended raises ``ValueError``, so a model cannot leave layers disagreeing.
During a step ``seq_lens`` still holds the committed lengths; :meth:`PagedKVCache.kv_len` gives the
length attention for a layer should use (committed + pending if that layer has appended).
``rollback``, ``fork`` and ``free`` during an open step raise ``ValueError``; :meth:`abort_step`
drops the open step (its pages are released, lengths are unchanged).

Invalid requests raise and leave the cache exactly as it was: every check runs before anything is
mutated. A step that fails after it opened is dropped by :meth:`abort_step`: lengths and contents as
they were, its new pages released (a shared page it copied stays the sequence's own copy).
"""

from __future__ import annotations

import array
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

from kfuse import _backends, _checks

__all__ = ["PagedKVCache"]

_INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                         torch.uint64})
_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Sequence ids, lengths and counts as the cache's methods take them: ints, a numpy array or a 1-D integer tensor
# (CPU int64 tensors are the fastest: no conversion).
Ids: TypeAlias = "Sequence[int] | np.ndarray | Tensor"
# A sequence's capacity in tokens. Lengths and positions are int32 in the Triton kernels, which add up to a split
# of positions (at most 32,832: triton_kernels/kv.py decode_splits) or a block of new tokens to a length; within
# that much of 2^31 the sums wrapped and a decode returned zeros (overflow hunt, 2026-12-07).
_MAX_CAPACITY = 2**31 - 2**16
_PLAIN_INT = frozenset({int})


def _index_tensor(x, what: str) -> Tensor:
    """``x`` (a sequence of ints, or a 1-D integer tensor) as a contiguous CPU int64 tensor. A TypeError for the
    wrong kind (not a sequence, a str, floats, bools, a tensor of another dtype), a ValueError for the wrong
    shape, a meta tensor or a value past int64."""
    if isinstance(x, Tensor):
        if x.dtype not in _INT_DTYPES:
            raise TypeError(f"{what} must be a 1-D integer tensor or a sequence of ints; got a {x.dtype} tensor")
        if x.dim() != 1 or x.is_meta:
            raise ValueError(f"{what} must be a 1-D integer tensor (with values) or a sequence of ints; "
                             f"got {'a meta ' if x.is_meta else ''}{x.dtype} {tuple(x.shape)}")
        return x.to(device="cpu", dtype=torch.int64).contiguous()  # note: a CUDA tensor here syncs
    if isinstance(x, (int, float, bool, str, bytes)) or not hasattr(x, "__len__"):
        raise TypeError(f"{what} must be a sequence of ints; got {_checks.type_name(x)} {x!r}")
    if getattr(x, "ndim", 1) != 1:  # (a 0-d or 2-D array)
        raise ValueError(f"{what} must be a 1-D sequence of ints; got {_checks.type_name(x)} {x!r}")
    # array('q') converts a list of 256 ints in ~8 us (numpy ~16 us, torch.tensor ~4x more) and
    # refuses non-integers (floats, strings). Bools are ints in Python and would pass as 0/1: a mask
    # given by mistake would select sequences 0 and 1, so they are refused as a bool tensor is.
    try:
        buf = array.array("q", x)
    except TypeError as e:
        raise TypeError(f"{what} must hold ints; got {list(x)!r}") from e
    except OverflowError as e:  # (it said "must hold ints" of an int: error-message hunt)
        raise ValueError(f"{what} holds a value outside int64's range; got {list(x)!r}") from e
    # The element scan only where some element is not a plain int: 0.9 us for 32 ints where the scan took 4.2.
    if not set(map(type, x)) <= _PLAIN_INT and any(isinstance(e, (bool, np.bool_)) for e in x):
        raise TypeError(f"{what} must hold ints, not bools; got {list(x)!r}")
    return torch.frombuffer(buf, dtype=torch.int64) if len(buf) else torch.zeros(0, dtype=torch.int64, device="cpu")


def _layer_index(where: str, layer: object, num_layers: int) -> int:
    """``layer`` as an int in ``[0, num_layers)``: the one check of the cache's methods and the attention ops
    (kfuse.ops.kv). An integer of any kind but bool (numpy, 0-d integer tensors: error-message hunt; as an int,
    since a 0-d tensor hashes by identity and the open step's layers are ints); a TypeError for anything else
    (a str, a float, a 1-element tensor), an IndexError out of range."""
    i = _checks.integer(where, "layer", layer)
    if not 0 <= i < num_layers:
        raise IndexError(f"{where}: layer must be an int in [0, {num_layers}); got {i}")
    return i


def _as_int_list(x, what: str) -> list[int]:
    return _index_tensor(x, what).tolist()


def _rebuilt_cache(cls: type, args: tuple, state: tuple[Tensor, ...], extra: dict) -> PagedKVCache:
    """A ``cls`` (:class:`PagedKVCache` or a subclass) made with ``args`` (the constructor's, ``_mirror`` last),
    holding ``state`` and the attributes ``extra`` (see :meth:`PagedKVCache.__reduce__`)."""
    *pos, mirror = args
    cache = cls.__new__(cls)
    PagedKVCache.__init__(cache, *pos, _mirror=mirror)
    cache.__dict__.update(extra)
    with torch.no_grad():
        for dst, src in zip((cache.k_pages, cache.v_pages, cache._h_flat, cache._h_npages, cache._h_active), state,
                            strict=True):
            dst.copy_(torch.as_tensor(src))  # (numpy host state; tensors in pickles made before 2026-12-07)
        if cache._mirrored:
            cache._flat.copy_(cache._h_flat)
    return cache


class PagedKVCache:
    """A paged KV cache whose sequences roll back, fork and are freed independently.

    Args:
        num_layers, num_kv_heads, head_dim: model shape.
        page_size: tokens per page.
        num_pages: pages in the pool (shared by all sequences; one page id spans all layers).
        max_seqs: sequence slots (rows of ``block_table``).
        dtype, device: of the K/V pools.
        max_pages_per_seq: columns of ``block_table``; default ``num_pages`` (a sequence may use the
            whole pool). The longest sequence holds ``max_pages_per_seq · page_size`` tokens, at most
            2^31 − 2^16.

    See the module docstring for the tensors, the host state and the step contract. Needs the
    compiled extension ``kfuse._C`` (its C++ metadata kernels keep the host state).

    Not thread-safe: one thread at a time drives a cache (its host state and open step are shared, with
    no lock); separate caches in separate threads are independent.
    """

    # Its tensors are made outside inference mode even when the cache is made inside it: an inference
    # tensor refuses in-place writes outside inference mode, so such a cache failed its first append there.
    @torch.inference_mode(False)
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int,
                 max_seqs: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_pages_per_seq: int | None = None, *, _mirror: bool = False) -> None:
        sizes = []
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("page_size", page_size), ("num_pages", num_pages), ("max_seqs", max_seqs)):
            i = _checks.integer("PagedKVCache", name, val, 1)  # numpy and 0-d tensor integers too
            if i >= 2**31:  # (torch's overflow error from deep inside named none: error-message hunt)
                raise ValueError(f"{name} must be below 2^31; got {i}")
            sizes.append(i)
        num_layers, num_kv_heads, head_dim, page_size, num_pages, max_seqs = sizes
        if dtype not in _KV_DTYPES:  # what the attention kernels read
            raise TypeError(f"PagedKVCache: dtype must be one of {', '.join(map(str, _KV_DTYPES))}; got {dtype!r}")
        if max_pages_per_seq is None:
            max_pages_per_seq = num_pages
        max_pages_per_seq = _checks.integer("PagedKVCache", "max_pages_per_seq", max_pages_per_seq, 1)
        if max_seqs * max_pages_per_seq >= 2**40:  # (num_pages is below 2^31: checked above)
            raise ValueError(f"max_seqs · max_pages_per_seq ({max_seqs * max_pages_per_seq}) must stay below 2^40")
        if max_pages_per_seq * page_size > _MAX_CAPACITY:  # lengths are int32 (seq_lens, the kernels)
            raise ValueError(f"a sequence's capacity max_pages_per_seq · page_size ({max_pages_per_seq} · {page_size}) "
                             f"must stay at or below 2^31 − 2^16 = {_MAX_CAPACITY} tokens (lengths and positions are "
                             "int32); pass a smaller max_pages_per_seq (it defaults to num_pages)")
        ext = _backends.extension()
        if ext is None:
            why = "; ".join(_backends.extension_reasons(torch.device("cpu")))
            raise RuntimeError(f"PagedKVCache needs the compiled extension kfuse._C: {why}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages, self.max_seqs = page_size, num_pages, max_seqs
        self.max_pages_per_seq = max_pages_per_seq
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=device)
        # The pages' device, not torch.device(device): "cuda" has no index and compares unequal to the
        # "cuda:0" of every tensor on it (every CUDA test failed that way, H200 2026-12-04).
        self.dtype, self.device = dtype, self.k_pages.device
        dev = self.device
        # Host state (CPU), updated in place by the C++ kernels of kfuse._C.KVHostState. The arrays the
        # device needs are views of one int32 buffer, laid out as the device's (block_table, seq_lens,
        # page_refcount, free_stack, free_top), so that an operation's writes are offsets into it. Every host
        # tensor names the CPU: under torch.set_default_device("cuda") they were made on the GPU (bug hunt).
        i32 = torch.int32
        sizes = (max_seqs * max_pages_per_seq, max_seqs, num_pages, num_pages + 1, 1)
        self._h_flat = torch.zeros(sum(sizes), dtype=i32, device="cpu")
        h_table, self._h_lens, self._h_ref, self._h_free, self._h_top = self._h_flat.split(sizes)
        self._h_table = h_table.view(max_seqs, max_pages_per_seq)
        self._h_table.fill_(-1)
        self._h_free[:-1] = torch.arange(num_pages - 1, -1, -1, dtype=i32, device="cpu")  # page 0 is allocated first
        self._h_free[-1] = -1
        self._h_top.fill_(num_pages)
        self._h_npages = torch.zeros(max_seqs, dtype=i32, device="cpu")  # table entries in use per row (a prefix)
        self._h_active = torch.zeros(max_seqs, dtype=torch.uint8, device="cpu")  # host only
        # numpy views of the same memory, for cheap scalar reads.
        self._n_lens, self._n_npages, self._n_active = (t.numpy() for t in (self._h_lens, self._h_npages,
                                                                             self._h_active))
        # A CPU cache's device state IS its host state; any other device gets a copy of the buffer,
        # onto which each operation's writes are replayed (the host kernels log them: one scatter of
        # final values instead of recomputing the operation with ~17 device ops). Tests force the copy
        # on CPU with _mirror=True.
        self._mirrored = dev.type != "cpu" or _mirror
        self._host = ext.KVHostState(self._h_table, self._h_lens, self._h_npages, self._h_active, self._h_ref,
                                     self._h_free, self._h_top, page_size, self._h_flat if self._mirrored else None)
        self._flat = self._h_flat.to(dev, copy=True) if self._mirrored else self._h_flat
        d_table, self.seq_lens, self.page_refcount, self.free_stack, self.free_top = self._flat.split(sizes)
        self.block_table = d_table.view(max_seqs, max_pages_per_seq)
        self._scratch = torch.zeros(num_pages, dtype=torch.int64, device=dev) if self._mirrored else None
        # K/V writes: one Triton launch for both pools on CUDA (see the module docstring), else index_copy_.
        self._append_kv: Callable[..., None] | None = None
        if dev.type == "cuda" and not _backends.triton_reasons(dev, dtype):
            from kfuse.triton_kernels.kv import paged_append  # noqa: PLC0415 (triton is optional)

            self._append_kv = paged_append
        # Open step: None, or dict(ids, counts, pending (CPU int64; pending: [max_seqs] tokens of the
        # step per sequence), layers (set), slots (flat page · page_size + slot, device int64), commit
        # (advance's device writes: offsets, int32 values; None on an unmirrored cache)).
        self._step: dict | None = None
        # Host updates begun (plans, rollbacks, forks, frees): a plan's number, by which the host state knows it
        # (see _open_step), and how a call sees another nested inside it (see _settle).
        self._updates = 0
        self._pool_views: tuple | None = None  # see _layer_pools
        self._init_attrs = frozenset(self.__dict__) | {"_init_attrs"}  # the constructor's (see __reduce__)

    # ------------------------------------------------------------------ helpers
    def _dev(self, vals, dtype: torch.dtype = torch.int64) -> Tensor:
        """A host list or CPU tensor as a device tensor without a sync (pinned + non_blocking on CUDA)."""
        if isinstance(vals, Tensor):
            t = _backends.as_dtype(vals, dtype)
        else:
            t = torch.tensor(vals, dtype=dtype, device="cpu")
        if self.device.type == "cuda":
            self._not_capturing("a metadata update")  # the public methods check first; this backstops
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _update(self) -> int:
        """The number of a host update about to begin, for :meth:`_settle` (and a plan's token)."""
        self._updates += 1
        return self._updates

    def _settle(self, update: int) -> None:
        """After the device writes of host update number ``update``: when another cache call ran between that
        update and these writes (a ``__del__`` freeing a sequence, run by the garbage collector as the replay
        allocated), this call's final values were written over the nested call's newer ones, and the device
        copy is made again from the host state. Before, the device free list and refcounts stayed behind the
        host's (re-entrancy hunt, 2026-12-07). An int compare on the common path."""
        if self._updates != update:
            self._resync()

    def _replay(self, writes: Tensor | None, update: int) -> None:
        """Apply the host kernels' writes (int64 ``[2, m]``: offsets into the flat buffer, final values;
        distinct offsets) of host update number ``update`` to the device copy: one host-to-device copy and
        one scatter, no sync."""
        if writes is not None and writes.shape[1]:
            try:
                w = self._dev(writes)
                # flat[offsets] = values, the values as the low halves of their int64s (little-endian, as every
                # platform torch runs CUDA on): row 1 of w's int32 view, even places; a strided view, where
                # .to(torch.int32) was one more kernel (and w[1].view(...)[::2] two more views: ~2 us).
                self._flat.index_copy_(0, w[0], w.view(torch.int32)[1, ::2])
            except BaseException:  # the host state changed: the device copy must not be left behind it
                self._resync()
                raise
        self._settle(update)

    def _resync(self) -> None:
        """The device copy made the host state again, after an error between the host's update and its
        replay (out of memory pinning the writes, an interrupt): later replays write only the offsets they
        change, so stale entries would never be repaired (state-after-errors hunt, 2026-12-05). One O(cache)
        copy, on error paths only."""
        if self._mirrored:
            self._flat.copy_(self._h_flat)

    def _ids(self, seq_ids, what: str = "seq_ids") -> Tensor:
        """Validated ids (in range, active, distinct) as a CPU int64 tensor."""
        ids = _index_tensor(seq_ids, what)
        self._host.check_ids(ids, what)
        return ids

    def _call_rows(self, seq_ids) -> tuple[Tensor, Tensor, int]:
        """An attention call's sequences when no step is open: the validated ids (as :meth:`_ids`), int32
        ``[2, n]`` (the ids, their committed lengths) and the longest length, from one extension call
        (``KVHostState.call_rows``; in Python the lookup, stack, cast and max took ~30-40 µs on a 2-core VM)."""
        ids = _index_tensor(seq_ids, "seq_ids")
        rows, longest = self._host.call_rows(ids, "seq_ids")
        return ids, rows, longest

    @staticmethod
    def _scalar(v, what: str) -> int:
        """An int from an int, a numpy integer or a one-element integer tensor; a TypeError for anything else
        (bools, floats, strs, tensors of other dtypes), a ValueError for a meta tensor (no value)."""
        if isinstance(v, Tensor) and v.numel() == 1 and v.dtype in _INT_DTYPES:
            if v.is_meta:
                raise ValueError(f"{what} must be an int; got a meta tensor (no value)")
            v = v.reshape(())  # (one element of any shape, as before; int_or_none takes 0-d ones)
        i = _checks.int_or_none(v)
        if i is None:
            raise TypeError(f"{what} must be an int; got {_checks.type_name(v)} {v!r}")
        return i

    def _check_id(self, seq_id, what: str) -> int:
        # A plain int in range and active passes the checks below (8 us: a list, a tensor, C++) as it is.
        if type(seq_id) is int and 0 <= seq_id < self.max_seqs and self._n_active[seq_id]:
            return seq_id
        return int(self._ids([self._scalar(seq_id, what)], what)[0])

    def _not_capturing(self, op: str) -> None:
        """Raise before any state changes when called inside a CUDA-graph capture: the host half of every
        metadata op runs once, at capture, and its host-to-device copies would be captured reading
        temporary host buffers at every replay."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{op}: PagedKVCache operations cannot be captured in a CUDA graph directly "
                               "(their arguments cross from the host); use cache.graphed_rollback(n) for rollback")

    def _appended(self, external: bool) -> Tensor:
        # Made outside inference mode (written in place by appends, perhaps outside it); the context only where
        # it is on (the decorator cost ~3 us a step).
        with torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext():
            return torch.full((self.num_layers,), external, dtype=torch.bool, device="cpu")

    @staticmethod
    def _same_counts(st: dict, ids: Tensor, cnt: Tensor | None) -> bool:
        """Whether counts ``cnt`` for ``ids`` (None: one token each) are the open step's ``st``: the step's flag
        ``ones`` spares building and comparing a tensor in the common case."""
        if cnt is None:
            return st["ones"] or torch.equal(torch.ones_like(ids), st["counts"])
        return torch.equal(cnt, st["counts"])

    def __reduce__(self) -> tuple:
        """``copy.deepcopy``, ``copy.copy`` and pickling (``torch.save``) give an independent cache with the same
        contents: the constructor's arguments and the state's tensors (pools, host state), rebuilt by
        :func:`_rebuilt_cache`. The host state's C++ object over views of those tensors cannot be pickled, and a
        shallow copy shared it (a step opened on the copy let the original roll back under it, leaving a
        committed token with no page; copy hunt). Refused while a step is open."""
        self._no_step("PagedKVCache: copy or pickle")
        args = (self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, self.num_pages, self.max_seqs,
                self.dtype, self.device, self.max_pages_per_seq, self._mirrored and self.device.type == "cpu")
        # Copies of the host state: torch.multiprocessing's pickler moves a CPU tensor's storage into shared
        # memory in place, and the C++ state and the numpy views keep pointers into the old one (a cache put
        # on a Queue then read freed memory: nonsense errors, a heap-corruption abort; multiprocessing hunt,
        # 2026-12-05). As numpy arrays, pickled by value: as tensor clones, the pickler sent a shared-memory
        # file descriptor of a clone freed before a spawned process read it ("bad value(s) in fds_to_keep";
        # forkserver: a hang; process hunt, 2026-12-07). The pools may move: nothing holds their pointers.
        state = (self.k_pages, self.v_pages, *(t.numpy().copy() for t in (self._h_flat, self._h_npages,
                                                                          self._h_active)))
        # A subclass and attributes set after the constructor come along (copied as the copy is: shallowly by
        # copy.copy, deeply by deepcopy).
        extra = {k: v for k, v in self.__dict__.items() if k not in self._init_attrs}
        return _rebuilt_cache, (type(self), args, state, extra)

    def _no_step(self, op: str) -> None:
        self._not_capturing(op)
        if self._step is not None:
            raise ValueError(f"{op}: a step is open (layers appended: {sorted(self._step['layers'])} of "
                             f"{self.num_layers}); call advance() or abort_step() first")

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        """Claim a free sequence slot (length 0) and return its id. Raises ``ValueError`` when all
        ``max_seqs`` slots are in use. No device work (a free slot's row is already −1 / length 0)."""
        free = np.flatnonzero(self._n_active == 0)
        if not free.size:
            raise ValueError(f"add_sequence: all max_seqs={self.max_seqs} sequence slots are in use")
        s = int(free[0])
        self._n_active[s] = 1
        return s

    def free(self, seq_id: int) -> None:
        """Release sequence ``seq_id``: its pages' refcounts drop (pages reaching 0 are freed) and the slot
        can be reused. Metadata only."""
        s = self._check_id(seq_id, "seq_id")
        self._no_step("free")
        one = torch.full((1,), s, dtype=torch.int64, device="cpu")  # torch.tensor([s]) took ~7 us, twice
        try:
            update = self._update()
            writes = self._host.rollback(one, torch.zeros_like(one), False)
            self._n_active[s] = 0  # the host's part done: the slot goes even if the device's replay fails
            self._replay(writes, update)
        except BaseException:  # (an interrupt as the host's rollback returned: the slot stays, emptied)
            self._resync()
            raise

    def reset(self, seq_ids: Ids) -> None:
        """Empty the sequences ``seq_ids`` (list, array or int tensor of active ids): length 0, their pages
        released as by ``rollback(seq_ids, 0)``, their slots kept (:meth:`free` releases the slot too).
        The cache's side of resetting a sequence to its start. Metadata only."""
        ids = self._ids(seq_ids)
        self.rollback(ids, torch.zeros_like(ids))

    @property
    def active_sequences(self) -> list[int]:
        """The ids of the sequences added and not freed, ascending (from the host state: no sync)."""
        return np.flatnonzero(self._n_active).tolist()

    def length(self, seq_id: int) -> int:
        """Committed length of ``seq_id`` from the host state (no sync)."""
        return int(self._n_lens[self._check_id(seq_id, "seq_id")])

    def pending(self, seq_id: int) -> int:
        """Tokens appended for ``seq_id`` in the open step (0 when none is open)."""
        s = self._check_id(seq_id, "seq_id")
        return 0 if self._step is None else int(self._step["pending"].numpy()[s])

    def kv_len(self, layer: int, seq_id: int) -> int:
        """Length attention at ``layer`` should read for ``seq_id``: committed, plus the open step's
        tokens if ``layer`` has appended them."""
        layer = self._check_layer(layer, "kv_len")
        s = self._check_id(seq_id, "seq_id")
        n = int(self._n_lens[s])
        if self._step is not None and layer in self._step["layers"]:
            n += self.pending(s)
        return n

    def kv_lens(self, layer: int, seq_ids: Ids) -> Tensor:
        """:meth:`kv_len` of several sequences at once: ``seq_ids`` distinct active ids (ints or a 1-D integer
        tensor), checked as :meth:`rollback` checks them, against the host state (no sync for ints or CPU
        tensors); CPU int64 ``[n]``."""
        layer = self._check_layer(layer, "kv_lens")
        return self._kv_lens(layer, self._ids(seq_ids))

    def _kv_lens(self, layer: int, seq_ids: Tensor) -> Tensor:
        """:meth:`kv_lens` of a checked ``layer`` (an int) and validated ``seq_ids`` (CPU int64 ``[n]``, from
        :meth:`_ids`): the attention ops' (kfuse.ops.kv), which have checked both."""
        lens = self._h_lens[seq_ids].long()
        if self._step is not None and layer in self._step["layers"]:
            lens += self._step["pending"][seq_ids]
        return lens

    def stats(self) -> dict:
        """``pages_used``, ``pages_free``, ``pages_total``, ``sequences`` (active), ``tokens`` (sum of
        committed lengths), ``fragmentation`` = unused slots in allocated pages / allocated slots (a
        page's used slots are the most any sequence referencing it fills; pages of an open step count
        as allocated and unused)."""
        ps, top = self.page_size, int(self._h_top[0])
        width = int(self._n_npages.max(initial=0))
        table = self._h_table[:, :width].numpy()
        filled = np.clip(self._n_lens[:, None].astype(np.int64) - np.arange(width) * ps, 0, ps)
        fill = np.zeros(self.num_pages, dtype=np.int64)
        np.maximum.at(fill, table[table >= 0], filled[table >= 0])
        used = self.num_pages - top
        frag = 0.0 if used == 0 else 1.0 - float(fill.sum()) / (used * ps)
        return {"pages_used": used, "pages_free": top, "pages_total": self.num_pages,
                "sequences": int(self._n_active.sum()), "tokens": int(self._n_lens.sum()), "fragmentation": frag}

    # ------------------------------------------------------------------ append / advance
    def append(self, layer: int, seq_ids: Ids, k: Tensor, v: Tensor, counts: Ids | None = None) -> None:
        """Write new tokens' K/V for ``layer`` at positions ``seq_lens[s] …`` of each sequence.

        Args:
            layer: int in ``[0, num_layers)``.
            seq_ids: distinct active sequence ids (ints, or a 1-D CPU integer tensor), length ``n``.
            k, v: ``[total_tokens, num_kv_heads, head_dim]``, the cache's dtype and device (stored detached), packed in
                ``seq_ids`` order.
            counts: tokens per sequence (``n`` ints ≥ 0 summing to ``total_tokens``); ``None`` means one
                token per sequence.

        The first append of a step allocates pages for all layers (popping the free stack; a shared,
        partially filled last page is copied first) and fixes the step's ids and counts; each layer
        appends once; :meth:`advance` commits. Cost O(new tokens) (plus one page copy per
        copy-on-write). No sync.
        """
        layer = self._check_layer(layer, "append")
        self._not_capturing("append")
        st = self._step
        ids = _index_tensor(seq_ids, "seq_ids")
        # counts=None: one token per sequence; its tensor is made only where one is needed (a step's record,
        # a message): a later layer compares a flag (ones_like + sum + equal: ~9 us a layer).
        cnt = None if counts is None else _index_tensor(counts, "counts")
        if cnt is not None and cnt.numel() != ids.numel():
            raise ValueError(f"counts has {cnt.numel()} entries; seq_ids has {ids.numel()}")
        if st is None:
            self._host.check_ids(ids, "seq_ids")
            if cnt is None:  # all 1, within [0, cap] (cap >= 1)
                cnt, total = torch.ones_like(ids), ids.numel()
            else:
                cap = self.max_pages_per_seq * self.page_size
                cl = cnt.tolist()  # one conversion where four tensor ops and a sum took ~15 us
                if cl and (min(cl) < 0 or max(cl) > cap):  # (before the sum, which huge counts would wrap)
                    raise ValueError(f"counts must be in [0, max_pages_per_seq*page_size = {cap}]; got {cl}")
                total = sum(cl)  # each within [0, cap]: the int64 sum's value
        else:
            # Compared here, raised after the K/V checks as before. Equal ids and counts: the step's total.
            same_cnt = self._same_counts(st, ids, cnt)
            same = same_cnt and torch.equal(ids, st["ids"])
            total = ids.numel() if cnt is None else st["total"] if same_cnt else int(cnt.sum())
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {_checks.type_name(t)}")
            want = (total, self.num_kv_heads, self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [total_tokens, num_kv_heads, "
                                 f"head_dim] = {list(want)}")
            if t.dtype != self.dtype:  # (a TypeError, as the attention ops' q of another dtype)
                raise TypeError(f"{name} has dtype {t.dtype}; the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; the cache is on {self.device}")
        if k.requires_grad or v.requires_grad:
            # The cache keeps values, not autograd history (inference only): K/V that require grad are
            # stored detached, so the pools never join a graph that would keep every step's activations.
            k, v = k.detach(), v.detach()
        pools = {self.k_pages.untyped_storage().data_ptr(), self.v_pages.untyped_storage().data_ptr()}
        # K/V read out of the pools themselves (a sequence's tokens copied into another): index_copy_ refuses a
        # source that shares the destination's memory, even where the slots differ, so such K/V are copied first.
        k, v = (t.clone() if t.untyped_storage().data_ptr() in pools else t for t in (k, v))
        if st is not None:
            if not same:
                cnt = torch.ones_like(ids) if cnt is None else cnt
                raise ValueError(f"seq_ids/counts ({ids.tolist()}, {cnt.tolist()}) differ from the open step's "
                                 f"({st['ids'].tolist()}, {st['counts'].tolist()}); every layer appends the same "
                                 "tokens")
            if layer in st["layers"]:
                raise ValueError(f"layer {layer} already appended in this step; call advance() first")
            self._write(layer, st["slots"], k, v)
        else:
            # Fresh tensors (from a list, a conversion, ones_like) need no copy for the step's record.
            st = self._open_step(ids, cnt, own=(ids is not seq_ids, cnt is not counts),
                                 ones=counts is None, total=total)  # validates capacity before mutating
            try:
                self._write(layer, st["slots"], k, v)
            except BaseException:  # e.g. pools made under torch.inference_mode(), written outside it
                self.abort_step()  # no open step, no new pages held (a copy-on-write copy stays)
                raise
        st["layers"].add(layer)
        st["appended_np"][layer] = True  # numpy view made once a step: 1.5 us where a tensor write took 3.4

    def _check_layer(self, layer: object, op: str) -> int:
        """``layer`` as an int in range (:func:`_layer_index`), for method ``op``."""
        return _layer_index(f"PagedKVCache.{op}", layer, self.num_layers)

    def _write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> None:
        """K/V ``[total, num_kv_heads, head_dim]`` of ``layer`` for new tokens at flat slots ``page · page_size +
        slot`` (device int64 ``[total]``, distinct): one launch for both pools on CUDA, else one
        ``index_copy_`` per pool; no checks, no host work (also the body of a captured decode step,
        ``kfuse.models.llama.DecodeGraphs``, which runs under ``torch.no_grad``)."""
        kp, vp = self.k_pages, self.v_pages
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or kp.requires_grad or vp.requires_grad):
            # Autograd records this write (K/V given to _write directly, with grad): fresh views, as before; a
            # cached one may predate the pools' history (made under no_grad, it refused the in-place write).
            shape = (-1, self.num_kv_heads, self.head_dim)
            kl, vl = kp[layer], vp[layer]
            k_rows, v_rows = kl.view(shape), vl.view(shape)
        else:
            kl, vl, k_rows, v_rows = self._layer_pools(layer)
        if self._append_kv is not None:
            self._append_kv(kl, vl, slots, k.resolve_neg(), v.resolve_neg())
            return
        k_rows.index_copy_(0, slots, k)
        v_rows.index_copy_(0, slots, v)

    def _layer_pools(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``k_pages[layer]``, ``v_pages[layer]`` and their ``[-1, num_kv_heads, head_dim]`` views, made once for
        every layer (two selects and two views took ~8 us a layer, each append), again when the pools' memory or
        shape changes: keyed on their addresses and shapes, not on the attributes, so a pool replaced in place
        (``.data = ...``) is written where it now is (review of the change). The views hold the pools they were
        made of until then (tests/fake_cuda.py replaces them). Made outside inference mode: a view made inside it
        refuses in-place writes outside it. Used for writes autograd does not record (see :meth:`_write`)."""
        kp, vp, pv = self.k_pages, self.v_pages, self._pool_views
        key = (kp.data_ptr(), vp.data_ptr(), kp.shape, vp.shape, kp.stride(), vp.stride())
        if pv is None or pv[0] != key:
            shape = (-1, self.num_kv_heads, self.head_dim)
            with torch.inference_mode(False):
                pv = self._pool_views = (key, [(kp[i], vp[i], kp[i].view(shape), vp[i].view(shape))
                                               for i in range(self.num_layers)])
        return pv[1][layer]

    def _open_step(self, ids: Tensor, cnt: Tensor, *, external: bool = False, own: tuple[bool, bool] = (False, False),
                   ones: bool = False, total: int | None = None) -> dict:
        """Open a step for validated ``ids`` with ``cnt`` tokens each: checks capacity, then updates the host
        state (and replays its writes to a mirrored device copy), copying shared partial pages first.

        ``external``: the caller writes every layer's K/V itself (:meth:`_write`, e.g. a CUDA-graph replay)
        at the step's ``slots``, which stay a host tensor; the step counts every layer as appended, so the
        caller's next call is :meth:`advance` (or :meth:`abort_step`).

        The new tokens' places cross to the device as flat slots (``page · page_size + slot``, from the C++
        plan), where :meth:`_write` puts each layer's K/V. On a mirrored cache they cross in one
        host-to-device copy with the step's metadata writes and with :meth:`advance`'s writes
        (``seq_lens[ids] + cnt``, known now: nothing may change a length while the step is open), so a
        step that takes no page makes one copy where it made two and :meth:`advance` none.

        ``own``: whether ``ids``, ``cnt`` are already the cache's own tensors (made by the caller, not the
        caller's caller's: no copy needed for the record); ``ones``: ``cnt`` is all ones; ``total``: its sum
        if known."""
        token = self._update()
        try:
            plan, m, cow_src, cow_dst = self._host.plan_step(ids, cnt, token)
            return self._open_planned_step(ids, cnt, external, plan, m, cow_src, cow_dst, own, ones, total, token)
        except BaseException:
            # plan_step has taken pages and pointed table entries at them (at a copy-on-write page's fresh
            # copy too): an error before the step was recorded (out of memory, an interrupt) left them
            # taken, with no step for abort_step to release, or a sequence reading an uncopied page
            # (state-after-errors hunt, 2026-12-05). Undone as abort_step does: the copies made (page by
            # page, views: nothing to allocate), the new pages released, the device copy resynced. The copies
            # come from the host state, not plan_step's return value: an interrupt pending as plan_step returns
            # is raised before that value is stored (process hunt, 2026-12-07). A step recorded already (the
            # interrupt raised as _open_planned_step returned) is left open, whole: abort_step undoes it.
            copies = self._host.pending_copies(token) if self._step is None else None
            if copies is None:  # no plan made (refused, or interrupted before it), or a step recorded
                raise
            for src, dst in zip(*(c.tolist() for c in copies), strict=True):
                self.k_pages[:, dst].copy_(self.k_pages[:, src])
                self.v_pages[:, dst].copy_(self.v_pages[:, src])
            self._host.rollback(ids, self._h_lens[ids].long(), False)
            self._resync()
            raise

    def _open_planned_step(self, ids: Tensor, cnt: Tensor, external: bool, plan: Tensor, m: int, cow_src: Tensor,
                           cow_dst: Tensor, own: tuple[bool, bool], ones: bool, total: int | None,
                           token: int) -> dict:
        """:meth:`_open_step` after the host's plan: the copy-on-write copies, the device copy's update, the
        step's record."""
        if cow_src.numel():
            src, dst = self._dev(cow_src), self._dev(cow_dst)
            self.k_pages.index_copy_(1, dst, self.k_pages.index_select(1, src))
            self.v_pages.index_copy_(1, dst, self.v_pages.index_select(1, src))
        slots, commit = plan, None
        if self._mirrored:  # plan: m writes (offsets, values), advance's n (offsets, values), the slots
            n = ids.numel()
            dev = self._dev(plan)
            dv = dev.view(torch.int32)  # the int64 values' low halves at even places (see _replay): one view for all
            if m:
                self._flat.index_copy_(0, dev[:m], dv[2 * m:4 * m:2])
            self._settle(token)
            commit = (dev[2 * m:2 * m + n], dv[2 * (2 * m + n):2 * (2 * m + 2 * n):2])  # offsets, int32 values
            slots = (plan if external else dev)[2 * m + 2 * n:]
        pending = torch.zeros(self.max_seqs, dtype=torch.int64, device="cpu")
        pending[ids] = cnt
        # Copies: ids/counts may be the caller's own tensors (_index_tensor returns a contiguous CPU int64
        # tensor as it is), and a write to them while the step is open must not change the step's record.
        appended = self._appended(external)
        self._step = {"ids": ids if own[0] else ids.clone(), "counts": cnt if own[1] else cnt.clone(),
                      "layers": set(range(self.num_layers)) if external else set(), "pending": pending,
                      # "layers" as a tensor, for compiled attention (see kfuse.ops.kv._validate)
                      "appended": appended, "appended_np": appended.numpy(),
                      # counts known to be all 1 (else compared as tensors), their sum: what append and advance
                      # use in place of tensor ops
                      "ones": ones, "total": int(cnt.sum()) if total is None else total,
                      "slots": slots, "commit": commit, "token": token}
        return self._step

    def advance(self, seq_ids: Ids, counts: Ids | None = None) -> None:
        """Commit the open step: ``seq_lens[s] += counts[s]``. ``seq_ids``/``counts`` must equal the
        step's and every layer must have appended; otherwise ``ValueError`` and nothing changes."""
        self._not_capturing("advance")
        ids = _index_tensor(seq_ids, "seq_ids")
        cnt = None if counts is None else _index_tensor(counts, "counts")  # None: all 1 (see append)
        st = self._step
        if st is None:
            raise ValueError("advance: no step is open (append() every layer first)")
        if not (torch.equal(ids, st["ids"]) and self._same_counts(st, ids, cnt)):
            cnt = torch.ones_like(ids) if cnt is None else cnt
            raise ValueError(f"advance: seq_ids/counts ({ids.tolist()}, {cnt.tolist()}) differ from the open step's "
                             f"({st['ids'].tolist()}, {st['counts'].tolist()})")
        if len(st["layers"]) != self.num_layers:  # it holds only valid layers: a full set is every layer
            missing = sorted(set(range(self.num_layers)) - st["layers"])
            raise ValueError(f"advance: layers {missing} have not appended in this step (layer count mismatch)")
        # Host lengths (C++), once per step: an advance() repeated after an interrupt raised as this call
        # returned changes nothing there (the step stays open until the last line).
        self._host.advance(st["ids"], st["counts"], st["token"])
        if st["commit"] is not None:  # the device copy's, sent when the step opened (final values: idempotent)
            self._flat.index_copy_(0, *st["commit"])
        self._step = None

    def abort_step(self) -> None:
        """Drop the open step (if any): pages it allocated past each sequence's committed length are
        released; lengths stay committed. A shared partial page the step copied (copy-on-write) stays
        the sequence's own copy, holding the same committed tokens. K/V written by the step are left in
        place but lie at or beyond the lengths."""
        self._not_capturing("abort_step")
        st = self._step
        if st is None:
            return
        # Then the step is dropped: interrupted in between, the step stays open and a repeated abort_step
        # changes nothing more (rollback to the same lengths); dropped first, its pages leaked.
        self._rollback(st["ids"], self._h_lens[st["ids"]].long(), check_lens=False)
        self._step = None

    def _undo_step(self, ids: Tensor, lens: Tensor) -> None:
        """A caller's step undone on an error: :meth:`abort_step`, then validated ``ids`` back to ``lens`` (their
        committed lengths, CPU int64, before the step opened). An interrupt raised as :meth:`advance` returned
        has committed the step, which abort_step keeps: the model's call raised with its tokens in the cache,
        and a retry fed them twice (process hunt, 2026-12-07)."""
        self.abort_step()
        if not np.array_equal(self._n_lens[ids.numpy()], lens.numpy()):
            self.rollback(ids, lens)

    # ------------------------------------------------------------------ rollback / fork
    def rollback(self, seq_ids: Ids, new_lens: Ids) -> None:
        """Set ``seq_lens[seq_ids[i]] = new_lens[i]`` (``0 ≤ new_len ≤ current``), drop block-table entries
        past each new last page, decrement their refcounts and free pages that reach 0.

        Args:
            seq_ids: distinct active sequence ids (ints or a 1-D CPU integer tensor), length ``n``.
            new_lens: ``n`` lengths (a checkpoint is a length: ``cache.length(s)`` taken earlier).

        Metadata only: no K/V bytes move. Host state: O(n + dropped pages) in C++; device copy (GPU): the
        host's writes (O(n + dropped pages) int32s) replayed by one copy and one scatter, no sync.
        :meth:`graphed_rollback` gives a CUDA-graph capturable form. CPU int64 tensors are the fastest
        arguments (no conversion).
        """
        ids = _index_tensor(seq_ids, "seq_ids")
        lens = _index_tensor(new_lens, "new_lens")
        if lens.numel() != ids.numel():
            raise ValueError(f"new_lens has {lens.numel()} entries; seq_ids has {ids.numel()}")
        self._no_step("rollback")
        self._rollback(ids, lens, check_lens=True)

    def _rollback(self, ids: Tensor, lens: Tensor, check_lens: bool) -> None:
        try:
            update = self._update()
            self._replay(self._host.rollback(ids, lens, check_lens), update)  # validates everything first
        except (ValueError, IndexError):  # a refused request: nothing changed (no O(cache) resync for it)
            raise
        except BaseException:  # e.g. an interrupt raised as the host's rollback returned, before the replay
            self._resync()
            raise

    @torch.inference_mode(False)  # its buffers, written by every call, must not be inference tensors
    def graphed_rollback(self, n: int) -> Callable[[Any, Any], None]:
        """A rollback of exactly ``n`` sequences whose device half is one CUDA-graph replay (CUDA caches).

        Returns ``rollback(seq_ids, new_lens)`` with :meth:`rollback`'s arguments, checks and effect: it
        checks and updates the host state, copies the ids and lengths into the graph's static device
        buffers (pinned memory, ``non_blocking``: no sync) and replays the captured device half
        (:meth:`_rollback_device`, fixed-shape ops). Capturing here needs no open step; the warm-up run
        before the capture rolls rows ``0 … n−1`` back to their own lengths, which changes nothing.
        The graph stays valid for the cache's lifetime (its tensors are never reallocated).
        """
        if self.device.type != "cuda":
            raise ValueError(f"graphed_rollback needs a CUDA cache; this one is on {self.device} (rollback() "
                             "there is host work only)")
        n = _checks.integer("graphed_rollback", "n", n)
        if not 1 <= n <= self.max_seqs:
            raise ValueError(f"graphed_rollback: n must be an int in [1, max_seqs={self.max_seqs}]; got {n!r}")
        self._no_step("graphed_rollback")
        ids = torch.arange(n, device=self.device)
        lens = self.seq_lens[:n].clone()
        # The capture on a stream of the cache's device, whichever is current: torch.cuda.graph's default
        # capture stream is made once per process, on the device current at the first capture, and a capture
        # on another device's stream records nothing of this cache's ops (they run at once; every replay then
        # leaves the device tables stale). Review 2026-12-05; DecodeGraphs._capture does the same.
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._rollback_device(ids, lens)  # warm-up (allocator, kernels): a no-op on the state
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                self._rollback_device(ids, lens)

        def rollback(seq_ids: Any, new_lens: Any) -> None:
            h_ids, h_lens = _index_tensor(seq_ids, "seq_ids"), _index_tensor(new_lens, "new_lens")
            if h_ids.numel() != n or h_lens.numel() != n:
                raise ValueError(f"seq_ids and new_lens: this graphed rollback takes exactly {n} sequences; got "
                                 f"{h_ids.numel()} and {h_lens.numel()}")
            self._no_step("rollback")
            update = self._update()
            self._host.rollback(h_ids, h_lens, True, log=False)  # checks everything before changing anything
            try:
                # Staged in fresh pinned memory: the copies run after this returns, and a caller's pinned
                # seq_ids (a server's staging buffer, refilled at once) would be read as it is then, while
                # pin_memory() returns a pinned tensor itself (GPU review, 2026-12-05).
                ids.copy_(torch.empty(n, dtype=torch.int64, pin_memory=True).copy_(h_ids), non_blocking=True)
                lens.copy_(h_lens.to(torch.int32).pin_memory(), non_blocking=True)
                graph.replay()
                self._settle(update)  # (a nested call's replay was rolled back a second time by the graph's)
            except BaseException:  # the host rolled back: the device tables must not stay behind
                self._resync()
                raise

        return rollback

    def _rollback_device(self, ids: Tensor, new_lens: Tensor) -> None:
        """Device copy of rollback: ``ids`` int64 ``[n]``, ``new_lens`` int32 ``[n]`` on the cache's device,
        already validated. Fixed-shape ops only (no sync, CUDA-graph capturable). Frees pages in the
        order the host kernel does (``csrc/kv/kv.h: rollback``)."""
        ps, P = self.page_size, self.max_pages_per_seq
        rows = self.block_table.index_select(0, ids)  # [n, P] int32
        # ceil(new_lens / ps) as (new_lens − 1) // ps + 1: new_lens + ps − 1 wrapped past int32 at a capacity near
        # 2^31 with a page over 2^16 tokens, which dropped and freed every page (overflow hunt, 2026-12-07).
        keep = torch.div(new_lens - 1, ps, rounding_mode="floor") + 1  # [n]
        col = torch.arange(P, device=self.device)
        drop = (col.unsqueeze(0) >= keep.unsqueeze(1)) & (rows >= 0)  # [n, P]
        pages = rows.clamp(min=0).long().flatten()  # [n·P]
        dflat = drop.flatten()
        self.page_refcount.scatter_add_(0, pages, -dflat.to(torch.int32))
        cand = dflat & (self.page_refcount.gather(0, pages) == 0)
        f = torch.arange(pages.numel(), device=self.device)
        self._scratch.scatter_reduce_(0, pages, torch.where(cand, f, -1), "amax", include_self=False)
        win = cand & (self._scratch.gather(0, pages) == f)
        pos = self.free_top.long() + torch.cumsum(win.long(), 0) - 1
        target = torch.where(win, pos, self.num_pages)  # losers write the sink slot
        self.free_stack.scatter_(0, target, pages.to(torch.int32))
        self.free_top.add_(win.sum().to(torch.int32))
        # Not `free_stack[num_pages] = -1`: a Python scalar assigned by index is copied from a CPU tensor,
        # which a CUDA-graph capture refuses (and which syncs outside one). fill_ stays on the device.
        self.free_stack.narrow(0, self.num_pages, 1).fill_(-1)
        self.block_table.index_copy_(0, ids, torch.where(drop, -1, rows))
        self.seq_lens.index_copy_(0, ids, new_lens)

    def fork(self, src_id: int, length: int, dst_id: int | None = None) -> int:
        """A sequence sharing ``src_id``'s first ``length`` tokens (``0 ≤ length ≤ len(src)``): its block
        table holds the parent's first ``ceil(length / page_size)`` pages, whose refcounts rise by one.
        The first write into a shared, partially filled page copies it (in :meth:`append`). No sync.

        The child is a new slot, or ``dst_id``: an active, empty sequence (from :meth:`add_sequence` or
        :meth:`reset`), for callers that keep their sequences in fixed slots. Returns the child's id."""
        s = self._check_id(src_id, "src_id")
        n = int(self._n_lens[s])
        length = self._scalar(length, "length")
        if not 0 <= length <= n:
            raise ValueError(f"length: {length!r} is outside [0, length of sequence {s} = {n}]")
        if dst_id is not None:
            d = self._check_id(dst_id, "dst_id")
            if d == s:
                raise ValueError(f"dst_id: the child must be another sequence than src_id = {s}")
            if self._n_lens[d] != 0:
                raise ValueError(f"dst_id: sequence {d} holds {int(self._n_lens[d])} tokens; a fork's child must "
                                 "be empty (reset() it first)")
        self._no_step("fork")
        child = self.add_sequence() if dst_id is None else d  # add_sequence raises when every slot is in use
        # C++ (table row, refcounts, length; logged for the device copy): 38 us in Python before.
        try:
            update = self._update()
            self._replay(self._host.fork(s, child, length), update)
        except BaseException:  # a failed fork changes nothing: the child (a slot of its own) is let go
            if dst_id is None:
                self.free(child)
            else:
                self.reset([child])
            raise
        return child
