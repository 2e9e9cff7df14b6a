"""Triton kernels for attention over a paged KV cache (see python/kfuse/kv.py and the definition in
python/kfuse/reference/kv.py).

Decode attention, one new query token per sequence::

    o[b, h] = softmax(q[b, h] · K[b, :n]ᵀ · scale) · V[b, :n],   n = lens[b]

K/V of sequence ``b`` live in the pools ``[num_pages, page_size, num_kv_heads, head_dim]`` (one
layer's slice of the cache) at ``pool[block_table[seq_ids[b], pos // page_size], pos % page_size]``.

Two kernels:

``_decode_split_kernel``  grid (B, num_kv_heads, num_splits). One program takes one sequence, one KV
                          head and one split of ``split_tokens`` positions, and processes the G query
                          heads of that KV head together (grouped-query attention: each K/V tile is
                          loaded once for all G heads, and ``q [G, D] · Kᵀ`` is one ``tl.dot``, G padded
                          to 16 rows, the smallest MMA). Online softmax in fp32 (exp2 with the log2(e)
                          folded into the scale); writes the split's normalised partial output and its
                          running max and sum (fp32). A split past the length writes nothing (the merge reads
                          only the splits below it): a grid sized for a longer ``max_len`` (a captured
                          decode step's) costs its extra programs' launch, not their writes.
``_decode_merge_kernel``  grid (B, num_q_heads). Merges the splits of one head in split order, one by
                          one (a fixed order: deterministic, no atomics), only those below the length.

Why split along the sequence: at batch 32 × 8 KV heads the (sequence, head) grid alone is 256
programs, about two per SM; long contexts need more programs in flight to reach HBM bandwidth.

Determinism and batch isolation: ``split_tokens`` and ``BLOCK_N`` are constants of the process
(not derived from the batch or from the longest sequence), so the positions a program sums and
their order depend only on the sequence's own length. Rolling back, forking or freeing another
sequence (which changes the grid's number of splits) leaves a sequence's output bit-identical.
(Up to 65535 splits, 16.8M tokens at 256: past them, a CUDA grid's limit, the split grows with
``max_len``, see :func:`decode_splits`.)

Never reads a slot at or past the length, nor a page the table does not give: every K/V and
block-table load is masked by ``pos < end`` (and ``page >= 0``); masked scores are −inf, so
garbage (NaN poison) in unread slots cannot reach the output. Length 0 gives zeros.

dtypes: q, K, V float16, bfloat16 or float32 (the same); accumulation fp32; fp32 dots in ``ieee``
precision (decode is bandwidth-bound: tf32 would only lose accuracy), half dots native.
Block sizes are fixed guesses for H100/H200 (tune on the GPU, see ``BLOCK_N``/``SPLIT_TOKENS``).

Prefill / append attention (``_prefill_kernel``), several causal queries per sequence, packed: grid
(sequences, KV heads, blocks of TOK new tokens, the last block first); a program's BLOCK_M rows are its
TOK tokens × the G query heads of its KV head (row = token · G + head), and each K/V tile it loads serves the G heads
(grouped-query attention, as the decode kernel). For a long prompt that is as many tile loads and
dots as one head's BLOCK_M tokens a program; a short append (fewer than BLOCK_M tokens, e.g. a few
tokens after a rollback) fills the MMA's rows with the group's heads instead of leaving them empty
(one new token: 1 row of 64 used before, G now; not yet measured on a GPU). Each program runs an
online softmax over the key tiles up to its block's last query position (tiles past it are never
visited): first the tiles wholly before its first query position, which every row sees (no causal
mask: FlashAttention-2's split), then the diagonal ones with the causal and length masks per row. Not
split along the sequence (prompts give enough query blocks).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kfuse._backends import cdiv, next_pow2, on_input_device
from kfuse.triton_kernels import INTERPRETED

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

# Positions per inner tile. 64 on a GPU (a first guess: 64 × 128 fp16 = 16 KB per K tile); 16, the
# smallest tl.dot size, under the interpreter so tiny tests cross several tiles.
BLOCK_N = 16 if INTERPRETED else 64
# Positions per split: a process-wide constant (a multiple of BLOCK_N), NOT derived from the batch,
# so the summation order of a sequence never depends on the others (see the module docstring).
# 256 gives 16 splits at 4096 tokens: 32 × 8 × 16 = 4096 programs at the spec's benchmark shape.
SPLIT_TOKENS = 256
# CUDA caps a grid's y and z at 65535 programs: the splits (z) of a longer max_len (a grid sized for
# the pool's capacity under torch.compile: 16.8M tokens at 256) would fail to launch.
_MAX_GRID_Z = 65535


def decode_splits(max_len: int, split: int) -> tuple[int, int]:
    """``(split, num_splits)`` for contexts up to ``max_len``: ``split`` positions per split, grown (in
    multiples of ``BLOCK_N``) only where ``max_len`` would need more than 65535 splits."""
    if cdiv(max_len, split) > _MAX_GRID_Z:
        split = cdiv(max_len, _MAX_GRID_Z * BLOCK_N) * BLOCK_N
    return split, max(1, cdiv(max_len, split))


def _unit_inner_strides(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor) -> tuple[Tensor, Tensor]:
    """(q, block_table) with unit innermost strides (copies of these small tensors if needed); the
    pools must have them already (they are never copied)."""
    if k_pages.stride(3) != 1 or v_pages.stride(3) != 1:
        raise ValueError("k_pages/v_pages need unit stride along head_dim")
    q = q.contiguous() if q.stride(2) != 1 else q
    return q, block_table.contiguous() if block_table.stride(1) != 1 else block_table


@triton.jit
def _online_softmax_tile(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """One key tile of the online softmax (base 2): scores ``s [rows, BLOCK_N]`` (−inf where masked;
    already scaled by log2(e)·scale), values ``v [BLOCK_N, D]``; returns the updated running max
    ``m_i``, sum ``l_i`` and output ``acc`` (fp32). A row with no valid key yet (causal, padding)
    keeps a max of −inf and contributes nothing: its max is taken as 0 for the exponentials."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _kv_tile(k_ptr, v_ptr, page, pos, valid, h, d, dm, skp, sks, skh, svp, svs, svh, PAGE: tl.constexpr):
    """K and V ``[BLOCK_N, BLOCK_D]`` of KV head h at positions ``pos`` (pages ``page``), zeros where not
    ``valid`` (never dereferenced there)."""
    page = tl.maximum(page, 0).to(tl.int64)
    slot = pos % PAGE
    lm = valid[:, None] & dm[None, :]
    k = tl.load(k_ptr + page[:, None] * skp + slot[:, None] * sks + h * skh + d[None, :], mask=lm, other=0.0)
    v = tl.load(v_ptr + page[:, None] * svp + slot[:, None] * svs + h * svh + d[None, :], mask=lm, other=0.0)
    return k, v


