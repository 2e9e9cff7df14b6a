"""Pure-PyTorch reference attention over a :class:`kfuse.kv.PagedKVCache`: the definition of the ops.

Each sequence's K/V are gathered through the device block table (positions ``< kv_len`` only: a slot
at or beyond a length, or a page the sequence does not reference, is never read), then attention is
computed densely in ``compute_dtype`` (float64 by default) and returned in ``q``'s dtype.

``kv_len`` for a sequence is ``seq_lens[s]`` plus, while a step is open and ``layer`` has appended,
the step's new tokens (:meth:`PagedKVCache.kv_len`), so attention inside a model layer sees the
tokens that layer just appended. These references read device tensors on the host (they sync).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # (kfuse.kv imports the extension's routing; the references need only torch)
    from kfuse.kv import Ids, PagedKVCache

__all__ = ["gather_kv", "paged_decode_attention_reference", "paged_prefill_attention_reference"]


def gather_kv(cache: PagedKVCache, layer: int, seq_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """K, V of ``seq_id`` at ``layer``: ``[length, num_kv_heads, head_dim]`` each, in the cache's dtype,
    gathered through ``cache.block_table`` (``length`` defaults to ``cache.kv_len(layer, seq_id)``)."""
    n = cache.kv_len(layer, seq_id) if length is None else length
    ps = cache.page_size
    if n == 0:
        empty = cache.k_pages.new_empty((0, cache.num_kv_heads, cache.head_dim))
        return empty, empty.clone()
    npages = -(-n // ps)
    pages = cache.block_table[seq_id, :npages].long()
    if bool((pages < 0).any()):
        raise ValueError(f"block table of sequence {seq_id} has no page among its first {npages} entries")
    k = cache.k_pages[layer].index_select(0, pages).reshape(npages * ps, cache.num_kv_heads, cache.head_dim)[:n]
    v = cache.v_pages[layer].index_select(0, pages).reshape(npages * ps, cache.num_kv_heads, cache.head_dim)[:n]
    return k, v


def _attend(q: Tensor, k: Tensor, v: Tensor, q_pos0: int, scale: float, dt: torch.dtype) -> Tensor:
    """q ``[t, Hq, D]`` at positions ``q_pos0 …``; k, v ``[n, Hkv, D]``; causal; returns ``[t, Hq, D]``."""
    t, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    if n == 0:
        return torch.zeros((t, hq, d), dtype=dt, device=q.device)
    g = hq // hkv
    qd = q.to(dt).transpose(0, 1)  # [Hq, t, D]
    kd = k.to(dt).repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, n, D]
    vd = v.to(dt).repeat_interleave(g, dim=1).transpose(0, 1)
    s = (qd @ kd.transpose(1, 2)) * scale  # [Hq, t, n]
    qpos = torch.arange(q_pos0, q_pos0 + t, device=q.device).unsqueeze(1)
    kpos = torch.arange(n, device=q.device).unsqueeze(0)
    s = s.masked_fill(kpos > qpos, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vd).transpose(0, 1)  # [t, Hq, D]


def _check_q(q: Tensor, cache, what: str = "q") -> None:
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"{what} must be [tokens, num_q_heads, head_dim={cache.head_dim}] with num_q_heads a "
                         f"multiple of num_kv_heads={cache.num_kv_heads}; got {tuple(q.shape)}")


def paged_decode_attention_reference(q: Tensor, cache: PagedKVCache, layer: int, seq_ids: Ids,
                                     scale: float | None = None, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Decode attention: one query token per sequence against all ``kv_len`` cached tokens.

    q: ``[B, num_q_heads, head_dim]`` (``num_q_heads`` a multiple of ``num_kv_heads``: grouped-query);
    returns ``[B, num_q_heads, head_dim]`` in ``q.dtype``; ``o[b] = softmax(q[b]·K[b]ᵀ·scale)·V[b]``;
    a sequence of length 0 gives zeros. ``scale`` defaults to ``1/sqrt(head_dim)``."""
    ids = [int(s) for s in seq_ids]
    _check_q(q, cache)
    if q.shape[0] != len(ids):
        raise ValueError(f"q has {q.shape[0]} rows; seq_ids has {len(ids)}")
    scale = 1.0 / math.sqrt(cache.head_dim) if scale is None else scale
    out = []
    for b, s in enumerate(ids):
        k, v = gather_kv(cache, layer, s)
        n = k.shape[0]
        out.append(_attend(q[b:b + 1], k, v, max(n - 1, 0), scale, compute_dtype))
    if not out:
        return q.new_empty(q.shape)
    return torch.cat(out).to(q.dtype)


def paged_prefill_attention_reference(q: Tensor, cache: PagedKVCache, layer: int, seq_ids: Ids, q_lens: Ids,
                                      scale: float | None = None,
                                      compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Prefill / append attention: ``q_lens[i]`` new tokens of ``seq_ids[i]``, packed in ``q``
    ``[sum(q_lens), num_q_heads, head_dim]``, are the last ``q_lens[i]`` of the sequence's ``kv_len``
    tokens; token at position ``p`` attends causally to positions ``0 … p`` (everything cached before
    it and the new tokens up to itself). Returns ``[sum(q_lens), num_q_heads, head_dim]`` in ``q.dtype``."""
    ids = [int(s) for s in seq_ids]
    ql = [int(x) for x in q_lens]
    _check_q(q, cache)
    if len(ql) != len(ids) or sum(ql) != q.shape[0] or any(x < 0 for x in ql):
        raise ValueError(f"q_lens {ql} must have one entry >= 0 per sequence ({len(ids)}) summing to q's "
                         f"{q.shape[0]} rows")
    scale = 1.0 / math.sqrt(cache.head_dim) if scale is None else scale
    out, off = [], 0
    for s, t in zip(ids, ql, strict=True):
        k, v = gather_kv(cache, layer, s)
        n = k.shape[0]
        if t > n:
            raise ValueError(f"q_lens: {t} new tokens for sequence {s} but only {n} are cached (append first)")
        out.append(_attend(q[off:off + t], k, v, n - t, scale, compute_dtype))
        off += t
    if not out:
        return q.new_empty(q.shape)
    return torch.cat(out).to(q.dtype)
