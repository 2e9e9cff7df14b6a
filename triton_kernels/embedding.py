"""Triton kernels for multi-table embedding bags (see the definition in python/kfuse/reference/embedding.py).

Layout (FBGEMM/TorchRec, as the CPU kernels): ``T`` contiguous tables ``weights[t] [rows_t, dim_t]`` of
one dtype (float32, float16, bfloat16), ``F`` features (feature ``f`` reads table ``feature_table[f]``),
flat ``indices [N]`` and ``offsets [F·B + 1]`` (int32 or int64, the same): bag ``b`` of feature ``f`` is
``indices[offsets[f·B + b] : offsets[f·B + b + 1]]``. Output ``[B, Σ_f dim_{table(f)}]``.

The tables are separate allocations, so one launch reaches all of them through their addresses: a
small int64 tensor per call holds, per feature, (table address, rows, dim, padding row, output
column, first global row) and the kernels cast the address back to a typed pointer
(``tl.load(meta).to(tl.pointer_type(WDT))``; this works compiled and under the interpreter). Nothing
is copied.

Kernels:

``_fwd_kernel``      grid (B, F, dim tiles). One program pools one bag over a BLOCK_D slice of its
                     feature's dim: the bag's indices in chunks of BLOCK_L, one [BLOCK_L, BLOCK_D]
                     gather per chunk, fp32 accumulation, one store in the tables' dtype.
``_keys_kernel``     grid (B, F). Per flat position: the sort key (global row = first row of the
                     table + index, or a sentinel above every row for padding and invalid indices),
                     the offset of its bag's slice in grad_out and the scale (per-sample weight,
                     1/count for mean, or 1).
then ``torch.sort(stable=True)`` of the keys (positions of one row stay in increasing order), the
offsets and scales gathered into that order, and
``_segment_kernel``  grid (N,). Program j is the start of a run of one row in the sorted keys (else it
                     returns at once) and sums the run's scaled grad_out rows in blocks of BLOCK_R
                     occurrences (one tile gather and a tree sum each), the blocks in increasing
                     position order: a fixed order, so the bits never depend on scheduling. It then
                     stores the row's gradient (row-sparse result) or applies the fused optimizer to
                     the row, stochastic rounding included (no gradient tensor is materialised).
``_psw_kernel``      grid (B, F). ``<grad_out[bag, cols], W[row]>`` per position.

Never reads out of bounds: offsets are clamped to [0, N] and made non-decreasing per bag; an index
outside [0, rows) is never dereferenced (masked loads, skipped by the backward). The forward records
the first bad offset and index positions in a device-side int32 flag (``atomic_min``) that
:func:`forward` returns; :func:`check_flag` reads it (one host sync) when the caller wants to know.

Block sizes are fixed, not autotuned, so the summation order is the same in every process: the
forward's measured on an H200 (``_FWD_BLOCK_L``, ``_FWD_WARPS``), the others first guesses
(``_BLOCK_L``, ``_block_d``, ``_block_r``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kfuse._backends import cdiv, next_pow2, on_input_device
from kfuse.triton_kernels import INTERPRETED

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_WDT = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_INT32_MAX = 2**31 - 1
_MAX_INDICES = _INT32_MAX - 64  # see _check
_MAX_ROW = 2**20  # the elements of a tile, Triton's cap: see _row_block
#: ``flag`` value meaning "no error".
NO_ERROR = _INT32_MAX
#: Fused optimizers (the ``MODE`` of ``_segment_kernel``; 0 stores the gradient).
OPTIMIZERS = {"sgd": 1, "rowwise_adagrad": 2, "adam": 3}

# Per-feature metadata, int64 [F, _FM] (_feature_meta): columns below. tl.constexpr, since compiled
# kernels may read no other globals.
_FM = tl.constexpr(6)
_PTR, _ROWS, _DIM, _PAD, _COL, _BASE = (tl.constexpr(i) for i in range(6))
# Per-table metadata of the segment kernel, int64 [T, _TM] (_table_meta).
_TM = tl.constexpr(8)
_T_PTR, _T_DIM, _T_BASE, _T_S1, _T_S2, _T_SEG0, _T_OUT0, _T_HASH = (tl.constexpr(i) for i in range(8))
_NONE = tl.constexpr(_INT32_MAX)  # NO_ERROR, in kernels

# Indices per gathered chunk of the keys and psw kernels: bags hold 5–30 medical codes, so 16 covers
# most bags in one or two [16, BLOCK_D] gathers (first guesses, not yet measured on a GPU).
_BLOCK_L = 16
# The forward's chunk and warps per program, measured (bench/tune_embedding.py, H200, 2026-12-04, the
# kernel alone from a CUDA graph, BLOCK_D 128, fp32): one warp per bag and 32-index chunks (a 20-code
# bag in one gather) 0.0315 ms on the medical shape and 0.0425 on FBGEMM's, against 0.0818 and 0.1069
# with 16 and 4 warps, whose cross-warp sums cost more than they spread; 1 warp beat 2, 4 and 8 at
# every (BLOCK_L, BLOCK_D) tried. 16 under the interpreter, so tiny tests' bags cross several chunks.
_FWD_BLOCK_L = 32
_FWD_WARPS = 1


def _block_d(dim: int) -> int:
    """Dim tile of the forward and psw kernels: up to 128 fp32 lanes (4 per thread at 4 warps);
    16 under the interpreter so odd dims cross several tiles in tiny tests."""
    return max(16, min(16 if INTERPRETED else 128, next_pow2(dim)))


def _block_r(block_d: int) -> int:
    """Occurrences of a row the segment kernel gathers at a time: each block is a chain of dependent
    loads (keys with offsets and scales, then the grad_out tile), so a Zipf head walked one occurrence
    at a time was a chain as long as the run (the medical benchmark's most common code: ~11k
    occurrences per call, ~0.5-1.5 us each: milliseconds on an idle GPU). 32 at dim 128, a tile of at
    most 4096 fp32 (32 registers a thread at 4 warps); 4 under the interpreter so that tiny tests' runs
    span several blocks."""
    return 4 if INTERPRETED else max(1, min(32, 4096 // block_d))


# ----------------------------------------------------------------------------------------
# Shared device helpers.
# ----------------------------------------------------------------------------------------
@triton.jit
def _bag_range(off_ptr, g, N):
    """Bag ``g``'s [lo, hi), clamped into [0, N] with hi >= lo, so bad offsets (already recorded
    by the forward) can never make a loop run past the indices."""
    lo = tl.minimum(tl.maximum(tl.load(off_ptr + g).to(tl.int64), 0), N)
    hi = tl.minimum(tl.maximum(tl.load(off_ptr + g + 1).to(tl.int64), lo), N)
    return lo, hi


@triton.jit
def _chunk(idx_ptr, k, hi, rows, pad):
    """Indices at positions ``k`` (< hi valid): (row to read, 0 where unused; used mask; bad mask)."""
    km = k < hi
    idx = tl.load(idx_ptr + k, mask=km, other=0).to(tl.int64)
    inb = (idx >= 0) & (idx < rows)
    use = km & inb & (idx != pad)
    return tl.where(use, idx, 0), use, km & ~inb


@triton.jit
def _mix(x):
    """lowbias32 on uint32 (wrapping arithmetic)."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0xD35A2D97
    x ^= x >> 15
    return x