@triton.jit
def _row_and_length(ids_ptr, lens_ptr, b, max_seqs, cap):
    """Sequence b's block-table row (int64) and length. Values the public ops never pass (they give the cache's
    own; a direct call of the registered op may) are read as an empty sequence, never out of bounds: a row
    outside ``[0, max_seqs)`` gives length 0, a length is cut to ``[0, cap]`` (the row's capacity; bad-input
    fuzz, 2026-12-05: such values read past the block table and the pools, a segfault under the interpreter)."""
    row = tl.load(ids_ptr + b)
    ok = (row >= 0) & (row < max_seqs)
    n = tl.where(ok, tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), cap), 0)
    return tl.where(ok, row, 0).to(tl.int64), n


# The bounds _row_and_length takes are not specialised: Triton compiles a variant per argument equal to 1 or
# divisible by 16, and these vary by cache (and total_q by call), so first calls would compile (seconds each)
# for no gain in a comparison.
@triton.jit(do_not_specialize=["max_seqs", "cap", "num_pages"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ids_ptr, lens_ptr, po_ptr, pml_ptr,
                         sqb, sqh, skp, sks, skh, svp, svs, svh, sbt, num_splits, split_tokens, qk_scale,
                         max_seqs, cap, num_pages,
                         G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """One (sequence b, KV head h, split sp): partial attention of query heads h·G … h·G+G−1 over
    positions [sp·split_tokens, min((sp+1)·split_tokens, lens[b])).

    q [B, Hq, D] (unit stride along D); k, v [num_pages, PAGE, Hkv, D] (unit stride along D);
    bt int32 [max_seqs, max_pages] (cap = max_pages · PAGE); ids int32 [B] (rows of bt); lens int32 [B] (see
    _row_and_length); num_pages: the pools' (a table entry outside [0, num_pages) is never dereferenced);
    po fp32 [B, Hq, num_splits, D] (normalised partial outputs); pml fp32 [B, Hq, num_splits, 2] (the max
    m and the sum l of 2^(s − m) over the split's scaled scores s; splits past the length are not written).
    qk_scale = scale · log2(e).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    row, n = _row_and_length(ids_ptr, lens_ptr, b, max_seqs, cap)
    start = sp * split_tokens
    end = tl.minimum(start + split_tokens, n)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    heads = h * G + g
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for blk in range(start, end, BLOCK_N):
        pos = blk + tl.arange(0, BLOCK_N)
        valid = pos < end
        # The table entry of each position; masked so no entry past the length is read.
        page = tl.load(bt_ptr + row * sbt + pos // PAGE, mask=valid, other=-1)
        valid = valid & (page >= 0) & (page < num_pages)  # a hole or a bad entry is never dereferenced
        k, v = _kv_tile(k_ptr, v_ptr, page, pos, valid, h, d, dm, skp, sks, skh, svp, svs, svh, PAGE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_G, BLOCK_N] fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_tile(s, v, m_i, l_i, acc, PREC)

    # A split below the length holds at least one position, so l_i > 0 unless its scores are NaN or all
    # -inf (NaN/inf in q or K). NaN ones give a NaN weight, and the merged output is NaN, as softmax gives;
    # an all -inf split stores o = 0 with l = 0, so it weighs 0 in the merge (its 0/0 made the output NaN
    # though other splits held finite scores; numerical hunt), and all -inf splits give NaN there.
    # m and l are stored apart, not as one log-sum-exp m + log2(l): at scores past ~1e5 (log2 units) the
    # fp32 sum rounded log2(l) away, and splits were weighed by their max alone (0.5 for 0.147 at 6.4e7,
    # ties across two splits; half-precision hunt, 2026-12-05).
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    part = (b.to(tl.int64) * (G * tl.num_programs(1)) + heads) * num_splits + sp  # [BLOCK_G]
    # A split past the length is not written: the merge reads only those below it. (Masked stores, not
    # an early return: under Triton 3.6 the return took this kernel from 113 to 168 registers.)
    live = gm & (start < n)
    tl.store(pml_ptr + 2 * part, m_i, mask=live)
    tl.store(pml_ptr + 2 * part + 1, l_i, mask=live)
    tl.store(po_ptr + part[:, None] * D + d[None, :], o, mask=live[:, None] & dm[None, :])


@triton.jit(do_not_specialize=["max_seqs", "cap"])  # (see _decode_split_kernel)
def _decode_merge_kernel(po_ptr, pml_ptr, ids_ptr, lens_ptr, out_ptr, sob, soh, Hq, num_splits, split_tokens,
                         max_seqs, cap, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (sequence b, query head hq): ``out = Σ_s w_s·po_s / Σ_s w_s``, ``w_s = 2^(m_s − max m)·l_s``,
    over the splits below the length, in split order. out [B, Hq, D] in q's dtype; zeros when the
    length is 0."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    _, n = _row_and_length(ids_ptr, lens_ptr, b, max_seqs, cap)  # the split kernel's length
    used = tl.minimum((n + split_tokens - 1) // split_tokens, num_splits)
    base = (b.to(tl.int64) * Hq + hq) * num_splits
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m = tl.full([], float("-inf"), tl.float32)
    for sp in range(0, used):
        m = tl.maximum(m, tl.load(pml_ptr + 2 * (base + sp)))
    l_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for sp in range(0, used):
        # Every split below the length holds at least one position: its m is finite unless the scores
        # were NaN (a NaN weight: the output is NaN) or all -inf (l = 0, weight 0; -inf - -inf, NaN, when
        # every split's are, as softmax gives).
        w = tl.exp2(tl.load(pml_ptr + 2 * (base + sp)) - m) * tl.load(pml_ptr + 2 * (base + sp) + 1)
        l_sum += w
        acc += w * tl.load(po_ptr + (base + sp) * D + d, mask=dm, other=0.0)
    o = tl.where(used > 0, acc / tl.where(used > 0, l_sum, 1.0), 0.0)
    tl.store(out_ptr + b.to(tl.int64) * sob + hq * soh + d, o.to(out_ptr.dtype.element_ty), mask=dm)


def decode_config(group: int, head_dim: int) -> tuple[int, int, int, int]:
    """``(BLOCK_G, BLOCK_D, num_warps, num_stages)`` for ``group`` query heads per KV head and ``head_dim``.

    The stages set how far the K/V loads run ahead of the dots, and the shared memory a program holds
    (so how many share an SM). Triton's pipeliner gives the block-table load that feeds the K/V
    addresses a stage of its own, so at Triton's default of 3 the K/V tiles are single-buffered and
    each iteration waits for every copy in flight (``async_wait {num = 0}``): a program's next tile
    does not load while it computes this one. At 5 they are double-buffered and the wait leaves 4
    copies in flight. sm_90a, bf16, G 4, d 128, BLOCK_N 64 (``bench/ptxas_kv.py``, Triton 3.8 / 3.6): 3
    stages 38 KB of shared memory, 80 / 116 registers; 5 stages 71 KB, 96 / 124. Not yet timed against
    each other: ``bench/tune_kv.py`` sweeps them."""
    block_g = max(16, next_pow2(group))  # tl.dot needs >= 16 rows
    block_d = max(16, next_pow2(head_dim))
    return block_g, block_d, 4, 3


@on_input_device
def paged_decode(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_ids: Tensor, lens: Tensor,
                 max_len: int, scale: float, split_tokens: int | None = None) -> Tensor:
    """Decode attention over one layer's pages.

    Args:
        q: ``[B, Hq, D]``, float16/bfloat16/float32; Hq a multiple of Hkv.
        k_pages, v_pages: ``[num_pages, page_size, Hkv, D]`` (one layer of the cache's pools), q's dtype.
        block_table: int32 ``[max_seqs, max_pages]``; seq_ids: int32 ``[B]`` (rows of it);
        lens: int32 ``[B]``, the lengths to attend over (each ``<= max_len``).
        max_len: a host-side upper bound on ``lens`` (sizes the grid only; no device read).
        scale: softmax scale.
        split_tokens: positions per split (default :data:`SPLIT_TOKENS`; a multiple of ``BLOCK_N``), grown
            where ``max_len`` would need more than 65535 splits (a CUDA grid's limit).
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    B, Hq, D = q.shape
    Hkv = k_pages.shape[2]
    G = Hq // Hkv
    split = SPLIT_TOKENS if split_tokens is None else split_tokens
    if split % BLOCK_N:
        raise ValueError(f"split_tokens ({split}) must be a multiple of BLOCK_N ({BLOCK_N})")
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    q, block_table = _unit_inner_strides(q, k_pages, v_pages, block_table)
    split, num_splits = decode_splits(max_len, split)
    po = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    pml = torch.empty((B, Hq, num_splits, 2), dtype=torch.float32, device=q.device)
    block_g, block_d, warps, stages = decode_config(G, D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # half operands ignore it (native MMA)
    cap = block_table.shape[1] * k_pages.shape[1]
    _decode_split_kernel[(B, Hkv, num_splits)](
        q, k_pages, v_pages, block_table, seq_ids, lens, po, pml,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_table.stride(0),
        num_splits, split, scale * _LOG2E, block_table.shape[0], cap, k_pages.shape[0],
        G=G, D=D, PAGE=k_pages.shape[1], BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    _decode_merge_kernel[(B, Hq)](po, pml, seq_ids, lens, out, out.stride(0), out.stride(1), Hq, num_splits, split,
                                  block_table.shape[0], cap, D=D, BLOCK_D=block_d, num_warps=1)
    return out


@triton.jit
def _append_kernel(k_ptr, v_ptr, kp_ptr, vp_ptr, slots_ptr, skt, skh, svt, svh, H: tl.constexpr, D: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Token t's K and V rows (``[H, D]``, any strides with a unit one along D) to flat slot ``slots[t]`` of
    one layer's pools (contiguous ``[num_slots, H, D]``), BLOCK elements of the row per program."""
    t = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = e < H * D
    h = e // D
    d = e % D
    dst = tl.load(slots_ptr + t) * (H * D) + e
    tl.store(kp_ptr + dst, tl.load(k_ptr + t.to(tl.int64) * skt + h * skh + d, mask=m), mask=m)
    tl.store(vp_ptr + dst, tl.load(v_ptr + t.to(tl.int64) * svt + h * svh + d, mask=m), mask=m)


@on_input_device
def paged_append(k_pool: Tensor, v_pool: Tensor, slots: Tensor, k: Tensor, v: Tensor) -> None:
    """``k_pool.view(-1, H, D)[slots] = k`` and the same for V, in one launch (two ``index_copy_`` took
    two; a decode step of a 16-layer model launches one per layer instead of two).

    Args:
        k_pool, v_pool: one layer's pools ``[num_pages, page_size, H, D]``, contiguous.
        slots: int64 ``[total]``, distinct flat slots ``page · page_size + slot`` (not checked: the
            cache's plan gives them), any stride.
        k, v: ``[total, H, D]``, the pools' dtype and device, unit stride along D.
    """
    total, H, D = k.shape
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("paged_append: the pools must be contiguous")
    if k.stride(2) != 1 or v.stride(2) != 1:
        k, v = k.contiguous(), v.contiguous()
    slots = slots.contiguous()  # the kernel reads slots[t] at t (a column view is strided)
    if total == 0:
        return
    block = min(next_pow2(H * D), 1024)
    _append_kernel[(total, cdiv(H * D, block))](k, v, k_pool, v_pool, slots, k.stride(0), k.stride(1), v.stride(0),
                                               v.stride(1), H=H, D=D, BLOCK=block, num_warps=4)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


@triton.jit(do_not_specialize=["max_seqs", "cap", "num_pages", "total_q"])  # (see _decode_split_kernel)
def _prefill_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ids_ptr, lens_ptr, qlens_ptr, qstart_ptr, out_ptr,
                    sqt, sqh, skp, sks, skh, svp, svs, svh, sbt, sot, soh, qk_scale, max_seqs, cap, num_pages,
                    total_q, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                    TOK: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """One (sequence i, KV head h, block of TOK of its new tokens): causal attention over the block
    table for the TOK tokens × G query heads h·G … h·G + G − 1 (BLOCK_M >= TOK·G rows, row = token·G +
    head). The sequence's t = qlens[i] new tokens are its last t of n = lens[i] positions, packed in q
    from row qstart[i]; new token j sits at position n − t + j and attends to positions 0 … it.

    q, out [total_q, Hq, D] (unit stride along D); k, v, bt, ids, lens as in ``_decode_split_kernel``;
    qlens, qstart int32 [num_seqs]; max_seqs, cap, num_pages as there; total_q = q's rows. Online softmax in
    fp32; key tiles past the block's last query position are never visited, and every load is masked below
    the length. Values the public op never passes read nothing out of bounds (see _row_and_length; new
    tokens are cut to [0, n], q and out rows to [0, total_q)).
    """
    i = tl.program_id(0)
    h = tl.program_id(1)
    # The last query blocks first: they see the most key tiles (causal), and a GPU starts programs in
    # grid order, so the cheap first blocks then fill the last wave instead of the costliest ones.
    mb = tl.num_programs(2) - 1 - tl.program_id(2)
    row, n = _row_and_length(ids_ptr, lens_ptr, i, max_seqs, cap)
    q0 = tl.load(qstart_ptr + i).to(tl.int64)
    # New tokens within [0, n] and their q rows within [0, total_q), cut as scalars. (The bounds cost this
    # kernel registers at 64 x 64, 4 warps, 3 stages on sm_90a: 188 -> 227, no spills, 2 programs an SM as
    # before, their shared memory the limit; at 5 stages 184 -> 187. bench/ptxas_kv.py)
    t = tl.minimum(tl.maximum(tl.load(qlens_ptr + i), 0), n)
    t = tl.where((q0 >= 0) & (q0 <= total_q), tl.minimum(t, total_q - q0), 0).to(tl.int32)
    if mb * TOK >= t:
        return
    r = tl.arange(0, BLOCK_M)
    j = mb * TOK + r // G  # [BLOCK_M] token of each row
    hq = h * G + r % G  # its query head
    jm = (j < t) & (r < TOK * G)
    qpos = n - t + j
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qmask = jm[:, None] & dm[None, :]
    qoff = (q0 + j)[:, None] * sqt + hq[:, None] * sqh + d[None, :]
    q = tl.load(q_ptr + qoff, mask=qmask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(n - t + (mb + 1) * TOK, n)  # one past the block's last query position
    # Key tiles wholly at or before the block's first query position are visible to every row: no causal
    # mask there (FlashAttention-2's split), only the table-hole one; the rest (the diagonal) get both.
    full = (n - t + mb * TOK + 1) // BLOCK_N * BLOCK_N
    for blk in range(0, full, BLOCK_N):
        pos = blk + tl.arange(0, BLOCK_N)
        page = tl.load(bt_ptr + row * sbt + pos // PAGE)  # pos < full <= hi <= n <= cap: inside the table's row
        valid = (page >= 0) & (page < num_pages)
        k, v = _kv_tile(k_ptr, v_ptr, page, pos, valid, h, d, dm, skp, sks, skh, svp, svs, svh, PAGE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_tile(s, v, m_i, l_i, acc, PREC)
    for blk in range(full, hi, BLOCK_N):
        pos = blk + tl.arange(0, BLOCK_N)
        valid = pos < hi
        page = tl.load(bt_ptr + row * sbt + pos // PAGE, mask=valid, other=-1)
        valid = valid & (page >= 0) & (page < num_pages)
        k, v = _kv_tile(k_ptr, v_ptr, page, pos, valid, h, d, dm, skp, sks, skh, svp, svs, svh, PAGE)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(valid[None, :] & (pos[None, :] <= qpos[:, None]), s, float("-inf"))
        m_i, l_i, acc = _online_softmax_tile(s, v, m_i, l_i, acc, PREC)

    # Each new token's row attends at least to itself: l_i > 0 unless its scores are NaN or all -inf
    # (NaN/inf in q or K), whose NaN output is softmax's (padding rows, 0 / 0, are not stored).
    o = acc / l_i[:, None]
    ooff = (q0 + j)[:, None] * sot + hq[:, None] * soh + d[None, :]
    tl.store(out_ptr + ooff, o.to(out_ptr.dtype.element_ty), mask=qmask)


def prefill_config(group: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """``(BLOCK_M, TOK, BLOCK_D, num_warps, num_stages)``: BLOCK_M rows (64 on a GPU, a first guess; 16
    under the interpreter; at least the group) holding TOK = BLOCK_M // group tokens of the group's
    heads. Stages as in :func:`decode_config`: at 3 (the H200 run of 2026-12-04) the K/V tiles are
    double-buffered but every iteration waits for all copies, so loads do not overlap the dots; at 5
    they do (sm_90a, bf16, G 4, d 128, BLOCK_M 64, BLOCK_N 64, Triton 3.8 / 3.6: 81 KB, 188 / 230
    registers at 3 stages; 113 KB, 184 / 232 at 5; ``bench/ptxas_kv.py``)."""
    block_m = max(16 if INTERPRETED else 64, next_pow2(group))
    block_d = max(16, next_pow2(head_dim))
    return block_m, block_m // group, block_d, 4, 3


@on_input_device
def paged_prefill(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_ids: Tensor, lens: Tensor,
                  q_lens: Tensor, max_q_len: int, scale: float) -> Tensor:
    """Causal prefill / append attention over one layer's pages.

    Args:
        q: packed ``[sum(q_lens), Hq, D]``; k_pages, v_pages, block_table, seq_ids, lens: as :func:`paged_decode`
            (``lens`` includes the new tokens).
        q_lens: int32 ``[n]``, new tokens per sequence (each ``<= lens``); max_q_len: a host-side bound on it.
        scale: softmax scale.
    Returns:
        ``[sum(q_lens), Hq, D]`` in q's dtype.
    """
    T, Hq, D = q.shape
    Hkv = k_pages.shape[2]
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or seq_ids.shape[0] == 0:
        return out
    q, block_table = _unit_inner_strides(q, k_pages, v_pages, block_table)
    qstart = (torch.cumsum(q_lens, 0) - q_lens).to(torch.int32)
    G = Hq // Hkv
    block_m, tok, block_d, warps, stages = prefill_config(G, D)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (seq_ids.shape[0], Hkv, max(1, cdiv(max_q_len, tok)))
    if grid[2] > _MAX_GRID_Z:
        raise ValueError(f"paged_prefill: {max_q_len} new tokens for one sequence in one call needs "
                         f"{grid[2]} query blocks, past a CUDA grid's {_MAX_GRID_Z}; feed the prompt in parts")
    _prefill_kernel[grid](
        q, k_pages, v_pages, block_table, seq_ids, lens, q_lens, qstart, out,
        q.stride(0), q.stride(1), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_table.stride(0),
        out.stride(0), out.stride(1), scale * _LOG2E, block_table.shape[0], block_table.shape[1] * k_pages.shape[1],
        k_pages.shape[0], T,
        G=G, D=D, PAGE=k_pages.shape[1], BLOCK_M=block_m, TOK=tok, BLOCK_N=BLOCK_N, BLOCK_D=block_d, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    return out
