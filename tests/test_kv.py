"""Tests of kfuse.kv.PagedKVCache (metadata, append, rollback, fork, copy-on-write) and the reference
attention over it (kfuse.reference.kv)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from kfuse.kv import PagedKVCache
from kfuse.reference.kv import gather_kv, paged_decode_attention_reference, paged_prefill_attention_reference

L, HKV, D, PS, NP, MS = 2, 2, 8, 4, 24, 6


def make(dtype=torch.float32, **kw) -> PagedKVCache:
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
    # host mirror == device
    assert lens.tolist() == cache._lens
    assert ref.tolist() == cache._ref
    assert free == cache._free
    counts = torch.zeros(cache.num_pages, dtype=torch.int64)
    for s in range(cache.max_seqs):
        n = int(lens[s])
        keep = -(-n // ps)
        row = bt[s]
        assert (row[:keep] >= 0).all(), f"seq {s}: missing page below its length"
        assert (row[keep:] == -1).all(), f"seq {s}: table entry past its last page"
        assert row[:keep].tolist() == cache._pages[s]
        if not cache._active[s]:
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


@pytest.mark.parametrize("num_pages", [24, 12, 40])
def test_random_ops_against_dense_reference(num_pages, seed):
    rng = random.Random(seed)
    cache = make(num_pages=num_pages)
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
            need = sum(-(-(cache._lens[s] + c) // PS) - len(cache._pages[s]) + 1
                       for s, c in zip(ids, counts, strict=True))
            if need > len(cache._free):
                continue  # may exhaust the pool; exhaustion is tested separately
            step(cache, dense, ids, counts)
        elif op == "rollback" and live:
            ids = rng.sample(live, rng.randint(1, len(live)))
            new = []
            for s in ids:
                n = cache._lens[s]
                new.append(rng.choice([0, n, n // 2, (n // PS) * PS, max(n - 1, 0), rng.randint(0, n)]))
            cache.rollback(ids, new)
            for s, n in zip(ids, new, strict=True):
                dense.kv[s] = [[k[:n], v[:n]] for k, v in dense.kv[s]]
        elif op == "fork" and live and len(live) < MS:
            src = rng.choice(live)
            n = cache._lens[src]
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


def test_copy_on_write_isolates_parent_and_child(seed):
    cache = make()
    dense = Dense(cache)
    a = cache.add_sequence()
    dense.add(a)
    step(cache, dense, [a], [PS + 2])  # 6 tokens: one full page, one half page
    b = cache.fork(a, PS + 1)  # mid-page fork
    dense.kv[b] = [[k[:PS + 1], v[:PS + 1]] for k, v in dense.kv[a]]
    shared = cache._pages[a][1]
    assert cache._ref[shared] == 2
    snap_a = [[t.clone() for t in gather_kv(cache, layer, a)] for layer in range(L)]
    step(cache, dense, [b], [3])  # child writes into the shared partial page: copied first
    assert cache._pages[b][1] != shared and cache._pages[b][0] == cache._pages[a][0]
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


def snapshot(cache: PagedKVCache):
    tensors = [t.clone() for t in (cache.k_pages, cache.v_pages, cache.block_table, cache.seq_lens,
                                   cache.page_refcount, cache.free_stack, cache.free_top)]
    host = (list(cache._lens), list(cache._active), [list(p) for p in cache._pages], list(cache._ref),
            list(cache._free), None if cache._step is None else (cache._step["ids"], cache._step["counts"],
                                                                  set(cache._step["layers"])))
    return tensors, host


def assert_same(cache: PagedKVCache, snap) -> None:
    now = snapshot(cache)
    for a, b in zip(now[0], snap[0], strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                                  b.view(torch.uint8) if b.is_floating_point() else b)
    assert now[1] == snap[1]


def _populated():
    cache = make(num_pages=8, max_seqs=3)
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
    "append bad layer": (lambda c, a, b: c.append(L, [a], *_kv(1)), IndexError, "layer"),
    "append duplicate ids": (lambda c, a, b: c.append(0, [a, a], *_kv(2)), ValueError, "seq_ids"),
    "append freed id": (lambda c, a, b: c.append(0, [2], *_kv(1)), ValueError, "seq_ids"),
    "append k shape": (lambda c, a, b: c.append(0, [a], torch.randn(2, HKV, D), torch.randn(1, HKV, D)),
                       ValueError, "k has shape"),
    "append v heads": (lambda c, a, b: c.append(0, [a], torch.randn(1, HKV, D), torch.randn(1, HKV + 1, D)),
                       ValueError, "v has shape"),
    "append dtype": (lambda c, a, b: c.append(0, [a], *_kv(1, torch.float64)), ValueError, "dtype"),
    "append device": (lambda c, a, b: c.append(0, [a], torch.randn(1, HKV, D, device="meta"),
                                               torch.randn(1, HKV, D)), ValueError, "k is on"),
    "append counts sum": (lambda c, a, b: c.append(0, [a, b], *_kv(3), counts=[1, 1]), ValueError, "k has shape"),
    "append negative count": (lambda c, a, b: c.append(0, [a, b], *_kv(0), counts=[1, -1]), ValueError, "counts"),
    "append pool exhausted": (lambda c, a, b: c.append(0, [a, b], *_kv(40), counts=[20, 20]), ValueError, "counts"),
    "append past max_pages_per_seq": (lambda c, a, b: c.append(0, [a], *_kv(30), counts=[30]), ValueError, "counts"),
    "advance without step": (lambda c, a, b: c.advance([a]), ValueError, "advance"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_requests_leave_cache_unchanged(name):
    fn, exc, words = INVALID[name]
    cache, a, b = _populated()
    snap = snapshot(cache)
    with pytest.raises(exc, match=words):
        fn(cache, a, b)
    assert_same(cache, snap)
    check_invariants(cache)


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
    # poison every slot at or beyond each length, and every free page
    ps = cache.page_size
    valid = torch.zeros(cache.num_pages, ps, dtype=torch.bool)
    for s in live:
        n = cache.length(s)
        for j, p in enumerate(cache._pages[s]):
            valid[p, : min(ps, n - j * ps)] = True
    for pool in (cache.k_pages, cache.v_pages):
        pool[:, ~valid] = float("nan")
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
    # capture the device half of the same rollback on the twin, replay it: same device state
    ids_d = torch.tensor([0, 2, 3], device=dev)
    lens_d = torch.tensor([7, 4, 0], dtype=torch.int32, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            twin._rollback_device(ids_d, lens_d)
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    for a, b in zip(snapshot(cache)[0][2:], snapshot(twin)[0][2:], strict=True):
        assert torch.equal(a, b)
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
    assert cache._pages[4][1] != cache._pages[0][1]