@triton.jit
def _stochastic_round(y, h_table, row, cols, WDT: tl.constexpr):
    """float32 ``y [BLOCK_D]`` of ``row`` rounded to WDT (float16/bfloat16) stochastically, with
    ``u = mix(mix(h_table ^ row) ^ col)``, ``h_table = mix(mix(mix(seed) ^ step) ^ table)`` (host).
    The exact definition of reference.embedding.stochastic_round: lo = the largest magnitude <= |y|,
    hi = the next one up; hi when (u >> 8)·2⁻²⁴ < (|y| − |lo|)/(|hi| − |lo|)."""
    u = _mix(_mix(h_table.to(tl.uint32) ^ row.to(tl.uint32)) ^ cols.to(tl.uint32))
    r = (u >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: exact
    n = y.to(WDT, fp_downcast_rounding="rtne")
    ay = tl.abs(y)
    mag = n.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    mag = tl.where(tl.abs(n.to(tl.float32)) > ay, mag - 1, mag)
    sign = tl.where(y.to(tl.int32, bitcast=True) < 0, 0x8000, 0)
    lo = (mag | sign).to(tl.int16).to(WDT, bitcast=True)
    hi = ((mag + 1) | sign).to(tl.int16).to(WDT, bitcast=True)
    alo = tl.abs(lo.to(tl.float32))
    ahi = tl.abs(hi.to(tl.float32))
    # Both differences are exact; div_rn (not the GPU's approximate '/') makes p, and so the
    # choice, bit-identical to the reference's IEEE division.
    p = tl.where(ahi > alo, tl.div_rn(ay - alo, ahi - alo), 0.0)
    out = tl.where(r < p, hi, lo)
    return tl.where(y != y, n, out)


# ----------------------------------------------------------------------------------------
# Forward.
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(idx_ptr, off_ptr, psw_ptr, meta_ptr, out_ptr, flag_ptr, B, N, out_width,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, MEAN: tl.constexpr, HAS_PSW: tl.constexpr,
                WDT: tl.constexpr):
    """Bag b of feature f, dims [d0, d0 + BLOCK_D): out[b, col_f + d] = Σ scale·W[idx, d].
    idx [N] int32/int64; off [F·B + 1] (idx's dtype); psw [N] fp32; meta int64 [F, _FM];
    out [B, out_width] (WDT); flag int32 [2]: first bad index position, first bad offset position."""
    b = tl.program_id(0)
    f = tl.program_id(1)
    pid_d = tl.program_id(2)
    m = meta_ptr + f * _FM
    dim = tl.load(m + _DIM)
    d0 = pid_d * BLOCK_D
    if d0 >= dim:  # this feature's dim has fewer tiles than the widest
        return
    w_ptr = tl.load(m + _PTR).to(tl.pointer_type(WDT))
    rows = tl.load(m + _ROWS)
    pad = tl.load(m + _PAD)
    col = tl.load(m + _COL)
    g = f.to(tl.int64) * B + b
    if pid_d == 0:
        # Offsets checks, once per bag: each program checks its own pair, atomic_min keeps the first.
        raw_lo = tl.load(off_ptr + g).to(tl.int64)
        raw_hi = tl.load(off_ptr + g + 1).to(tl.int64)
        bad_lo = (raw_lo < 0) | (raw_lo > N) | ((g == 0) & (raw_lo != 0))
        bad_hi = (raw_hi < raw_lo) | (raw_hi > N) | ((g == tl.num_programs(1).to(tl.int64) * B - 1) & (raw_hi != N))
        if bad_lo | bad_hi:
            tl.atomic_min(flag_ptr + 1, tl.where(bad_lo, g, g + 1).to(tl.int32))
    lo, hi = _bag_range(off_ptr, g, N)
    d = d0 + tl.arange(0, BLOCK_D)
    dm = d < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    count = tl.zeros([], dtype=tl.int32)
    for k0 in range(lo, hi, BLOCK_L):
        k = k0 + tl.arange(0, BLOCK_L)
        row, use, bad = _chunk(idx_ptr, k, hi, rows, pad)
        if pid_d == 0:
            first_bad = tl.min(tl.where(bad, k, _NONE))
            if first_bad < _NONE:
                tl.atomic_min(flag_ptr, first_bad.to(tl.int32))
        v = tl.load(w_ptr + row[:, None] * dim + d[None, :], mask=use[:, None] & dm[None, :], other=0.0)
        v = v.to(tl.float32)
        if HAS_PSW:
            v = v * tl.load(psw_ptr + k, mask=use, other=0.0)[:, None]
        acc += tl.sum(v, 0)
        count += tl.sum(use.to(tl.int32), 0)
    if MEAN:  # div_rn: correctly rounded, as the reference's and the CPU kernels' (plain / is div.full)
        acc = tl.div_rn(acc, tl.maximum(count, 1).to(tl.float32))
    tl.store(out_ptr + b.to(tl.int64) * out_width + col + d, acc.to(WDT), mask=dm)


def _check(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int],
           padding_idx: list[int], per_sample_weights: Tensor | None, checked_tables: bool = False) -> int:
    """Shape/dtype/device checks (no tensor values are read: no sync). Returns B. ``checked_tables``: the
    caller has checked each table's layout, dtype and device (kfuse.ops.embedding does, naming the table;
    the second pass cost ~12 µs of Python per call at 32 tables)."""
    if not weights or (not checked_tables and any(w.dtype != weights[0].dtype or w.device != weights[0].device
                                                  or w.dim() != 2 or not w.is_contiguous() for w in weights)):
        raise ValueError("embedding triton: weights must be contiguous 2-D tables of one dtype and device")
    if weights[0].dtype not in _FLOATS:
        raise TypeError(f"embedding triton: tables must be float32, float16 or bfloat16; got {weights[0].dtype}")
    dev = weights[0].device
    if indices.dim() != 1 or offsets.dim() != 1 or indices.dtype not in (torch.int32, torch.int64) \
            or offsets.dtype != indices.dtype or indices.device != dev or offsets.device != dev:
        raise ValueError("embedding triton: indices and offsets must be 1-D int32/int64 tensors of one dtype on the "
                         "tables' device")
    if not indices.is_contiguous() or not offsets.is_contiguous():
        raise ValueError("embedding triton: indices and offsets must be contiguous")
    nf = len(feature_table)
    if nf == 0 or offsets.shape[0] < 1 or (offsets.shape[0] - 1) % nf:
        raise ValueError(f"embedding triton: offsets must have F·B + 1 entries (F = {nf}); got {offsets.shape[0]}")
    if nf > 65535:  # features are the grids' second axis (CUDA caps it at 65535)
        raise ValueError(f"embedding triton: at most 65535 features; got {nf}")
    if len(padding_idx) != len(weights):
        raise ValueError(f"embedding triton: padding_idx needs one entry per table ({len(weights)})")
    # Positions and bag numbers are int32 in the kernels (the error flag, the bag of each position). The
    # backward's segment kernel reads a block of up to 32 positions past a run's end (k0 + BLOCK_R, int32), so
    # indices keep 64 spare: within 32 of 2^31 that position wrapped negative (overflow audit).
    if indices.shape[0] > _MAX_INDICES or offsets.shape[0] >= _INT32_MAX:
        raise ValueError(f"embedding triton: at most {_MAX_INDICES} indices and 2^31 - 2 bags; got "
                         f"{indices.shape[0]} indices, {offsets.shape[0] - 1} bags")
    if per_sample_weights is not None and (per_sample_weights.shape != indices.shape
                                           or per_sample_weights.dtype != torch.float32
                                           or not per_sample_weights.is_contiguous()):
        raise ValueError("embedding triton: per_sample_weights must be a contiguous float32 [N] tensor")
    return (offsets.shape[0] - 1) // nf


