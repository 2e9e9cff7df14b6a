"""Tests of kfuse.kv.PagedKVCache (metadata, append, rollback, fork, copy-on-write) and the reference
attention over it (kfuse.reference.kv)."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import sm90
import torch
import torch.nn.functional as F
from fake_cuda import MixedDevices, fake_cuda_device_state
from interrupts import interrupt_each_point
from tolerances import assert_close

import kfuse
from kfuse import _backends
from kfuse.kv import PagedKVCache
from kfuse.ops import kv as kv_ops
from kfuse.ops.kv import _prefill_sdpa
from kfuse.reference.kv import gather_kv, paged_decode_attention_reference, paged_prefill_attention_reference
from kfuse.triton_kernels import kv as tk

L, HKV, D, PS, NP, MS = 2, 2, 8, 4, 24, 6


def make(dtype=torch.float32, **kw) -> PagedKVCache:
    """A small cache; ``_mirror=True`` keeps a separate device copy of the metadata on a CPU cache (the
    code path of a CUDA cache: every operation replayed on the copy, compared by check_invariants)."""
    args = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, page_size=PS, num_pages=NP, max_seqs=MS, dtype=dtype)
    args.update(kw)
    return PagedKVCache(**args)


class Dense:
    """Per-sequence, per-layer dense K/V: the reference the cache is checked against."""

    def __init__(self, cache: PagedKVCache):
        self.c = cache
        self.kv: dict[int, list[list[torch.Tensor]]] = {}

    def add(self, s):
        e = torch.empty(0, self.c.num_kv_heads, self.c.head_dim, dtype=self.c.dtype)
        self.kv[s] = [[e, e] for _ in range(self.c.num_layers)]


def step(cache: PagedKVCache, dense: Dense | None, ids: list[int], counts: list[int]) -> None:
    """Append random K/V of ``counts`` tokens to every layer, then advance."""
    total = sum(counts)
    for layer in range(cache.num_layers):
        k = torch.randn(total, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
        v = torch.randn(total, cache.num_kv_heads, cache.head_dim, dtype=cache.dtype)
        cache.append(layer, ids, k, v, counts)
        if dense is not None:
            off = 0
            for s, c in zip(ids, counts, strict=True):
                kk, vv = dense.kv[s][layer]
                dense.kv[s][layer] = [torch.cat([kk, k[off:off + c]]), torch.cat([vv, v[off:off + c]])]
                off += c
    cache.advance(ids, counts)


def check_invariants(cache: PagedKVCache, dense: Dense | None = None) -> None:
    ps = cache.page_size
    bt = cache.block_table.cpu()
    lens = cache.seq_lens.cpu()
    ref = cache.page_refcount.cpu()
    top = int(cache.free_top.item())
    free = cache.free_stack[:top].cpu().tolist()
    # host state == device state (the same tensors on an unmirrored CPU cache; with a device copy, the
    # whole buffer: stale free-stack entries and the sink slot too)
    assert torch.equal(cache._flat.cpu(), cache._h_flat)
    assert torch.equal(lens, cache._h_lens) and torch.equal(bt, cache._h_table)
    assert torch.equal(ref, cache._h_ref)
    assert free == cache._h_free[:int(cache._h_top[0])].tolist()
    counts = torch.zeros(cache.num_pages, dtype=torch.int64)
    for s in range(cache.max_seqs):
        n = int(lens[s])
        keep = -(-n // ps)
        row = bt[s]
        assert (row[:keep] >= 0).all(), f"seq {s}: missing page below its length"
        assert (row[keep:] == -1).all(), f"seq {s}: table entry past its last page"
        assert int(cache._h_npages[s]) == keep
        if not cache._h_active[s]:
            assert n == 0 and keep == 0
        for p in row[:keep].tolist():
            counts[p] += 1
    assert torch.equal(ref.long(), counts), "refcounts != table references"
    used = int((counts > 0).sum())
    assert used + top == cache.num_pages, "free + used != total"
    assert len(set(free)) == len(free)
    for p in free:
        assert ref[p] == 0 and counts[p] == 0, f"free page {p} is referenced"
    st = cache.stats()
    assert st["pages_used"] == used and st["pages_free"] == top
    if dense is not None:
        for s, layers in dense.kv.items():
            for layer in range(cache.num_layers):
                k, v = gather_kv(cache, layer, s)
                assert torch.equal(k, layers[layer][0]), f"seq {s} layer {layer}: K differs"
                assert torch.equal(v, layers[layer][1]), f"seq {s} layer {layer}: V differs"


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
@pytest.mark.parametrize("num_pages", [24, 12, 40])
def test_random_ops_against_dense_reference(num_pages, mirror, seed):
    rng = random.Random(seed)
    cache = make(num_pages=num_pages, _mirror=mirror)
    dense = Dense(cache)
    check_invariants(cache, dense)
    n_ops = {"add": 0, "step": 0, "rollback": 0, "fork": 0, "free": 0}
    for _ in range(300):
        live = list(dense.kv)
        op = rng.choice(["add", "step", "step", "step", "rollback", "fork", "free"])
        if op == "add" and len(live) < MS:
            s = cache.add_sequence()
            dense.add(s)
        elif op == "step" and live:
            ids = rng.sample(live, rng.randint(1, len(live)))
            counts = [rng.choice([0, 1, 1, 2, 3, 5, 7]) for _ in ids]
            need = sum(-(-(cache.length(s) + c) // PS) - int(cache._h_npages[s]) + 1
                       for s, c in zip(ids, counts, strict=True))
            if need > cache.stats()["pages_free"]:
                continue  # may exhaust the pool; exhaustion is tested separately
            step(cache, dense, ids, counts)
        elif op == "rollback" and live:
            ids = rng.sample(live, rng.randint(1, len(live)))
            new = []
            for s in ids:
                n = cache.length(s)
                new.append(rng.choice([0, n, n // 2, (n // PS) * PS, max(n - 1, 0), rng.randint(0, n)]))
            cache.rollback(ids, new)
            for s, n in zip(ids, new, strict=True):
                dense.kv[s] = [[k[:n], v[:n]] for k, v in dense.kv[s]]
        elif op == "fork" and live and len(live) < MS:
            src = rng.choice(live)
            n = cache.length(src)
            length = rng.choice([n, n // 2, (n // PS) * PS, rng.randint(0, n)])
            child = cache.fork(src, length)
            dense.kv[child] = [[k[:length], v[:length]] for k, v in dense.kv[src]]
        elif op == "free" and live:
            s = rng.choice(live)
            cache.free(s)
            del dense.kv[s]
        else:
            continue
        n_ops[op] += 1
        check_invariants(cache, dense)
    assert all(v > 5 for v in n_ops.values()), n_ops


def test_fixed_shape_device_rollback_matches_the_host(seed):
    """graphed_rollback's device half (_rollback_device: fixed-shape ops, captured in a CUDA graph on a
    GPU) recomputes on the device copy exactly what the host kernel did, shared pages included (forked
    sequences rolled back together); checked on a CPU cache with a device copy."""
    rng = random.Random(seed)
    cache = make(num_pages=40, _mirror=True)
    ids = [cache.add_sequence() for _ in range(3)]
    for _ in range(40):
        counts = [rng.randint(0, 6) for _ in ids]
        if sum(-(-(cache.length(s) + c) // PS) - int(cache._h_npages[s]) + 1
               for s, c in zip(ids, counts, strict=True)) <= cache.stats()["pages_free"]:
            step(cache, None, ids, counts)
        if len(ids) < MS and rng.random() < 0.4:
            src = rng.choice(ids)
            ids.append(cache.fork(src, rng.randint(0, cache.length(src))))
        sel = rng.sample(ids, rng.randint(1, len(ids)))
        new = [rng.choice([0, rng.randint(0, cache.length(s))]) for s in sel]
        cache._host.rollback(torch.tensor(sel), torch.tensor(new), True, log=False)  # host half, as graphed_rollback
        cache._rollback_device(torch.tensor(sel), torch.tensor(new, dtype=torch.int32))
        check_invariants(cache)
        if len(ids) == MS:
            cache.free(ids.pop(rng.randrange(len(ids))))


def test_device_rollback_never_mixes_host_and_device_tensors():
    """_rollback_device is captured in a CUDA graph (graphed_rollback), where a host-to-device copy
    raises (and outside one, syncs). Traced on fake CUDA tensors (no GPU needed): no aten op may take a
    CPU tensor beside a CUDA one. (It once set ``free_stack[num_pages] = -1``: a copy from a CPU scalar.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    cache = make(num_pages=24, _mirror=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_cuda_device_state(cache)
        ids, lens = torch.arange(3, device="cuda"), torch.zeros(3, dtype=torch.int32, device="cuda")
        with MixedDevices() as log:
            cache._rollback_device(ids, lens)
    assert len(log.ops) > 10 and not log.mixed, log.mixed


def test_a_decode_step_makes_one_transfer(monkeypatch):
    """The device traffic of a step of one token per sequence on a mirrored cache (a CUDA cache's code
    path): one host-to-device copy, at the first append, of the flat slots, the new lengths (advance's
    writes) and the metadata writes of a step that takes new pages; one index_copy_ per pool and layer,
    one for the lengths at advance, and one for the metadata writes of a step that takes pages. The
    device state stays equal to the host's, in the open step (old lengths) and after advance."""
    cache = make(_mirror=True)
    ids = torch.tensor([cache.add_sequence() for _ in range(3)])
    step(cache, None, ids.tolist(), [3, 5, 1])  # PS = 4: the next token of each fits its last page
    transfers = []
    real = cache._dev
    monkeypatch.setattr(cache, "_dev", lambda *a, **k: transfers.append(1) or real(*a, **k))
    for new_page in (False, True):  # lengths 3, 5, 1 -> 4, 6, 2; then 4 -> 5 takes a page
        transfers.clear()
        with MixedDevices() as log:  # (its aten op log; every tensor is on the CPU here)
            for layer in range(L):
                kv = torch.randn(3, HKV, D)
                cache.append(layer, ids, kv, kv)
                assert torch.equal(cache._flat, cache._h_flat)  # committed lengths on both until advance
            cache.advance(ids)
        assert len(transfers) == 1, (new_page, len(transfers))
        assert log.ops.count("aten.index_copy_.default") == 2 * L + 1 + new_page, log.ops
        check_invariants(cache)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_append_writes_what_index_copy_writes(dtype, seed):
    """A CUDA cache writes K and V with one Triton launch a layer (triton_kernels/kv.py paged_append), a
    CPU cache with index_copy_. Under the interpreter, two mirrored CPU caches, one writing each way, go
    through the same steps (one token each, ragged counts across pages, a copy-on-write into a forked
    page, an empty step) with K/V given as strided views (unit stride along the head dim, read in place;
    other, copied): their pools are equal bit for bit, and every slot past the written ones keeps its
    poison. Odd head counts and head dims (3, 5)."""
    caches = [make(dtype, num_kv_heads=3, head_dim=5, _mirror=True) for _ in range(2)]
    for c in caches:
        c.k_pages.fill_(float("nan"))
        c.v_pages.fill_(float("nan"))
    caches[1]._append_kv = tk.paged_append
    ids = [[c.add_sequence() for _ in range(3)] for c in caches][0]
    gen = torch.Generator().manual_seed(seed)

    def run(op):
        for c in caches:
            op(c)

    def both_step(counts):
        total = sum(counts)
        for layer in range(L):
            kv = torch.randn(total, 2, 3, 7, generator=gen).to(dtype)[..., 1:6]  # strides (42, 21, 7, 1)
            run(lambda c, kv=kv, layer=layer: c.append(layer, ids, kv[:, 0], kv[:, 1], counts))
        run(lambda c: c.advance(ids, counts))

    for counts in ([1, 1, 1], [5, 0, PS + 3], [0, 0, 0], [2, 1, 1]):
        both_step(counts)
    child = caches[0].fork(ids[0], PS + 2)  # mid-page: the child's first write copies that page
    assert caches[1].fork(ids[0], PS + 2) == child
    for layer in range(L):
        kv = torch.randn(5, 1, 3, generator=gen).to(dtype).permute(1, 2, 0)  # not unit-stride along D: copied
        run(lambda c, kv=kv, layer=layer: c.append(layer, [child], kv, -kv))
    run(lambda c: c.advance([child]))
    for a, b in ((caches[0].k_pages, caches[1].k_pages), (caches[0].v_pages, caches[1].v_pages)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    for c in caches:
        check_invariants(c)


@pytest.mark.interpret
def test_triton_append_takes_strided_slots(seed):
    """paged_append given its slots as a column view (stride 2) writes the rows index_copy_ writes (it
    read them as contiguous: slot 9 lost, row 0 overwritten; review 2026-12-04)."""
    kp, vp = torch.zeros(4, 4, 2, 4), torch.zeros(4, 4, 2, 4)
    want_k, want_v = kp.clone(), vp.clone()
    slots = torch.tensor([[3, 0], [7, 0], [9, 0]])[:, 0]
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    tk.paged_append(kp, vp, slots, k, v)
    want_k.view(-1, 2, 4).index_copy_(0, slots, k)
    want_v.view(-1, 2, 4).index_copy_(0, slots, v)
    assert torch.equal(kp, want_k) and torch.equal(vp, want_v)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_a_cache_made_in_inference_mode_works_outside_it(mirror, seed):
    """A cache made under torch.inference_mode() appends, rolls back, forks and attends outside it (its
    tensors were inference tensors, which refuse in-place writes there: a mirrored cache's first append
    failed after the host had taken its page, leaving it held with no step open; review 2026-12-04)."""
    with torch.inference_mode():
        cache = make(_mirror=mirror)
    dense = Dense(cache)
    a = cache.add_sequence()
    dense.add(a)
    step(cache, dense, [a], [PS + 1])
    cache.rollback([a], [PS - 1])
    dense.kv[a] = [[k[:PS - 1], v[:PS - 1]] for k, v in dense.kv[a]]
    b = cache.fork(a, PS - 2)
    dense.kv[b] = [[k[:PS - 2], v[:PS - 2]] for k, v in dense.kv[a]]
    step(cache, dense, [a, b], [2, 3])
    check_invariants(cache, dense)
    q = torch.randn(2, HKV * 2, D)
    assert_close(kfuse.paged_decode_attention(q, cache, 1, [a, b], backend="cpu"),
                 paged_decode_attention_reference(q, cache, 1, [a, b]), torch.float32, "decode")


def test_metadata_ops_refuse_a_cuda_graph_capture_before_changing_anything(monkeypatch):
    """Inside a CUDA-graph capture every metadata op raises before touching the host or device state
    (its host half would run once, at capture). Checked on a mirrored CPU cache posing as a CUDA one,
    with the capture query patched: the guards run before any device work."""
    cache, a, b = _populated(mirror=True)
    snap = snapshot(cache)
    cache.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kv = torch.zeros(1, HKV, D)
    for name, op in [("rollback", lambda: cache.rollback([a], [1])), ("fork", lambda: cache.fork(a, 2)),
                     ("free", lambda: cache.free(b)), ("append", lambda: cache.append(0, [a], kv, kv)),
                     ("advance", lambda: cache.advance([a])), ("abort_step", cache.abort_step)]:
        with pytest.raises(RuntimeError, match=f"{name}: .*graphed_rollback"):
            op()
        assert_same(cache, snap)
    cache.device = torch.device("cpu")  # and after the refusals the cache works as before
    cache.rollback([a], [1])
    check_invariants(cache)


def test_copy_on_write_isolates_parent_and_child(seed):
    cache = make()
    dense = Dense(cache)
    a = cache.add_sequence()
    dense.add(a)
    step(cache, dense, [a], [PS + 2])  # 6 tokens: one full page, one half page
    b = cache.fork(a, PS + 1)  # mid-page fork
    dense.kv[b] = [[k[:PS + 1], v[:PS + 1]] for k, v in dense.kv[a]]
    shared = int(cache._h_table[a, 1])
    assert cache._h_ref[shared] == 2
    snap_a = [[t.clone() for t in gather_kv(cache, layer, a)] for layer in range(L)]
    step(cache, dense, [b], [3])  # child writes into the shared partial page: copied first
    assert cache._h_table[b, 1] != shared and cache._h_table[b, 0] == cache._h_table[a, 0]
    for layer in range(L):
        k, v = gather_kv(cache, layer, a)
        assert torch.equal(k, snap_a[layer][0]) and torch.equal(v, snap_a[layer][1])
    check_invariants(cache, dense)
    # and the other way round: a fresh fork, the parent writes
    c = cache.fork(a, PS + 2)
    dense.kv[c] = [[k.clone(), v.clone()] for k, v in dense.kv[a]]
    snap_c = [[t.clone() for t in gather_kv(cache, layer, c)] for layer in range(L)]
    step(cache, dense, [a], [1])
    for layer in range(L):
        k, v = gather_kv(cache, layer, c)
        assert torch.equal(k, snap_c[layer][0]) and torch.equal(v, snap_c[layer][1])
    check_invariants(cache, dense)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_reset_then_fork_into_the_same_slot(mirror, seed):
    """The spec's reset and fork(src, dst, length): reset() empties a sequence and keeps its slot, and a
    fork into it shares the parent's pages as a fork into a new slot does."""
    cache = make(_mirror=mirror)
    dense = Dense(cache)
    a, b = cache.add_sequence(), cache.add_sequence()
    dense.add(a)
    dense.add(b)
    step(cache, dense, [a, b], [PS + 2, 3])
    used = cache.stats()["pages_used"]
    cache.reset([b])
    dense.kv[b] = [[k[:0], v[:0]] for k, v in dense.kv[b]]
    assert cache.length(b) == 0 and b in cache.active_sequences
    assert cache.stats()["pages_used"] == used - 1
    check_invariants(cache, dense)
    assert cache.fork(a, PS + 1, dst_id=b) == b
    dense.kv[b] = [[k[:PS + 1], v[:PS + 1]] for k, v in dense.kv[a]]
    assert cache._h_ref[int(cache._h_table[a, 0])] == 2
    step(cache, dense, [b], [2])  # the child's write into the shared partial page copies it
    check_invariants(cache, dense)
    cache.reset(torch.tensor([a, b]))
    assert cache.stats()["pages_used"] == 0 and sorted(cache.active_sequences) == [a, b]


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
@pytest.mark.parametrize("holders", [2, 3])
def test_shared_page_writers_in_one_step_need_only_their_copies(holders, mirror, seed):
    """h holders of a partial page (refcount h) all append in one step: h - 1 copy it and the last
    writes in place, so a pool with h - 1 free pages suffices (one page per writer was counted, and
    a parent and its fork were refused near a full pool); with h - 2 free the step is refused, the
    cache unchanged."""
    for free in (holders - 1, holders - 2):
        cache = make(num_pages=2 + free, max_seqs=holders, _mirror=mirror)
        dense = Dense(cache)
        a = cache.add_sequence()
        dense.add(a)
        step(cache, dense, [a], [PS + 2])  # two pages, the second half full
        ids = [a]
        for _ in range(holders - 1):
            ids.append(cache.fork(a, PS + 2))
            dense.kv[ids[-1]] = [[k.clone(), v.clone()] for k, v in dense.kv[a]]
        assert cache._h_ref[int(cache._h_table[a, 1])] == holders and cache.stats()["pages_free"] == free
        if free < holders - 1:
            snap = snapshot(cache)
            with pytest.raises(ValueError, match="pool exhausted"):
                cache.append(0, ids, *_kv(holders), counts=[1] * holders)
            assert_same(cache, snap)
            continue
        step(cache, dense, ids, [1] * holders)
        assert cache.stats()["pages_free"] == 0
        assert len({int(cache._h_table[s, 1]) for s in ids}) == holders  # each holder its own page now
        check_invariants(cache, dense)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_rollback_and_fork_move_no_kv_bytes(mirror, seed):
    """Rollback (to mid-page, to a page boundary, to 0) and fork change metadata only: both pools
    keep every byte, freed pages included."""
    cache = make(_mirror=mirror)
    a, b = cache.add_sequence(), cache.add_sequence()
    step(cache, None, [a, b], [3 * PS + 1, 2 * PS + 3])
    pools = [cache.k_pages.clone(), cache.v_pages.clone()]
    cache.rollback([a, b], [PS + 2, 2 * PS])
    c = cache.fork(a, PS + 1)
    cache.rollback([b, c], [0, 1])
    assert cache.stats()["pages_free"] > NP - 5  # pages were freed, not just relabelled
    for now, before in zip((cache.k_pages, cache.v_pages), pools, strict=True):
        assert torch.equal(now.view(torch.uint8), before.view(torch.uint8))
    check_invariants(cache)


def snapshot(cache: PagedKVCache):
    tensors = [t.clone() for t in (cache.k_pages, cache.v_pages, cache.block_table, cache.seq_lens,
                                   cache.page_refcount, cache.free_stack, cache.free_top)]
    host = ([t.tolist() for t in (cache._h_table, cache._h_lens, cache._h_npages, cache._h_active, cache._h_ref,
                                  cache._h_free, cache._h_top)],
            None if cache._step is None else (cache._step["ids"].tolist(), cache._step["counts"].tolist(),
                                              set(cache._step["layers"])))
    return tensors, host


def assert_same(cache: PagedKVCache, snap) -> None:
    now = snapshot(cache)
    for a, b in zip(now[0], snap[0], strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(torch.uint8) if b.is_floating_point() else b)
    assert now[1] == snap[1]


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu", "mirrored"])
def test_errors_after_the_host_update_leave_a_consistent_cache(monkeypatch, mirror):
    """Errors torch raises after the host state has changed (out of memory, an interrupt), where no
    argument is wrong (state-after-errors hunt, 2026-12-05):
    - in a step's copy-on-write copy: the forked sequence's table pointed at the fresh, uncopied page
      (its tokens read as zeros), and the step was never recorded for abort_step;
    - after a step's pages were taken: they stayed taken with no step to release them, and the next
      step's capacity check went wrong (the free stack ran below 0);
    - in the device replay of a mirrored (CUDA) cache's fork: host and device copies diverged and the
      child's slot leaked.
    Each now leaves what abort_step or the failed call's absence would: the tokens, lengths, free pages
    and the device copy agree with a dense reference, and the next steps run."""
    cache = make(num_pages=10, _mirror=mirror)
    dense = Dense(cache)
    a = cache.add_sequence()
    dense.add(a)
    step(cache, dense, [a], [PS + 2])  # a partially filled page
    b = cache.fork(a, PS + 2)
    dense.kv[b] = [list(kv) for kv in dense.kv[a]]

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    with monkeypatch.context() as m:  # the copy-on-write copy of b's shared page
        m.setattr(torch.Tensor, "index_select", oom)
        with pytest.raises(torch.OutOfMemoryError):
            cache.append(0, [b], torch.randn(1, HKV, D), torch.randn(1, HKV, D))
    assert cache._step is None
    check_invariants(cache, dense)
    used = cache.stats()["pages_used"]
    with monkeypatch.context() as m:  # after a's new pages were taken: the step's record
        m.setattr(torch, "zeros", oom)
        with pytest.raises(torch.OutOfMemoryError):
            cache.append(0, [a], torch.randn(2 * PS, HKV, D), torch.randn(2 * PS, HKV, D), [2 * PS])
    assert cache._step is None and cache.stats()["pages_used"] == used
    check_invariants(cache, dense)
    if mirror:
        active = cache.active_sequences
        with monkeypatch.context() as m:  # the device replay of a fork
            m.setattr(cache, "_dev", oom)
            with pytest.raises(torch.OutOfMemoryError):
                cache.fork(a, PS)
        assert cache.active_sequences == active and cache.stats()["pages_used"] == used
        check_invariants(cache, dense)
        d = cache.add_sequence()  # a caller's own empty slot as the child (review: reset(child) refused an int)
        dense.add(d)
        with monkeypatch.context() as m:
            m.setattr(cache, "_dev", oom)
            with pytest.raises(torch.OutOfMemoryError):
                cache.fork(a, PS, dst_id=d)
        assert cache.length(d) == 0 and cache.stats()["pages_used"] == used
        check_invariants(cache, dense)
        cache.free(d)
        del dense.kv[d]
    step(cache, dense, [a, b], [2 * PS, 3])
    check_invariants(cache, dense)


@pytest.mark.parametrize("op", ["rollback", "fork", "free", "step"])
def test_a_cache_call_nested_in_another_leaves_the_device_copy_whole(op, seed):
    """A cache call made while another is between its host update and its device replay (a ``__del__`` that
    freed a sequence, run by the garbage collector as the replay allocated): the outer replay wrote its
    final values over the nested call's, and the device free list and refcounts stayed behind the host's
    (re-entrancy hunt, 2026-12-07). Now the outer call resyncs the device copy when a call ran inside it."""
    cache = make(num_pages=16, _mirror=True)
    dense = Dense(cache)
    a = cache.add_sequence()
    dense.add(a)
    step(cache, dense, [a], [2 * PS + 1])
    victim = cache.fork(a, 2 * PS)  # shares a's first pages: the nested free writes their refcounts too
    dense.kv[victim] = [[k[:2 * PS], v[:2 * PS]] for k, v in dense.kv[a]]
    step(cache, dense, [victim], [3])
    real, nested = cache._dev, []

    def dev(*args, **kwargs):
        if not nested:  # the nested call: once, inside the outer call's upload
            nested.append(victim)
            cache.free(victim)
            del dense.kv[victim]
        return real(*args, **kwargs)

    cache._dev = dev
    if op == "rollback":
        cache.rollback([a], [PS - 1])
        dense.kv[a] = [[k[:PS - 1], v[:PS - 1]] for k, v in dense.kv[a]]
    elif op == "fork":
        b = cache.fork(a, PS + 1)
        dense.kv[b] = [[k[:PS + 1], v[:PS + 1]] for k, v in dense.kv[a]]
    elif op == "free":
        cache.free(a)
        del dense.kv[a]
    else:
        del cache._dev
        step(cache, dense, [a], [2 * PS])
        cache._dev = dev
        step(cache, dense, [a], [2 * PS])  # takes pages: the plan's writes
    del cache._dev
    assert nested
    check_invariants(cache, dense)
    c = cache.add_sequence()
    dense.add(c)
    step(cache, dense, [c], [3 * PS])
    check_invariants(cache, dense)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_an_interrupt_anywhere_leaves_a_cache_that_abort_step_makes_whole(mirror, seed):
    """A KeyboardInterrupt raised at every interrupt point in turn (tests/interrupts.py) of a step that copies a
    shared page, a rollback, a fork and a free (process hunt, 2026-12-07: raised as the host's plan_step
    returned, the step's pages leaked and a forked sequence's page was left uncopied even after abort_step;
    raised as a host update returned, a mirrored cache's device copy stayed behind it). After each, and
    abort_step() where a step is open: the metadata invariants hold, each sequence reads the tokens of one of
    its lengths, and freeing every sequence frees every page. A step whose advance() was interrupted is
    advanced again instead: once in all."""
    g = torch.Generator().manual_seed(seed)
    base, new = (torch.randn(L, 2, n, HKV, D, generator=g) for n in (PS + 2, 3))  # [layer, k/v, token, ...]

    def setup():
        cache = make(num_pages=10, _mirror=mirror)
        a = cache.add_sequence()
        for layer in range(L):
            cache.append(layer, [a], base[layer, 0], base[layer, 1], [PS + 2])  # a partially filled page
        cache.advance([a], [PS + 2])
        return cache, a, cache.fork(a, PS + 2)

    def op(state):
        cache, a, b = state
        junk = torch.zeros(PS + 1, HKV, D)  # a step dropped: b's copy of the shared page kept, its next page freed
        cache.append(0, [b], junk, junk, [PS + 1])
        cache.abort_step()
        for layer in range(L):  # a 1 token, b 2: both write into the page they share
            cache.append(layer, [a, b], new[layer, 0], new[layer, 1], [1, 2])
        cache.advance([a, b], [1, 2])
        cache.rollback([a], [PS + 1])
        cache.free(cache.fork(b, PS + 3))

    def check(state, interrupted):
        cache, a, b = state
        st = cache._step
        if st is not None and len(st["layers"]) == L and st["ids"].tolist() == [a, b]:
            cache.advance([a, b], [1, 2])  # the interrupted call again (after its host update, it must not repeat it)
        elif st is not None:
            cache.abort_step()
        check_invariants(cache)
        for s, mine in ((a, new[:, :, :1]), (b, new[:, :, 1:])):
            n = cache.length(s)
            for layer in range(L):
                k, v = gather_kv(cache, layer, s)
                assert torch.equal(k, torch.cat([base[layer, 0], mine[layer, 0]])[:n]), (s, layer, n)
                assert torch.equal(v, torch.cat([base[layer, 1], mine[layer, 1]])[:n]), (s, layer, n)
        if not interrupted:
            assert (cache.length(a), cache.length(b)) == (PS + 1, PS + 4)
        for s in cache.active_sequences:  # (a fork interrupted as it returned: a child whose id was never seen)
            cache.free(s)
        assert cache.stats()["pages_used"] == 0

    assert interrupt_each_point(setup, op, check) > 20


def test_bug_hunt_findings_leave_the_cache_as_it_was():
    """Five ways a user reached a broken or leaking cache (a review of 2026-12-03), each now refused
    with a clear error and the cache unchanged, or handled:
    counts near 2**63 wrapped their sum (and the C++ end-of-sequence check) and corrupted the metadata;
    a K/V write that fails left a step open and pages held; a list of bools passed as sequences 0 and 1;
    pending() and kv_len() read any index and any layer; K/V that require grad made the pools part of an
    ever-growing autograd graph."""
    cache, a, b = _populated()
    snap = snapshot(cache)
    huge = 2**63 - 1
    with pytest.raises(ValueError, match=r"counts must be in \[0, max_pages_per_seq\*page_size"):
        cache.append(0, [a, b], torch.zeros(0, HKV, D), torch.zeros(0, HKV, D), counts=[huge, 1 - huge + 2**63 - 1])
    assert_same(cache, snap)
    with pytest.raises(TypeError, match="must hold ints, not bools"):
        cache.rollback([True], [0])
    with pytest.raises(TypeError, match="must hold ints, not bools"):
        kfuse.paged_decode_attention(torch.randn(2, HKV, D), cache, 0, [True, False])
    assert_same(cache, snap)
    for bad in (-1, 99):
        with pytest.raises(IndexError, match="seq_id"):
            cache.pending(bad)
    with pytest.raises(IndexError, match="layer"):
        cache.kv_len(L, a)
    # A failing write on the step's first layer: no step stays open, no page stays held.
    for mirror in (False, True):
        failing = make(_mirror=mirror)
        s = failing.add_sequence()
        before = snapshot(failing)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(failing, "_write", lambda *a: (_ for _ in ()).throw(RuntimeError("write failed")))
            with pytest.raises(RuntimeError, match="write failed"):
                failing.append(0, [s], torch.randn(3, HKV, D), torch.randn(3, HKV, D), counts=[3])
        assert failing._step is None
        assert_same(failing, before)
        check_invariants(failing)
    # K/V with autograd history are stored as values: the pools never require grad.
    w = torch.randn(D, D, requires_grad=True)
    for _ in range(3):
        k = torch.randn(2, HKV, D) @ w
        step_k = [k, k]
        for layer in range(L):
            cache.append(layer, [a, b], *step_k)
        cache.advance([a, b])
    assert not cache.k_pages.requires_grad and not cache.v_pages.requires_grad and cache.k_pages.grad_fn is None


def _populated(mirror: bool = False):
    cache = make(num_pages=8, max_seqs=3, _mirror=mirror)
    a, b = cache.add_sequence(), cache.add_sequence()
    step(cache, None, [a, b], [5, 3])
    return cache, a, b


def _kv(n, dtype=torch.float32):
    return torch.randn(n, HKV, D, dtype=dtype), torch.randn(n, HKV, D, dtype=dtype)


INVALID = {
    "rollback past length": (lambda c, a, b: c.rollback([a], [6]), ValueError, "new_lens"),
    "rollback below 0": (lambda c, a, b: c.rollback([a], [-1]), ValueError, "new_lens"),
    "rollback unknown id": (lambda c, a, b: c.rollback([2], [0]), ValueError, "seq_ids"),
    "rollback out of range id": (lambda c, a, b: c.rollback([7], [0]), IndexError, "seq_ids"),
    "rollback duplicate ids": (lambda c, a, b: c.rollback([a, a], [1, 1]), ValueError, "seq_ids"),
    "rollback len mismatch": (lambda c, a, b: c.rollback([a, b], [1]), ValueError, "new_lens"),
    "free unknown": (lambda c, a, b: c.free(2), ValueError, "seq_id"),
    "fork unknown": (lambda c, a, b: c.fork(2, 0), ValueError, "src_id"),
    "fork past length": (lambda c, a, b: c.fork(a, 6), ValueError, "length"),
    "fork float length": (lambda c, a, b: c.fork(a, 1.0), TypeError, "length must be an int; got float"),
    "fork bool length": (lambda c, a, b: c.fork(a, True), TypeError, "length must be an int; got bool"),
    "fork str src_id": (lambda c, a, b: c.fork("0", 1), TypeError, "src_id must be an int; got str"),
    "free str": (lambda c, a, b: c.free("0"), TypeError, "seq_id must be an int; got str"),
    "rollback str ids": (lambda c, a, b: c.rollback("0", [1]), TypeError, "seq_ids must be a sequence of ints; got"),
    "rollback float lens": (lambda c, a, b: c.rollback([a], [1.5]), TypeError, "new_lens must hold ints"),
    "rollback int ids": (lambda c, a, b: c.rollback(a, [1]), TypeError, "seq_ids must be a sequence of ints; got int"),
    "reset float tensor": (lambda c, a, b: c.reset(torch.tensor([0.0])), TypeError, "seq_ids must be a 1-D integer"),
    "fork into non-empty dst": (lambda c, a, b: c.fork(a, 2, dst_id=b), ValueError, "dst_id: sequence 1 holds 3"),
    "fork into itself": (lambda c, a, b: c.fork(a, 2, dst_id=a), ValueError, "dst_id: the child must be another"),
    "fork into free slot": (lambda c, a, b: c.fork(a, 2, dst_id=2), ValueError, "dst_id"),
    "reset unknown id": (lambda c, a, b: c.reset([a, 2]), ValueError, "seq_ids"),
    "append bad layer": (lambda c, a, b: c.append(L, [a], *_kv(1)), IndexError, "layer"),
    "append str layer": (lambda c, a, b: c.append("0", [a], *_kv(1)), TypeError,
                         "PagedKVCache.append: layer must be an int; got str '0'"),
    "append list k": (lambda c, a, b: c.append(0, [a], [[[0.0] * D] * HKV], _kv(1)[1]), TypeError,
                      "k must be a torch.Tensor; got list"),
    "append list v": (lambda c, a, b: c.append(0, [a], _kv(1)[0], [[[0.0] * D] * HKV]), TypeError,
                      "v must be a torch.Tensor; got list"),
    "append str counts": (lambda c, a, b: c.append(0, [a], *_kv(1), counts="1"), TypeError, "counts must be a"),
    "append duplicate ids": (lambda c, a, b: c.append(0, [a, a], *_kv(2)), ValueError, "seq_ids"),
    "append freed id": (lambda c, a, b: c.append(0, [2], *_kv(1)), ValueError, "seq_ids"),
    "append k shape": (lambda c, a, b: c.append(0, [a], torch.randn(2, HKV, D), torch.randn(1, HKV, D)),
                       ValueError, "k has shape"),
    "append v heads": (lambda c, a, b: c.append(0, [a], torch.randn(1, HKV, D), torch.randn(1, HKV + 1, D)),
                       ValueError, "v has shape"),
    "append dtype": (lambda c, a, b: c.append(0, [a], *_kv(1, torch.float64)), TypeError, "dtype"),
    "append device": (lambda c, a, b: c.append(0, [a], torch.randn(1, HKV, D, device="meta"),
                                               torch.randn(1, HKV, D)), ValueError, "k is on"),
    "append counts sum": (lambda c, a, b: c.append(0, [a, b], *_kv(3), counts=[1, 1]), ValueError, "k has shape"),
    "append negative count": (lambda c, a, b: c.append(0, [a, b], *_kv(0), counts=[1, -1]), ValueError, "counts"),
    "append pool exhausted": (lambda c, a, b: c.append(0, [a, b], *_kv(40), counts=[20, 20]), ValueError, "counts"),
    "append past max_pages_per_seq": (lambda c, a, b: c.append(0, [a], *_kv(30), counts=[30]), ValueError, "counts"),
    "advance without step": (lambda c, a, b: c.advance([a]), ValueError, "advance"),
    "advance float counts": (lambda c, a, b: c.advance([a], [1.0]), TypeError, "counts must hold ints"),
}


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_requests_leave_cache_unchanged(name, mirror):
    fn, exc, words = INVALID[name]
    cache, a, b = _populated(mirror)
    snap = snapshot(cache)
    with pytest.raises(exc, match=words):
        fn(cache, a, b)
    assert_same(cache, snap)
    check_invariants(cache)


def test_numpy_and_tensor_integers_are_ids_and_lengths():
    cache, a, b = _populated()
    c = cache.fork(np.int64(a), np.int32(3))
    cache.free(np.int64(c))
    d = cache.fork(torch.tensor(b), torch.tensor(2))
    assert cache.length(d) == 2 and cache.stats()["sequences"] == 3
    check_invariants(cache)


def test_host_state_advance_and_unchecked_rollback_refuse_out_of_range_values():
    """kfuse._C.KVHostState.advance checked nothing (an id past max_seqs wrote out of bounds, a negative one
    another row's table entry, a negative count made a negative length that the next step's plan read out
    of bounds), and rollback without check_lens took a negative length (a row read from page -2) or one
    past the pages the row holds (registered-ops hunt, 2026-12-06, under ASan; review). Refused before any
    change."""
    cache = make(torch.float32, num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, num_pages=8, max_seqs=2,
                 max_pages_per_seq=4)
    s = cache.add_sequence()
    cache.append(0, [s], torch.zeros(5, 1, 4), torch.zeros(5, 1, 4), [5])
    cache.advance([s], [5])
    host, before = cache._host, [t.clone() for t in (cache._h_lens, cache._h_table, cache._h_npages)]

    def t(*v):
        return torch.tensor(v, dtype=torch.int64)

    for call, err, msg in ((lambda: host.advance(t(10**6), t(1), -7), IndexError, "out of range"),
                           (lambda: host.advance(t(-3), t(7), -7), IndexError, "out of range"),
                           (lambda: host.advance(t(s), t(-100), -7), ValueError, "counts: -100"),
                           (lambda: host.advance(t(s), t(12), -7), ValueError, "capacity 16"),
                           (lambda: host.advance(t(s), t(2**63 - 1), -7), ValueError, "capacity 16"),  # (no wrap)
                           (lambda: host.rollback(t(s), t(-9), False, True), ValueError, "new_lens: -9"),
                           # past the 2 pages it holds, within its row of 4 (review: npages then pointed at -1
                           # entries, and a later free decremented ref[-1], another row's length)
                           (lambda: host.rollback(t(s), t(12), False, True), ValueError, "pages' capacity 8")):
        with pytest.raises(err, match=msg):
            call()
    assert all(torch.equal(a, b) for a, b in zip(before, (cache._h_lens, cache._h_table, cache._h_npages),
                                                 strict=True))
    assert cache.kv_len(0, s) == 5


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_copies_and_pickles_are_independent_caches(mirror, tmp_path, seed):
    """copy.deepcopy and pickling (torch.save) failed on the C++ host state ("cannot pickle KVHostState"),
    and copy.copy shared it: a step opened on the copy let the original roll back under it (copy hunt).
    Each now gives a cache with the same contents and outputs, whose operations leave the original's
    state and pages alone; a cache with an open step is refused."""
    import copy  # noqa: PLC0415
    import io  # noqa: PLC0415
    from multiprocessing.reduction import ForkingPickler  # noqa: PLC0415

    import torch.multiprocessing  # noqa: F401, PLC0415 (registers torch's reductions with ForkingPickler)

    cache, a, b = _populated(mirror)
    c = cache.fork(b, 2)
    cache.rollback([a], [4])
    snap = snapshot(cache)
    q = torch.randn(3, 2 * HKV, D)
    want = kfuse.paged_decode_attention(q, cache, 1, [a, b, c], backend="cpu")
    buf = io.BytesIO()
    torch.save(cache, buf)
    buf.seek(0)
    # torch.multiprocessing's pickler (a Queue.put, a spawned process's arguments) moves CPU storages into
    # shared memory in place: the original's C++ state and numpy views pointed into the freed host buffer
    # (multiprocessing hunt, 2026-12-05). The original stays whole and the pickle loads as a cache.
    shared = ForkingPickler.loads(ForkingPickler.dumps(cache))
    assert_same(cache, snap)
    for other in (copy.deepcopy(cache), copy.copy(cache), torch.load(buf, weights_only=False), shared):
        assert_same(other, snap)
        check_invariants(other)
        assert torch.equal(kfuse.paged_decode_attention(q, other, 1, [a, b, c], backend="cpu"), want)
        step(other, None, [a, c], [3, 2])
        other.rollback([b], [0])
        other.free(c)
        assert_same(cache, snap)
    class Tagged(PagedKVCache):
        pass

    tagged = Tagged(**{k: getattr(cache, k) for k in ("num_layers", "num_kv_heads", "head_dim", "page_size",
                                                       "num_pages", "max_seqs")})
    tagged.tag = ["mine"]
    for how in (copy.copy, copy.deepcopy):  # the subclass and later attributes come along, as copied
        other = how(tagged)
        assert type(other) is Tagged and other.tag == ["mine"] and (other.tag is tagged.tag) == (how is copy.copy)
    cache.append(0, [a], *_kv(1))
    with pytest.raises(ValueError, match="copy or pickle: a step is open"):
        copy.deepcopy(cache)


def _decode_in_child(cache, q, ids, out) -> None:
    out.put(kfuse.paged_decode_attention(q, cache, 1, ids, backend="cpu").numpy())  # (by value: the child exits)


def test_a_cache_passed_to_a_spawned_process(seed):
    """A cache as a spawned process's argument (torch.multiprocessing, a spawn DataLoader): its host state went as
    shared-memory file descriptors of temporary clones, freed before the child read them ("bad value(s) in
    fds_to_keep"; forkserver hung; process hunt, 2026-12-07). The child gets the cache's contents."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    cache, a, b = _populated(False)
    q = torch.randn(2, 2 * HKV, D)
    want = kfuse.paged_decode_attention(q, cache, 1, [a, b], backend="cpu")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(cache, q, [a, b], out))
    child.start()
    try:
        assert torch.equal(torch.from_numpy(out.get(timeout=120)), want)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def test_a_capacity_past_int32_lengths_is_refused():
    """Lengths are int32 (seq_lens, the kernels); the C++ advance truncated a sum past 2^31 - 1 (overflow
    audit). A sequence's capacity max_pages_per_seq · page_size (max_pages_per_seq defaults to num_pages)
    must stay below 2^31, checked before any pool is allocated. The Triton kernels add up to a split's positions
    to a length in int32, so the limit is 2^31 − 2^16 (overflow hunt, 2026-12-07: a decode of a sequence within
    32,832 tokens of 2^31 returned zeros)."""
    for pages, per_seq in ((2**15, None), (2**20, 2**15)):
        with pytest.raises(ValueError, match=r"capacity max_pages_per_seq · page_size \(32768 · 65536\) must stay"):
            PagedKVCache(1, 1, 1, 2**16, pages, 1, max_pages_per_seq=per_seq)
    with pytest.raises(ValueError, match=r"\(65535 · 32768\) must stay at or below 2\^31 − 2\^16 = 2147418112"):
        PagedKVCache(1, 1, 1, 2**15, 1, 1, max_pages_per_seq=2**16 - 1)
    PagedKVCache(1, 1, 1, 2**15, 1, 1, max_pages_per_seq=2**16 - 2)  # 2^31 − 2^16 exactly


def test_device_rollback_to_a_length_near_the_capacity_keeps_the_pages():
    """_rollback_device (graphed_rollback's device half) counted a sequence's pages as ceil(len / page_size) with
    len + page_size − 1 in int32, which wrapped for a page of 3 · 2^19 tokens and a length near 2^31: every page
    was dropped and freed on the device copy, still used on the host (overflow hunt, 2026-12-07)."""
    ps = 3 * 2**19
    cache = PagedKVCache(1, 1, 1, ps, 2, 1, max_pages_per_seq=1365, dtype=torch.float16, _mirror=True)
    s = cache.add_sequence()
    cache.append(0, [s], torch.ones(2 * ps, 1, 1, dtype=torch.float16), torch.ones(2 * ps, 1, 1, dtype=torch.float16),
                 [2 * ps])
    cache.advance([s], [2 * ps])
    table, refs, top = cache.block_table.clone(), cache.page_refcount.clone(), cache.free_top.clone()
    # (a length past this one's, which only the metadata sees: a sequence that long would not fit in memory here)
    cache._rollback_device(torch.tensor([s]), torch.tensor([1365 * ps], dtype=torch.int32))
    assert torch.equal(cache.block_table, table) and torch.equal(cache.page_refcount, refs)
    assert torch.equal(cache.free_top, top)


def test_arguments_of_the_wrong_kind_name_themselves():
    """Type-confusion bug hunt (2026-12-04): an int32 cache was built and failed at attention in C++
    ("unsupported dtype Int"), dtype=None made float32 pools no append matched, bools passed as sizes,
    and a 0-d array, a meta tensor or a complex length for an id, or scale=10**400, raised errors from
    deep inside (numpy, torch, float()). The cache is left as it was."""
    for dtype in (torch.int32, torch.bool, torch.complex64, None, "float32"):
        with pytest.raises(TypeError, match="PagedKVCache: dtype must be one of"):
            make(dtype=dtype)
    with pytest.raises(TypeError, match="PagedKVCache: num_layers must be an int; got bool True"):
        PagedKVCache(True, HKV, D, 4, 8, 2)
    with pytest.raises(TypeError, match="PagedKVCache: page_size must be an int; got str '4'"):
        PagedKVCache(2, HKV, D, "4", 8, 2)
    with pytest.raises(ValueError, match="PagedKVCache: num_pages must be >= 1; got 0"):
        PagedKVCache(2, HKV, D, 4, 0, 2)
    cache, a, b = _populated()
    snap = snapshot(cache)
    for bad in (np.array(a), torch.tensor([a], device="meta")):
        with pytest.raises(ValueError, match="seq_ids must be"):
            cache.rollback(bad, [0])
    with pytest.raises(TypeError, match="seq_id must be an int; got torch.Tensor"):
        cache.length(torch.tensor(0, dtype=torch.complex64))
    with pytest.raises(ValueError, match="seq_id must be an int; got a meta tensor"):
        cache.length(torch.tensor(a, device="meta"))
    with pytest.raises(ValueError, match="kfuse.paged_decode_attention: scale is out of float's range"):
        kfuse.paged_decode_attention(torch.randn(2, HKV, D), cache, 0, [a, b], scale=10**400)
    assert_same(cache, snap)


def test_sequence_slots_exhausted():
    cache = make(max_seqs=2)
    a = cache.add_sequence()
    cache.add_sequence()
    snap = snapshot(cache)
    with pytest.raises(ValueError, match="max_seqs"):
        cache.add_sequence()
    with pytest.raises(ValueError, match="max_seqs"):
        cache.fork(a, 0)
    assert_same(cache, snap)


@pytest.mark.parametrize("name", ["rollback", "fork", "free", "append other layer ids", "append same layer twice",
                                  "advance missing layer", "advance other counts"])
def test_step_contract(name):
    cache, a, b = _populated()
    cache.append(0, [a, b], *_kv(3), counts=[2, 1])
    snap = snapshot(cache)
    fn, words = {
        "rollback": (lambda: cache.rollback([a], [1]), "step is open"),
        "fork": (lambda: cache.fork(a, 1), "step is open"),
        "free": (lambda: cache.free(b), "step is open"),
        "append other layer ids": (lambda: cache.append(1, [a], *_kv(2), counts=[2]), "open step"),
        "append same layer twice": (lambda: cache.append(0, [a, b], *_kv(3), counts=[2, 1]), "already appended"),
        "advance missing layer": (lambda: cache.advance([a, b], [2, 1]), "layer count mismatch"),
        "advance other counts": (lambda: cache.advance([a, b], [1, 1]), "differ"),
    }[name]
    with pytest.raises(ValueError, match=words):
        fn()
    assert_same(cache, snap)
    # the step can still be completed, or aborted
    cache.append(1, [a, b], *_kv(3), counts=[2, 1])
    assert cache.kv_len(1, a) == 7 and cache.length(a) == 5
    cache.abort_step()
    check_invariants(cache)
    assert cache.length(a) == 5 and cache.stats()["pages_used"] == 3


def test_stats():
    cache = make()
    assert cache.stats() == {"pages_used": 0, "pages_free": NP, "pages_total": NP, "sequences": 0, "tokens": 0,
                             "fragmentation": 0.0}
    a = cache.add_sequence()
    step(cache, None, [a], [PS + 1])
    st = cache.stats()
    assert st["pages_used"] == 2 and st["sequences"] == 1 and st["tokens"] == PS + 1
    assert st["fragmentation"] == pytest.approx((PS - 1) / (2 * PS))
    cache.fork(a, PS + 1)
    assert cache.stats()["pages_used"] == 2


# ---------------------------------------------------------------- attention
def sdpa(q, k, v, causal_offset=None):
    """SDPA on contiguous K/V: q [t, Hq, D], k/v [n, Hkv, D]; float64."""
    hq, hkv = q.shape[1], k.shape[1]
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k.repeat_interleave(hq // hkv, 1),
                                                       v.repeat_interleave(hq // hkv, 1)))
    mask = None
    if causal_offset is not None:
        t, n = q.shape[0], k.shape[0]
        mask = torch.arange(n)[None, :] <= (torch.arange(t)[:, None] + causal_offset)
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).transpose(0, 1)


LENS = [0, 1, PS - 1, PS, PS + 1, 5 * PS + 3]


@pytest.mark.parametrize("group", [1, 4])
def test_decode_attention_matches_sdpa(group, seed):
    cache = make(num_pages=16)
    ids = [cache.add_sequence() for _ in LENS]
    step(cache, None, ids, LENS)
    q = torch.randn(len(ids), HKV * group, D)
    out = paged_decode_attention_reference(q, cache, 1, ids)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, s in enumerate(ids):
        k, v = gather_kv(cache, 1, s)
        if LENS[b] == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
        else:
            assert_close(out[b:b + 1], sdpa(q[b:b + 1], k, v), torch.float32, f"len {LENS[b]}")


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_attention_in_an_open_step_per_layer_and_subset(mirror, seed):
    """Inside a step, the layers that have appended share one device copy of ids and lengths (ops/kv.py
    _validate); a call for other ids, or at a layer that has not appended yet, gets its own, right lengths."""
    cache = make(num_pages=24, _mirror=mirror)
    ids = [cache.add_sequence() for _ in range(3)]
    step(cache, None, ids, [5, 2, 9])
    k = torch.randn(3, HKV, D)
    cache.append(0, ids, k, torch.randn(3, HKV, D))  # layer 0 appended (lengths +1), layer 1 not yet
    q = torch.randn(3, HKV * 2, D)
    for layer, sel in [(0, ids), (0, ids), (0, ids[:1]), (1, ids), (0, ids[::-1]), (0, ids)]:
        got = kfuse.paged_decode_attention(q[:len(sel)], cache, layer, sel, backend="cpu")
        want = paged_decode_attention_reference(q[:len(sel)], cache, layer, sel)
        assert_close(got, want, torch.float32, f"layer {layer}, ids {sel}")
        assert cache.kv_len(layer, sel[0]) == cache.length(sel[0]) + (layer == 0)
    cache.append(1, ids, k, torch.randn(3, HKV, D))
    cache.advance(ids)
    assert [cache.length(s) for s in ids] == [6, 3, 10]


def test_a_decode_call_makes_one_transfer(monkeypatch, seed):
    """Outside a step a decode call sends its ids and lengths to the device in one host-to-device copy
    (ops/kv.py _to_device), and the kernel reads the right rows of it."""
    cache = make(num_pages=24, _mirror=True)
    ids = [cache.add_sequence() for _ in range(3)]
    step(cache, None, ids, [5, 2, 9])
    transfers = []
    real = cache._dev
    monkeypatch.setattr(cache, "_dev", lambda *a, **k: transfers.append(1) or real(*a, **k))
    q = torch.randn(2, HKV * 2, D)
    got = kfuse.paged_decode_attention(q, cache, 1, ids[:0:-1], backend="cpu")
    assert len(transfers) == 1
    assert_close(got, paged_decode_attention_reference(q, cache, 1, ids[:0:-1]), torch.float32, "ids [2, 1]")


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_matches_sdpa(group, seed):
    cache = make(num_pages=20)
    ids = [cache.add_sequence() for _ in LENS]
    step(cache, None, ids, LENS)  # existing context
    new = [3, 1, PS, 2, 0, PS + 1]
    total = sum(new)
    ks = []
    for layer in range(L):
        k, v = _kv(total)
        cache.append(layer, ids, k, v, new)
        ks.append((k, v))
    q = torch.randn(total, HKV * group, D)
    out = paged_prefill_attention_reference(q, cache, 1, ids, new)  # inside the step: sees the new tokens
    off = 0
    for s, n0, t in zip(ids, LENS, new, strict=True):
        k, v = gather_kv(cache, 1, s)
        assert k.shape[0] == n0 + t
        assert torch.equal(k[n0:], ks[1][0][off:off + t])
        if t:
            assert_close(out[off:off + t], sdpa(q[off:off + t], k, v, causal_offset=n0), torch.float32, f"seq {s}")
        off += t
    cache.advance(ids, new)
    out2 = paged_prefill_attention_reference(q, cache, 1, ids, new)
    assert torch.equal(out, out2)


def test_poison_beyond_lengths_and_freed_pages(seed):
    cache = make()
    ids = [cache.add_sequence() for _ in range(4)]
    step(cache, None, ids, [PS + 2, 2 * PS, 3, 7])
    x = cache.fork(ids[0], PS + 1)
    cache.rollback([ids[1], ids[3]], [PS - 1, 0])
    cache.free(ids[2])
    live = [ids[0], ids[1], ids[3], x]
    q = torch.randn(len(live), HKV * 2, D)
    qp = torch.randn(sum(min(2, cache.length(s)) for s in live), HKV * 2, D)
    qlens = [min(2, cache.length(s)) for s in live]
    before = [paged_decode_attention_reference(q, cache, layer, live) for layer in range(L)]
    before_p = [paged_prefill_attention_reference(qp, cache, layer, live, qlens) for layer in range(L)]
    _poison(cache, live)  # every slot at or beyond each length, and every free page
    assert cache.k_pages.isnan().any()
    for layer in range(L):
        after = paged_decode_attention_reference(q, cache, layer, live)
        after_p = paged_prefill_attention_reference(qp, cache, layer, live, qlens)
        assert torch.isfinite(after).all() and torch.isfinite(after_p).all()
        assert torch.equal(after, before[layer]) and torch.equal(after_p, before_p[layer])


def test_isolation_rollback_and_fork_leave_others_bit_identical(seed):
    cache = make()
    ids = [cache.add_sequence() for _ in range(3)]
    step(cache, None, ids, [9, 6, 5])
    q = torch.randn(2, HKV * 4, D)
    others = ids[1:]
    before = paged_decode_attention_reference(q, cache, 0, others)
    cache.rollback([ids[0]], [3])
    cache.fork(ids[0], 2)
    step(cache, None, [ids[0]], [4])
    assert torch.equal(paged_decode_attention_reference(q, cache, 0, others), before)


# ---------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphed_rollback_captures_on_the_cache_device_whichever_is_current():
    """graphed_rollback captured on torch.cuda.graph's default capture stream, made once per process on the
    device current at the first capture: for a cache on another device the graph recorded nothing, and every
    replay left the device tables stale (review 2026-12-05; not yet run: needs two GPUs)."""
    g = torch.cuda.CUDAGraph()
    x = torch.zeros(4, device="cuda:0")
    with torch.cuda.graph(g):  # the process's default capture stream, on cuda:0
        x.add_(1)
    cache = make(device="cuda:1")
    ids = [cache.add_sequence() for _ in range(3)]
    for layer in range(L):
        k = torch.randn(15, HKV, D, device="cuda:1")
        cache.append(layer, ids, k, k, counts=[9, 5, 1])
    cache.advance(ids, [9, 5, 1])
    with torch.cuda.device(0):
        graphed = cache.graphed_rollback(2)
        graphed([0, 1], [3, 2])
    torch.cuda.synchronize(1)
    check_invariants(cache)
    assert cache.seq_lens[:3].tolist() == [3, 2, 1]

@pytest.mark.cuda
def test_metadata_ops_do_not_sync_and_rollback_is_cuda_graph_capturable():
    dev = "cuda"
    cache, twin = make(device=dev), make(device=dev)
    for c in (cache, twin):
        torch.manual_seed(0)
        ids = [c.add_sequence() for _ in range(4)]
        ks = [(torch.randn(20, HKV, D, device=dev), torch.randn(20, HKV, D, device=dev)) for _ in range(L)]
        for layer in range(L):
            c.append(layer, ids, *ks[layer], counts=[9, 6, 4, 1])
        c.advance(ids, [9, 6, 4, 1])
        c.fork(ids[0], 6)  # seq 4 shares seq 0's pages 0 and 1 (page 1 mid-page)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.rollback([0, 2, 3], [7, 4, 0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check_invariants(cache)
    # the same rollback on the twin through a CUDA graph (captured once, replayed without a sync):
    # same state; then a second replay with other arguments, checked against the host state
    graphed = twin.graphed_rollback(3)
    torch.cuda.synchronize()
    check_invariants(twin)  # the capture's warm-up changed nothing
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphed([0, 2, 3], [7, 4, 0])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    (mine, mine_host), (theirs, theirs_host) = snapshot(cache), snapshot(twin)
    assert all(torch.equal(x, y) for x, y in zip(mine[2:], theirs[2:], strict=True)) and mine_host == theirs_host
    check_invariants(twin)
    snap = snapshot(twin)
    with pytest.raises(ValueError, match="new_lens"):
        graphed([0, 1, 4], [1, 99, 0])
    assert_same(twin, snap)
    graphed([0, 1, 4], [1, 3, 5])
    torch.cuda.synchronize()
    check_invariants(twin)
    assert [twin.length(s) for s in (0, 1, 4)] == [1, 3, 5]
    # A caller's pinned seq_ids refilled as soon as the call returns: the replay read the buffer as it was
    # then (pin_memory() of a pinned tensor is itself; GPU review, 2026-12-05). The GPU is kept busy so that
    # the copy runs after the refill.
    pinned = torch.tensor([0, 1, 4]).pin_memory()
    torch.cuda._sleep(50_000_000)
    graphed(pinned, [1, 2, 3])
    pinned.copy_(torch.tensor([2, 3, 0]))
    torch.cuda.synchronize()
    check_invariants(twin)
    assert [twin.length(s) for s in (0, 1, 4)] == [1, 2, 3]
    snap = snapshot(twin)
    with pytest.raises(RuntimeError, match="graphed_rollback"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        twin.rollback([0], [0])
    assert_same(twin, snap)  # refused before the host state changed
    # append (with a copy-on-write for seq 4), advance, fork and free do not sync either
    k1, v1 = torch.randn(4, HKV, D, device=dev), torch.randn(4, HKV, D, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(L):
            cache.append(layer, [1, 2, 4], k1, v1, counts=[1, 2, 1])
        cache.advance([1, 2, 4], [1, 2, 1])
        child = cache.fork(1, 5)
        cache.free(child)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    check_invariants(cache)
    assert cache._h_table[4, 1] != cache._h_table[0, 1]


# ---------------------------------------------------------------- attention ops (kfuse.paged_*_attention)
# Every backend against SDPA on gathered contiguous K/V. The Triton decode kernel runs under the
# interpreter on CPU tensors (tiny shapes; BLOCK_N = 16 there) with SPLIT_TOKENS lowered to 16 so
# that the long sequence spans several splits and the merge kernel is exercised.
HAS_CUDA = torch.cuda.is_available()
OP_LENS = [0, 1, PS - 1, PS, PS + 1, 10 * PS + 1]  # the last: 3 splits of 16 (interpreter)
# On a GPU a tile and a split hold 64 positions (small_splits), so a 41-token context is one tile:
# CUDA runs add a context of three and a bit splits, and the prefill there 70 new tokens on top of it
# (more than one query block at every group size, several key tiles).
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_free_nested_in_a_graphed_rollback_leaves_the_device_copy_whole(monkeypatch):
    """A free run between a graphed rollback's host update and its graph's replay (a ``__del__`` run by the
    garbage collector as the call staged its arguments): the free's replay wrote the host's values, which held
    the rollback already, and the graph then rolled those pages back a second time (re-entrancy hunt,
    2026-12-07; written without a GPU)."""
    cache = make(num_pages=16, device="cuda")
    a = cache.add_sequence()
    for layer in range(L):
        cache.append(layer, [a], torch.randn(2 * PS + 1, HKV, D, device="cuda"),
                     torch.randn(2 * PS + 1, HKV, D, device="cuda"), [2 * PS + 1])
    cache.advance([a], [2 * PS + 1])
    victim = cache.fork(a, 2 * PS)
    graphed = cache.graphed_rollback(1)
    real_empty, nested = torch.empty, []

    def empty(*args, **kwargs):
        if not nested:
            nested.append(victim)
            cache.free(victim)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    graphed([a], [PS - 1])
    monkeypatch.undo()
    torch.cuda.synchronize()
    assert nested
    check_invariants(cache)


CUDA_LONG, CUDA_LONG_NEW = 3 * 64 + 5, 70


def op_lens(device) -> list[int]:
    return OP_LENS + [CUDA_LONG] if device == "cuda" else OP_LENS
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp", marks=pytest.mark.interpret),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda),
]


@pytest.fixture
def small_splits(monkeypatch):
    """Splits of BLOCK_N positions (16 under the interpreter): the long sequences span several."""
    monkeypatch.setattr(tk, "SPLIT_TOKENS", tk.BLOCK_N)


def _op_cache(lens, dtype, device, group=1, d=D, page_size=PS, hkv=HKV, spare=16):
    pages = sum(-(-n // page_size) for n in lens) + spare
    cache = make(dtype=dtype, device=device, head_dim=d, page_size=page_size, num_pages=pages,
                 num_kv_heads=hkv, max_seqs=len(lens) + 2)
    ids = [cache.add_sequence() for _ in lens]
    total = sum(lens)
    for layer in range(L):
        k = torch.randn(total, hkv, d, device=device).to(dtype)
        v = torch.randn(total, hkv, d, device=device).to(dtype)
        cache.append(layer, ids, k, v, lens)
    cache.advance(ids, lens)
    return cache, ids


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_decode_op_matches_sdpa(backend, device, group, d, small_splits, seed):
    lens = op_lens(device)  # every case under the interpreter too: 1-2 s each (audit, 2026-12-06)
    for dtype in _dtypes(device):
        cache, ids = _op_cache(lens, dtype, device, group, d)
        q = torch.randn(len(ids), HKV * group, d, device=device).to(dtype)
        out = kfuse.paged_decode_attention(q, cache, 1, ids, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
        for b, s in enumerate(ids):
            if lens[b] == 0:
                assert torch.equal(out[b].cpu(), torch.zeros_like(out[b].cpu()))
                continue
            k, v = gather_kv(cache, 1, s)
            assert_close(out[b:b + 1], sdpa(q[b:b + 1].cpu(), k.cpu(), v.cpu()), dtype, f"{dtype} len {lens[b]}")
        # explicit scale
        out2 = kfuse.paged_decode_attention(q, cache, 1, ids, scale=0.3, backend=backend)
        ref2 = paged_decode_attention_reference(q, cache, 1, ids, scale=0.3)
        assert_close(out2, ref2, dtype, f"{dtype} scale")


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.id != "reference"])
def test_flop_counter_counts_the_keys_each_query_attends(backend, device, seed):
    """FlopCounterMode counted 0 FLOPs for the paged attention ops (modes-and-hooks hunt, 2026-12-07): q·kᵀ and
    p·v count 2 · 2 · head_dim per query head and key attended, causally in prefill (a query sees the cached
    tokens and the new ones up to itself). (The reference backend runs torch's matmuls, which count
    themselves: the whole masked rectangle.)"""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    cache = make(device=device)
    a, b = cache.add_sequence(), cache.add_sequence()
    step(cache, None, [a, b], [3, 6])  # cached: 3 and 6 tokens
    hq = 2 * HKV
    k, v = torch.randn(2 + 4, HKV, D, device=device), torch.randn(2 + 4, HKV, D, device=device)
    for layer in range(L):
        cache.append(layer, [a, b], k, v, [2, 4])
    cache.advance([a, b], [2, 4])
    with FlopCounterMode(display=False) as mode:
        kfuse.paged_prefill_attention(torch.randn(6, hq, D, device=device), cache, 0, [a, b], [2, 4],
                                      backend=backend)
    assert mode.get_total_flops() == 4 * hq * D * ((4 + 5) + (7 + 8 + 9 + 10))
    with FlopCounterMode(display=False) as mode:
        kfuse.paged_decode_attention(torch.randn(2, hq, D, device=device), cache, 0, [a, b], backend=backend)
    assert mode.get_total_flops() == 4 * hq * D * (5 + 10)


@pytest.mark.interpret
def test_triton_grids_stay_within_cuda_limits(monkeypatch, seed):
    """A CUDA grid has at most 65535 programs along z: past that many splits (a grid sized for the
    pool's capacity under torch.compile) the split grows in BLOCK_N multiples, and a prefill with more
    query blocks than that for one sequence is refused. The limit is lowered here to run it."""
    assert tk.decode_splits(4096, 256) == (256, 16) and tk.decode_splits(0, 256) == (256, 1)
    split, n = tk.decode_splits(2**27, 256)
    assert n <= 65535 and split % tk.BLOCK_N == 0 and split * n >= 2**27 and split * (n - 1) < 2**27
    monkeypatch.setattr(tk, "_MAX_GRID_Z", 2)
    cache, ids = _op_cache([549, 3, 0], torch.float32, "cpu")
    q = torch.randn(3, HKV * 2, D)
    assert tk.decode_splits(549, tk.SPLIT_TOKENS)[1] == 2
    out = kfuse.paged_decode_attention(q, cache, 1, ids, backend="triton")
    assert_close(out, paged_decode_attention_reference(q, cache, 1, ids), torch.float32, "grown splits")
    monkeypatch.setattr(tk, "_MAX_GRID_Z", 1)
    new = [tk.prefill_config(2, D)[1] + 1, 0, 0]  # two query blocks for the first sequence
    for layer in range(L):
        cache.append(layer, ids, *_kv(sum(new)), new)
    with pytest.raises(ValueError, match="feed the prompt in parts"):
        kfuse.paged_prefill_attention(torch.randn(sum(new), HKV * 2, D), cache, 1, ids, new, backend="triton")


@pytest.mark.interpret
def test_decode_triton_interp_odd_page_size_and_open_step(small_splits, seed):
    """Page size 5 (not a power of two, not dividing BLOCK_N); inside an open step the layer that has
    appended sees the new tokens (kv_len), the other does not."""
    cache, ids = _op_cache([7, 0, 23], torch.float32, "cpu", page_size=5)
    q = torch.randn(3, HKV * 4, D)
    k, v = _kv(3)
    cache.append(1, ids, k, v, [1, 1, 1])
    for layer in range(L):
        out = kfuse.paged_decode_attention(q, cache, layer, ids, backend="triton")
        ref = paged_decode_attention_reference(q, cache, layer, ids)
        assert_close(out, ref, torch.float32, f"layer {layer}")
    assert not torch.equal(kfuse.paged_decode_attention(q, cache, 0, ids, backend="triton"),
                           kfuse.paged_decode_attention(q, cache, 1, ids, backend="triton"))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_prefill_op_matches_sdpa(backend, device, group, seed):
    """Ragged new tokens (0, 1, a page, 20: two query blocks under the interpreter) on top of contexts of
    every length; inside the open step (the layer has appended) and again after advance. On a GPU also
    a long context with many new tokens, at head dims 8, 64 and 128."""
    lens = op_lens(device)
    new = [3, 1, PS, 2, 0, 20] + ([CUDA_LONG_NEW] if device == "cuda" else [])
    for dtype, d in [(t, d) for t in _dtypes(device) for d in ([D, 64, 128] if device == "cuda" else [D])]:
        cache, ids = _op_cache(lens, dtype, device, d=d, spare=sum(-(-t // PS) + 1 for t in new))
        for layer in range(L):
            k, v = (torch.randn(sum(new), HKV, d).to(dtype) for _ in range(2))
            cache.append(layer, ids, k.to(device), v.to(device), new)
        q = torch.randn(sum(new), HKV * group, d, device=device).to(dtype)
        out = kfuse.paged_prefill_attention(q, cache, 1, ids, new, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype
        off = 0
        for s, n0, t in zip(ids, lens, new, strict=True):
            k, v = gather_kv(cache, 1, s)
            if t:
                assert_close(out[off:off + t], sdpa(q[off:off + t].cpu(), k.cpu(), v.cpu(), causal_offset=n0), dtype,
                             f"{dtype} seq {s}")
            off += t
        cache.advance(ids, new)
        assert torch.equal(kfuse.paged_prefill_attention(q, cache, 1, ids, new, backend=backend), out)


@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", torch.float16, marks=pytest.mark.interpret, id="cpu"),
                                          *(pytest.param("cuda", t, marks=pytest.mark.cuda, id=f"cuda-{t}")
                                            for t in (torch.float16, torch.bfloat16))])
def test_uniform_fresh_prompts_run_flash_attention_over_their_pages(device, dtype, seed, monkeypatch):
    """A triton-backend prefill whose every sequence is a fresh prompt of one length T (at least
    kv_ops._FLASH_MIN_Q_LEN; the Triton kernel took 2.61x flash's time at 8 x 1024 tokens on the H200) runs
    torch's flash attention over the gathered pages: T not a multiple of the page size, pages out of order,
    grouped-query heads; each sequence's rows within the dtype's tolerance of SDPA on its own K/V. Calls
    that are not all fresh prompts of one length (ragged, new tokens behind cached ones, shorter than the
    bound) run the Triton kernel. On the CPU flash is declared available (torch's CPU flash kernel runs the
    route; the Triton kernel runs under the interpreter, which has no bfloat16)."""
    t, hkv, group, d = 2 * PS + 3, 2, 4, 16
    monkeypatch.setattr(kv_ops, "_FLASH_MIN_Q_LEN", t)
    if device == "cpu":
        monkeypatch.setattr(kv_ops, "_flash_runs", lambda q, hkv: True)
    taken = []
    flash = kv_ops._prefill_flash
    monkeypatch.setattr(kv_ops, "_prefill_flash", lambda *a: taken.append(a[0].shape[0]) or flash(*a))
    cache = make(dtype=dtype, device=device, head_dim=d, num_kv_heads=hkv, page_size=PS, num_pages=64, max_seqs=5)
    ids = [cache.add_sequence() for _ in range(4)]
    for layer in range(L):
        cache.append(layer, [ids[3]], *(torch.randn(PS + 1, hkv, d, device=device).to(dtype) for _ in range(2)),
                     [PS + 1])
    cache.advance([ids[3]], [PS + 1])  # pages taken before the prompts': theirs are not in order

    def prefill(seqs, counts):
        for layer in range(L):
            kv = [torch.randn(sum(counts), hkv, d, device=device).to(dtype) for _ in range(2)]
            cache.append(layer, seqs, *kv, counts)
        q = torch.randn(sum(counts), hkv * group, d, device=device).to(dtype)
        out = kfuse.paged_prefill_attention(q, cache, 1, seqs, counts, backend="triton")
        off = 0
        for s, c in zip(seqs, counts, strict=True):
            k, v = gather_kv(cache, 1, s)
            assert_close(out[off:off + c], sdpa(q[off:off + c].cpu(), k.cpu(), v.cpu(), causal_offset=k.shape[0] - c),
                         dtype, f"seq {s}")
            off += c
        cache.advance(seqs, counts)
        return out

    prefill(ids[:3], [t] * 3)
    assert taken == [3 * t]
    prefill([ids[3]], [t])  # behind its PS + 1 cached tokens: the kernel
    cache.reset(ids[:3])
    prefill(ids[:3], [t, t - 1, t])  # ragged
    cache.reset(ids[:3])
    prefill(ids[:2], [t - 1] * 2)  # under the bound
    assert taken == [3 * t]
    cache.reset(ids[:2])
    # the same prompts alone: the route again, each within tolerance (bits may differ: flash splits by batch)
    prefill(ids[:1], [t])
    assert taken == [3 * t, t]


@pytest.mark.parametrize("route", [pytest.param("cpu-sdpa"), pytest.param("flash", marks=pytest.mark.interpret),
                                   pytest.param("flash-cuda", marks=pytest.mark.cuda)])
def test_sdpa_routes_ignore_autocast(route, seed, monkeypatch):
    """The prefills that run torch's SDPA (the cpu backend's long half-precision ones, the triton backend's
    fresh prompts on flash) compute in the cache's dtype under autocast, as the kernels do: autocast cast an
    fp16 cache's SDPA to bf16 (0.013 from the result without it, on the cpu backend)."""
    device = "cuda" if route == "flash-cuda" else "cpu"
    backend = "cpu" if route == "cpu-sdpa" else "triton"
    t = 2 * PS + 3
    monkeypatch.setattr(kv_ops, "_SDPA_MIN_Q_LEN", t)
    monkeypatch.setattr(kv_ops, "_FLASH_MIN_Q_LEN", t)
    if route == "flash":
        monkeypatch.setattr(kv_ops, "_flash_runs", lambda q, hkv: True)
    routed = []
    for name in ("_prefill_sdpa", "_prefill_flash"):
        fn = getattr(kv_ops, name)
        monkeypatch.setattr(kv_ops, name, lambda *a, _fn=fn, _name=name: routed.append(_name) or _fn(*a))
    cache, ids = _op_cache([t, t], torch.float16, device, d=16)
    q = torch.randn(2 * t, HKV * 4, 16, device=device).half()
    want = kfuse.paged_prefill_attention(q, cache, 0, ids, [t, t], backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = kfuse.paged_prefill_attention(q, cache, 0, ids, [t, t], backend=backend)
    assert routed == ["_prefill_sdpa" if route == "cpu-sdpa" else "_prefill_flash"] * 2
    assert got.dtype == torch.float16 and torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_flash_prefill_reads_nothing_out_of_bounds_and_takes_any_q_layout(device, seed):
    """The registered op takes any block table and seq_ids: rows outside the table and pages outside the pool
    (-1, past the end) read other K/V after a clamp, never out of bounds (as the Triton kernels bound theirs;
    an index_select out of range is a device-side assert on a GPU: review); a permuted q gives q's result."""
    cache, ids = _op_cache([PS + 2] * 2, torch.float16, device, d=16)
    k_pages, v_pages, table, layer, sid, _ = _op_args(cache, ids)
    table, sid = table.to(device), sid.to(device)
    q = torch.randn(2 * (PS + 2), HKV * 2, 16, device=device).half()
    want = kv_ops._prefill_flash(q, k_pages[layer], v_pages[layer], table, sid, 0.25)
    assert_close(want[:PS + 2], sdpa(q[:PS + 2].cpu(), *(x.cpu() for x in gather_kv(cache, layer, ids[0])),
                                     causal_offset=0), torch.float16)
    permuted = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(kv_ops._prefill_flash(permuted, k_pages[layer], v_pages[layer], table, sid, 0.25), want)
    bad = table.clone()
    bad[ids[0], 0], bad[ids[1], 1] = -1, 10 ** 6
    for tbl, rows in ((bad, sid), (table, torch.tensor([-5, 10 ** 6], dtype=torch.int32, device=device))):
        out = kv_ops._prefill_flash(q, k_pages[layer], v_pages[layer], tbl, rows, 0.25)
        assert out.shape == q.shape and out.is_contiguous() and torch.isfinite(out).all()


def test_flash_route_is_decided_from_host_ints_alone(monkeypatch):
    """_takes_flash: fresh prompts of one length T >= the bound, known from q's rows = n · max_q_len and
    max_len = max_q_len, their pages within the table, a pool and a table with rows; a q flash cannot run
    (fp32, CPU) never."""
    monkeypatch.setattr(kv_ops, "_FLASH_MIN_Q_LEN", 8)
    q = torch.empty(3 * 9, 4, 16, dtype=torch.float16)
    pool, table = torch.empty(1, 10, 4, 2, 16), torch.empty(5, 3, dtype=torch.int32)  # pages of 4, 3 a row
    with monkeypatch.context() as m:
        m.setattr(kv_ops, "_flash_runs", lambda q, hkv: True)
        assert kv_ops._takes_flash(q, 3, 9, 9, pool, table)
        assert not kv_ops._takes_flash(q, 3, 9, 10, pool, table)  # a sequence with cached tokens before its new ones
        assert not kv_ops._takes_flash(q, 3, 10, 10, pool, table)  # rows short of 3 x 10: ragged
        assert not kv_ops._takes_flash(q, 3, 9, 9, pool, table[:, :2])  # 9 tokens need 3 pages of 4
        assert not kv_ops._takes_flash(q[:21], 3, 7, 7, pool, table)  # under the bound
        assert not kv_ops._takes_flash(q[:0], 0, 0, 0, pool, table)
        assert not kv_ops._takes_flash(q, 3, 9, 9, pool[:, :0], table)  # an empty pool
        assert not kv_ops._takes_flash(q, 3, 9, 9, pool, table[:0])  # a table without rows
    assert not kv_ops._flash_runs(q, 2)  # a CPU tensor
    assert not kv_ops._flash_runs(q.float(), 2)


@pytest.mark.cuda
def test_flash_runs_asks_torch_once_per_shape_and_follows_the_flash_switch():
    """On a GPU: fp16/bf16 heads torch's flash takes (D 16 ... 256, grouped-query) are taken, fp32 and a head
    dim flash refuses are not, and enable_flash_sdp(False) turns the route off."""
    q = torch.empty(8, 8, 64, dtype=torch.bfloat16, device="cuda")
    assert kv_ops._flash_runs(q, 2) and kv_ops._flash_runs(q.half(), 8)
    assert not kv_ops._flash_runs(q.float(), 2)
    assert not kv_ops._flash_runs(torch.empty(8, 8, 512, dtype=torch.bfloat16, device="cuda"), 2)
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert not kv_ops._flash_runs(q, 2)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert kv_ops._flash_runs(q, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_long_half_prefills_run_sdpa_and_keep_the_kernels_promises(dtype, seed, monkeypatch):
    """Half-precision sequences of at least kv_ops._SDPA_MIN_Q_LEN new tokens run torch's SDPA over their
    gathered pages on the cpu backend (1.3-5.5x faster than the C++ kernel in bf16: CPU perf hunt,
    2026-12-06): their rows equal SDPA on their own K/V (causal from the bottom right: new tokens after a
    cached context, a whole prompt); shorter ones (and empty ones) beside them run the C++ kernel, as alone
    (chosen by the call's longest, a short one took SDPA beside a long one: other bits; review). Within the
    dtype's tolerance of the float64 reference, bit for bit whatever the thread count, the rest of the batch and
    q's layout (a strided q took SDPA's other kernel: other bits; layout hunt); a call below the threshold runs
    the C++ kernel only."""
    t_min = kv_ops._SDPA_MIN_Q_LEN
    cache = make(dtype, num_layers=1, num_kv_heads=2, head_dim=16, num_pages=64)
    ids = [cache.add_sequence() for _ in range(4)]
    ctx, new = [37, 0, 5, 3], [t_min, 10, t_min + 3, 0]
    for counts in (ctx, new):
        if sum(counts):
            cache.append(0, ids, torch.randn(sum(counts), 2, 16).to(dtype), torch.randn(sum(counts), 2, 16).to(dtype),
                         counts)
            cache.advance(ids, counts)
    q = torch.randn(sum(new), 8, 16).to(dtype)
    calls = []
    monkeypatch.setattr(kv_ops, "_prefill_sdpa", lambda *a: calls.append(1) or _prefill_sdpa(*a))
    out = kfuse.paged_prefill_attention(q, cache, 0, ids, new, backend="cpu")
    assert calls, "the SDPA path did not run"
    assert_close(out, paged_prefill_attention_reference(q, cache, 0, ids, new), dtype, "vs float64")
    off = 0
    for s, t in zip(ids, new, strict=True):
        k, v = gather_kv(cache, 0, s)
        if t >= t_min:
            want = F.scaled_dot_product_attention(
                q[off:off + t].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=torch.ones(t, k.shape[0], dtype=torch.bool).tril(k.shape[0] - t), enable_gqa=True)
            assert torch.equal(out[off:off + t], want[0].transpose(0, 1)), s
        alone = kfuse.paged_prefill_attention(q[off:off + t].clone(), cache, 0, [s], [t], backend="cpu")
        assert torch.equal(alone, out[off:off + t]), s
        off += t
    old = torch.get_num_threads()
    try:
        for nt in (1, 3):
            torch.set_num_threads(nt)
            assert torch.equal(kfuse.paged_prefill_attention(q, cache, 0, ids, new, backend="cpu"), out), nt
    finally:
        torch.set_num_threads(old)
    for strided in (q.transpose(1, 2).contiguous().transpose(1, 2),  # rows not unit-stride: SDPA's other kernel
                    torch.full((*q.shape[:2], 2 * q.shape[2]), float("nan"), dtype=dtype)[..., ::2].copy_(q)):
        assert torch.equal(kfuse.paged_prefill_attention(strided, cache, 0, ids, new, backend="cpu"), out)
    calls.clear()
    short = [t_min - 1, 0, 0, 0]
    kfuse.paged_prefill_attention(q[:t_min - 1], cache, 0, ids, short, backend="cpu")
    assert not calls, "below the threshold: the C++ kernel"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_decode_splits_tied_at_huge_scores_weigh_by_their_sizes(backend, device, small_splits):
    """Every key equal to q, so softmax is the plain mean of V, at scaled scores up to 6.4e7: the Triton
    decode stored each split as one fp32 log-sum-exp m + log2(l), whose log2(l) was rounded away past
    ~1e5, and weighed splits by their max alone (0.5 where the mean is 0.147, two splits of 256 and 44
    positions; half-precision hunt, 2026-12-05). Splits now keep m and l apart."""
    # Two splits, the second shorter, whatever a split is (16 positions under the interpreter, 64 on a GPU: n was
    # fixed at 29, below a GPU's split, so the test expected -1.2 there and spanned one split; GPU-path audit)
    split = tk.SPLIT_TOKENS
    n = split + split // 2 + 5
    for c in (8.0, 4000.0):
        cache = make(torch.float16, device=device, num_layers=1, num_kv_heads=1, head_dim=16, num_pages=-(-n // PS))
        s = cache.add_sequence()
        v = torch.zeros(n, 1, 16, dtype=torch.float16)
        v[split:] = 1.0  # the first split's positions 0, the rest 1
        cache.append(0, [s], torch.full((n, 1, 16), c, dtype=torch.float16).to(device), v.to(device), [n])
        cache.advance([s], [n])
        q = torch.full((1, 1, 16), c, dtype=torch.float16, device=device)
        with torch.no_grad():
            out = kfuse.paged_decode_attention(q, cache, 0, [s], backend=backend)
        assert_close(out.float().cpu(), torch.full((1, 1, 16), (n - split) / n), torch.float16, f"c={c}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negated_views_are_read_as_their_values(backend, device):
    """``torch._neg_view`` tensors (same values, the negative bit set, which ``.contiguous()`` keeps) as q,
    and as appended K/V (through the Triton append for the triton backend), give the plain tensors'
    results bit for bit: the kernels read their memory, ``-q``, before (layout hunt, 2026-12-05)."""
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(L, 2, 5, HKV, D, generator=gen).to(device)
    pools = []
    for neg in (False, True):
        cache = make(device=device, num_pages=8)
        if backend == "triton":
            cache._append_kv = tk.paged_append
        s = cache.add_sequence()
        for layer, (k, v) in enumerate(kv):
            cache.append(layer, [s], torch._neg_view(-k) if neg else k, torch._neg_view(-v) if neg else v, [5])
        cache.advance([s], [5])
        pools.append((cache.k_pages.clone(), cache.v_pages.clone()))
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    with torch.no_grad():
        q = torch.randn(1, 2 * HKV, D, generator=gen).to(device)
        assert torch.equal(kfuse.paged_decode_attention(torch._neg_view(-q), cache, 1, [s], backend=backend),
                           kfuse.paged_decode_attention(q, cache, 1, [s], backend=backend))
        q = torch.randn(3, 2 * HKV, D, generator=gen).to(device)
        assert torch.equal(kfuse.paged_prefill_attention(torch._neg_view(-q), cache, 1, [s], [3], backend=backend),
                           kfuse.paged_prefill_attention(q, cache, 1, [s], [3], backend=backend))


@pytest.mark.interpret
@pytest.mark.parametrize("group,page_size", [(1, PS), (4, 5)])
def test_triton_gpu_block_sizes_under_interpreter(group, page_size, monkeypatch, seed):
    """The decode and prefill kernels with the tiles and splits a GPU runs (64-position key tiles,
    64-row query blocks, 256-position splits; the other interpreter tests use 16), so the masks and
    split boundaries of the GPU's tiles are checked numerically too: contexts of 0, 1, a tile ± 1, two
    splits and a bit, with ragged new tokens (prefill) over more than one query block."""
    monkeypatch.setattr(tk, "INTERPRETED", False)
    monkeypatch.setattr(tk, "BLOCK_N", 64)
    assert tk.SPLIT_TOKENS == 256 and tk.prefill_config(group, D)[0] == 64
    lens = [0, 1, 63, 64, 65, 2 * 256 + 37]
    new = [5, 1, 0, 64 // group + 3, 2, 1]
    cache, ids = _op_cache(lens, torch.float16, "cpu", page_size=page_size,
                           spare=sum(-(-t // page_size) + 1 for t in new))
    q = torch.randn(len(ids), HKV * group, D).half()
    out = kfuse.paged_decode_attention(q, cache, 1, ids, backend="triton")
    assert_close(out, paged_decode_attention_reference(q, cache, 1, ids), torch.float16, "decode")
    for layer in range(L):
        k, v = (torch.randn(sum(new), HKV, D).half() for _ in range(2))
        cache.append(layer, ids, k, v, new)
    q = torch.randn(sum(new), HKV * group, D).half()
    out = kfuse.paged_prefill_attention(q, cache, 1, ids, new, backend="triton")
    assert_close(out, paged_prefill_attention_reference(q, cache, 1, ids, new), torch.float16, "prefill")


def test_backend_reasons():
    q = torch.randn(2, HKV, D)
    assert kv_ops.backend_reasons(q)["cpu"] == []
    assert kv_ops.backend_reasons(q)["cuda"]  # no csrc kernels yet
    assert any("float64" in r for r in kv_ops.backend_reasons(q.double(), "paged_prefill_attention")["triton"])


def _poison(cache, live) -> None:
    """NaN in every pool slot at or beyond each live sequence's length, and in every free page."""
    ps = cache.page_size
    valid = torch.zeros(cache.num_pages, ps, dtype=torch.bool)
    for s in live:
        n = cache.length(s)
        for j, p in enumerate(cache._h_table[s, :cache._h_npages[s]].tolist()):
            valid[p, : min(ps, n - j * ps)] = True
    for pool in (cache.k_pages, cache.v_pages):
        pool[:, ~valid.to(pool.device)] = float("nan")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_poison_beyond_lengths_and_freed_pages(backend, device, small_splits, seed):
    cache = make(device=device, num_pages=30)
    ids = [cache.add_sequence() for _ in range(4)]
    counts = [PS + 2, 2 * PS, 3, 9 * PS + 3]
    for layer in range(L):
        n = sum(counts)
        cache.append(layer, ids, torch.randn(n, HKV, D, device=device), torch.randn(n, HKV, D, device=device), counts)
    cache.advance(ids, counts)
    x = cache.fork(ids[0], PS + 1)
    cache.rollback([ids[1], ids[3]], [PS - 1, 7 * PS + 1])
    cache.free(ids[2])
    live = [ids[0], ids[1], ids[3], x]
    q = torch.randn(len(live), HKV * 2, D, device=device)
    qlens = [min(2, cache.length(s)) for s in live]
    qp = torch.randn(sum(qlens), HKV * 2, D, device=device)
    pb = backend
    before = [kfuse.paged_decode_attention(q, cache, layer, live, backend=backend) for layer in range(L)]
    before_p = [kfuse.paged_prefill_attention(qp, cache, layer, live, qlens, backend=pb) for layer in range(L)]
    _poison(cache, live)
    assert cache.k_pages.isnan().any()
    for layer in range(L):
        after = kfuse.paged_decode_attention(q, cache, layer, live, backend=backend)
        after_p = kfuse.paged_prefill_attention(qp, cache, layer, live, qlens, backend=pb)
        assert torch.isfinite(after).all() and torch.isfinite(after_p).all()
        assert torch.equal(after, before[layer]) and torch.equal(after_p, before_p[layer])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_show_nan_and_inf_within_the_lengths(backend, device, small_splits, seed):
    """NaN or inf in q, or in K below a length, gives NaN where softmax does (all-inf scores included),
    on every backend, and leaves the other sequences alone: the Triton kernels took a NaN or all -inf
    row for an empty split and wrote zeros (bug hunt)."""
    lens = [3, 2 * PS + 5, PS]  # the second spans several splits (small_splits)
    cache, ids = _op_cache(lens, torch.float32, device)
    q = torch.randn(3, HKV, D, device=device)
    cache.k_pages[1, int(cache._h_table[ids[1], 1]), 2, 0, 0] = float("nan")  # seq 1, position PS + 2, head 0
    q[0, 0, 0] = float("inf")  # seq 0, head 0: an inf score (inf - inf in softmax)
    for name, out, ref in [
        ("decode", kfuse.paged_decode_attention(q, cache, 1, ids, backend=backend),
         paged_decode_attention_reference(q, cache, 1, ids).cpu()),
        ("prefill", kfuse.paged_prefill_attention(q, cache, 1, ids, [1, 1, 1], backend=backend),
         paged_prefill_attention_reference(q, cache, 1, ids, [1, 1, 1]).cpu())]:
        nan = ref.isnan()
        assert nan[0, 0].all() and nan[1, 0].all() and not nan[:, 1:].any() and not nan[2].any(), name
        assert torch.equal(out.cpu().isnan(), nan), name
        assert_close(out.cpu()[~nan].view(-1, D), ref[~nan].view(-1, D), torch.float32, name)
    cache.k_pages[1, int(cache._h_table[ids[2], 0])].fill_(-float("inf"))  # seq 2: every score -inf
    q = torch.ones(3, HKV, D, device=device)
    out = kfuse.paged_decode_attention(q[2:], cache, 1, ids[2:], backend=backend)
    assert out.isnan().all() and paged_decode_attention_reference(q[2:], cache, 1, ids[2:]).isnan().all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_keys_scoring_minus_inf_before_finite_ones_weigh_nothing(backend, device, small_splits, seed):
    """Keys whose scores are -inf (K = -inf where q > 0) weigh 0, as softmax gives, when the finite ones come
    later: where a whole tile, split or chunk at the start was -inf the cpu kernels (16-position tiles,
    512-position decode chunks) and the Triton decode (a split: 16 positions here, small_splits) computed
    -inf - -inf and gave NaN (numerical hunt)."""
    for n, minus_inf in ((20, 16), (20, 15), (600, 512)):
        if backend == "triton" and device == "cpu" and n > 64:
            continue  # interpreter time; the 16-position splits already hold a whole -inf split at n = 20
        cache = make(num_layers=1, num_kv_heads=1, head_dim=4, page_size=16, num_pages=n // 16 + 2, max_seqs=1,
                     device=device)
        k, v = torch.randn(n, 1, 4), torch.randn(n, 1, 4)
        k[:minus_inf, :, 0] = -float("inf")
        s = cache.add_sequence()
        cache.append(0, [s], k.to(device), v.to(device), [n])
        cache.advance([s], [n])
        q = torch.randn(1, 2, 4)
        q[..., 0] = 1.0
        q = q.to(device)
        for name, out, ref in [
                ("decode", kfuse.paged_decode_attention(q, cache, 0, [s], backend=backend),
                 paged_decode_attention_reference(q, cache, 0, [s])),
                ("prefill", kfuse.paged_prefill_attention(q, cache, 0, [s], [1], backend=backend),
                 paged_prefill_attention_reference(q, cache, 0, [s], [1]))]:
            assert torch.isfinite(ref).all()
            assert_close(out.cpu(), ref.cpu(), torch.float32, f"{name}, n={n}, {minus_inf} keys -inf")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ops_isolation_rollback_and_fork_leave_others_bit_identical(backend, device, small_splits, seed):
    """Rolling back the longest sequence shrinks the Triton grid's split count; the others' outputs
    (computed in the same batch) must not change by a bit."""
    lens = [10 * PS + 1, 6, 5, 2 * PS]
    cache, ids = _op_cache(lens, torch.float32, device)
    q = torch.randn(len(ids), HKV * 4, D, device=device)
    before = kfuse.paged_decode_attention(q, cache, 0, ids, backend=backend)
    cache.rollback([ids[0]], [3])
    cache.fork(ids[0], 2)
    k, v = _kv(4)
    for layer in range(L):
        cache.append(layer, [ids[0]], k.to(device), v.to(device), [4])
    cache.advance([ids[0]], [4])
    after = kfuse.paged_decode_attention(q, cache, 0, ids, backend=backend)
    assert torch.equal(after[1:], before[1:])
    assert not torch.equal(after[0], before[0])
    # and a sub-batch gives the same bits as the full batch
    assert torch.equal(kfuse.paged_decode_attention(q[1:], cache, 0, ids[1:], backend=backend), after[1:])


@pytest.mark.parametrize("backend,device", BACKENDS[1:])
def test_registered_decode_with_a_larger_grid_changes_no_bit(backend, device, small_splits, seed):
    """The registered decode op sized for the cache's whole capacity (``max_len``, as a captured decode
    step sizes it: kfuse.models.llama.DecodeGraphs) gives the bits of the op sized for the lengths: the
    extra splits hold no position and the merge reads only those below each length."""
    lens = [3 * PS + 1, 0, 5, 2 * PS]
    cache, ids = _op_cache(lens, torch.float32, device)
    q = torch.randn(len(ids), HKV * 4, D, device=device)
    sid = torch.tensor(ids, dtype=torch.int32, device=device)
    kl = torch.tensor(lens, dtype=torch.int32, device=device)
    args = (q, cache.k_pages, cache.v_pages, cache.block_table, 1, sid, kl)
    tight = kv_ops.paged_decode_attention_op(*args, max(lens), D ** -0.5, backend)
    wide = kv_ops.paged_decode_attention_op(*args, cache.max_pages_per_seq * PS, D ** -0.5, backend)
    assert torch.equal(tight, wide)
    assert torch.equal(tight, kfuse.paged_decode_attention(q, cache, 1, ids, scale=D ** -0.5, backend=backend))


# ---------------------------------------------------------------- cpu kernels (csrc/kv/kv_attention_cpu.cpp)
# The parametrised op tests above run the C++ kernels at short lengths; these add the decode chunk
# boundary (lengths over two chunks: a fixed-order merge of three partials), every dtype, head
# dims 64/128/odd, and the determinism contract: bits independent of the thread count and of the
# other sequences of the batch.
_EXT = _backends.extension()
CHUNK = _EXT.kv_decode_chunk if _EXT is not None else 512
CPU_LENS = [0, 1, PS - 1, PS, PS + 1, 2 * CHUNK + PS + 1]
CPU_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_cpu_kernels_match_reference(dtype, group, seed):
    """Decode, and prefill (whole prompts of 1 and PS + 1 tokens, one token on top of a context, 40 tokens:
    three query blocks on top of two chunks), against the float64 reference, the cache NaN-poisoned past
    every length. Groups 1 and 2 take the dot-product scores (a task of at most two rows), 4 and 8 the
    transposed tile; head dim 37 the scalar tails of both. Three KV heads: a decode task runs several heads
    tile by tile."""
    for d in (64, 128, 37) if dtype == torch.float32 else (64, 37):
        cache, ids = _op_cache(CPU_LENS, dtype, "cpu", hkv=3, d=d)
        _poison(cache, ids)
        q = torch.randn(len(ids), 3 * group, d).to(dtype)
        out = kfuse.paged_decode_attention(q, cache, 1, ids, backend="cpu")
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert_close(out, paged_decode_attention_reference(q, cache, 1, ids), dtype, f"decode d={d}")
        new = [0, 1, PS - 1, 1, PS + 1, 40]
        qp = torch.randn(sum(new), 3 * group, d).to(dtype)
        out = kfuse.paged_prefill_attention(qp, cache, 1, ids, new, backend="cpu")
        assert_close(out, paged_prefill_attention_reference(qp, cache, 1, ids, new), dtype, f"prefill d={d}")


def test_cpu_kernels_bit_identical_across_threads_and_batches(seed):
    """Same bits with 1 and 2 threads, and for each sequence alone as in the batch (decode chunks and
    prefill query blocks never depend on the thread count or on the other sequences; with 1 thread a decode
    task runs both KV heads, with 2 one head each)."""
    lens = [2 * CHUNK + 3, CHUNK, 5, CHUNK + 1]
    cache, ids = _op_cache(lens, torch.float32, "cpu", hkv=2, d=64)
    q = torch.randn(len(ids), 8, 64)
    new = [40, 17, 5, 1]
    qp = torch.randn(sum(new), 8, 64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append((kfuse.paged_decode_attention(q, cache, 0, ids, backend="cpu"),
                         kfuse.paged_prefill_attention(qp, cache, 0, ids, new, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    off = 0
    for b, s in enumerate(ids):
        assert torch.equal(kfuse.paged_decode_attention(q[b:b + 1], cache, 0, [s], backend="cpu"), outs[0][0][b:b + 1])
        alone = kfuse.paged_prefill_attention(qp[off:off + new[b]], cache, 0, [s], [new[b]], backend="cpu")
        assert torch.equal(alone, outs[0][1][off:off + new[b]])
        off += new[b]
    # rolling the longest sequence back (fewer chunks in the batch) leaves the others' bits alone
    cache.rollback([ids[0]], [7])
    assert torch.equal(kfuse.paged_decode_attention(q, cache, 0, ids, backend="cpu")[1:], outs[0][0][1:])


def test_cpu_kernels_check_invariants():
    """The extension's own checks (the ops validate first; these guard direct calls), and the cpu
    backend's reasons off the CPU."""
    assert any("meta" in r for r in kv_ops.backend_reasons(torch.empty(2, HKV, D, device="meta"))["cpu"])
    cache, ids = _op_cache([3, PS + 1], torch.float32, "cpu")
    q = torch.randn(2, HKV, D)
    k, v = cache.k_pages[0], cache.v_pages[0]
    bt, sid = cache.block_table, torch.tensor(ids, dtype=torch.int32)
    lens = torch.tensor([3, PS + 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32"):
        _EXT.kv_decode_attention(q, k, v, bt, sid.long(), lens, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        _EXT.kv_decode_attention(q.double(), k, v, bt, sid, lens, 1.0)
    with pytest.raises(ValueError, match="not a page"):
        _EXT.kv_decode_attention(q, k, v, bt, sid, torch.tensor([3, 3 * PS], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="q_lens"):
        _EXT.kv_prefill_attention(q, k, v, bt, sid, lens, torch.tensor([4, 0], dtype=torch.int32), 1.0)


@pytest.mark.cuda
def test_triton_cuda_ops_do_not_sync(seed):
    """The eager Triton path validates against the host mirror and sizes its grid from it: no host sync."""
    cache, ids = _op_cache([0, 7, 300], torch.float16, "cuda")
    for layer in range(L):
        k, v = _kv(3, torch.float16)
        cache.append(layer, ids, k.cuda(), v.cuda(), [1, 1, 1])
    q = torch.randn(3, HKV * 4, D, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = kfuse.paged_decode_attention(q, cache, 1, ids, backend="triton")
        out_p = kfuse.paged_prefill_attention(q, cache, 1, ids, [1, 1, 1], backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # one new token per sequence: prefill of it is decode over the same positions
    assert_close(out_p, out, torch.float16, "prefill of one token == decode")
    assert_close(out, paged_decode_attention_reference(q, cache, 1, ids), torch.float16, "decode")


def _op_args(cache, ids, layer=1):
    lens = [cache.kv_len(layer, s) for s in ids]
    return (cache.k_pages, cache.v_pages, cache.block_table, layer, torch.tensor(ids, dtype=torch.int32),
            torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_registered_ops_read_strided_ids_and_lengths(backend, device, seed):
    """seq_ids, lens and q_lens as strided views or with a storage offset (valid input of the registered ops)
    give the contiguous tensors' results, bit for bit: the Triton kernels read them at ptr + b, so a strided
    view gave another sequence's or another length's attention (2.96 off; layout hunt, 2026-12-07)."""
    cache, ids = _op_cache([3, PS + 1, 2 * PS + 2], torch.float32, device)
    k_pages, v_pages, table, layer, sid, lens = _op_args(cache, ids)
    sid, lens = sid.to(device), lens.to(device)
    qlens = torch.tensor([1, 2, 3], dtype=torch.int32, device=device)

    def views(t):  # a step-2 view, and a view one element into a buffer
        spread = torch.full((2 * t.numel(),), 99, dtype=t.dtype, device=device)
        spread[::2] = t
        shifted = torch.full((t.numel() + 1,), 99, dtype=t.dtype, device=device)
        shifted[1:] = t
        return spread[::2], shifted[1:]

    q = torch.randn(3, HKV * 2, D, device=device)
    qp = torch.randn(6, HKV * 2, D, device=device)

    def decode(s, n):
        return torch.ops.kfuse.paged_decode_attention(q, k_pages, v_pages, table, layer, s, n, 2 * PS + 2, 0.5,
                                                      backend)

    def prefill(s, n, ql):
        return torch.ops.kfuse.paged_prefill_attention(qp, k_pages, v_pages, table, layer, s, n, ql, 3, 2 * PS + 2,
                                                       0.5, backend)

    want_d, want_p = decode(sid, lens), prefill(sid, lens, qlens)
    for s, n, ql in zip(views(sid), views(lens), views(qlens), strict=True):
        assert torch.equal(decode(s, lens), want_d) and torch.equal(decode(sid, n), want_d)
        for args in ((s, lens, qlens), (sid, n, qlens), (sid, lens, ql)):
            assert torch.equal(prefill(*args), want_p)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_registered_ops(backend, seed):
    cache, ids = _op_cache([0, 3, PS + 1], torch.float32, "cpu")
    q = torch.randn(3, HKV * 2, D)
    args = _op_args(cache, ids)
    torch.library.opcheck(torch.ops.kfuse.paged_decode_attention.default, (q, *args, PS + 1, 0.5, backend))
    qp = torch.randn(4, HKV * 2, D)
    torch.library.opcheck(torch.ops.kfuse.paged_prefill_attention.default,
                          (qp, *args, torch.tensor([0, 2, 2], dtype=torch.int32), 2, PS + 1, 0.5, backend))


def test_registered_ops_reject_bogus_backend():
    cache, ids = _op_cache([3, 1], torch.float32, "cpu")
    q = torch.randn(2, HKV, D)
    args = _op_args(cache, ids)
    with pytest.raises(ValueError, match="backend"):
        torch.ops.kfuse.paged_decode_attention(q, *args, 3, 0.5, "bogus")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.kfuse.paged_prefill_attention(q, *args, torch.tensor([1, 1], dtype=torch.int32), 1, 3, 0.5,
                                                "bogus")
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode() as mode, pytest.raises(ValueError, match="backend"):
        fq = mode.from_tensor(q)
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        torch.ops.kfuse.paged_decode_attention(fq, *fargs, 3, 0.5, "bogus")
    # "reference" runs the reference
    out = torch.ops.kfuse.paged_decode_attention(q, *args, 3, 0.5, "reference")
    assert torch.equal(out, paged_decode_attention_reference(q, cache, 1, ids, scale=0.5))


@pytest.mark.parametrize("path", ["reference", "cpu-sdpa", "cpu"])
def test_registered_ops_check_values_where_they_read_them_on_the_host(path, seed, monkeypatch):
    """The reference backend and the cpu backend's SDPA prefill read seq_ids, lens, q_lens and the block
    table on the host and checked none of them (registered-ops hunt, 2026-12-06): a q_lens sum short of
    q's rows returned uninitialised rows, a q_len past its length fully masked rows, seq_ids -1 another
    sequence, lens -4 zeros. They raise as the C++ kernel does, naming the argument. The reference also
    gives a sequence named twice at two lengths each row's (it kept the last's), as the cpu backend; and
    the SDPA path's output is contiguous for a permuted q, as the op's fake says (torch.compile failed).
    Every path raises ValueError (the C++ kernel's checks raised RuntimeError until 2026-12-06)."""
    dtype = torch.bfloat16 if path == "cpu-sdpa" else torch.float32
    backend = "reference" if path == "reference" else "cpu"
    monkeypatch.setattr(kv_ops, "_SDPA_MIN_Q_LEN", 1)  # every bf16 prefill on SDPA, at these small sizes
    cache, ids = _op_cache([5, PS + 3], dtype, "cpu")
    k_pages, v_pages, table, layer, sid, lens = _op_args(cache, ids)
    q = torch.randn(4, HKV * 2, D).to(dtype)

    def prefill(q=q, seq_ids=sid, lens=lens, q_lens=(2, 2), table=table):
        return torch.ops.kfuse.paged_prefill_attention(q, k_pages, v_pages, table, layer, seq_ids, lens,
                                                       torch.tensor(q_lens, dtype=torch.int32), 4, PS + 3, 0.5,
                                                       backend)

    prefill()
    bad_table = table.clone()
    bad_table[ids[1], 1] = cache.k_pages.shape[1]
    for kw, msg in (({"q_lens": (1, 2)}, r"q has 4 rows; q_lens sums to 3"),
                    ({"q_lens": (6, 0)}, r"q_lens\[0\] = 6 must be in \[0, lens\[0\] = 5\]"),
                    ({"seq_ids": torch.tensor([-1, ids[1]], dtype=torch.int32)}, r"seq_ids\[0\] = -1 or lens"),
                    ({"lens": torch.tensor([-4, PS + 3], dtype=torch.int32)}, r"lens\[0\] = -4 out of range"),
                    ({"table": bad_table}, rf"block_table\[{ids[1]}, 1\] = \d+ is not a page")):
        with pytest.raises(ValueError, match=msg):
            prefill(**kw)
    if path == "cpu-sdpa":
        permuted = torch.randn(HKV * 2, 4, D).to(dtype).transpose(0, 1)
        out = prefill(q=permuted)
        assert out.is_contiguous() and torch.equal(out, prefill(q=permuted.contiguous()))
    else:
        twice = torch.tensor([ids[1], ids[1]], dtype=torch.int32)
        at = torch.tensor([3, PS + 3], dtype=torch.int32)
        for op, extra in ((torch.ops.kfuse.paged_decode_attention, (PS + 3,)),
                          (torch.ops.kfuse.paged_prefill_attention,
                           (torch.tensor([1, 1], dtype=torch.int32), 1, PS + 3))):
            got, want = (op(q[:2], k_pages, v_pages, table, layer, twice, at, *extra, 0.5, b) for b in ("reference",
                                                                                                     "cpu"))
            assert_close(got, want, dtype, op.__name__)
        with pytest.raises(ValueError, match=r"seq_ids\[0\] = -1 or lens"):
            torch.ops.kfuse.paged_decode_attention(q[:2], k_pages, v_pages, table, layer,
                                                   torch.tensor([-1, ids[1]], dtype=torch.int32), lens, PS + 3, 0.5,
                                                   "reference")


@pytest.mark.parametrize("backend,compiler", [("reference", "eager"), ("cpu", "inductor")])
def test_torch_compile_fullgraph(backend, compiler, seed):
    """Both ops inside a compiled graph (the C++ kernels' registration under inductor too) give the
    eager calls' bits."""
    cache, ids = _op_cache([5, 0, PS + 1], torch.float32, "cpu")
    new = [2, 0, 1]
    for layer in range(L):
        k, v = _kv(3)
        cache.append(layer, ids, k, v, new)
    q, qp = torch.randn(3, HKV * 2, D), torch.randn(3, HKV * 2, D)

    def f(q, qp):
        a = kfuse.paged_decode_attention(q, cache, 1, ids, backend=backend)
        b = kfuse.paged_prefill_attention(qp, cache, 1, ids, new, backend=backend)
        return a * 2, b + 1

    torch._dynamo.reset()
    a, b = torch.compile(f, fullgraph=True, backend=compiler)(q, qp)
    want = f(q, qp)
    assert torch.equal(a, want[0]) and torch.equal(b, want[1])
    assert_close(want[0], paged_decode_attention_reference(q, cache, 1, ids) * 2, torch.float32, "decode")
    assert_close(want[1], paged_prefill_attention_reference(qp, cache, 1, ids, new) + 1, torch.float32, "prefill")


def test_torch_compile_traces_one_graph_for_every_layer_and_batch_size(seed):
    """Compiled attention called per layer inside steps, as a model calls it: one graph for every layer
    (Dynamo guarded on the open step's set of appended layers, so each layer compiled anew and past 8
    layers fullgraph failed) and, with dynamic shapes and the ids as a tensor, for every batch size
    (iterating the tensor fixed its length). Each call gives the eager call's bits. A tensor q_lens,
    whose values are unknown while tracing, is refused naming the argument. (Compile hunt.)"""
    torch._dynamo.reset()
    layers = 10
    cache = make(num_layers=layers, num_pages=64, max_seqs=8)
    ids = [cache.add_sequence() for _ in range(5)]
    step(cache, None, ids, [3, 1, 4, 1, 5])
    counters = torch._dynamo.utils.counters
    counters.clear()
    dec = torch.compile(lambda q, s, layer: kfuse.paged_decode_attention(q, cache, layer, s, backend="cpu"),
                        fullgraph=True, dynamic=True)
    for n in (5, 4, 3):
        sub = torch.tensor(ids[:n])
        for layer in range(layers):
            cache.append(layer, sub, *_kv(n))
            q = torch.randn(n, 2 * HKV, D)
            assert torch.equal(dec(q, sub, layer), kfuse.paged_decode_attention(q, cache, layer, sub, backend="cpu"))
        cache.advance(sub)
    assert counters["stats"]["unique_graphs"] == 1
    pre = torch.compile(lambda q, q_lens: kfuse.paged_prefill_attention(q, cache, 0, ids[:2], q_lens, backend="cpu"))
    with pytest.raises(TypeError, match="under torch.compile q_lens must be a list of ints"):
        pre(torch.randn(3, 2 * HKV, D), torch.tensor([1, 2]))


def _bad_inputs():
    cache, ids = _op_cache([3, 2], torch.float32, "cpu")
    cache.free(cache.add_sequence())
    freed = cache.max_seqs - 1
    q = torch.randn(2, HKV * 2, D)
    dec, pre = kfuse.paged_decode_attention, kfuse.paged_prefill_attention
    return {
        "q dtype": (lambda: dec(q.half(), cache, 0, ids), TypeError, "q has dtype"),
        "q device": (lambda: dec(q.to("meta"), cache, 0, ids), ValueError, "q is on meta"),
        "q rank": (lambda: dec(q[0], cache, 0, ids), ValueError, "q must be"),
        "q heads": (lambda: dec(torch.randn(2, HKV + 1, D), cache, 0, ids), ValueError, "num_kv_heads"),
        "q head_dim": (lambda: dec(torch.randn(2, HKV, D + 1), cache, 0, ids), ValueError, "head_dim"),
        "q rows": (lambda: dec(q[:1], cache, 0, ids), ValueError, "q has 1 rows"),
        "cache": (lambda: dec(q, object(), 0, ids), TypeError, "cache must be"),
        "layer": (lambda: dec(q, cache, L, ids), IndexError, "layer must be"),
        "str layer": (lambda: dec(q, cache, "0", ids), TypeError, "attention: layer must be an int; got str"),
        "float layer (prefill)": (lambda: pre(q, cache, 0.0, ids, [1, 1]), TypeError,
                                  "paged_prefill_attention: layer must be an int; got float"),
        "list q": (lambda: dec(q.tolist(), cache, 0, ids), TypeError, "q must be a torch.Tensor; got list"),
        "list q (prefill)": (lambda: pre(q.tolist(), cache, 0, ids, [1, 1]), TypeError, "q must be a torch.Tensor"),
        "str seq_ids": (lambda: dec(q, cache, 0, "01"), TypeError, "seq_ids must be a sequence of ints; got str"),
        "float q_lens": (lambda: pre(q, cache, 0, ids, [1.0, 1.0]), TypeError, "q_lens must hold ints"),
        "unknown id": (lambda: dec(q, cache, 0, [ids[0], 99]), IndexError, "seq_ids"),
        "freed id": (lambda: dec(q, cache, 0, [ids[0], freed]), ValueError, "seq_ids.*not active"),
        "duplicate id": (lambda: dec(q, cache, 0, [ids[0], ids[0]]), ValueError, "seq_ids.*duplicate"),
        "scale": (lambda: dec(q, cache, 0, ids, scale="x"), TypeError, "scale"),
        "backend": (lambda: dec(q, cache, 0, ids, backend="bogus"), ValueError, "backend"),
        "cuda backend": (lambda: dec(q, cache, 0, ids, backend="cuda"), _backends.BackendUnavailableError, "cuda"),
        "q_lens count": (lambda: pre(q, cache, 0, ids, [2]), ValueError, "q_lens"),
        "q_lens sum": (lambda: pre(q, cache, 0, ids, [1, 2]), ValueError, "q_lens"),
        "q_lens past cache": (lambda: pre(torch.randn(4, HKV, D), cache, 0, ids, [4, 0]), ValueError,
                              "q_lens: 4 new tokens"),
        # No backward: an output that silently dropped q's gradient would be a wrong gradient.
        "q requires grad": (lambda: dec(q.requires_grad_(), cache, 0, ids), RuntimeError, "no autograd"),
        "q requires grad (prefill)": (lambda: pre(torch.randn(5, HKV, D, requires_grad=True), cache, 0, ids, [3, 2],
                                                  backend="reference"), RuntimeError, "no autograd"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_op_bad_inputs_name_the_argument(name):
    fn, exc, match = _bad_inputs()[name]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the triton-cuda tests compile and run the kernels")
def test_triton_kv_kernels_compile_for_sm90():
    """The decode (split and merge), prefill and append kernels, as their launchers launch them on a GPU,
    compile to sm_90a machine code and fit an H200 (``tests/sm90.py``): fp16 with 4 query heads a KV
    head and bf16 with 8 at head dim 128 (Llama's), fp32 with 1 at 64, fp16 at 96 (not a power of
    two), 16-token pages, 32k-token contexts (128 splits), a prefill of 2 × 512 tokens, and one sequence
    of one page with one head (sizes of 1 become constants in a launch's specialisation). The
    interpreter never runs the compiler. ~1 min cold on 2 cores."""
    launches = sm90.run_script("""
import torch
from kfuse.triton_kernels import kv as tk
e = lambda *shape, dt=torch.int32: torch.empty(*shape, dtype=dt, device="meta")
for dt, G, D, Hkv, B, ctx in ((torch.float16, 4, 128, 8, 16, 32768), (torch.bfloat16, 8, 128, 8, 16, 32768),
                              (torch.float32, 1, 64, 8, 16, 32768), (torch.float16, 4, 96, 8, 16, 32768),
                              (torch.float16, 1, 128, 1, 1, 16)):
    pages = e(B * ctx // 16, 16, Hkv, D, dt=dt)
    table, ids, lens = e(B, ctx // 16), e(B), e(B)
    tk.paged_decode(e(B, G * Hkv, D, dt=dt), pages, pages, table, ids, lens, ctx, D ** -0.5)
    if dt != torch.float32:
        n, per_seq = min(B, 2), min(ctx, 512)
        tk.paged_prefill(e(n * per_seq, G * Hkv, D, dt=dt), pages, pages, table, ids[:n], lens[:n], e(n), per_seq,
                         D ** -0.5)
    tk.paged_append(pages, pages, e(B, dt=torch.int64), e(B, Hkv, D, dt=dt), e(B, Hkv, D, dt=dt))
""")
    assert {launch["kernel"] for launch in launches} == sm90.launched_kernels(tk)
    assert max(launch["grid"][2] for launch in launches if launch["kernel"] == "_decode_split_kernel") == 128


def test_layers_of_a_step_share_one_validation(monkeypatch):
    """Within a step, a layer's attention given the same ids tensor as the previous layer's (unchanged)
    skips the cache's checks and reuses its device copies; an in-place change of that tensor, or
    another tensor, is checked again; the outputs are those of a fresh check."""
    from kfuse.ops import kv as kv_ops  # noqa: PLC0415

    cache = make()
    ids = [cache.add_sequence() for _ in range(3)]
    step(cache, None, ids, [5, 3, 7])
    seq = torch.tensor(ids)
    q = torch.randn(3, 2 * HKV, D)
    checks = []
    real = cache._ids
    monkeypatch.setattr(cache, "_ids", lambda s, what="seq_ids": checks.append(1) or real(s, what))
    outs = []
    for layer in range(L):
        k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
        cache.append(layer, seq, k, v)
        outs.append(kfuse.paged_decode_attention(q, cache, layer, seq, backend="cpu"))
    assert len(checks) == 1  # the first layer's only
    _, first = kv_ops._validate("paged_decode_attention", q, cache, 0, seq)
    seq.add_(0)  # an in-place write (same values, new version): checked again
    _, again = kv_ops._validate("paged_decode_attention", q, cache, 0, seq)
    assert len(checks) == 2 and again is not first and torch.equal(again.lens, first.lens)
    kv_ops._validate("paged_decode_attention", q, cache, 0, seq.clone())  # another tensor: checked
    assert len(checks) == 3
    cache.advance(seq)
    fresh = kfuse.paged_decode_attention(q, cache, L - 1, seq, backend="cpu")  # no step: checked, same lengths
    assert torch.equal(fresh, outs[-1])


@pytest.mark.parametrize("mirror", [False, True])
def test_cpu_calls_outside_a_step_read_their_rows_in_one_extension_call(mirror, seed):
    """With no step open, a CPU cache's attention call gets its ids' checks, their lengths, the kernels' int32
    rows and the longest length from one extension call (KVHostState.call_rows: ~30-40 µs of a decode call's
    Python before), no transfer: the same rows as the general path (cache._ids, _kv_lens, _to_device) for ids as
    a list, an int32 or int64 tensor, in any order, a sequence of length 0 included; no sequences gives max_len
    0. A mirrored cache (a CUDA cache's code path) keeps the general path and its one transfer."""
    gen = random.Random(seed)
    cache = make(_mirror=mirror)
    ids = [cache.add_sequence() for _ in range(5)]
    step(cache, None, ids, [gen.randint(0, 9) for _ in ids[:-1]] + [0])
    q = torch.randn(3, 2 * HKV, D)
    transfers = []
    real = cache._dev
    for pick in (gen.sample(ids, 3), [ids[-1], ids[0], ids[2]]):
        want_ids = cache._ids(pick)
        want = kv_ops._to_device(cache, want_ids, cache._kv_lens(1, want_ids))
        for given in (pick, torch.tensor(pick, dtype=torch.int32), torch.tensor(pick)):
            transfers.clear()
            cache._dev = lambda *a, **k: transfers.append(1) or real(*a, **k)
            got = kv_ops._sequences("paged_decode_attention", cache, 1, given)
            del cache._dev
            assert len(transfers) == mirror
            assert got.max_len == want.max_len and torch.equal(got.host_ids, want.host_ids)
            assert torch.equal(got.host_lens.long(), want.host_lens)
            assert got.ids.dtype == got.lens.dtype == torch.int32
            assert torch.equal(got.ids, want.ids) and torch.equal(got.lens, want.lens)
        out = kfuse.paged_decode_attention(q, cache, 1, pick, backend="cpu")
        assert_close(out, paged_decode_attention_reference(q, cache, 1, pick, D ** -0.5), torch.float32)
    assert kv_ops._sequences("paged_decode_attention", cache, 0, []).max_len == 0


@pytest.mark.parametrize("backend,device", BACKENDS[:3])
def test_a_step_under_inference_mode_attends_with_an_inference_ids_tensor(backend, device, seed):
    """Under torch.inference_mode() the ids tensor is an inference tensor, which has no version counter:
    the per-step memo read it and every layer's attention raised "Inference tensors do not track version
    counter" (so did every step of the Llama model there; bug hunt). Such ids are checked at every call,
    so a write into them between layers (allowed inside inference mode) changes the rows a later layer
    reads, as it does for any other tensor."""
    cache = make()
    a, b = cache.add_sequence(), cache.add_sequence()
    step(cache, None, [a, b], [5, 2])
    q = torch.randn(2, 2 * HKV, D)
    with torch.inference_mode():  # a step opened there is finished outside it
        cache.append(0, [a, b], *_kv(2))
    for layer in range(1, L):
        cache.append(layer, [a, b], *_kv(2))
    cache.advance([a, b])
    with torch.inference_mode():
        ids = torch.tensor([a, b])
        for layer in range(L):
            cache.append(layer, ids, *_kv(2))
        for layer in range(L):
            if layer == 1:
                ids.copy_(torch.tensor([b, a]))
            order = ids.tolist()
            got = kfuse.paged_decode_attention(q, cache, layer, ids, backend=backend)
            assert_close(got, paged_decode_attention_reference(q, cache, layer, order), torch.float32,
                         f"decode, layer {layer}")
            got = kfuse.paged_prefill_attention(q, cache, layer, ids, [1, 1], backend=backend)
            assert_close(got, paged_prefill_attention_reference(q, cache, layer, order, [1, 1]), torch.float32,
                         f"prefill, layer {layer}")
        cache.advance(ids.flip(0))
    assert (cache.length(a), cache.length(b)) == (7, 4)


@pytest.mark.parametrize("mirror", [False, True], ids=["cpu-state", "device-copy"])
def test_a_cpu_cache_works_under_another_default_device(mirror, seed):
    """Under torch.set_default_device("cuda") (here "meta", which every machine has) a CPU cache made its
    host state on the default device: construction, free and the prefill failed (bug hunt). Every host
    tensor names the CPU: appends, rollback, fork, free and both attentions (cpu and reference backends)
    there leave the cache and give the outputs they do outside it, bit for bit."""
    first = [_kv(8) for _ in range(L)]
    second = [_kv(2) for _ in range(L)]
    q = torch.randn(2, 2 * HKV, D)

    def run():
        cache = make(device="cpu", _mirror=mirror)
        a, b = cache.add_sequence(), cache.add_sequence()
        for layer in range(L):
            cache.append(layer, [a, b], *first[layer], counts=[5, 3])
        cache.advance([a, b], [5, 3])
        cache.rollback([a], [2])
        c = cache.fork(b, 2)
        for layer in range(L):
            cache.append(layer, [a, c], *second[layer], counts=[1, 1])
        outs = [op(q, cache, layer, [a, c], *extra, backend=backend) for layer in range(L)
                for op, extra in ((kfuse.paged_decode_attention, ()), (kfuse.paged_prefill_attention, ([1, 1],)))
                for backend in ("cpu", "reference")]
        cache.advance([a, c])
        cache.free(b)
        return outs, snapshot(cache)

    want, want_state = run()
    with torch.device("meta"):
        got, got_state = run()
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    assert got_state[1] == want_state[1] and all(torch.equal(x, y) for x, y in zip(got_state[0], want_state[0],
                                                                                    strict=True))


def test_cpu_half_prefill_on_sdpa_works_under_another_default_device(seed, monkeypatch):
    """The cpu backend's SDPA prefill (half precision, at least _SDPA_MIN_Q_LEN new tokens) built its causal mask
    and the short sequences' row indices on the default device: under torch.device("meta") SDPA took the meta
    mask and returned other values, silently, and the short sequences' metadata was read as garbage ("seq_ids[0]
    = -1866994224 out of range"; under "cuda", mismatched devices). They are made on q's device now."""
    monkeypatch.setattr(kv_ops, "_SDPA_MIN_Q_LEN", 4)  # small sizes: sequences of 4+ new tokens on SDPA
    cache = make(torch.bfloat16, num_layers=1, num_kv_heads=2, head_dim=16, num_pages=16)
    ids = [cache.add_sequence() for _ in range(3)]
    for counts in ([9, 3, 0], [5, 2, 4]):  # SDPA with a cached context, the C++ kernel, SDPA on a whole prompt
        cache.append(0, ids, *(torch.randn(sum(counts), 2, 16).to(torch.bfloat16) for _ in "kv"), counts)
        cache.advance(ids, counts)
    q = torch.randn(11, 8, 16).to(torch.bfloat16)
    want = kfuse.paged_prefill_attention(q, cache, 0, ids, [5, 2, 4], backend="cpu")
    with torch.device("meta"):
        got = kfuse.paged_prefill_attention(q, cache, 0, ids, [5, 2, 4], backend="cpu")
    assert torch.equal(got, want)


def test_numpy_and_tensor_integers_serve_as_sizes_and_layers(seed):
    """np.int64 sizes and layers (and 0-d integer tensors) were refused as "must be an int" while sequence ids
    took them; a size past int32 failed deep in torch, an id past int64 "must hold ints" (error-message
    hunt). They are taken as their ints, and the others name the argument."""
    cache = PagedKVCache(np.int64(2), np.int64(HKV), D, PS, NP, MS)
    s = cache.add_sequence()
    k = torch.randn(3, HKV, D)
    q = torch.randn(1, 2 * HKV, D)
    cache.append(np.int64(0), [s], k, k, [3])
    cache.append(torch.tensor(1), [s], k, k, [3])  # the step's layers are ints: it commits
    want = kfuse.paged_decode_attention(q, cache, 1, [s])  # in the open step (a tensor layer read none of it)
    for layer in (np.int64(1), torch.tensor(1)):
        assert torch.equal(kfuse.paged_decode_attention(q, cache, layer, [s]), want)
        assert cache.kv_len(layer, s) == 3
    cache.advance([s], [3])
    assert torch.equal(kfuse.paged_decode_attention(q, cache, torch.tensor(1), [s]), want)
    for bad in (torch.tensor(True), torch.tensor([1]), torch.tensor(1.0), "1", 1.0, True):
        with pytest.raises(TypeError, match="kfuse.paged_decode_attention: layer must be an int; got"):
            kfuse.paged_decode_attention(q, cache, bad, [s])
        with pytest.raises(TypeError, match="PagedKVCache.kv_len: layer must be an int; got"):
            cache.kv_len(bad, s)
    with pytest.raises(ValueError, match=r"num_layers must be below 2\^31; got 18446744073709551616"):
        PagedKVCache(2**64, HKV, D, PS, NP, MS)
    with pytest.raises(ValueError, match="new_lens holds a value outside int64's range"):
        cache.rollback([s], [2**63])


def test_kv_lens_checks_its_arguments():
    """kv_lens, public, read any layer and indexed the host lengths with whatever it was given: a str layer, an
    unknown or freed id (a free slot's length), a float or 2-D tensor passed through to torch's indexing. It checks
    them as the other methods do (against the host state: no sync), and takes ints as well as tensors."""
    cache, a, b = _populated()
    assert cache.kv_lens(0, [b, a]).tolist() == [3, 5] and cache.kv_lens(np.int64(1), torch.tensor([a])).tolist() == [5]
    snap = snapshot(cache)
    for args, exc, match in [(("0", [a]), TypeError, "PagedKVCache.kv_lens: layer must be an int; got str"),
                             ((L, [a]), IndexError, r"PagedKVCache.kv_lens: layer must be an int in \[0, 2\); got 2"),
                             ((0, [2]), ValueError, "seq_ids: sequence 2 is not active"),
                             ((0, [7]), IndexError, "seq_ids: sequence id 7 out of range"),
                             ((0, [a, a]), ValueError, "seq_ids.*duplicate"),
                             ((0, torch.tensor([0.0])), TypeError, "seq_ids must be a 1-D integer tensor"),
                             ((0, torch.tensor([[a]])), ValueError, "seq_ids must be a 1-D integer tensor"),
                             ((0, a), TypeError, "seq_ids must be a sequence of ints; got int")]:
        with pytest.raises(exc, match=match):
            cache.kv_lens(*args)
    assert_same(cache, snap)


def test_a_step_keeps_its_own_copy_of_the_callers_ids(seed):
    """The open step and the attention's per-step memo copy the caller's ids and counts tensors: writing
    them between layers (a buffer reused for the next batch) neither changes which sequences the step
    commits nor which rows a later layer's attention reads (bug hunt: both used the caller's tensor)."""
    cache = make(num_layers=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    ids, cnt = torch.tensor([a]), torch.tensor([2])
    cache.append(0, ids, *_kv(2), counts=cnt)
    ids[0], cnt[0] = b, 1
    with pytest.raises(ValueError, match="differ from the open step's"):
        cache.append(1, ids, *_kv(1), counts=cnt)
    cache.append(1, [a], *_kv(2), counts=[2])
    cache.advance([a], [2])
    assert (cache.length(a), cache.length(b)) == (2, 0)
    check_invariants(cache)
    step(cache, None, [a, b], [3, 4])
    T = torch.tensor([a, b])
    q = torch.randn(2, HKV, D)
    for layer in range(2):
        cache.append(layer, [a, b], *_kv(2))
    kfuse.paged_decode_attention(q, cache, 0, T, backend="cpu")  # the memo's ids: [a, b]
    T[0], T[1] = b, a
    got = kfuse.paged_decode_attention(q, cache, 1, torch.tensor([b, a]), backend="cpu")
    assert torch.equal(got, kfuse.paged_decode_attention(q, cache, 1, [b, a], backend="cpu"))
    assert_close(got, paged_decode_attention_reference(q, cache, 1, [b, a]), torch.float32, "rows of [b, a]")


def test_append_takes_kv_read_from_the_pools(seed):
    """K/V that are views of the cache's own pools (one sequence's tokens appended to another) are
    stored; index_copy_ refused them as overlapping its destination (bug hunt)."""
    cache = make()
    a, b = cache.add_sequence(), cache.add_sequence()
    step(cache, None, [a], [3])
    page = int(cache._h_table[a, 0])
    for layer in range(L):
        cache.append(layer, [b], cache.k_pages[layer, page, :3], cache.v_pages[layer, page, :3], counts=[3])
    cache.advance([b], [3])
    for layer in range(L):
        assert all(torch.equal(x, y) for x, y in zip(gather_kv(cache, layer, a), gather_kv(cache, layer, b),
                                                      strict=True))
    check_invariants(cache)


@pytest.mark.parametrize("mode", ["ragged decode", "prefill"])
def test_sdpa_baselines_stay_on_fused_kernels(mode):
    """The attention baselines on CUDA (kfuse.bench.kv._fused_sdpa, run here on CPU tensors): SDPA with
    GQA (a mask for the ragged decode, causal for the prefill) under the fused kernels when one takes
    it, else K/V repeated per head (and the row says so); both give SDPA's result."""
    from kfuse.bench import kv as kv_bench  # noqa: PLC0415

    t = 1 if mode == "ragged decode" else 40
    q4, k, v = torch.randn(2, 8, t, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    mask = (torch.arange(40) < torch.tensor([30, 40]).unsqueeze(1))[:, None, None, :] if t == 1 else None

    def call(k, v, gqa=True):
        return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)

    def gqa_refused(k, v, gqa=True):
        if gqa:
            raise RuntimeError("No available kernel. Aborting execution.")
        return call(k, v, gqa)

    want = call(k, v)
    fn, extra = kv_bench._fused_sdpa(call, q4, k, v)
    assert extra is None and torch.allclose(fn(), want, atol=1e-6)
    fn, extra = kv_bench._fused_sdpa(gqa_refused, q4, k, v)
    assert extra(0.0) == {"K/V repeated": 1.0} and torch.allclose(fn(), want, atol=1e-6)


def _tiny_report_cases(device: torch.device, quick: bool) -> list:
    from kfuse.bench import kv as kv_bench  # noqa: PLC0415

    dt = torch.float32
    return [kv_bench._case(device, dt, "rollback", 8, 40, 1, 1, 8),
            kv_bench._case(device, dt, "fork", 1, 40, 1, 1, 8),
            kv_bench._case(device, dt, "append", 3, 37, 4, 2, 16),
            kv_bench._case(device, dt, "decode", 3, 37, 4, 2, 16, ragged=False),
            kv_bench._case(device, dt, "decode", 3, 37, 4, 2, 16, ragged=True),
            kv_bench._case(device, dt, "prefill", 2, 19, 4, 2, 16)]


def by_mode_ok(rows: list[dict], mode: str) -> bool:
    return all(r["status"] == "ok" and r["max_err"] == 0.0 for r in rows if r["mode"] == mode)


def test_report_rows_tiny(report_rows) -> None:
    """``python -m kfuse --ops kv`` at tiny shapes on the CPU: every case has its rows, every row that ran
    has a finite time and ratio and passed its check (rollback metadata, appended K/V, attention against
    float64), the targets are the CPU's (rollback 20 µs, uniform decode 1.5× SDPA) and the table shows them."""
    from kfuse.bench import kv as kv_bench  # noqa: PLC0415

    rows, ran, out = report_rows("kv", kv_bench, _tiny_report_cases)
    assert {r["mode"] for r in rows} == {"rollback", "fork", "append", "decode", "prefill"}
    assert by_mode_ok(rows, "fork") and by_mode_ok(rows, "rollback")
    by = {(r["shape"], r["mode"], r["name"]): r for r in rows}
    assert by["8x40 hq=1 hkv=1 d=8", "rollback", "kfuse"]["ratio_to"] == "20us"
    assert by["8x40 hq=1 hkv=1 d=8", "rollback", "kfuse"]["target"] == 1.0
    assert by["3x37 hq=4 hkv=2 d=16", "append", "cat"]["ratio"] == 1.0
    assert by["3x37 hq=4 hkv=2 d=16", "append", "kfuse"]["max_err"] == 0.0
    uni, rag = "3x37 hq=4 hkv=2 d=16 ragged=False", "3x37 hq=4 hkv=2 d=16 ragged=True"
    assert by[uni, "decode", "cpu"]["target"] == 1.5 and by[rag, "decode", "cpu"]["target"] is None
    for shape, mode in ((uni, "decode"), (rag, "decode"), ("2x19 hq=4 hkv=2 d=16", "prefill")):
        assert by[shape, mode, "cpu"]["status"] == "ok" and by[shape, mode, "sdpa"]["ratio"] == 1.0
        assert by[shape, mode, "cpu"]["gbps"] > 0 and by[shape, mode, "cpu"]["pct_copy"] > 0
    # ragged decode: the useful bytes, 2 · Σ len · Hkv · D · 4 (lengths spread over 18 … 37)
    assert kv_bench.bytes_moved(kv_bench._case(torch.device("cpu"), torch.float32, "decode", 3, 37, 4, 2, 16,
                                               ragged=True)) == 2 * (24 + 30 + 37) * 2 * 16 * 4
    assert "rollback" in out and "<=1.50" in out and "%copy" in out


@pytest.mark.parametrize("device", ["cpu:0", *(["cuda"] if torch.cuda.is_available() else [])])
def test_device_named_without_or_with_an_index_takes_tensors_on_it(device):
    # A device named "cuda" (no index) compared unequal to the "cuda:0" of every tensor on it, so every
    # append and attention call raised "k is on cuda:0; the cache is on cuda" (H200, 2026-12-04); "cpu:0"
    # against "cpu" is the same mismatch on a CPU.
    cache = make(device=device)
    assert cache.device == cache.k_pages.device
    sid = cache.add_sequence()
    k = torch.randn(3, HKV, D, device=device)
    for layer in range(L):
        cache.append(layer, [sid], k, -k, counts=[3])
    cache.advance([sid], counts=[3])
    q = torch.randn(1, HKV, D, device=device)
    got = kfuse.paged_decode_attention(q, cache, 0, [sid])
    want = F.scaled_dot_product_attention(q.view(1, HKV, 1, D), k.transpose(0, 1)[None], -k.transpose(0, 1)[None])
    assert_close(got.view(1, HKV, D), want.view(1, HKV, D), torch.float32)


@pytest.mark.parametrize("mirror", [False, True])
def test_appends_follow_pools_replaced_in_place(mirror):
    """The cache keeps each layer's pool views between appends (host time); a pool given new memory in place
    (``k_pages.data = ...``) was written through the old views, and attention read the new, empty pool
    (review of the change, 2026-12-05). Appends go where the pools now are."""
    c = make(_mirror=mirror)
    s = c.add_sequence()
    gen = torch.Generator().manual_seed(0)
    kv = [torch.randn(2, HKV, D, generator=gen) for _ in range(4)]
    for layer in range(L):
        c.append(layer, [s], kv[0], kv[1], [2])
    c.advance([s], [2])
    c.k_pages.data = c.k_pages.clone()
    c.v_pages.data = c.v_pages.clone()
    for layer in range(L):
        c.append(layer, [s], kv[2], kv[3], [2])
    c.advance([s], [2])
    for layer in range(L):
        k, v = gather_kv(c, layer, s)
        assert torch.equal(k, torch.cat([kv[0], kv[2]])) and torch.equal(v, torch.cat([kv[1], kv[3]])), layer


@pytest.mark.interpret
def test_triton_registered_ops_read_nothing_out_of_bounds_on_bad_values():
    """The registered ops' Triton path reads no tensor values on the host (a GPU sync): seq_ids past the block
    table, a table entry past the pools or a length past a row's capacity (values the public ops, which pass
    the cache's own, never give) were dereferenced: a segfault under the interpreter, an out-of-bounds read on a
    GPU (bad-input fuzz, 2026-12-05). The kernels now read such a sequence as empty (a row outside the table),
    cut a length to the row's capacity and skip a bad entry's keys: finite outputs, nothing read outside."""
    cache = PagedKVCache(1, 1, 4, 16, 40, 2)
    s = cache.add_sequence()
    n = 600  # three decode splits
    gen = torch.Generator().manual_seed(0)
    cache.append(0, [s], torch.randn(n, 1, 4, generator=gen), torch.randn(n, 1, 4, generator=gen), [n])
    cache.advance([s], [n])
    ops, i32 = torch.ops.kfuse, functools.partial(torch.tensor, dtype=torch.int32)
    q = torch.randn(1, 1, 4, generator=gen)
    bad_page = cache.block_table.clone()
    bad_page[s, 1] = 10_000_000
    cases = {  # (block_table, seq_ids, lens, max_len)
        "row": (cache.block_table, i32([1_000_000]), i32([n]), n),
        "negative row": (cache.block_table, i32([-5]), i32([n]), n),
        "page": (bad_page, i32([s]), i32([n]), n),
        "length": (cache.block_table, i32([s]), i32([40 * 16 * 50]), 40 * 16 * 50),
        "negative length": (cache.block_table, i32([s]), i32([-7]), n),
    }
    for name, (table, ids, lens, max_len) in cases.items():
        out = ops.paged_decode_attention(q, cache.k_pages, cache.v_pages, table, 0, ids, lens, max_len, 0.5,
                                         "triton")
        assert torch.isfinite(out).all(), name
        if name.endswith("row") or name == "negative length":
            assert torch.equal(out, torch.zeros_like(out)), f"{name}: an empty sequence"
        qp = torch.randn(3, 1, 4, generator=gen)
        for q_lens in (i32([3]), i32([700]), i32([-2])):  # within, past the length, negative
            out = ops.paged_prefill_attention(qp, cache.k_pages, cache.v_pages, table, 0, ids, lens, q_lens, 3,
                                              max_len, 0.5, "triton")
            assert out.shape == qp.shape, name
