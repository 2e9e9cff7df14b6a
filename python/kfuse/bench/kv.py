"""The paged KV cache in the benchmark report and in pytest-benchmark (:class:`kfuse.report.OpBench`).

Every row's ``ratio`` is its time over the case's basis, beside the target of issue 14 (``target``,
a ratio to stay at or under). Cases (``mode``), all on one layer of a :class:`kfuse.kv.PagedKVCache`:

- ``rollback``: ``cache.rollback`` of 256 sequences at a context length (shape ``(256, ctx)``),
  metadata only. Timed: one ``cache.rollback(ids, new_lens)`` call with CPU int64 tensors (the
  fastest argument form; a Python list adds ~7 µs per 256 ids), host checks and host state included
  (the median wall-clock time of back-to-back calls; on CUDA too, in synchronised rounds of 10 calls:
  ``Candidate.host_bound``; on CUDA the ``device us`` column gives the device time of a call, kernels and
  copies, from the profiler).
  The first (checked) call rolls every sequence back to ``3/4·ctx``; each timed call then takes every
  sequence back by one page (256 pages freed per call: the host half is O(sequences + freed pages),
  the device half the same fixed-shape work whatever is dropped), down to ``ctx/4``, after which one
  call re-appends (one call in ``ctx / 2 / page``, 32 at 1k tokens; the median leaves it out, on CUDA while
  fewer than half the rounds of 10 hold one). The K/V pools of these
  cases have 1 KV head of dim 8 (rollback moves no K/V bytes, so the pool's size does not enter).
  Basis: the target time itself (10 µs on CUDA, 20 µs on the CPU); target ratio 1 (on CUDA a
  conservative reading: the issue's 10 µs is device time, the ``device us`` column). Checked once:
  lengths, block table, refcounts and free list against the expected metadata.
- ``fork``: ``cache.fork(parent, ctx − page/2)`` of a sequence of ``ctx`` tokens (shape ``(1, ctx)``):
  metadata only (the shared, partially filled page is copied by the child's first append, not
  here). Every :data:`FORK_CHILDREN` + 1-th call frees the children instead (the median leaves it
  out). Basis: 10 µs on CUDA (target ratio 1: the issue's fork target, less its page copy), 20 µs
  on the CPU (no target).
- ``append``: one token per sequence for one layer, ``cache.append(0, ids, k, v)`` then
  ``cache.advance(ids)`` (the step of a 1-layer model), at a context length; every
  :data:`APPEND_WRAP`-th call also rolls the sequences back to the case's context (metadata only; so
  the pool does not run out), inside the timed call. Baseline ``cat``: ``torch.cat`` of the new
  token onto a contiguous ``[B, Hkv, T, D]`` K and V (what Hugging Face's ``DynamicCache.update``
  does), at the same context (the result is not kept, so T stays fixed). Basis: ``cat``. Target
  ≤ 1/50 (≥ 50× faster) on CUDA. Checked once: the K/V gathered through the block table equal the
  initial K/V followed by the new token.
- ``decode``: ``kfuse.paged_decode_attention`` (backends ``triton``, ``cpu``) against
  ``scaled_dot_product_attention`` (``sdpa``, ``enable_gqa``) on contiguous ``[B, Hkv, T, D]`` K/V:
  uniform lengths (``ragged=False``: every sequence ``ctx``) or ragged ones (``ragged=True``:
  evenly spread over ``ctx/2 … ctx``; SDPA reads the padded ``ctx`` through a boolean mask). Basis:
  ``sdpa``. Targets (CUDA): uniform ≤ 1/0.9 (≥ 90 % of its throughput), ragged ≤ 1/1.3 (≥ 1.3× its
  useful-bytes throughput: both rows count the same useful bytes); CPU uniform ≤ 1.5.
- ``prefill``: ``kfuse.paged_prefill_attention`` of ``ctx`` new tokens per sequence (the whole
  cached sequence, causal) against SDPA ``is_causal=True`` on the same tokens laid out contiguously.
  Basis: ``sdpa``. Target ≤ 1.3 on CUDA. These are fresh prompts of one length, which the ``triton``
  backend runs on torch's flash attention over the gathered pages (``kfuse.ops.kv._takes_flash``);
  ``triton-kernel`` is the Triton prefill kernel on the same call (the route off), what ragged prompts
  and new tokens behind cached ones run (skipped where Triton cannot run).

Attention rows are checked against a float64 reference on the same (low-precision) K/V; the
``GB/s`` column is :func:`bytes_moved` over the time (useful bytes), and ``%copy`` is that as % of the
copy ceiling measured in the same run.
The ``cpu`` backend of the attention ops is the C++ kernels (``csrc/kv/kv_attention_cpu.cpp``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import kfuse
from kfuse.kv import PagedKVCache
from kfuse.ops import kv as kv_ops
from kfuse.ops.kv import backend_reasons
from kfuse.report import Candidate, Case, Ceilings, backend_skips, device_time_us, scaled_error

NAME = "kv"
#: The kfuse attention backends the report times, in table order (``cuda`` has no KV kernels).
BACKENDS = ("triton", "cpu")
PAGE = 16
ROLLBACK_SEQS = 256
#: The append rows roll the sequences back to the case's context every this many calls.
APPEND_WRAP = 256
#: Children the fork rows make before freeing them all (one call in this many + 1).
FORK_CHILDREN = 64
#: Time targets of the rollback and fork rows (ms): their basis.
ROLLBACK_MS = {"cuda": 0.010, "cpu": 0.020}
_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------- cases


def _case(device: torch.device, dtype: torch.dtype, mode: str, batch: int, ctx: int, hq: int, hkv: int, d: int,
          **extra: Any) -> Case:
    return Case(NAME, (batch, ctx), dtype, mode, device, {"hq": hq, "hkv": hkv, "d": d, **extra})


def cases(device: torch.device, quick: bool) -> list[Case]:
    """CUDA, bf16, 32 query / 8 KV heads, head dim 128, page 16: rollback of 256 sequences at 1k and 32k
    tokens (1k and 4k with ``quick``); fork at the first rollback context; append at batch 32, 4096
    tokens; decode at batch 32, 4096 tokens, uniform and ragged; prefill of 8 × 1024 tokens. CPU, fp32,
    8 / 2 heads, head dim 64: rollback of 256 sequences at 256 and 2k tokens; fork at 256; append,
    decode (uniform, ragged) at batch 8, 512 tokens (``quick``; else 2048); prefill of 2 × 256 tokens;
    then uniform decode in bf16 and fp16 (no target: the issue's CPU target is fp32's)."""
    if device.type == "cuda":
        dt, hq, hkv, d, B, ctx = torch.bfloat16, 32, 8, 128, 32, 4096
        roll = (1024, 4096 if quick else 32768)
        pre = (8, 1024)
    else:
        dt, hq, hkv, d, B, ctx = torch.float32, 8, 2, 64, 8, (512 if quick else 2048)
        roll = (256, 2048)
        pre = (2, 256)
    out = [_case(device, dt, "rollback", ROLLBACK_SEQS, n, 1, 1, 8) for n in roll]
    out.append(_case(device, dt, "fork", 1, roll[0], 1, 1, 8))
    out.append(_case(device, dt, "append", B, ctx, hq, hkv, d))
    out += [_case(device, dt, "decode", B, ctx, hq, hkv, d, ragged=r) for r in (False, True)]
    out.append(_case(device, dt, "prefill", *pre, hq, hkv, d))
    if device.type == "cpu":
        out += [_case(device, half, "decode", B, ctx, hq, hkv, d) for half in (torch.bfloat16, torch.float16)]
    return out


# --------------------------------------------------------------------------- bytes


def seq_lens(case: Case) -> list[int]:
    """Each sequence's length: ``ctx``, or for ragged decode evenly spread over ``ctx/2 … ctx``."""
    B, ctx = case.shape
    if case.params.get("ragged"):
        return [ctx // 2 + (ctx - ctx // 2) * (i + 1) // B for i in range(B)]
    return [ctx] * B


def kv_read_bytes(lens: list[int], hkv: int, d: int, elem: int) -> int:
    """Decode attention's floor: every K and V element below each sequence's length read once,
    ``2 · Σ len · Hkv · D · elem`` (useful bytes; q and o, ``B · Hq · D`` each, are left out)."""
    return 2 * sum(lens) * hkv * d * elem


def append_bytes(batch: int, hkv: int, d: int, elem: int) -> int:
    """Append's floor: one token's K and V written per sequence, ``2 · B · Hkv · D · elem``."""
    return 2 * batch * hkv * d * elem


def prefill_bytes(batch: int, ctx: int, hq: int, hkv: int, d: int, elem: int) -> int:
    """Prefill's floor: K and V read once and q read, o written: ``(2 · Hkv + 2 · Hq) · B · T · D · elem``."""
    return (2 * hkv + 2 * hq) * batch * ctx * d * elem


def bytes_moved(case: Case) -> int | None:
    """:func:`kv_read_bytes` (decode), :func:`append_bytes`, :func:`prefill_bytes`; None for rollback."""
    p, elem = case.params, torch.finfo(case.dtype).bits // 8
    if case.mode == "decode":
        return kv_read_bytes(seq_lens(case), p["hkv"], p["d"], elem)
    if case.mode == "append":
        return append_bytes(case.shape[0], p["hkv"], p["d"], elem)
    if case.mode == "prefill":
        return prefill_bytes(*case.shape, p["hq"], p["hkv"], p["d"], elem)
    return None


def flops(case: Case) -> int | None:
    """Attention's ``4 · Hq · D`` per (query, key) pair (causal prefill: half the square); None otherwise."""
    p = case.params
    if case.mode == "decode":
        return 4 * p["hq"] * p["d"] * sum(seq_lens(case))
    if case.mode == "prefill":
        B, T = case.shape
        return 4 * p["hq"] * p["d"] * B * T * (T + 1) // 2
    return None


def target(case: Case) -> float | None:
    """The kfuse rows' target ratio (time / basis): see the module docstring."""
    cuda = case.device.type == "cuda"
    if not cuda and case.dtype != torch.float32:
        return None
    if case.mode == "rollback":
        return 1.0
    if case.mode == "fork":
        return 1.0 if cuda else None
    if case.mode == "append":
        return 1 / 50 if cuda else None
    if case.mode == "decode":
        if case.params.get("ragged"):
            return 1 / 1.3 if cuda else None
        return 1 / 0.9 if cuda else 1.5
    return 1.3 if cuda else None


def ratio_basis(case: Case, times: dict[str, float], ceilings: Ceilings) -> tuple[float, str] | None:
    """Rollback, fork: the target time (10 µs CUDA, 20 µs CPU); append: ``cat``; attention: ``sdpa``."""
    if case.mode in ("rollback", "fork"):
        ms = ROLLBACK_MS["cuda" if case.device.type == "cuda" else "cpu"]
        return ms, f"{ms * 1e3:.0f}us"
    name = "cat" if case.mode == "append" else "sdpa"
    return (times[name], name) if name in times else None


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """A case's cache (one layer, ``lens`` committed), ``ids``, the contiguous ``k``, ``v``
    ``[B, Hkv, T, D]`` it holds (T = max length, zero past a length), and ``q`` (decode ``[B, Hq, D]``,
    prefill packed ``[B·T, Hq, D]``), ``k1``, ``v1`` ``[B, Hkv, D]`` (append's new token)."""

    cache: PagedKVCache
    ids: list[int]
    lens: list[int]
    k: Tensor
    v: Tensor
    q: Tensor | None = None
    k1: Tensor | None = None
    v1: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)