# _feature_meta's device tensors by (device, feature_table, padding_idx, each table's address and shape):
# everything a row holds, so a hit is the tensor a rebuild would make, even for new tables at a freed
# table's address. At most _META_CACHE_SIZE entries, never evicted: a CUDA graph captured around a
# launch holds a cached tensor's address, and kernels on another stream may still read one, so freeing
# it could hand its memory to someone else (review of c2b67d9). Past that many keys the metadata is
# built per call, as before the cache.
_META_CACHE: dict[tuple, _FeatureMeta] = {}
_META_CACHE_SIZE = 64


class _FeatureMeta(NamedTuple):
    """What the launchers derive from the tables' shapes and addresses alone."""

    meta: Tensor  # int64 [F, _FM] on the tables' device
    width: int  # output columns, Σ_f dim_{feature_table[f]}
    block_d: int  # _block_d of the widest table
    d_tiles: int  # dim tiles (of block_d) of the widest feature


def tables_key_of(weights: list[Tensor]) -> tuple[int, ...]:
    """Each table's (address, rows, dim), flattened: what the metadata depends on of the tables (kfuse's
    extension computes the same in one pass, ``kfuse._C.embedding_tables``)."""
    return tuple(v for w in weights for v in (w.data_ptr(), w.shape[0], w.shape[1]))


def _feature_meta(weights: list[Tensor], feature_table: list[int], padding_idx: list[int],
                  tables_key: tuple[int, ...] | None = None) -> _FeatureMeta:
    """The tables' :class:`_FeatureMeta`, cached (see _META_CACHE): a training loop's calls after the first
    make no host-to-device copy. The build took 45 % of the launcher's Python at 32 tables
    (bench/host_launchers.py). ``tables_key``: :func:`tables_key_of` ``weights``, when the caller has it."""
    key = (weights[0].device, tuple(feature_table), tuple(padding_idx),
           tables_key_of(weights) if tables_key is None else tables_key)
    hit = _META_CACHE.get(key)
    if hit is not None:
        return hit
    block_d = _block_d(max(w.shape[1] for w in weights))
    dim = max(weights[t].shape[1] for t in feature_table)
    d_tiles = cdiv(dim, block_d)
    if d_tiles > 65535:  # the forward grid's third axis (CUDA caps it at 65535)
        raise ValueError(f"embedding triton: weights has rows of {dim} elements; the forward takes at most "
                         f"{65535 * block_d} (use backend='reference')")
    bases = [0]
    for w in weights:
        bases.append(bases[-1] + w.shape[0])
    rows, col = [], 0
    for t in feature_table:
        w = weights[t]
        rows.append([w.data_ptr(), w.shape[0], w.shape[1], padding_idx[t], col, bases[t]])
        col += w.shape[1]
    if weights[0].is_cuda and torch.cuda.is_current_stream_capturing():
        # The copy below (from pageable memory, and blocking when cached) cannot be captured: a replay
        # would copy from a freed host buffer (review 2026-12-05).
        raise RuntimeError("embedding triton: the first call with these tables (or any call once 64 table "
                           "sets are cached) builds its metadata with a host-to-device copy, which a CUDA graph "
                           "cannot capture: make one call before the capture (the usual warm-up)")
    cache = len(_META_CACHE) < _META_CACHE_SIZE
    # A cached entry must be on the device before the copy's call returns: a later hit may launch on another
    # stream, which nothing orders after this one (a server's stream per thread over shared tables; review
    # 2026-12-05). So its copy is blocking: one sync of the current stream per key. Uncached metadata is
    # read by this call's kernels only, on this stream.
    meta = torch.tensor(rows, dtype=torch.int64, device="cpu").to(weights[0].device, non_blocking=not cache)
    fm = _FeatureMeta(meta, col, block_d, d_tiles)
    if cache:
        # Two threads may build the same key at once: the first entry stays, as a captured graph or another
        # stream may already read it (replacing it freed it under them; GPU review, 2026-12-05).
        fm = _META_CACHE.setdefault(key, fm)
    return fm


