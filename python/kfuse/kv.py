"""Paged KV cache with per-sequence rollback, fork and copy-on-write (spec: ``shared/specs/kv.md``).

This module is the portable (torch tensor ops) implementation of the cache's metadata and K/V
writes; GPU/CPU kernels come later. Attention over the cache: :mod:`kfuse.reference.kv`.

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

Host mirror and synchronisation
-------------------------------
The cache keeps a host-side mirror (Python ints/lists) of every length, every sequence's page list,
the refcounts and the free stack, kept equal to the device state (tests check it). Every request is
validated against the mirror, and every allocation decision (which pages, copy-on-write or not) is
made from it, so no operation needs to read device memory: none of ``add_sequence``, ``append``,
``advance``, ``rollback``, ``fork``, ``free`` or ``stats`` synchronises with a GPU. Host-decided index
tensors reach the device through pinned memory and ``non_blocking`` copies (the caching host allocator
keeps the pinned buffer alive until the copy has run). Passing CUDA tensors *as arguments* (``seq_ids``,
``new_lens``, ``counts``) does sync, because they are read on the host to validate them; pass Python
ints or CPU tensors. The device half of rollback, :meth:`PagedKVCache._rollback_device`, is a fixed
sequence of fixed-shape tensor ops (gather, ``where``, ``scatter_add_``, ``scatter_reduce_``, ``cumsum``,
``index_copy_``) on device index tensors, with no data-dependent shapes, so it can be captured in a
CUDA graph. Cost: O(n · max_pages_per_seq) elementwise work for ``n`` sequences (fixed shape, so
independent of context length); no K/V bytes move.

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

Errors leave the cache exactly as it was: every check runs before anything is mutated.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["PagedKVCache"]


def _as_int_list(x, what: str) -> list[int]:
    if isinstance(x, Tensor):
        if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor or a sequence of ints; "
                             f"got {x.dtype} {tuple(x.shape)}")
        return [int(v) for v in x.tolist()]  # note: a CUDA tensor here syncs
    if isinstance(x, int):
        raise ValueError(f"{what} must be a sequence of ints, not a single int ({x})")
    try:
        items = list(x)
    except TypeError as e:
        raise ValueError(f"{what} must be a sequence of ints; got {type(x).__name__}") from e
    for w in items:
        if isinstance(w, (float, bool)) or not hasattr(w, "__index__"):
            raise ValueError(f"{what} must hold ints; got {w!r}")
    return [int(w) for w in items]


class PagedKVCache:
    """A paged KV cache whose sequences roll back, fork and are freed independently.

    Args:
        num_layers, num_kv_heads, head_dim: model shape.
        page_size: tokens per page.
        num_pages: pages in the pool (shared by all sequences; one page id spans all layers).
        max_seqs: sequence slots (rows of ``block_table``).
        dtype, device: of the K/V pools.
        max_pages_per_seq: columns of ``block_table``; default ``num_pages`` (a sequence may use the
            whole pool). The longest sequence holds ``max_pages_per_seq · page_size`` tokens.

    See the module docstring for the tensors, the host mirror and the step contract.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int,
                 max_seqs: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_pages_per_seq: int | None = None) -> None:
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("page_size", page_size), ("num_pages", num_pages), ("max_seqs", max_seqs)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int; got {val!r}")
        if max_pages_per_seq is None:
            max_pages_per_seq = num_pages
        if not isinstance(max_pages_per_seq, int) or max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq must be a positive int; got {max_pages_per_seq!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages, self.max_seqs = page_size, num_pages, max_seqs
        self.max_pages_per_seq = max_pages_per_seq
        self.dtype, self.device = dtype, torch.device(device)
        dev = self.device
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=dev)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=dev)
        self.block_table = torch.full((max_seqs, max_pages_per_seq), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=dev)
        self.page_refcount = torch.zeros(num_pages, dtype=torch.int32, device=dev)
        init_free = list(range(num_pages - 1, -1, -1))  # page 0 is allocated first
        self.free_stack = torch.tensor(init_free + [-1], dtype=torch.int32, device=dev)
        self.free_top = torch.tensor([num_pages], dtype=torch.int32, device=dev)
        self._scratch = torch.zeros(num_pages, dtype=torch.int64, device=dev)  # rollback's dedupe buffer
        # Host mirror.
        self._lens = [0] * max_seqs
        self._active = [False] * max_seqs
        self._pages: list[list[int]] = [[] for _ in range(max_seqs)]
        self._ref = [0] * num_pages
        self._free = init_free
        # Open step: None, or dict(ids, counts, layers (set), tok_page, tok_slot device index tensors).
        self._step: dict | None = None

    # ------------------------------------------------------------------ helpers
    def _dev(self, vals: list[int], dtype: torch.dtype = torch.int64) -> Tensor:
        """A host list as a device tensor without a sync (pinned + non_blocking on CUDA)."""
        t = torch.tensor(vals, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _check_ids(self, seq_ids, what: str = "seq_ids") -> list[int]:
        ids = _as_int_list(seq_ids, what)
        seen = set()
        for s in ids:
            if not 0 <= s < self.max_seqs:
                raise IndexError(f"{what}: sequence id {s} out of range [0, {self.max_seqs})")
            if not self._active[s]:
                raise ValueError(f"{what}: sequence {s} is not active (never added, or freed)")
            if s in seen:
                raise ValueError(f"{what}: duplicate sequence id {s}")
            seen.add(s)
        return ids

    def _check_id(self, seq_id, what: str) -> int:
        if isinstance(seq_id, Tensor) and seq_id.numel() == 1:
            seq_id = int(seq_id.item())
        if not isinstance(seq_id, int) or isinstance(seq_id, bool):
            raise ValueError(f"{what} must be an int; got {seq_id!r}")
        return self._check_ids([seq_id], what)[0]

    def _no_step(self, op: str) -> None:
        if self._step is not None:
            raise ValueError(f"{op}: a step is open (layers appended: {sorted(self._step['layers'])} of "
                             f"{self.num_layers}); call advance() or abort_step() first")

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        """Claim a free sequence slot (length 0) and return its id. Raises ``ValueError`` when all
        ``max_seqs`` slots are in use. No device work (a free slot's row is already −1 / length 0)."""
        for s in range(self.max_seqs):
            if not self._active[s]:
                self._active[s] = True
                return s
        raise ValueError(f"add_sequence: all max_seqs={self.max_seqs} sequence slots are in use")

    def free(self, seq_id: int) -> None:
        """Release sequence ``seq_id``: its pages' refcounts drop (pages reaching 0 are freed) and the slot
        can be reused. Metadata only."""
        s = self._check_id(seq_id, "seq_id")
        self._no_step("free")
        self._rollback([s], [0])
        self._active[s] = False

    @property
    def active_sequences(self) -> list[int]:
        return [s for s in range(self.max_seqs) if self._active[s]]

    def length(self, seq_id: int) -> int:
        """Committed length of ``seq_id`` from the host mirror (no sync)."""
        return self._lens[self._check_id(seq_id, "seq_id")]

    def pending(self, seq_id: int) -> int:
        """Tokens appended for ``seq_id`` in the open step (0 when none is open)."""
        if self._step is None:
            return 0
        return dict(zip(self._step["ids"], self._step["counts"], strict=True)).get(seq_id, 0)

    def kv_len(self, layer: int, seq_id: int) -> int:
        """Length attention at ``layer`` should read for ``seq_id``: committed, plus the open step's
        tokens if ``layer`` has appended them."""
        s = self._check_id(seq_id, "seq_id")
        n = self._lens[s]
        if self._step is not None and layer in self._step["layers"]:
            n += self.pending(s)
        return n

    def stats(self) -> dict:
        """``pages_used``, ``pages_free``, ``pages_total``, ``sequences`` (active), ``tokens`` (sum of
        committed lengths), ``fragmentation`` = unused slots in allocated pages / allocated slots (a
        page's used slots are the most any sequence referencing it fills; pages of an open step count
        as allocated and unused)."""
        fill = [0] * self.num_pages
        ps = self.page_size
        for s in range(self.max_seqs):
            for j, p in enumerate(self._pages[s]):
                fill[p] = max(fill[p], min(ps, max(0, self._lens[s] - j * ps)))
        used = self.num_pages - len(self._free)
        frag = 0.0 if used == 0 else 1.0 - sum(fill) / (used * ps)
        return {"pages_used": used, "pages_free": len(self._free), "pages_total": self.num_pages,
                "sequences": sum(self._active), "tokens": sum(self._lens), "fragmentation": frag}

    # ------------------------------------------------------------------ append / advance
    def append(self, layer: int, seq_ids, k: Tensor, v: Tensor, counts=None) -> None:
        """Write new tokens' K/V for ``layer`` at positions ``seq_lens[s] …`` of each sequence.

        Args:
            layer: int in ``[0, num_layers)``.
            seq_ids: distinct active sequence ids (ints, or a 1-D CPU integer tensor), length ``n``.
            k, v: ``[total_tokens, num_kv_heads, head_dim]``, the cache's dtype and device, packed in
                ``seq_ids`` order.
            counts: tokens per sequence (``n`` ints ≥ 0 summing to ``total_tokens``); ``None`` means one
                token per sequence.

        The first append of a step allocates pages for all layers (popping the free stack; a shared,
        partially filled last page is copied first) and fixes the step's ids and counts; each layer
        appends once; :meth:`advance` commits. Cost O(new tokens) (plus one page copy per
        copy-on-write). No sync.
        """
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.num_layers}); got {layer!r}")
        ids = self._check_ids(seq_ids)
        cnt = [1] * len(ids) if counts is None else _as_int_list(counts, "counts")
        if len(cnt) != len(ids):
            raise ValueError(f"counts has {len(cnt)} entries; seq_ids has {len(ids)}")
        if any(c < 0 for c in cnt):
            raise ValueError(f"counts must be >= 0; got {cnt}")
        total = sum(cnt)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} must be a tensor; got {type(t).__name__}")
            want = (total, self.num_kv_heads, self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [total_tokens, num_kv_heads, "
                                 f"head_dim] = {list(want)}")
            if t.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {t.dtype}; the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}; the cache is on {self.device}")
        st = self._step
        if st is not None:
            if ids != st["ids"] or cnt != st["counts"]:
                raise ValueError(f"seq_ids/counts ({ids}, {cnt}) differ from the open step's "
                                 f"({st['ids']}, {st['counts']}); every layer appends the same tokens")
            if layer in st["layers"]:
                raise ValueError(f"layer {layer} already appended in this step; call advance() first")
        else:
            st = self._open_step(ids, cnt)  # validates capacity before mutating
        self.k_pages[layer].index_put_((st["tok_page"], st["tok_slot"]), k)
        self.v_pages[layer].index_put_((st["tok_page"], st["tok_slot"]), v)
        st["layers"].add(layer)

    def _open_step(self, ids: list[int], cnt: list[int]) -> dict:
        ps = self.page_size
        cap = self.max_pages_per_seq * ps
        need = 0
        for s, c in zip(ids, cnt, strict=True):
            n, end = self._lens[s], self._lens[s] + c
            if end > cap:
                raise ValueError(f"counts: sequence {s} would reach {end} tokens; max_pages_per_seq·page_size "
                                 f"= {cap}")
            if c == 0:
                continue
            need += -(-end // ps) - len(self._pages[s])
            if n % ps and self._ref[self._pages[s][n // ps]] > 1:
                need += 1  # copy-on-write
        if need > len(self._free):
            raise ValueError(f"counts: the step needs {need} new pages; only {len(self._free)} of "
                             f"{self.num_pages} are free (pool exhausted)")
        # Mutate: host mirror first, collecting device updates.
        cow_src, cow_dst, t_row, t_col, t_val, rc_idx, rc_delta = [], [], [], [], [], [], []
        tok_page, tok_slot = [], []
        popped = 0
        for s, c in zip(ids, cnt, strict=True):
            n, end = self._lens[s], self._lens[s] + c
            if c == 0:
                continue
            pages = self._pages[s]
            if n % ps and self._ref[pages[n // ps]] > 1:
                old, new = pages[n // ps], self._free.pop()
                popped += 1
                cow_src.append(old)
                cow_dst.append(new)
                pages[n // ps] = new
                self._ref[old] -= 1
                self._ref[new] += 1
                t_row.append(s)
                t_col.append(n // ps)
                t_val.append(new)
                rc_idx += [old, new]
                rc_delta += [-1, 1]
            while len(pages) * ps < end:
                p = self._free.pop()
                popped += 1
                t_row.append(s)
                t_col.append(len(pages))
                t_val.append(p)
                pages.append(p)
                self._ref[p] += 1
                rc_idx.append(p)
                rc_delta.append(1)
            for pos in range(n, end):
                tok_page.append(pages[pos // ps])
                tok_slot.append(pos % ps)
        if cow_src:
            src, dst = self._dev(cow_src), self._dev(cow_dst)
            self.k_pages.index_copy_(1, dst, self.k_pages.index_select(1, src))
            self.v_pages.index_copy_(1, dst, self.v_pages.index_select(1, src))
        if t_row:
            self.block_table.index_put_((self._dev(t_row), self._dev(t_col)), self._dev(t_val, torch.int32))
            self.page_refcount.scatter_add_(0, self._dev(rc_idx), self._dev(rc_delta, torch.int32))
        if popped:
            self.free_top.sub_(popped)
        self._step = {"ids": ids, "counts": cnt, "layers": set(),
                      "tok_page": self._dev(tok_page), "tok_slot": self._dev(tok_slot)}
        return self._step

    def advance(self, seq_ids, counts=None) -> None:
        """Commit the open step: ``seq_lens[s] += counts[s]``. ``seq_ids``/``counts`` must equal the
        step's and every layer must have appended; otherwise ``ValueError`` and nothing changes."""
        ids = _as_int_list(seq_ids, "seq_ids")
        cnt = [1] * len(ids) if counts is None else _as_int_list(counts, "counts")
        st = self._step
        if st is None:
            raise ValueError("advance: no step is open (append() every layer first)")
        if ids != st["ids"] or cnt != st["counts"]:
            raise ValueError(f"advance: seq_ids/counts ({ids}, {cnt}) differ from the open step's "
                             f"({st['ids']}, {st['counts']})")
        missing = sorted(set(range(self.num_layers)) - st["layers"])
        if missing:
            raise ValueError(f"advance: layers {missing} have not appended in this step (layer count mismatch)")
        new = []
        for s, c in zip(ids, cnt, strict=True):
            self._lens[s] += c
            new.append(self._lens[s])
        if ids:
            self.seq_lens.index_copy_(0, self._dev(ids), self._dev(new, torch.int32))
        self._step = None

    def abort_step(self) -> None:
        """Drop the open step (if any): pages it allocated are released; lengths stay committed. K/V
        written by the step are left in place but lie at or beyond the lengths."""
        st = self._step
        if st is None:
            return
        self._step = None
        self._rollback(st["ids"], [self._lens[s] for s in st["ids"]])

    # ------------------------------------------------------------------ rollback / fork
    def rollback(self, seq_ids, new_lens) -> None:
        """Set ``seq_lens[seq_ids[i]] = new_lens[i]`` (``0 ≤ new_len ≤ current``), drop block-table entries
        past each new last page, decrement their refcounts and free pages that reach 0.

        Metadata only: no K/V bytes move. O(n · max_pages_per_seq) fixed-shape device ops, no sync
        (validation uses the host mirror), device half capturable in a CUDA graph.
        """
        ids = self._check_ids(seq_ids)
        lens = _as_int_list(new_lens, "new_lens")
        if len(lens) != len(ids):
            raise ValueError(f"new_lens has {len(lens)} entries; seq_ids has {len(ids)}")
        for s, n in zip(ids, lens, strict=True):
            if not 0 <= n <= self._lens[s]:
                raise ValueError(f"new_lens: {n} for sequence {s} is outside [0, current length {self._lens[s]}]")
        self._no_step("rollback")
        self._rollback(ids, lens)

    def _rollback(self, ids: list[int], lens: list[int]) -> None:
        if not ids:
            return
        ps, P = self.page_size, self.max_pages_per_seq
        # Host mirror, in the same order the device pushes freed pages (row-major over [n, P], each page
        # at its last dropped occurrence).
        last: dict[int, int] = {}
        for i, (s, n) in enumerate(zip(ids, lens, strict=True)):
            keep = -(-n // ps)
            for j in range(keep, len(self._pages[s])):
                p = self._pages[s][j]
                self._ref[p] -= 1
                last[p] = i * P + j
            del self._pages[s][keep:]
            self._lens[s] = n
        freed = sorted((f, p) for p, f in last.items() if self._ref[p] == 0)
        self._free.extend(p for _, p in freed)
        self._rollback_device(self._dev(ids), self._dev(lens, torch.int32))

    def _rollback_device(self, ids: Tensor, new_lens: Tensor) -> None:
        """Device half of rollback: ``ids`` int64 ``[n]``, ``new_lens`` int32 ``[n]`` on the cache's device,
        already validated. Fixed-shape ops only (no sync, CUDA-graph capturable)."""
        ps, P = self.page_size, self.max_pages_per_seq
        rows = self.block_table.index_select(0, ids)  # [n, P] int32
        keep = torch.div(new_lens + (ps - 1), ps, rounding_mode="floor")  # [n]
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
        self.free_stack[self.num_pages] = -1
        self.block_table.index_copy_(0, ids, torch.where(drop, -1, rows))
        self.seq_lens.index_copy_(0, ids, new_lens)

    def fork(self, src_id: int, length: int) -> int:
        """A new sequence sharing ``src_id``'s first ``length`` tokens (``0 ≤ length ≤ len(src)``): its block
        table holds the parent's first ``ceil(length / page_size)`` pages, whose refcounts rise by one.
        The first write into a shared, partially filled page copies it (in :meth:`append`). No sync."""
        s = self._check_id(src_id, "src_id")
        if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= self._lens[s]:
            raise ValueError(f"length: {length!r} is outside [0, length of sequence {s} = {self._lens[s]}]")
        self._no_step("fork")
        if all(self._active):
            raise ValueError(f"fork: all max_seqs={self.max_seqs} sequence slots are in use")
        child = self.add_sequence()
        keep = -(-length // self.page_size)
        shared = self._pages[s][:keep]
        self._pages[child] = list(shared)
        self._lens[child] = length
        for p in shared:
            self._ref[p] += 1
        row = self.block_table[s]
        col = torch.arange(self.max_pages_per_seq, device=self.device)
        self.block_table[child] = torch.where(col < keep, row, -1)
        if keep:
            self.page_refcount.scatter_add_(0, row[:keep].long(), torch.ones(keep, dtype=torch.int32,
                                                                            device=self.device))
        self.seq_lens[child] = length
        return child