def make_inputs(case: Case, seed: int) -> Inputs:
    """A cache with pages for the case (plus :data:`APPEND_WRAP` tokens per sequence for append),
    filled by one ``append`` of every sequence's tokens (K, V ~ N(0, 1)); q ~ N(0, 1)."""
    dev, dt, p = case.device, case.dtype, case.params
    B, ctx = case.shape
    lens = seq_lens(case)
    T = max(lens)
    spare = APPEND_WRAP if case.mode == "append" else 0
    per_seq = -(-(T + spare) // PAGE)
    slots = B + (FORK_CHILDREN if case.mode == "fork" else 0)
    cache = PagedKVCache(1, p["hkv"], p["d"], PAGE, B * per_seq, slots, dtype=dt, device=dev,
                         max_pages_per_seq=per_seq)
    ids = [cache.add_sequence() for _ in range(B)]
    gen = torch.Generator(dev).manual_seed(seed)
    k = torch.randn(B, p["hkv"], T, p["d"], generator=gen, device=dev).to(dt)
    v = torch.randn(B, p["hkv"], T, p["d"], generator=gen, device=dev).to(dt)
    mask = torch.arange(T, device=dev) < torch.tensor(lens, device=dev).unsqueeze(1)  # [B, T]
    k.mul_(mask[:, None, :, None])
    v.mul_(mask[:, None, :, None])
    packed = mask.flatten()
    cache.append(0, ids, k.transpose(1, 2).flatten(0, 1)[packed], v.transpose(1, 2).flatten(0, 1)[packed], lens)
    cache.advance(ids, lens)
    inp = Inputs(cache, ids, lens, k, v)
    if case.mode == "decode":
        inp.q = torch.randn(B, p["hq"], p["d"], generator=gen, device=dev).to(dt)
    elif case.mode == "prefill":
        inp.q = torch.randn(B * T, p["hq"], p["d"], generator=gen, device=dev).to(dt)
    elif case.mode == "append":
        inp.k1 = torch.randn(B, p["hkv"], p["d"], generator=gen, device=dev).to(dt)
        inp.v1 = torch.randn(B, p["hkv"], p["d"], generator=gen, device=dev).to(dt)
    return inp


def gathered(cache: PagedKVCache, seq_id: int) -> tuple[Tensor, Tensor]:
    """Layer 0's K and V of ``seq_id`` ``[len, Hkv, D]``, read through the block table (host mirror)."""
    n = cache.length(seq_id)
    pages = cache.block_table[seq_id, : -(-n // cache.page_size)].long()
    kk = cache.k_pages[0].index_select(0, pages).flatten(0, 1)[:n]
    vv = cache.v_pages[0].index_select(0, pages).flatten(0, 1)[:n]
    return kk, vv


# --------------------------------------------------------------------------- candidates


def _rollback_run(inp: Inputs, ctx: int) -> Callable[[], Any]:
    cache, B = inp.cache, len(inp.ids)
    ids = torch.tensor(inp.ids)
    first = ctx - ctx // 4
    # The timed calls take every sequence back by one page (B pages freed per call), down to ctx // 4,
    # then one call re-appends up to `first` (one call in len(steps) + 1: the median skips it).
    steps = [torch.full((B,), n) for n in range(first - PAGE, ctx // 4 - 1, -PAGE)]
    refill = steps[-1][0].item() if steps else first
    fill = torch.zeros(B * (first - refill), cache.num_kv_heads, cache.head_dim, dtype=cache.dtype,
                       device=cache.device)

    def run() -> Any:
        st = inp.state
        if not st.get("rolled"):
            st["rolled"], st["i"] = True, 0
            cache.rollback(ids, torch.full((B,), first))
            return "checked"
        if st["i"] == len(steps):
            cache.append(0, ids, fill, fill, [first - refill] * B)
            cache.advance(ids, [first - refill] * B)
            st["i"] = 0
            return None
        cache.rollback(ids, steps[st["i"]])
        st["i"] += 1
        return None

    return run


def _rollback_error(case: Case, inp: Inputs) -> Callable[[Any], float]:
    """0 when the metadata after the first rollback is the expected one (else 1)."""
    def check(result: Any) -> float:
        c, n = inp.cache, case.shape[1] - case.shape[1] // 4
        keep = -(-n // PAGE)
        ok = result == "checked" and c.seq_lens[inp.ids].tolist() == [n] * len(inp.ids)
        bt = c.block_table[inp.ids]
        ok = ok and bool((bt[:, :keep] >= 0).all()) and bool((bt[:, keep:] == -1).all())
        rc = torch.zeros(c.num_pages, dtype=torch.int32, device=c.device)
        used = bt[bt >= 0].long()
        rc.scatter_add_(0, used, torch.ones_like(used, dtype=torch.int32))
        ok = ok and torch.equal(rc, c.page_refcount) and int(c.free_top) == c.num_pages - used.numel()
        free = c.free_stack[: int(c.free_top)].long()
        host_free = c._h_free[: int(c._h_top[0])].tolist()
        ok = ok and bool((rc[free] == 0).all()) and sorted(free.tolist()) == sorted(host_free)
        return 0.0 if ok else 1.0
    return check


def _fork_run(inp: Inputs, ctx: int) -> Callable[[], Any]:
    cache, parent = inp.cache, inp.ids[0]
    at = ctx - PAGE // 2  # mid-page: the child's first append would copy that page
    children: list[int] = []

    def run() -> Any:
        if len(children) == FORK_CHILDREN:
            for c in children:
                cache.free(c)
            children.clear()
            return None
        children.append(cache.fork(parent, at))
        return children[-1]

    return run


def _fork_error(inp: Inputs) -> Callable[[Any], float]:
    """0 when the first child shares the parent's pages below its length, and their refcounts are 2."""
    def check(child: Any) -> float:
        c, parent = inp.cache, inp.ids[0]
        keep = -(-c.length(child) // PAGE)
        shared = c.block_table[parent, :keep]
        ok = torch.equal(c.block_table[child, :keep], shared) and bool((c.block_table[child, keep:] == -1).all())
        ok = ok and bool((c.page_refcount[shared.long()] == 2).all())
        return 0.0 if ok else 1.0
    return check


def _append_run(inp: Inputs, ctx: int) -> Callable[[], Any]:
    cache, ids, k1, v1 = inp.cache, inp.ids, inp.k1, inp.v1
    inp.state["calls"] = 0

    def run() -> Any:
        if inp.state["calls"] == APPEND_WRAP:
            cache.rollback(ids, [ctx] * len(ids))
            inp.state["calls"] = 0
        cache.append(0, ids, k1, v1)
        cache.advance(ids)
        inp.state["calls"] += 1
        return cache

    return run


def _append_error(inp: Inputs) -> Callable[[Any], float]:
    """0 when every sequence's gathered K/V equal the initial K/V then the new token (first call)."""
    def check(cache: Any) -> float:
        ok = True
        for b, s in enumerate(inp.ids):
            kk, vv = gathered(cache, s)
            n = inp.lens[b]
            ok = ok and kk.shape[0] == n + 1
            ok = ok and torch.equal(kk[:n], inp.k[b, :, :n].transpose(0, 1)) and torch.equal(kk[n], inp.k1[b])
            ok = ok and torch.equal(vv[:n], inp.v[b, :, :n].transpose(0, 1)) and torch.equal(vv[n], inp.v1[b])
        return 0.0 if ok else 1.0
    return check


def _cat_error(inp: Inputs) -> Callable[[Any], float]:
    def check(result: Any) -> float:
        kc, vc = result
        ok = torch.equal(kc[:, :, -1], inp.k1) and torch.equal(vc[:, :, -1], inp.v1)
        ok = ok and torch.equal(kc[:, :, :-1], inp.k) and torch.equal(vc[:, :, :-1], inp.v)
        return 0.0 if ok else 1.0
    return check


def _attn_candidates(case: Case, inp: Inputs) -> list[Candidate]:
    q, ids, cache = inp.q, inp.ids, inp.cache
    op = "paged_decode_attention" if case.mode == "decode" else "paged_prefill_attention"
    skips = backend_skips(backend_reasons(q, op), case.device)
    out = []
    for name in BACKENDS:
        if skips[name]:
            out.append(Candidate(name, "backend", skip=skips[name]))
        elif case.mode == "decode":
            out.append(Candidate(name, "backend", functools.partial(
                kfuse.paged_decode_attention, q, cache, 0, ids, backend=name)))
        else:
            out.append(Candidate(name, "backend", functools.partial(
                kfuse.paged_prefill_attention, q, cache, 0, ids, inp.lens, backend=name)))
    if case.mode == "prefill":
        out.append(_triton_kernel(q, cache, ids, inp.lens, skips["triton"]))
    B, T = case.shape
    k, v = inp.k, inp.v
    extra = None
    if case.mode == "decode":
        q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
        mask = None
        if case.params.get("ragged"):
            mask = (torch.arange(T, device=q.device) < torch.tensor(inp.lens, device=q.device).unsqueeze(1))
            mask = mask[:, None, None, :]  # [B, 1, 1, T]

        def call(k: Tensor, v: Tensor, gqa: bool = True) -> Tensor:
            return F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, enable_gqa=gqa).squeeze(2)
    else:
        q4 = q.view(B, T, -1, q.shape[-1]).transpose(1, 2)  # [B, Hq, T, D] (a view)

        def call(k: Tensor, v: Tensor, gqa: bool = True) -> Tensor:
            o = F.scaled_dot_product_attention(q4, k, v, is_causal=True, enable_gqa=gqa)
            return o.transpose(1, 2).flatten(0, 1)  # packed [B·T, Hq, D] (a view)
    if q.is_cuda:
        sdpa, extra = _fused_sdpa(call, q4, k, v)
    else:
        sdpa = functools.partial(call, k, v)
    out.append(Candidate("sdpa", "baseline", sdpa, extra=extra))
    return out


def _triton_kernel(q: Tensor, cache: PagedKVCache, ids: list[int], q_lens: list[int], skip: str | None) -> Candidate:
    """``triton-kernel``: the triton backend's prefill with its flash route off (``_FLASH_MIN_Q_LEN`` past any
    length), i.e. the Triton prefill kernel on the case's call."""
    if skip:
        return Candidate("triton-kernel", "baseline", skip=skip)

    def kernel() -> Tensor:
        bound, kv_ops._FLASH_MIN_Q_LEN = kv_ops._FLASH_MIN_Q_LEN, 1 << 30
        try:
            return kfuse.paged_prefill_attention(q, cache, 0, ids, q_lens, backend="triton")
        finally:
            kv_ops._FLASH_MIN_Q_LEN = bound

    return Candidate("triton-kernel", "baseline", kernel)


def _fused_sdpa(call: Callable[..., Tensor], q4: Tensor, k: Tensor,
                v: Tensor) -> tuple[Callable[[], Tensor], Callable[[float], dict[str, float]] | None]:
    """The attention baseline on CUDA (``call(k, v, gqa=True)``: SDPA on contiguous K/V), held to SDPA's
    fused kernels (flash, memory-efficient, cuDNN), so that it is never the math fallback (fp32, K/V
    expanded per query head) by accident. Where none takes GQA (with a mask, the ragged decode, on some
    torch versions), K and V repeated per query head once, outside the timed call (what Hugging Face's
    ``repeat_kv`` does inside it), then the fused kernels, and the row says so (``K/V repeated`` = 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def gqa() -> Tensor:
        with sdpa_kernel(fused):
            return call(k, v)
    try:
        gqa()
        return gqa, None
    except RuntimeError:
        pass
    g = q4.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def repeated() -> Tensor:
        with sdpa_kernel(fused):
            return call(kr, vr, gqa=False)
    return repeated, lambda _ms: {"K/V repeated": 1.0}


def _device_us(run: Callable[[], Any], case: Case) -> Callable[[float], dict[str, float]]:
    """The ``device us`` column of a host-bound row on CUDA (the issue's rollback and fork targets are in
    device time; the row's time is the wall clock, host work included)."""
    def extra(_ms: float) -> dict[str, float]:
        us = device_time_us(run, case.device)
        return {} if us is None else {"device us": us}

    return extra


def candidates(case: Case, inputs: Inputs) -> list[Candidate]:
    """Rollback, append: ``kfuse`` (the cache's own operations); append also ``cat``. Attention: the
    kfuse backends (skipped with the reason where they cannot run), then ``sdpa``."""
    ctx = case.shape[1]
    if case.mode == "rollback":
        run = _rollback_run(inputs, ctx)
        return [Candidate("kfuse", "backend", run, error=_rollback_error(case, inputs), host_bound=True,
                          extra=_device_us(run, case))]
    if case.mode == "fork":
        run = _fork_run(inputs, ctx)
        return [Candidate("kfuse", "backend", run, error=_fork_error(inputs), host_bound=True,
                          extra=_device_us(run, case))]
    if case.mode == "append":
        k, v, k1, v1 = inputs.k, inputs.v, inputs.k1.unsqueeze(2), inputs.v1.unsqueeze(2)
        run = _append_run(inputs, ctx)
        return [Candidate("kfuse", "backend", run, error=_append_error(inputs), host_bound=True,
                          extra=_device_us(run, case)),
                Candidate("cat", "baseline", lambda: (torch.cat([k, k1], 2), torch.cat([v, v1], 2)),
                          error=_cat_error(inputs))]
    return _attn_candidates(case, inputs)


def reference(case: Case, inputs: Inputs) -> Tensor | None:
    """Attention in float64 over the contiguous K/V (positions below each length; prefill causal),
    grouped-query heads sharing their KV head; None for rollback and append (checked by their own
    ``error``)."""
    if case.mode not in ("decode", "prefill"):
        return None
    B, T = case.shape
    hq, hkv, d = case.params["hq"], case.params["hkv"], case.params["d"]
    g = hq // hkv
    k, v = inputs.k.double(), inputs.v.double()  # [B, Hkv, T, D]
    if case.mode == "decode":
        q = inputs.q.double().view(B, hkv, g, 1, d)
        valid = torch.arange(T, device=k.device) < torch.tensor(inputs.lens, device=k.device).unsqueeze(1)
        valid = valid[:, None, None, None, :]  # [B, 1, 1, 1, T]
    else:
        q = inputs.q.double().view(B, T, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
        valid = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
    s = torch.einsum("bhgqd,bhtd->bhgqt", q, k) / math.sqrt(d)
    o = torch.einsum("bhgqt,bhtd->bhgqd", s.masked_fill(~valid, -math.inf).softmax(-1), v)
    if case.mode == "decode":
        return o.reshape(B, hq, d)
    return o.permute(0, 3, 1, 2, 4).reshape(B * T, hq, d)


def error(case: Case, result: Any, expected: Any) -> float:
    """``max |r − r64| / max |r64|`` of the attention output."""
    return scaled_error(result, expected)


def tolerance(case: Case) -> float:
    """Attention: 1e-4 fp32, 4e-3 fp16, 2e-2 bf16; rollback, append: 0 (exact)."""
    return _TOL[case.dtype] if case.mode in ("decode", "prefill") else 0.0


def names(case: Case) -> list[str]:
    """The candidates' names for ``case``, in table order (``bench/bench_kv.py`` parametrizes on them)."""
    if case.mode in ("rollback", "fork"):
        return ["kfuse"]
    if case.mode == "append":
        return ["kfuse", "cat"]
    return [*BACKENDS, *(["triton-kernel"] if case.mode == "prefill" else []), "sdpa"]