@on_input_device
def forward(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int],
            padding_idx: list[int], pooling: int, per_sample_weights: Tensor | None,
            checked_tables: bool = False, tables_key: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Pooled lookups of every feature in one launch.

    Parameters
    ----------
    weights : list[Tensor]
        ``T`` tables ``[rows_t, dim_t]``, contiguous, one dtype (float32, float16, bfloat16) and device.
    indices : Tensor
        ``[N]`` int32 or int64, contiguous.
    offsets : Tensor
        ``[F·B + 1]``, indices' dtype: bag ``b`` of feature ``f`` is
        ``indices[offsets[f·B + b] : offsets[f·B + b + 1]]``.
    feature_table : list[int]
        ``F`` table numbers. padding_idx: ``T`` rows to skip (−1 = none, else in ``[0, rows_t)``).
    pooling : int
        0 = sum, 1 = mean (over the bag's non-padding indices; empty bags give zeros).
    per_sample_weights : Tensor or None
        ``[N]`` float32, contiguous (sum pooling).
    checked_tables : bool
        The caller has checked every table's layout, dtype and device (skips that per-table pass).
    tables_key : tuple[int, ...] or None
        :func:`tables_key_of` ``weights``, when the caller has it (skips another per-table pass).

    Returns
    -------
    (Tensor, Tensor)
        ``out [B, Σ_f dim_{feature_table[f]}]`` in the tables' dtype (fp32 accumulation), and
        ``flag`` int32 ``[2]`` on the device: the first position of an index outside its table's
        ``[0, rows)`` and the first bad offset position (offsets[0] != 0, decreasing, outside
        ``[0, N]``, or offsets[-1] != N), each :data:`NO_ERROR` when none. Bad indices contribute
        nothing and are never dereferenced; bad offsets are clamped. Reading the flag is the
        caller's choice, so the hot path has no host sync: :func:`check_flag` raises (one sync);
        a training loop may check it every k steps or only in debug mode, or skip it when the
        indices were validated upstream.
    """
    B = _check(weights, indices, offsets, feature_table, padding_idx, per_sample_weights, checked_tables)
    dev = weights[0].device
    meta, width, block_d, d_tiles = _feature_meta(weights, feature_table, padding_idx, tables_key)
    out = torch.empty((B, width), dtype=weights[0].dtype, device=dev)
    flag = torch.full((2,), NO_ERROR, dtype=torch.int32, device=dev)
    if B == 0:
        # No bag, so no program checks the one offset: it must be both 0 and len(indices). Flagged on the
        # device as the kernel would (no host read of the offsets).
        flag[1:] = torch.where((offsets[:1] != 0) | (indices.shape[0] != 0), 0, NO_ERROR)
        return out, flag
    psw = per_sample_weights
    _fwd_kernel[(B, len(feature_table), d_tiles)](
        indices, offsets, psw if psw is not None else out, meta, out, flag, B, indices.shape[0], width,
        BLOCK_L=16 if INTERPRETED else _FWD_BLOCK_L, BLOCK_D=block_d, MEAN=pooling == 1,
        HAS_PSW=psw is not None, WDT=_WDT[weights[0].dtype], num_warps=_FWD_WARPS)
    return out, flag


def check_flag(flag: Tensor, indices: Tensor, offsets: Tensor) -> None:
    """Raise if :func:`forward`'s ``flag`` (int32 ``[2]``) recorded an error (one host sync).

    Raises:
        ValueError: a bad offset (named by position). IndexError: an index outside its table.
    """
    bad_index, bad_offset = flag.tolist()
    if bad_offset != NO_ERROR:
        off = offsets.tolist()
        ctx = f"offsets[{bad_offset}] = {off[bad_offset]}"
        if bad_offset > 0:
            ctx += f", offsets[{bad_offset - 1}] = {off[bad_offset - 1]}"
        raise ValueError(f"embedding triton: offsets must run non-decreasing from 0 to len(indices) = "
                         f"{indices.shape[0]}; got {ctx}")
    if bad_index != NO_ERROR:
        raise IndexError(f"embedding triton: indices[{bad_index}] = {int(indices[bad_index])} is out of range of its "
                         "feature's table")


# ----------------------------------------------------------------------------------------
# Backward: keys, stable sort, segment sums (+ fused optimizers); psw gradient.
# ----------------------------------------------------------------------------------------
@triton.jit
def _keys_kernel(idx_ptr, off_ptr, psw_ptr, meta_ptr, key_ptr, goff_ptr, scale_ptr, B, N, sentinel, go_width,
                 BLOCK_L: tl.constexpr, MEAN: tl.constexpr, HAS_PSW: tl.constexpr):
    """Bag b of feature f: for each of its positions i, key[i] = first global row of the table + index
    (``sentinel`` for padding and invalid indices: sorted last, never summed), goff[i] = where the
    bag's gradient slice starts in grad_out ``[B, go_width]`` (b·go_width + the feature's column;
    int64), scale[i] = psw[i], 1/count (mean) or 1 (fp32). Positions in no bag keep the sentinel the
    launcher filled in."""
    b = tl.program_id(0)
    f = tl.program_id(1)
    m = meta_ptr + f * _FM
    rows = tl.load(m + _ROWS)
    pad = tl.load(m + _PAD)
    base = tl.load(m + _BASE)
    goff = b.to(tl.int64) * go_width + tl.load(m + _COL)
    g = f.to(tl.int64) * B + b
    lo, hi = _bag_range(off_ptr, g, N)
    inv = 1.0
    if MEAN:
        count = tl.zeros([], dtype=tl.int32)
        for k0 in range(lo, hi, BLOCK_L):
            k = k0 + tl.arange(0, BLOCK_L)
            _, use, _ = _chunk(idx_ptr, k, hi, rows, pad)
            count += tl.sum(use.to(tl.int32), 0)
        inv = tl.div_rn(1.0, tl.maximum(count, 1).to(tl.float32))
    for k0 in range(lo, hi, BLOCK_L):
        k = k0 + tl.arange(0, BLOCK_L)
        km = k < hi
        row, use, _ = _chunk(idx_ptr, k, hi, rows, pad)
        key = tl.where(use, base + row, sentinel)
        tl.store(key_ptr + k, key.to(key_ptr.dtype.element_ty), mask=km)
        tl.store(goff_ptr + k, tl.zeros([BLOCK_L], tl.int64) + goff, mask=km)
        if HAS_PSW:
            s = tl.load(psw_ptr + k, mask=km, other=0.0)
        else:
            s = tl.zeros([BLOCK_L], tl.float32) + inv
        tl.store(scale_ptr + k, s, mask=km)


@triton.jit
def _segment_kernel(skey_ptr, tkey_ptr, goff_ptr, scale_ptr, go_ptr, tmeta_ptr, rank_ptr,
                    rows_out_ptr, g_out_ptr, N, sentinel, lr, eps, beta1, beta2, omb1, omb2,
                    weight_decay, bc1, bc2, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr, MODE: tl.constexpr, WDT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Program j: if sorted position j starts a run of one (table, row), sum the run's
    ``scale[i]·grad_out[bag(i), cols(f(i))]`` in blocks of BLOCK_R occurrences in increasing position
    i (the stable sort's order): each block's slices gathered as one [BLOCK_R, BLOCK_D] tile from
    their offsets in grad_out (goff, in sorted order: one level of indirection) and reduced by
    ``tl.sum`` (a fixed tree), the blocks added in order; then MODE 0: store it (rows_out[rank[j]] =
    row, g_out at the table's slice) or MODE 1/2/3: update the row with SGD / row-wise Adagrad / Adam
    in fp32 and store it (stochastically rounded for half tables). The whole row is one BLOCK_D tile:
    row-wise Adagrad needs its mean square before the update.

    skey [N] (int32/int64, sorted), tkey [N] int64 (table of each key, T for the sentinel), goff [N]
    int64 and scale [N] fp32 (each sorted position's grad_out offset and scale), go [B, go_width] any
    float dtype, tmeta int64 [T, _TM], rank [N] int64 (run number of each run start)."""
    j = tl.program_id(0)
    key = tl.load(skey_ptr + j)
    prev = tl.load(skey_ptr + tl.maximum(j - 1, 0))
    if ((j > 0) & (prev == key)) | (key == sentinel):
        return
    tm = tmeta_ptr + tl.load(tkey_ptr + j) * _TM
    dim = tl.load(tm + _T_DIM)
    row = key.to(tl.int64) - tl.load(tm + _T_BASE)
    d = tl.arange(0, BLOCK_D)
    dm = d < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    r = tl.arange(0, BLOCK_R)
    k0 = j
    more = j < N
    while more:
        # The run is a prefix of the block (the keys are sorted); the other lanes load nothing.
        k = k0 + r
        run = tl.load(skey_ptr + k, mask=k < N, other=sentinel) == key
        off = tl.load(goff_ptr + k, mask=run, other=0)
        sc = tl.load(scale_ptr + k, mask=run, other=0.0)
        go = tl.load(go_ptr + off[:, None] + d[None, :], mask=run[:, None] & dm[None, :], other=0.0)
        # acc starts at +0 and is never -0 after an add, so a block past the run's end (+0) adds nothing.
        acc += tl.sum(sc[:, None] * go.to(tl.float32), 0)
        k0 += BLOCK_R
        more = tl.sum(run.to(tl.int32), 0) == BLOCK_R
    if MODE == 0:
        rank = tl.load(rank_ptr + j)
        tl.store(rows_out_ptr + rank, row)
        out = tl.load(tm + _T_OUT0) + (rank - tl.load(tm + _T_SEG0)) * dim
        tl.store(g_out_ptr + out + d, acc, mask=dm)
    else:
        w_ptr = tl.load(tm + _T_PTR).to(tl.pointer_type(WDT)) + row * dim + d
        w = tl.load(w_ptr, mask=dm, other=0.0).to(tl.float32)
        if MODE == 1:  # sgd
            new = w - lr * (acc + weight_decay * w)
        elif MODE == 2:  # rowwise_adagrad (FBGEMM EXACT_ROWWISE_ADAGRAD): one fp32 state per row
            gw = acc + weight_decay * w
            s_ptr = tl.load(tm + _T_S1).to(tl.pointer_type(tl.float32)) + row
            s = tl.load(s_ptr) + tl.div_rn(tl.sum(tl.where(dm, gw * gw, 0.0), 0), dim.to(tl.float32))
            tl.store(s_ptr, s)
            new = w - tl.div_rn(lr * gw, tl.sqrt_rn(s) + eps)
        else:  # adam: AdamW's step on the rows seen (reference.embedding.adam_update)
            m_ptr = tl.load(tm + _T_S1).to(tl.pointer_type(tl.float32)) + row * dim + d
            v_ptr = tl.load(tm + _T_S2).to(tl.pointer_type(tl.float32)) + row * dim + d
            # omb1 = 1 − β1 rounded once from float64 on the host, as the reference's (1 - beta1).
            mo = beta1 * tl.load(m_ptr, mask=dm, other=0.0) + omb1 * acc
            vo = beta2 * tl.load(v_ptr, mask=dm, other=0.0) + omb2 * (acc * acc)
            tl.store(m_ptr, mo, mask=dm)
            tl.store(v_ptr, vo, mask=dm)
            step_dir = tl.div_rn(tl.div_rn(mo, bc1), tl.sqrt_rn(tl.div_rn(vo, bc2)) + eps)
            new = w - lr * (step_dir + weight_decay * w)
        if STOCHASTIC:
            tl.store(w_ptr, _stochastic_round(new, tl.load(tm + _T_HASH), row, d, WDT), mask=dm)
        else:
            tl.store(w_ptr, new.to(WDT), mask=dm)


def _mix32(x: int) -> int:
    """lowbias32 on a host int (the device ``_mix``)."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & m
    x ^= x >> 15
    x = (x * 0xD35A2D97) & m
    return x ^ (x >> 15)


def table_hash(seed: int, step: int, table: int) -> int:
    """``mix(mix(mix(seed) ^ step) ^ table)`` (all mod 2³²): the per-(call, table) prefix of the
    stochastic-rounding hash, computed on the host."""
    m = 0xFFFFFFFF
    return _mix32(_mix32(_mix32(seed & m) ^ (step & m)) ^ (table & m))


def _sorted_keys(weights: list[Tensor], indices: Tensor, offsets: Tensor, feature_table: list[int],
                 padding_idx: list[int], pooling: int, per_sample_weights: Tensor | None, B: int):
    """Keys, stable sort and runs, all on the device without a host sync.

    Returns (skey [N] sorted keys, goff [N] int64 grad_out offsets and scale [N] fp32 in sorted order,
    tkey [N] int64 table of each sorted key (T for the sentinel), firsts [T + 1] the first global row
    of each table and the sentinel (skey's dtype), sentinel)."""
    dev = weights[0].device
    N = indices.shape[0]
    fmeta = _feature_meta(weights, feature_table, padding_idx).meta
    sentinel = sum(w.shape[0] for w in weights)
    # int32 keys when the global rows fit: half the radix-sort passes of int64.
    kdt = torch.int32 if sentinel < _INT32_MAX else torch.int64
    key = torch.full((N,), sentinel, dtype=kdt, device=dev)
    goff = torch.empty((N,), dtype=torch.int64, device=dev)  # (positions in no bag: sentinel keys, never read)
    scale = torch.empty((N,), dtype=torch.float32, device=dev)
    psw = per_sample_weights
    go_width = sum(weights[t].shape[1] for t in feature_table)
    _keys_kernel[(B, len(feature_table))](
        indices, offsets, psw if psw is not None else scale, fmeta, key, goff, scale, B, N, sentinel, go_width,
        BLOCK_L=_BLOCK_L, MEAN=pooling == 1, HAS_PSW=psw is not None, num_warps=1)
    # Stable: the positions of one row keep their increasing order, which fixes the order of its
    # sum. On a GPU, a CUB radix sort of N (key, int64 position) pairs: about 4 passes over
    # N·12 bytes for int32 keys (~1 MB at the medical benchmark's N = 80k; not yet timed on a GPU).
    skey, perm = torch.sort(key, stable=True)
    # Offsets and scales in sorted order (two gathers of N): the segment kernel then reads them
    # contiguously, one level of dependent loads before grad_out instead of three (position, bag,
    # feature column).
    goff, scale = goff[perm], scale[perm]
    firsts = [0]
    for w in weights:
        firsts.append(firsts[-1] + w.shape[0])
    firsts = torch.tensor(firsts, dtype=kdt, device="cpu").to(dev, non_blocking=True)
    tkey = torch.searchsorted(firsts[1:], skey, right=True)
    return skey, goff, scale, tkey, firsts, sentinel


@on_input_device
def backward_sparse(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor,
                    feature_table: list[int], padding_idx: list[int], pooling: int,
                    per_sample_weights: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    """Row-sparse gradients of every table, deterministic (bitwise identical run to run).

    Parameters
    ----------
    grad_out : Tensor
        ``[B, Σ_f dim_{feature_table[f]}]``, contiguous, any float dtype (read as fp32).
    weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights :
        As in :func:`forward` (only the tables' shapes and dtype are used).

    Returns
    -------
    list[tuple[Tensor, Tensor]]
        Per table ``t``: (``rows`` int64 ``[U_t]``, ascending unique non-padding rows looked up;
        ``grads`` float32 ``[U_t, dim_t]``), each unique row's gradient summed one occurrence at a
        time in increasing flat position. Invalid indices (see :func:`forward`'s flag) are
        skipped. ONE host sync sizes the result (``U_t`` is data-dependent: inherent to a
        row-sparse result; :func:`backward_fused` has none).
    """
    B = _check(weights, indices, offsets, feature_table, padding_idx, per_sample_weights)
    dev = weights[0].device
    N = indices.shape[0]
    _check_grad_out(grad_out, weights, feature_table, B)
    block_d = _row_block(max(w.shape[1] for w in weights))
    if N == 0 or B == 0:
        return [(torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros((0, w.shape[1]), dtype=torch.float32,
                                                                              device=dev)) for w in weights]
    skey, goff, scale, tkey, firsts, sentinel = _sorted_keys(
        weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights, B)
    run_start = torch.ones((N,), dtype=torch.bool, device=dev)
    run_start[1:] = skey[1:] != skey[:-1]
    rank = torch.cumsum(run_start, 0) - 1  # run number of each run start
    # Runs before each table's first key: searchsorted into the sorted keys, then the run count.
    at = torch.searchsorted(skey, firsts)
    runs_before = torch.cat([rank.new_zeros(1), rank + 1])[at]
    seg0 = runs_before.tolist()  # the host sync: [T + 1] run counts
    counts = [seg0[t + 1] - seg0[t] for t in range(len(weights))]
    out0 = [0]
    for c, w in zip(counts, weights, strict=True):
        out0.append(out0[-1] + c * w.shape[1])
    rows_out = torch.empty((seg0[-1],), dtype=torch.int64, device=dev)
    g_out = torch.empty((out0[-1],), dtype=torch.float32, device=dev)
    tmeta = _table_meta(weights, seg0=seg0, out0=out0)
    _launch_segments(grad_out, weights, skey, tkey, goff, scale, tmeta, rank, rows_out, g_out, sentinel, mode=0,
                     block_d=block_d)
    return [(rows_out[seg0[t]:seg0[t + 1]], g_out[out0[t]:out0[t + 1]].view(counts[t], w.shape[1]))
            for t, w in enumerate(weights)]


def _check_grad_out(grad_out: Tensor, weights: list[Tensor], feature_table: list[int], B: int) -> None:
    width = sum(weights[t].shape[1] for t in feature_table)
    if tuple(grad_out.shape) != (B, width) or not grad_out.is_contiguous() or not grad_out.is_floating_point() \
            or grad_out.device != weights[0].device:
        raise ValueError(f"embedding triton: grad_out must be a contiguous floating [{B}, {width}] tensor on the "
                         f"tables' device; got {list(grad_out.shape)} {grad_out.dtype}")


def _table_meta(weights: list[Tensor], seg0: list[int] | None = None, out0: list[int] | None = None,
                states1: list[Tensor] | None = None, states2: list[Tensor] | None = None,
                hashes: list[int] | None = None) -> Tensor:
    """int64 [T, _TM] on the tables' device (the columns the segment kernel's mode reads; 0 elsewhere)."""
    rows, base = [], 0
    for t, w in enumerate(weights):
        rows.append([w.data_ptr(), w.shape[1], base, states1[t].data_ptr() if states1 else 0,
                     states2[t].data_ptr() if states2 else 0, seg0[t] if seg0 else 0, out0[t] if out0 else 0,
                     hashes[t] if hashes else 0])
        base += w.shape[0]
    return torch.tensor(rows, dtype=torch.int64, device="cpu").to(weights[0].device, non_blocking=True)


def _row_block(dim: int, what: str = "weights") -> int:
    """BLOCK_D of a kernel that holds a whole row of ``dim`` elements in one tile (the segment kernel: row-wise
    Adagrad needs the row's mean square first; 512 fp32 lanes at dim 300, 4 per thread at 4 warps). Triton
    caps a tile at 2^20 elements: past it the error came from the compiler, naming nothing (overflow hunt,
    2026-12-07)."""
    if dim > _MAX_ROW:
        raise ValueError(f"embedding triton: {what} has rows of {dim} elements; the backward holds a row in one "
                         f"Triton block of at most 2^20 = {_MAX_ROW} (use backend='reference', or 'cpu' on the CPU)")
    return max(16, next_pow2(dim))


def _launch_segments(grad_out, weights, skey, tkey, goff, scale, tmeta, rank, rows_out, g_out, sentinel, mode,
                     block_d, lr=0.0, eps=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, bc1=1.0,
                     bc2=1.0) -> None:
    dtype = weights[0].dtype
    _segment_kernel[(skey.shape[0],)](
        skey, tkey, goff, scale, grad_out, tmeta, rank, rows_out, g_out, skey.shape[0], sentinel, lr, eps, beta1,
        beta2, 1.0 - beta1, 1.0 - beta2, weight_decay, bc1, bc2,
        BLOCK_R=_block_r(block_d), BLOCK_D=block_d, MODE=mode, WDT=_WDT[dtype],
        STOCHASTIC=mode > 0 and dtype != torch.float32, num_warps=4)


@on_input_device
def backward_fused(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor,
                   feature_table: list[int], padding_idx: list[int], pooling: int,
                   per_sample_weights: Tensor | None, optimizer: str, states1: list[Tensor], states2: list[Tensor],
                   lr: float, eps: float, beta1: float, beta2: float, weight_decay: float, step: int,
                   seed: int) -> None:
    """The backward with a fused optimizer: the tables (and states) are updated in place, one update
    per unique row with its deterministically summed gradient (as :func:`backward_sparse`); no
    gradient tensor is materialised and there is no host sync.

    Parameters
    ----------
    grad_out, weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights :
        As in :func:`backward_sparse`; the tables are written.
    optimizer : str
        ``"sgd"``, ``"rowwise_adagrad"`` or ``"adam"`` (rules: python/kfuse/reference/embedding.py).
    states1 : list[Tensor]
        Per table: float32 ``[rows_t]`` (rowwise_adagrad's sum of mean squares) or ``[rows_t, dim_t]``
        (adam's m); empty list for sgd. states2: per table float32 ``[rows_t, dim_t]`` (adam's v), else
        an empty list. Contiguous, on the tables' device.
    lr, eps, beta1, beta2, weight_decay : float
        Hyper-parameters (fp32 arithmetic).
    step : int
        The global step, >= 1 (Adam's bias corrections; the rounding hash).
    seed : int
        Of the stochastic rounding of float16/bfloat16 tables: the bits depend only on (seed, step,
        table, row, column, value).
    """
    B = _check(weights, indices, offsets, feature_table, padding_idx, per_sample_weights)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"embedding triton: optimizer must be one of {sorted(OPTIMIZERS)}; got {optimizer!r}")
    _check_grad_out(grad_out, weights, feature_table, B)
    block_d = _row_block(max(w.shape[1] for w in weights))
    n_states = {"sgd": (0, 0), "rowwise_adagrad": (1, 0), "adam": (1, 1)}[optimizer]
    for name, states, need in (("states1", states1, n_states[0]), ("states2", states2, n_states[1])):
        want = [((w.shape[0],) if optimizer == "rowwise_adagrad" else tuple(w.shape)) for w in weights] if need else []
        if len(states) != len(want) or any(
                tuple(s.shape) != sh or s.dtype != torch.float32 or not s.is_contiguous() or s.device != w.device
                for s, sh, w in zip(states, want, weights, strict=False)):
            raise ValueError(f"embedding triton: {name} for {optimizer} must be contiguous float32 tensors of shapes "
                             f"{want}")
    if indices.shape[0] == 0 or B == 0:
        return
    skey, goff, scale, tkey, _, sentinel = _sorted_keys(
        weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights, B)
    tmeta = _table_meta(weights, states1=states1, states2=states2,
                        hashes=[table_hash(seed, step, t) for t in range(len(weights))])
    # rank, rows_out and g_out are not read by the optimizer modes: any tensors do.
    _launch_segments(grad_out, weights, skey, tkey, goff, scale, tmeta, skey, skey, scale, sentinel,
                     mode=OPTIMIZERS[optimizer], block_d=block_d, lr=lr, eps=eps, beta1=beta1, beta2=beta2,
                     weight_decay=weight_decay,
                     bc1=1.0 - beta1**step if optimizer == "adam" else 1.0,
                     bc2=1.0 - beta2**step if optimizer == "adam" else 1.0)


@triton.jit
def _psw_kernel(idx_ptr, off_ptr, meta_ptr, go_ptr, out_ptr, B, N, go_width,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, WDT: tl.constexpr):
    """Bag b of feature f: out[i] = <go[b, col_f : col_f + dim], W[idx_i]> (fp32; 0 for padding and
    invalid indices). go [B, go_width] any float dtype; out [N] fp32 (zero-filled by the launcher)."""
    b = tl.program_id(0)
    f = tl.program_id(1)
    m = meta_ptr + f * _FM
    w_ptr = tl.load(m + _PTR).to(tl.pointer_type(WDT))
    rows = tl.load(m + _ROWS)
    dim = tl.load(m + _DIM)
    pad = tl.load(m + _PAD)
    col = tl.load(m + _COL)
    lo, hi = _bag_range(off_ptr, f.to(tl.int64) * B + b, N)
    for k0 in range(lo, hi, BLOCK_L):
        k = k0 + tl.arange(0, BLOCK_L)
        row, use, _ = _chunk(idx_ptr, k, hi, rows, pad)
        acc = tl.zeros([BLOCK_L], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < dim
            go = tl.load(go_ptr + b.to(tl.int64) * go_width + col + d, mask=dm, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + row[:, None] * dim + d[None, :], mask=use[:, None] & dm[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * go[None, :], 1)
        # 0 at padding positions whatever grad_out holds (their masked rows times an inf or NaN in it made
        # NaN, where torch gives 0; numerical hunt)
        tl.store(out_ptr + k, tl.where(use, acc, 0.0), mask=k < hi)


@on_input_device
def backward_psw(grad_out: Tensor, weights: list[Tensor], indices: Tensor, offsets: Tensor,
                 feature_table: list[int], padding_idx: list[int]) -> Tensor:
    """Gradient of ``per_sample_weights``: ``[N]`` float32, ``<grad_out[bag(i), cols(f(i))], W[idx_i]>``
    (0 for padding and invalid indices). Arguments as in :func:`backward_sparse`."""
    B = _check(weights, indices, offsets, feature_table, padding_idx, None)
    _check_grad_out(grad_out, weights, feature_table, B)
    out = torch.zeros((indices.shape[0],), dtype=torch.float32, device=weights[0].device)
    if indices.shape[0] == 0 or B == 0:
        return out
    meta, _, block_d, _ = _feature_meta(weights, feature_table, padding_idx)
    _psw_kernel[(B, len(feature_table))](
        indices, offsets, meta, grad_out, out, B, indices.shape[0], grad_out.shape[1],
        BLOCK_L=_BLOCK_L, BLOCK_D=block_d, WDT=_WDT[weights[0].dtype], num_warps=4)
    return out


# h_table not specialised: an argument equal to 1 would become a constant, which _stochastic_round's
# integer arithmetic does not compile with (one table hash in 2^32).
@triton.jit(do_not_specialize=["h_table"])
def _round_kernel(y_ptr, rows_ptr, out_ptr, dim, h_table, BLOCK_D: tl.constexpr, WDT: tl.constexpr):
    """out[u, :] = stochastic rounding of y[u, :] (fp32) as row rows[u] of the table."""
    u = tl.program_id(0)
    row = tl.load(rows_ptr + u)
    d = tl.arange(0, BLOCK_D)
    dm = d < dim
    y = tl.load(y_ptr + u.to(tl.int64) * dim + d, mask=dm, other=0.0)
    tl.store(out_ptr + u.to(tl.int64) * dim + d, _stochastic_round(y, h_table, row, d, WDT), mask=dm)


@on_input_device
def stochastic_round(y: Tensor, rows: Tensor, dtype: torch.dtype, seed: int, step: int, table: int) -> Tensor:
    """The fused optimizers' stochastic rounding on its own (the same device function): ``y [U, dim]``
    float32 contiguous, new values of table ``table``'s ``rows [U]`` (int64), rounded to ``dtype``
    (float16/bfloat16) with the bits of ``reference.embedding.rounding_bits(seed, step, table, rows,
    cols)``. For unfused updates on the GPU (e.g. after an all-reduce) and for pinning the bits in
    tests."""
    if dtype not in (torch.float16, torch.bfloat16) or y.dtype != torch.float32 or y.dim() != 2 \
            or not y.is_contiguous() or tuple(rows.shape) != (y.shape[0],) or rows.dtype != torch.int64:
        raise ValueError("embedding triton: stochastic_round takes float32 y [U, dim], int64 rows [U] and "
                         "float16/bfloat16")
    out = torch.empty(y.shape, dtype=dtype, device=y.device)
    if y.numel():
        _round_kernel[(y.shape[0],)](y, rows.contiguous(), out, y.shape[1], table_hash(seed, step, table),
                                     BLOCK_D=_row_block(y.shape[1], "y"), WDT=_WDT[dtype],
                                     num_warps=4)
    return out
