"""Triton kernels for LoRA linear layers (see specs/lora.md and python/kfuse/reference/lora.py).

    y = x Wᵀ + bias + s·((dropout(x) Aᵀ) Bᵀ + lora_bias),   S = dropout(x) Aᵀ  (fp32 [M, r])

x [M, K], W [N, K] (or stored [K, N] with ``fan_in_fan_out``: read in place through its
strides), A [r, K], B [N, r], s = scaling. The low-rank work is ~2r/N of the base GEMM, so the
point of fusing is to add no pass over x or y and no launch that a plain ``x Wᵀ`` would not
pay; every kernel here is a tiled ``tl.dot`` GEMM whose accumulator *starts* from the
low-rank term, or a small pass that produces what that start needs:

forward, M > _SMALL_M   ``_shrink_kernel`` (S, one read of x; split along K when its row tiles are few)
                        then ``_fwd_kernel`` (acc = s·S Bᵀ,
                        then acc += x Wᵀ over K, bias + s·lora_bias in the epilogue); bf16 at
                        M >= _CUBLAS_MIN_M: cuBLAS's x Wᵀ, then ``_fwd_update_kernel`` adds s·S Bᵀ +
                        biases in one pass over y (cheaper than our GEMM's gap to cuBLAS: see there).
forward, M <= _SMALL_M  (decode) ``_fwd_splitk_kernel``: split-K partials of x Wᵀ and, in extra
                        column programs, of S from the same x; ``_fwd_splitk_reduce_kernel`` sums
                        them in a fixed order and adds s·S Bᵀ + biases. Split-K fills the GPU
                        when M·N alone gives too few tiles; S is computed once, not per N-tile.
backward                ``_bwd_dy_kernel``: ONE read of dy gives G = dy B, dB = s·dyᵀ S and
                        dy.sum(0) (per-block partials); ``_bwd_dx_kernel``: dx = dy W with the
                        accumulator starting from s·(G A) ⊙ mask/(1-p), and dA = s·Gᵀ (x ⊙ mask/(1-p))
                        from the same tile's mask (per-M-block partials); bf16 at M >= _CUBLAS_MIN_M:
                        dx = cuBLAS's dy W, the low-rank term added in that pass. The dy pass is the one read
                        of dy beside the GEMM's: at M = K = N = 4096 bf16, 32 MiB at ~4 TB/s, ~8 us
                        against the GEMM's ~200 us (~4 %). Computing G inside the dx main loop instead
                        would redo dy·B in every one of the K/BK column programs (r/BK = 12.5 % more
                        MMA work at r = 16, BK = 128), and dB = s·dyᵀ S, a sum over M, would still need
                        a pass of its own.
multi-adapter           ``_multi_shrink_kernel`` then ``_multi_fwd_kernel`` (bf16 at M >= _CUBLAS_MIN_M:
                        its pass after cuBLAS's x Wᵀ, as the forward's); each tile loops over the
                        distinct adapters among its rows (a data-dependent loop inside the kernel,
                        no host sync, CUDA-graph safe).

Dropout is never stored: keep[m, k] = u(word k % 4 of Philox(seed, m·⌈K/4⌉ + k // 4)) >= p, u the
uniform float ``tl.rand`` makes of a word (see ``_keep``: four mask elements per Philox call; int64
counters, which Triton 3.6 and 3.8 both split into two 32-bit Philox counters, so any M·K works).
``seed`` is an int64 device tensor read with tl.load: no host sync, capturable in a CUDA graph.

Numerics. Accumulation is fp32. A dot whose operands are both x's half dtype (x·Wᵀ, x·Aᵀ with
half adapters) runs natively on the tensor cores; a dot with an fp32 operand (S, G, fp32
adapters) takes both operands to fp32 and runs at ``LR_PREC``: tf32 when x is half — bf16/fp16
values are exact in tf32, so only the fp32 side is rounded, to 10 bits, on the low-rank term
alone, no coarser than the rounding of the half output; ``tf32x3`` would be near-fp32 at 3x
the (small) low-rank MMA cost — and, for fp32 x, what torch would use (``ieee`` unless
``torch.set_float32_matmul_precision`` allows tf32). Every reduction over M (dA, dB, colsum)
is written as per-block partials whose layout depends only on the shape and dtype and is
summed in a fixed order: bitwise-reproducible, no atomics.

Block sizes are a fixed per-shape table (``_gemm_config`` and friends), not ``triton.autotune``:
autotuning would benchmark on the first call of every shape (breaking CUDA-graph capture of
the serving path) and could pick different partial layouts in different processes. They are
first guesses for H100/H200; tuning them is the GPU session's job (see the notes at each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from kfuse._backends import cdiv, next_pow2, on_input_device
from kfuse.triton_kernels import INTERPRETED

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# Rank columns per block. Adapters of rank above this loop over rank blocks (the dy pass then
# reads dy once per block: rare, ranks are mostly <= 64). tl.dot needs >= 16 on every dim, so
# ranks below 16 are padded to 16 with masks.
_RB_MAX = 64
# Forward: M at or below this takes the split-K decode path. Tune on the GPU (the crossover
# against the shrink + GEMM path; the target is <= 1.10x cuBLAS up to M = 128).
_SMALL_M = 64
# Programs to aim for when splitting K (forward decode, multi-adapter shrink) or N (dy pass):
# about two waves of a 132-SM GPU. A constant rather than the device's SM count, so the
# split (and with it the summation order) does not depend on the device.
_TARGET_PROGRAMS = 264
# Multi-adapter shrink: at most this many K splits (see lora_multi_forward).
_MULTI_MAX_SPLITS = 8
# bf16 x and W at M >= _CUBLAS_MIN_M: the forward's x Wᵀ by cuBLAS (torch.mm), then one pass over y that adds
# the low-rank term and the biases in fp32 (_fwd_update_kernel), instead of _fwd_kernel's GEMM; the backward's dx
# likewise (cuBLAS's dy W, then _bwd_dx_kernel's CUBLAS variant adds the low-rank term in the pass over x that
# makes dA's partials anyway), and the multi-adapter forward (_multi_fwd_kernel's CUBLAS variant: each row's
# adapter term and the bias onto cuBLAS's x Wᵀ). On the H200 (2026-12-04, bf16, K = N = 4096, r = 16;
# bench/results/2026-12-04-h200) _fwd_kernel took 1.32-1.41x cuBLAS's x Wᵀ at M = 4096 and 1.25-1.30x at 16384,
# a plain Triton GEMM alone 1.24x, while cuBLAS followed by an addmm_ of the low-rank term (the report's "addmm"
# row, the same two passes over y) took 1.17x and 1.23x: until the Triton GEMM matches cuBLAS (_TMA), a second
# pass over the output costs less than the GEMM's gap. Not yet timed on a GPU itself (bench/tune_lora.py times
# both directions against the Triton GEMMs). bf16 only: the output is rounded to x's dtype between the passes,
# and fp16's range would turn a product past 65504 into inf where the fp32 sum with the low-rank term is finite
# (bf16 has fp32's range); the interpreter tests widen _CUBLAS_DTYPES to run it.
_CUBLAS_MIN_M = 2048
_CUBLAS_DTYPES = (torch.bfloat16,)
# The forward's second pass's tile (a pass over y bound by memory; a first guess, not yet timed).
_UPDATE_BM, _UPDATE_BN = (16, 32) if INTERPRETED else (64, 128)
# The forward's and the dx GEMM's main loops read their operands by TMA (the TMA variants of _fwd_kernel
# and _bwd_dx_kernel) where the layouts allow. Off until a GPU has timed it against the pointer loads
# (bench/tune_lora.py times both).
_TMA = False


# ----------------------------------------------------------------------------------------
# Shared device helpers.
# ----------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, rows, k0, K, p, BK: tl.constexpr):
    """The dropout mask (True = kept) at ``rows`` ([BM] ints) × columns k0 .. k0 + BK − 1 of a row
    of length K: ``[BM, BK]`` bool. k0 must be a multiple of 4. THE mask function: every kernel
    calls this one, so the backward regenerates exactly the forward's mask.

    One Philox call gives four 32-bit words, and ``tl.rand`` keeps one of them: counter
    m·⌈K/4⌉ + k // 4 gives the four columns 4·(k // 4) .. + 3 of row m, word k % 4 each (so the
    mask does not depend on the tile: every kernel's BK and K split is a multiple of 4). ptxas for
    sm_90a (``bench/ptxas_lora.py``): the S pass's loop body went from 1088 IMAD.HI (Philox's
    multiply-highs) to 300 per thread (bf16 x, fp32 adapters; 272 fp16). int64 counters: M·K may
    exceed 2³¹."""
    j = k0 // 4 + tl.arange(0, BK // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, rows[:, None].to(tl.int64) * ((K + 3) // 4) + j[None, :])
    # Column 4j + w takes word w: interleave(interleave(r0, r2), interleave(r1, r3)) puts r0, r1, r2, r3
    # at 4j, 4j + 1, 4j + 2, 4j + 3.
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return tl.random.uint_to_uniform_float(r) >= p


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a·b in fp32. Two operands of the same half dtype go to the tensor cores as they
    are (exact products); otherwise both are taken to fp32 and PREC picks the instruction."""
    if a.dtype == b.dtype and a.dtype != tl.float32:
        out = tl.dot(a, b, acc)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    return out


@triton.jit
def _tile_ids(pid, M, P, BM: tl.constexpr, BP: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles share
    each column tile while it is in L2 (the weight is read ~M/(GROUP_M·BM) times, not M/BM)."""
    num_m = tl.cdiv(M, BM)
    num_p = tl.cdiv(P, BP)
    width = GROUP_M * num_p
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _mainloop(acc, a_ptr, b_ptr, rows, cols, M, P, q_lo, q_hi, sam, saq, sbq, sbp,
              BQ: tl.constexpr, PREC: tl.constexpr):
    """acc += X[rows, q_lo:q_hi] · Y[q_lo:q_hi, cols], X at a_ptr (strides sam, saq), Y at
    b_ptr (strides sbq, sbp). The forward passes Y = Wᵀ (sbq = W's k stride), the dx GEMM
    Y = W: one loop for both layouts of W and both directions."""
    q = tl.arange(0, BQ)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * sam + (q_lo + q)[None, :].to(tl.int64) * saq
    b_ptrs = b_ptr + (q_lo + q)[:, None].to(tl.int64) * sbq + cols[None, :].to(tl.int64) * sbp
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < P
    for q0 in range(q_lo, q_hi, BQ):
        q_ok = (q0 + q) < q_hi
        a = tl.load(a_ptrs, mask=row_ok & q_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=q_ok[:, None] & col_ok, other=0.0)
        acc = _dot(a, b, acc, PREC)
        a_ptrs += BQ * saq
        b_ptrs += BQ * sbq
    return acc


@triton.jit
def _mainloop_tma(acc, a_desc, b_desc, off_m, off_p, q_hi, BQ: tl.constexpr, B_T: tl.constexpr, PREC: tl.constexpr):
    """:func:`_mainloop` with both operands read by TMA: acc += X[off_m box, 0:q_hi] · Y[0:q_hi, off_p box], X
    by ``a_desc`` (``[rows, q]`` boxes), Y by ``b_desc``: its ``[q, p]`` boxes, or (``B_T``) the transposes
    of its ``[p, q]`` boxes. Boxes past an edge read zeros. The forward passes X = x, Y = Wᵀ (B_T unless
    fan_in_fan_out), the dx GEMM X = dy, Y = W (B_T when fan_in_fan_out)."""
    for q in range(0, q_hi, BQ):
        a = a_desc.load([off_m, q])
        if B_T:
            b = tl.trans(b_desc.load([off_p, q]))
        else:
            b = b_desc.load([q, off_p])
        acc = _dot(a, b, acc, PREC)
    return acc


@triton.jit
def _shrink_tile(acc, x_ptr, a_ptr, seed, rows, rr, M, K, R, sxm, sar, sak, k_lo, k_hi, p,
                 BK: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """acc + (x ⊙ keep)[rows, k_lo:k_hi] · A[rr, k_lo:k_hi]ᵀ  ([BM, RB] fp32; no 1/(1-p))."""
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * sxm + (k_lo + ks)[None, :]
    a_ptrs = a_ptr + rr[None, :].to(tl.int64) * sar + (k_lo + ks)[:, None].to(tl.int64) * sak
    row_ok = rows[:, None] < M
    r_ok = rr[None, :] < R
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + ks
        k_ok = kk < k_hi
        xt = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        if DROPOUT:
            xt = xt * _keep(seed, rows, k0, K, p, BK).to(xt.dtype)  # (a product: 0·inf = NaN, as torch's dropout)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok, other=0.0)
        acc = _dot(xt, at, acc, PREC)
        x_ptrs += BK
        a_ptrs += BK * sak
    return acc


@triton.jit
def _low_rank(x_ptr, y_ptr, rows, cols, M, P, R, syr, syp, BM: tl.constexpr, BP: tl.constexpr, RB: tl.constexpr,
              LR_PREC: tl.constexpr):
    """(X Y)[rows, cols]: ``[BM, BP]`` fp32, X ``[M, R]`` fp32 contiguous (S or G), Y ``[R, P]`` at strides
    syr, syp (Bᵀ for the forward, A for dx); one [BM, RB] x [RB, BP] dot per rank block (RB >= 16, ~r/K of
    a GEMM main loop's MMA work)."""
    acc = tl.zeros([BM, BP], dtype=tl.float32)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * R + rr[None, :],
                     mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)
        yt = tl.load(y_ptr + rr[:, None].to(tl.int64) * syr + cols[None, :].to(tl.int64) * syp,
                     mask=(rr[:, None] < R) & (cols[None, :] < P), other=0.0)
        acc = _dot(xt, yt, acc, LR_PREC)
    return acc


@triton.jit
def _epilogue(acc, bias_ptr, lbias_ptr, cols, N, scaling, HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr):
    """acc + bias + s·lora_bias (both [N], any float dtype)."""
    col_ok = cols < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LBIAS:
        acc += scaling * tl.load(lbias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _seed(seed_ptr, DROPOUT: tl.constexpr):
    # Without dropout seed_ptr may be any pointer (the launchers pass x): never read.
    if DROPOUT:
        s = tl.load(seed_ptr)
    else:
        s = 0
    return s


# ----------------------------------------------------------------------------------------
# Dropout mask (tests, references) and S = dropout(x) Aᵀ.
# ----------------------------------------------------------------------------------------
@triton.jit
def _mask_kernel(seed_ptr, out_ptr, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    keep = _keep(tl.load(seed_ptr), rows, tl.program_id(1) * BK, K, p, BK)
    rows = rows[:, None]
    cols = tl.program_id(1) * BK + tl.arange(0, BK)[None, :]
    tl.store(out_ptr + rows.to(tl.int64) * K + cols, keep.to(tl.uint8), mask=(rows < M) & (cols < K))


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, seed_ptr, s_ptr, M, K, R, sxm, sar, sak, k_per_split, p, inv_keep,
                   BM: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr, DROPOUT: tl.constexpr,
                   PREC: tl.constexpr):
    """S[rows, rank block] over K split ``k_per_split``: grid (M tiles, rank blocks, splits); split sp
    writes its partial (already ⊙ 1/(1-p)) to s[sp] ([splits, M, R]; with one split, S itself). One
    read of x."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * RB + tl.arange(0, RB)
    k_lo = tl.program_id(2) * k_per_split
    acc = tl.zeros([BM, RB], dtype=tl.float32)
    acc = _shrink_tile(acc, x_ptr, a_ptr, _seed(seed_ptr, DROPOUT), rows, rr, M, K, R, sxm, sar, sak, k_lo,
                       tl.minimum(K, k_lo + k_per_split), p, BK, DROPOUT, PREC)
    if DROPOUT:
        acc = acc * inv_keep
    offs = (tl.program_id(2).to(tl.int64) * M + rows[:, None]) * R + rr[None, :]
    tl.store(s_ptr + offs, acc, mask=(rows[:, None] < M) & (rr[None, :] < R))


# ----------------------------------------------------------------------------------------
# Forward, M > _SMALL_M: one GEMM whose accumulator starts from s·S Bᵀ.
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, lbias_ptr, y_ptr,
                M, N, K, R, sxm, swn, swk, sbn, sbr, scaling,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr, GROUP_M: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_LBIAS: tl.constexpr, PREC: tl.constexpr, LR_PREC: tl.constexpr,
                TMA: tl.constexpr = False, W_KN: tl.constexpr = False):
    """y tile = s·S Bᵀ + x Wᵀ + bias + s·lora_bias; grid (M tiles · N tiles,), grouped. The low-rank term
    first (the accumulator's start), so the K loop is the plain GEMM's and y is written once.

    With ``TMA``, x_ptr and w_ptr are tensor descriptors: x ``[M, K]`` in ``[BM, BK]`` boxes, W ``[N, K]``
    in ``[BN, BK]`` or, ``W_KN`` (fan_in_fan_out), ``[K, N]`` in ``[BK, BN]`` (see :func:`_mainloop_tma`).
    The H200's Triton GEMM with pointer loads took 1.24x cuBLAS's time at M = K = N = 4096 (bf16,
    2026-12-04); TMA is the usual next step on Hopper. Taken only where ``_TMA`` is set and the layouts
    allow (:func:`_tma_operands`): not yet timed on a GPU."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = _low_rank(s_ptr, b_ptr, rows, cols, M, N, R, sbr, sbn, BM, BN, RB, LR_PREC) * scaling
    if TMA:
        acc = _mainloop_tma(acc, x_ptr, w_ptr, pid_m * BM, pid_n * BN, K, BK, not W_KN, PREC)
    else:
        acc = _mainloop(acc, x_ptr, w_ptr, rows, cols, M, N, 0, K, sxm, 1, swk, swn, BK, PREC)
    acc = _epilogue(acc, bias_ptr, lbias_ptr, cols, N, scaling, HAS_BIAS, HAS_LBIAS)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _fwd_update_kernel(y_ptr, s_ptr, b_ptr, bias_ptr, lbias_ptr, M, N, R, sbn, sbr, scaling,
                       BM: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_LBIAS: tl.constexpr, LR_PREC: tl.constexpr):
    """y tile += s·S Bᵀ + bias + s·lora_bias in fp32, in place: the second pass of the cuBLAS path
    (``_CUBLAS_MIN_M``), y ``[M, N]`` contiguous holding x Wᵀ; grid (M tiles, N tiles)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = _low_rank(s_ptr, b_ptr, rows, cols, M, N, R, sbr, sbn, BM, BN, RB, LR_PREC) * scaling
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    acc += tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    acc = _epilogue(acc, bias_ptr, lbias_ptr, cols, N, scaling, HAS_BIAS, HAS_LBIAS)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# Forward, M <= _SMALL_M (decode): split-K partials of [x Wᵀ | S], then a fixed-order reduce.
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_splitk_kernel(x_ptr, w_ptr, a_ptr, seed_ptr, yp_ptr, sp_ptr,
                       M, N, K, R, sxm, swn, swk, sar, sak, k_per_split, p, inv_keep,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr,
                       DROPOUT: tl.constexpr, PREC: tl.constexpr, LR_PREC: tl.constexpr):
    """Grid (N tiles + rank blocks, M tiles, splits). Column programs below cdiv(N, BN) write
    the split's partial of x Wᵀ to yp [splits, M, N]; the rest write the split's partial of S
    (already ⊙ mask/(1-p)) to sp [splits, M, R]. Both read the same K range of x, and S is
    computed once per split rather than once per N tile (which would re-read A N/BN times)."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows[:, None] < M
    if pid_c < n_tiles:
        cols = pid_c * BN + tl.arange(0, BN)
        # (Names differ between the branches: Triton types a variable once per if/else.)
        acc_y = tl.zeros([BM, BN], dtype=tl.float32)
        acc_y = _mainloop(acc_y, x_ptr, w_ptr, rows, cols, M, N, k_lo, k_hi, sxm, 1, swk, swn, BK, PREC)
        tl.store(yp_ptr + (pid_s.to(tl.int64) * M + rows[:, None]) * N + cols[None, :], acc_y,
                 mask=row_ok & (cols[None, :] < N))
    else:
        rr = (pid_c - n_tiles) * RB + tl.arange(0, RB)
        acc_s = tl.zeros([BM, RB], dtype=tl.float32)
        acc_s = _shrink_tile(acc_s, x_ptr, a_ptr, _seed(seed_ptr, DROPOUT), rows, rr, M, K, R, sxm, sar, sak,
                             k_lo, k_hi, p, BK, DROPOUT, LR_PREC)
        if DROPOUT:
            acc_s = acc_s * inv_keep
        tl.store(sp_ptr + (pid_s.to(tl.int64) * M + rows[:, None]) * R + rr[None, :], acc_s,
                 mask=row_ok & (rr[None, :] < R))


@triton.jit
def _fwd_splitk_reduce_kernel(yp_ptr, sp_ptr, b_ptr, bias_ptr, lbias_ptr, y_ptr, s_ptr,
                              M, N, R, SPLITS, sbn, sbr, scaling,
                              BM: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_LBIAS: tl.constexpr, SAVE_S: tl.constexpr, LR_PREC: tl.constexpr):
    """Grid (N tiles, M tiles): y = Σ_splits yp + s·(Σ_splits sp) Bᵀ + biases, sums in split
    order (deterministic). Column tile 0 also stores S when SAVE_S."""
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i in range(0, SPLITS):
        acc += tl.load(yp_ptr + (i * M + rows[:, None].to(tl.int64)) * N + cols[None, :], mask=row_ok & col_ok,
                       other=0.0)
    low = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        r_ok = rr[None, :] < R
        st = tl.zeros([BM, RB], dtype=tl.float32)
        for i in range(0, SPLITS):
            st += tl.load(sp_ptr + (i * M + rows[:, None].to(tl.int64)) * R + rr[None, :], mask=row_ok & r_ok,
                          other=0.0)
        if SAVE_S:
            tl.store(s_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], st, mask=row_ok & r_ok & (pid_n == 0))
        bt = tl.load(b_ptr + cols[None, :].to(tl.int64) * sbn + rr[:, None].to(tl.int64) * sbr,
                     mask=(rr[:, None] < R) & col_ok, other=0.0)
        low = _dot(st, bt, low, LR_PREC)
    acc = _epilogue(acc + scaling * low, bias_ptr, lbias_ptr, cols, N, scaling, HAS_BIAS, HAS_LBIAS)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok & col_ok)


# ----------------------------------------------------------------------------------------
# Backward.
# ----------------------------------------------------------------------------------------
@triton.jit
def _bwd_dy_kernel(dy_ptr, b_ptr, s_ptr, gp_ptr, dbp_ptr, csp_ptr,
                   M, N, R, n_per_split, sbn, sbr, scaling,
                   BM: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr,
                   NEED_G: tl.constexpr, NEED_DB: tl.constexpr, NEED_CS: tl.constexpr, LR_PREC: tl.constexpr):
    """One read of dy for everything that needs it. Grid (M blocks, N splits, rank blocks);
    program (i, j, b) walks the N range of split j for rows of block i and writes
      gp [splits, M, R]    its split's partial of G = dy B            (rank block b)
      dbp [M blocks, N, R] its row block's partial of dB = s·dyᵀ S    (rank block b)
      csp [M blocks, N]    its row block's partial of dy.sum(0)        (rank block 0 only)
    G's reduction over N is split so that small M still fills the GPU; dB's and colsum's over M
    are partials per row block. Both are summed afterwards in a fixed order."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_r = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * RB + tl.arange(0, RB)
    row_ok = rows[:, None] < M
    r_ok = rr[None, :] < R
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    if NEED_DB:
        st = tl.load(s_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], mask=row_ok & r_ok, other=0.0)
    g = tl.zeros([BM, RB], dtype=tl.float32)
    ns = tl.arange(0, BN)
    dy_ptrs = dy_ptr + rows[:, None].to(tl.int64) * N + (n_lo + ns)[None, :]
    b_ptrs = b_ptr + (n_lo + ns)[:, None].to(tl.int64) * sbn + rr[None, :].to(tl.int64) * sbr
    for n0 in range(n_lo, n_hi, BN):
        cols = n0 + ns
        n_ok = cols < n_hi
        dyt = tl.load(dy_ptrs, mask=row_ok & n_ok[None, :], other=0.0)
        if NEED_G:
            bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok, other=0.0)
            g = _dot(dyt, bt, g, LR_PREC)
        if NEED_DB:
            dbt = _dot(tl.trans(dyt), st, tl.zeros([BN, RB], dtype=tl.float32), LR_PREC) * scaling
            tl.store(dbp_ptr + (pid_m.to(tl.int64) * N + cols[:, None]) * R + rr[None, :], dbt,
                     mask=n_ok[:, None] & r_ok)
        if NEED_CS:
            cs = tl.sum(dyt.to(tl.float32), axis=0)
            tl.store(csp_ptr + pid_m.to(tl.int64) * N + cols, cs, mask=n_ok & (pid_r == 0))
        dy_ptrs += BN
        b_ptrs += BN * sbn
    if NEED_G:
        tl.store(gp_ptr + (pid_s.to(tl.int64) * M + rows[:, None]) * R + rr[None, :], g, mask=row_ok & r_ok)


@triton.jit
def _bwd_dx_kernel(dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, seed_ptr, dx_ptr, dap_ptr,
                   M, N, K, R, swn, swk, sar, sak, scaling, p, inv_keep,
                   BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr, GROUP_M: tl.constexpr,
                   DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
                   PREC: tl.constexpr, LR_PREC: tl.constexpr, TMA: tl.constexpr = False, W_T: tl.constexpr = False,
                   CUBLAS: tl.constexpr = False):
    """Grid (M tiles · K tiles,), grouped. For its [BM, BK] tile of dx (with ``TMA``, dy_ptr and w_ptr are
    tensor descriptors of dy [M, N] in [BM, BN] boxes and W as stored: [N, K] in [BN, BK] boxes, or
    ``W_T`` (fan_in_fan_out) [K, N] in [BK, BN] ones; see :func:`_mainloop_tma`):
      dx = dy W + s·(G A) ⊙ keep/(1-p): without dropout the accumulator starts from the low-rank
           term; with dropout the masked term is computed and added after the GEMM loop;
      dap[pid_m, :, k tile] = s·Gᵀ (x ⊙ keep/(1-p)): this row block's partial of dA, from the
           same mask. The partial layout [M tiles, R, K] depends on BM only (fixed per shape).
    Order, for registers: dA first, so that x's [BM, BK] fp32 tile is dead before the low-rank tile
    (the start of the GEMM's accumulator) is made. ptxas -v for sm_90a, BM 128, 8 warps, Triton 3.8
    (3.6) — without dropout, 128x256: bf16 x with fp32 adapters 255 registers and 80 (76) B of spill
    stores when dA came after, 222 (229) registers and none now; fp16 48 (48) B before, none now.
    With dropout, 128x128: 253 (244) registers, no spills, wgmma pipelined, 610 (580) IMAD.HI of
    Philox; with a tl.rand draw per element and the masked term as the loop's start it had 255 (255)
    registers, 324 (268) B of spill stores outside the loop and 1084 (1086) IMAD.HI. (The mask is
    drawn twice, once per layout it is used in: Triton rematerialises it rather than convert it.)
    With ``CUBLAS`` (``_CUBLAS_MIN_M``), dx already holds cuBLAS's dy W: the tile adds the low-rank term to
    it in place (no GEMM loop; dy_ptr and w_ptr are not read)."""
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BM, BK, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BK + tl.arange(0, BK)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < K
    if DROPOUT:
        keep = _keep(tl.load(seed_ptr), rows, pid_k * BK, K, p, BK)
    if NEED_DA:
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=row_ok & col_ok,
                     other=0.0).to(tl.float32)
        if DROPOUT:
            xt = xt * (keep.to(tl.float32) * inv_keep)
        for r0 in range(0, R, RB):
            rr = r0 + tl.arange(0, RB)
            gt = tl.load(g_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], mask=row_ok & (rr[None, :] < R),
                         other=0.0)
            dat = _dot(tl.trans(gt), xt, tl.zeros([RB, BK], dtype=tl.float32), LR_PREC) * scaling
            tl.store(dap_ptr + (pid_m.to(tl.int64) * R + rr[:, None]) * K + cols[None, :], dat,
                     mask=(rr[:, None] < R) & col_ok)
    if NEED_DX and CUBLAS:
        # dx's tile loaded after the low-rank term: loaded first, it stayed live beside the rank loop's fp32
        # tile and spilled (sm_90a, Triton 3.6, 128x256, 8 warps: fp32 adapters at RB 64 120 B of spill stores,
        # bf16 ones at RB 32 / 64 32 / 128 B; none so; review)
        low = _low_rank(g_ptr, a_ptr, rows, cols, M, K, R, sar, sak, BM, BK, RB, LR_PREC)
        if DROPOUT:
            low = low * (keep.to(tl.float32) * (scaling * inv_keep))
        else:
            low = low * scaling
        dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
        acc = tl.load(dx_ptrs, mask=row_ok & col_ok, other=0.0).to(tl.float32) + low
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=row_ok & col_ok)
    elif NEED_DX:
        if DROPOUT:
            # The masked term joins after the GEMM loop, and is computed there: as the loop's starting
            # value (or computed before it), Triton 3.6 made ptxas serialise the loop's wgmma (C7515)
            # once the mask came from tl.randint4x (bench/ptxas_lora.py).
            acc = tl.zeros([BM, BK], dtype=tl.float32)
            if TMA:
                acc = _mainloop_tma(acc, dy_ptr, w_ptr, pid_m * BM, pid_k * BK, N, BN, W_T, PREC)
            else:
                acc = _mainloop(acc, dy_ptr, w_ptr, rows, cols, M, K, 0, N, N, 1, swn, swk, BN, PREC)
            low = _low_rank(g_ptr, a_ptr, rows, cols, M, K, R, sar, sak, BM, BK, RB, LR_PREC)
            acc += low * (keep.to(tl.float32) * (scaling * inv_keep))
        else:
            acc = _low_rank(g_ptr, a_ptr, rows, cols, M, K, R, sar, sak, BM, BK, RB, LR_PREC) * scaling
            if TMA:
                acc = _mainloop_tma(acc, dy_ptr, w_ptr, pid_m * BM, pid_k * BK, N, BN, W_T, PREC)
            else:
                acc = _mainloop(acc, dy_ptr, w_ptr, rows, cols, M, K, 0, N, N, 1, swn, swk, BN, PREC)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=row_ok & col_ok)


# ----------------------------------------------------------------------------------------
# Multi-adapter forward (serving). Rows of one tile may use different adapters; a tile loops
# over the distinct adapters among its rows (smallest id first), so the work is one pass per
# adapter present, not per adapter loaded, and there is no host-side grouping.
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_adapters(ids_ptr, rows, M, L):
    """The rows' adapter ids as int32, -1 for base-only rows: -1 itself, ids outside [0, L)
    (validated by the caller, but never used to address memory here) and rows past M."""
    ids = tl.load(ids_ptr + rows, mask=rows < M, other=-1)
    ok = (ids >= 0) & (ids < L)  # compared in the ids' own dtype, before narrowing
    return tl.where(ok, ids, -1).to(tl.int32)


@triton.jit
def _next_adapter(ids, todo, L):
    """The smallest adapter id among rows still to do, L when none is left."""
    return tl.min(tl.where(todo, ids, L), axis=0)


@triton.jit
def _multi_shrink_kernel(x_ptr, ids_ptr, a_ptr, ranks_ptr, sp_ptr,
                         M, K, L, R, sxm, sal, sar, sak, k_per_split,
                         BM: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr):
    """Grid (M tiles, rank blocks, K splits): sp[split, rows, rank block] = x[rows, K range] ·
    A_{id(row)}ᵀ, rank columns >= ranks[id] masked (never read). x is loaded once per K step
    and multiplied by each adapter present in the tile; rows keep their own adapter's result."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.program_id(1) * RB + tl.arange(0, RB)
    pid_s = tl.program_id(2)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    ids = _tile_adapters(ids_ptr, rows, M, L)
    row_ok = rows[:, None] < M
    ks = tl.arange(0, BK)
    acc = tl.zeros([BM, RB], dtype=tl.float32)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * sxm + (k_lo + ks)[None, :]
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + ks
        k_ok = kk < k_hi
        xt = tl.load(x_ptrs, mask=row_ok & k_ok[None, :], other=0.0)
        todo = ids >= 0
        cur = _next_adapter(ids, todo, L)
        while cur < L:
            rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + cur), 0), R).to(tl.int32)  # clamped before narrowing
            a_ptrs = a_ptr + cur.to(tl.int64) * sal + rr[None, :].to(tl.int64) * sar + kk[:, None].to(tl.int64) * sak
            at = tl.load(a_ptrs, mask=k_ok[:, None] & (rr[None, :] < rank), other=0.0)
            sel = ids == cur
            acc = tl.where(sel[:, None], _dot(xt, at, acc, PREC), acc)
            todo = todo & ~sel
            cur = _next_adapter(ids, todo, L)
        x_ptrs += BK
    offs = (pid_s.to(tl.int64) * M + rows[:, None]) * R + rr[None, :]
    tl.store(sp_ptr + offs, acc, mask=row_ok & (rr[None, :] < R))


@triton.jit
def _multi_fwd_kernel(x_ptr, w_ptr, sp_ptr, ids_ptr, b_ptr, ranks_ptr, scal_ptr, bias_ptr, y_ptr,
                      M, N, K, L, R, SPLITS, sxm, swn, swk, sbl, sbn, sbr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RB: tl.constexpr, GROUP_M: tl.constexpr,
                      HAS_BIAS: tl.constexpr, PREC: tl.constexpr, LR_PREC: tl.constexpr, CUBLAS: tl.constexpr = False):
    """Grid (M tiles · N tiles,), grouped: acc = x Wᵀ, then for each adapter a present in the tile
    acc += s_a·(S_rows B_aᵀ) on its rows only (a select, so another adapter's weights, even non-finite
    ones, never reach a row), + bias. S = Σ_splits sp, summed in split order.
    The main loop comes first: started from the low-rank terms (as the single-adapter forward is),
    ptxas serialised every wgmma of the kernel (C7515: non-wgmma instructions defining an
    accumulator) at each tile the launcher uses; after the main loop, none is. With ``CUBLAS``
    (``_CUBLAS_MIN_M``), y already holds cuBLAS's x Wᵀ: the tile reads it instead of the main loop."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    ids = _tile_adapters(ids_ptr, rows, M, L)
    if CUBLAS:
        acc = tl.load(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=row_ok & col_ok,
                      other=0.0).to(tl.float32)
    else:
        acc = _mainloop(tl.zeros([BM, BN], dtype=tl.float32), x_ptr, w_ptr, rows, cols, M, N, 0, K, sxm, 1, swk,
                        swn, BK, PREC)
    for r0 in range(0, R, RB):
        rr = r0 + tl.arange(0, RB)
        st = tl.zeros([BM, RB], dtype=tl.float32)
        for i in range(0, SPLITS):
            st += tl.load(sp_ptr + (i * M + rows[:, None].to(tl.int64)) * R + rr[None, :],
                          mask=row_ok & (rr[None, :] < R), other=0.0)
        todo = ids >= 0
        cur = _next_adapter(ids, todo, L)
        while cur < L:
            rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + cur), 0), R).to(tl.int32)  # clamped before narrowing
            sc = tl.load(scal_ptr + cur).to(tl.float32)
            b_ptrs = b_ptr + cur.to(tl.int64) * sbl + cols[None, :].to(tl.int64) * sbn + rr[:, None].to(tl.int64) * sbr
            bt = tl.load(b_ptrs, mask=(rr[:, None] < rank) & col_ok, other=0.0)
            sel = ids == cur
            acc += tl.where(sel[:, None], _dot(st, bt, tl.zeros([BM, BN], dtype=tl.float32), LR_PREC) * sc, 0.0)
            todo = todo & ~sel
            cur = _next_adapter(ids, todo, L)
    acc = _epilogue(acc, bias_ptr, bias_ptr, cols, N, 1.0, HAS_BIAS, False)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok & col_ok)


# ----------------------------------------------------------------------------------------
# Launchers: validate, allocate, pick blocks and grid, launch. No autograd here.
# ----------------------------------------------------------------------------------------
def _takes_cublas(M: int, dtype: torch.dtype, w: Tensor) -> bool:
    """Whether the forward's x Wᵀ or the backward's dy W (``w``: the GEMM's right operand) is cuBLAS's
    (``_CUBLAS_MIN_M``): bf16 at large M, a W that cuBLAS reads in place, i.e. one unit stride and a leading
    dimension at least the other size (a slice of a wider weight too; torch copies any other layout first, so
    that keeps the Triton GEMM, which reads it by strides)."""
    (s0, s1), (n0, n1) = w.stride(), w.shape
    in_place = (s1 == 1 and s0 >= max(1, n1)) or (s0 == 1 and s1 >= max(1, n0))
    return M >= _CUBLAS_MIN_M and dtype in _CUBLAS_DTYPES and in_place


def _cublas_mm(a: Tensor, b: Tensor, out: Tensor) -> bool:
    """``out = a @ b`` by cuBLAS where :func:`_takes_cublas` says so (``a``: x or dy, ``[M, ·]``; ``b``: the GEMM's
    right operand), True then; else False and ``out`` untouched (the Triton GEMM computes it)."""
    if not _takes_cublas(a.shape[0], a.dtype, b):
        return False
    torch.mm(a.detach(), b.detach(), out=out)  # (out= refuses inputs that require grad; the op has its own)
    return True


def _rank_block(R: int) -> int:
    return min(_RB_MAX, max(16, next_pow2(R)))


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(PREC for the base GEMM's fp32 dots, LR_PREC for dots with an fp32 operand)."""
    if dtype == torch.float32:
        # As torch's own fp32 matmul: ieee unless the user allowed tf32.
        prec = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
        return prec, prec
    return "ieee", "tf32"  # half x: PREC is unused (half dots are native), see the module doc


def _gemm_config(M: int, P: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BM, BP, BQ, GROUP_M, num_warps, num_stages) of a [M, P] output tile GEMM.

    GPU values are unmeasured first guesses for H100/H200 with pointer loads (cp.async
    pipelining, wgmma): tune them there. Small M is memory-bound on the weight, so its tiles
    aim at >= ~128 programs for P = 4096; large M at the usual 128x256x64 Hopper tile. Also
    worth trying for large M: TMA descriptors (tl.make_tensor_descriptor exists in Triton 3.6
    and 3.8, but needs triton.set_allocator and 16-byte aligned strides, which a strided or
    fan_in_fan_out W may not have: pointer loads keep one path for every layout). The dx GEMM's
    BM also sets dA's partial layout, so it must stay a function of the shape only."""
    if INTERPRETED:
        return 32, 32, 16, 2, 4, 1  # small tiles: the tiny test shapes still span several tiles
    if dtype == torch.float32:
        return 64, 64, 32, 8, 4, 3
    if M >= 2048:
        return 128, 256, 64, 8, 8, 3
    if M > 256:
        return 128, 128, 64, 8, 8, 3
    if M > 64:
        return 64, 64, 128, 8, 4, 4
    return max(16, next_pow2(M)), 64, 128, 1, 4, 4


def _dx_config(M: int, K: int, dtype: torch.dtype, dropout: bool) -> tuple[int, int, int, int, int, int]:
    """(BM, BK, BN, GROUP_M, num_warps, num_stages) of the dx kernel: the GEMM's tile, but at most 128
    columns wide with dropout, whose mask ([BM, BK] Philox draws) needs the registers: ptxas -v for
    sm_90a, bf16 with fp32 adapters at BM = 128, 8 warps, with dropout: 128x256 1012 bytes of spill
    stores (249 LDL/STL between the HGMMAs), 128x128 none (Triton 3.8; 5280 and 324 B before the
    mask came from tl.randint4x; without dropout 128x256 has none: see _bwd_dx_kernel). BM is the
    GEMM's (it sets dA's partial layout)."""
    bm, bk, bn, group, warps, stages = _gemm_config(M, K, dtype)
    return bm, min(bk, 128) if dropout else bk, bn, group, warps, stages


def _multi_config(M: int, N: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """The multi-adapter forward's tile: the GEMM's, at most 128 wide. Its low-rank terms come after the
    main loop, each a [BM, BN] dot beside the accumulator: at 128x256 (M >= 2048) ptxas -v for sm_90a
    gives 255 registers and ~2.1 KB of spill stores, ~90 of them between the HGMMAs; at 128x128 202
    registers and none (bf16, fp32 adapters, 8 warps; Triton 3.8 and 3.6 alike)."""
    bm, bn, bk, group, warps, stages = _gemm_config(M, N, dtype)
    return bm, min(bn, 128), bk, group, warps, stages


def _splits(work: int, programs: int, per_step: int, max_splits: int = 1 << 30) -> tuple[int, int]:
    """(length per split, number of splits) of a reduction of ``work`` elements in steps of
    ``per_step``, so that about _TARGET_PROGRAMS programs run; a function of the shape only."""
    steps = cdiv(work, per_step)
    splits = max(1, min(steps, max_splits, cdiv(_TARGET_PROGRAMS, max(1, programs))))
    length = cdiv(steps, splits) * per_step
    return length, cdiv(work, length) if work > 0 else 1


def _shrink_config(M: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BM, BK, num_warps, num_stages) of the S pass over x. It is bound by reading x (and, per
    row tile, A from L2: a smaller BM means more programs but more A traffic). Half x: measured
    (bench/tune_lora.py, H200, 2026-12-04, the whole forward from a CUDA graph, bf16, K = N = 4096,
    r = 16): BK 256 took M = 128 from 0.0389 to 0.0351 ms and, with BM 64 and 8 warps, M = 4096 from
    0.2698 to 0.2584 (the best of 5 tiles each). fp32 x: first guesses."""
    if INTERPRETED:
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return (64 if M >= 8192 else 32 if M >= 2048 else 16), 64, 4, 3
    return (64, 256, 8, 3) if M >= 2048 else (16, 256, 4, 3)


def _weight_view(weight: Tensor, fan_in_fan_out: bool) -> tuple[int, int, int, int]:
    """(N, K, stride of W[n, k] along n, along k): W is read in place in either layout."""
    if fan_in_fan_out:
        K, N = weight.shape
        return N, K, weight.stride(1), weight.stride(0)
    N, K = weight.shape
    return N, K, weight.stride(0), weight.stride(1)


def _tma_operands(a: Tensor, weight: Tensor, a_box: list[int], bn: int, bk: int,
                  fan_in_fan_out: bool) -> tuple[Tensor | TensorDescriptor, Tensor | TensorDescriptor, bool]:
    """A GEMM's operands for its main loop: ``(a, weight, False)`` as they are (pointer loads), or, where
    ``_TMA`` is set and TMA can read both as they are, their tensor descriptors and True (``a`` in
    ``a_box`` boxes; the weight as stored: [N, K] in [bn, bk] boxes, [K, N] in [bk, bn] with
    fan_in_fan_out). TMA needs non-empty tensors with 16-byte aligned bases and row strides and unit inner
    strides, and here rows that do not overlap (a broadcast row, stride 0, is no tensor map a driver
    need accept)."""
    ok = _TMA and all(t.numel() > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0
                      and t.stride(0) * t.element_size() % 16 == 0 for t in (a, weight))
    if not ok:
        return a, weight, False
    return (TensorDescriptor.from_tensor(a, a_box),
            TensorDescriptor.from_tensor(weight, [bk, bn] if fan_in_fan_out else [bn, bk]), True)


def _check_x(x: Tensor, name: str = "x", contiguous: bool = True) -> None:
    if x.ndim != 2 or (contiguous and not x.is_contiguous()):
        raise ValueError(f"lora triton: {name} must be a contiguous 2-D tensor; got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"lora triton: {name} must be float16, bfloat16 or float32; got {x.dtype}")


def _check_same_device(x: Tensor, **tensors: Tensor | None) -> None:
    dev = x.device  # (each .device builds an object, ~0.4 us: one per call where there were two per tensor)
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise ValueError(f"lora triton: {name} is on {t.device}, x on {dev}")


def _check_adapter(t: Tensor, name: str, shape: tuple[int, ...], x_dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"lora triton: {name} must have shape {list(shape)}; got {list(t.shape)}")
    if t.dtype not in (torch.float32, x_dtype):
        raise ValueError(f"lora triton: {name} must be float32 or x's dtype {x_dtype}; got {t.dtype}")


def _check_adapters(A: Tensor, B: Tensor, N: int, K: int, dtype: torch.dtype) -> int:
    """Checks ``A [r, K]`` and ``B [N, r]``; returns r."""
    if A.ndim != 2:
        raise ValueError(f"lora triton: A must be [r, K]; got shape {list(A.shape)}")
    R = A.shape[0]
    _check_adapter(A, "A", (R, K), dtype)
    _check_adapter(B, "B", (N, R), dtype)
    return R


def _check_weight(weight: Tensor, fan_in_fan_out: bool, K: int, x_dtype: torch.dtype) -> tuple[int, int, int]:
    if weight.ndim != 2:
        raise ValueError(f"lora triton: weight must be 2-D; got shape {tuple(weight.shape)}")
    if weight.dtype != x_dtype:
        raise ValueError(f"lora triton: weight must have x's dtype {x_dtype}; got {weight.dtype}")
    N, Kw, swn, swk = _weight_view(weight, fan_in_fan_out)
    if Kw != K:
        want = "[K, N]" if fan_in_fan_out else "[N, K]"
        raise ValueError(f"lora triton: weight must be {want} with K = {K} (fan_in_fan_out={fan_in_fan_out}); "
                         f"got shape {tuple(weight.shape)}")
    return N, swn, swk


def _check_vector(t: Tensor | None, name: str, N: int) -> None:
    if t is not None and (tuple(t.shape) != (N,) or not t.is_floating_point()):
        raise ValueError(f"lora triton: {name} must be a floating [{N}] tensor; got {t.dtype} {list(t.shape)}")


def _dropout_args(seed: Tensor | None, p: float, x: Tensor) -> tuple[bool, Tensor, float, float]:
    """(dropout on?, seed pointer to pass, p, 1/(1-p)). Without dropout x stands in for the
    seed pointer (never read)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lora triton: dropout p must be in [0, 1); got {p}")
    if seed is None or p == 0.0:
        return False, x, 0.0, 1.0
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
        raise ValueError(f"lora triton: seed must be a one-element int64 tensor on {x.device}; "
                         f"got {seed.dtype} {list(seed.shape)} on {seed.device}")
    return True, seed, p, 1.0 / (1.0 - p)


@on_input_device
def lora_dropout_mask(seed: Tensor, M: int, K: int, p: float) -> Tensor:
    """The dropout mask every kernel here applies (and regenerates, backward).

    Parameters
    ----------
    seed : Tensor
        int64, one element (shape ``[1]``), on the device; read in the kernel (no host sync).
    M, K : int
        Rows and row length of the masked ``x [M, K]``.
    p : float
        Drop probability, in [0, 1).

    Returns
    -------
    Tensor
        bool ``[M, K]`` on seed's device, True = kept: ``keep[m, k] = u(word k % 4 of
        Philox(seed, m·⌈K/4⌉ + k // 4)) >= p`` (see ``_keep``).
    """
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"lora triton: seed must be a one-element int64 tensor; got {seed.dtype} {list(seed.shape)}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"lora triton: dropout p must be in [0, 1); got {p}")
    out = torch.empty((M, K), dtype=torch.uint8, device=seed.device)
    if M * K > 0:
        bm, bk = (16, 64) if INTERPRETED else (32, 128)
        _mask_kernel[(cdiv(M, bm), cdiv(K, bk))](seed, out, M, K, float(p), BM=bm, BK=bk)
    return out.view(torch.bool)


@on_input_device
def lora_shrink(x: Tensor, A: Tensor, seed: Tensor | None, p: float) -> Tensor:
    """``S = dropout(x) Aᵀ`` in fp32 (the intermediate the forward and backward share).

    Parameters
    ----------
    x : Tensor
        ``[M, K]``, contiguous, fp16/bf16/fp32.
    A : Tensor
        ``[r, K]``, fp32 or x's dtype, any strides.
    seed : Tensor or None
        int64 ``[1]`` on the device; None (or ``p == 0``): no dropout.
    p : float
        Drop probability in [0, 1); kept values are scaled by 1/(1-p).

    Returns
    -------
    Tensor
        ``S [M, r]``, fp32, contiguous.
    """
    _check_x(x)
    M, K = x.shape
    if A.ndim != 2:
        raise ValueError(f"lora triton: A must be [r, K]; got shape {list(A.shape)}")
    _check_adapter(A, "A", (A.shape[0], K), x.dtype)
    _check_same_device(x, A=A)
    dropout, seed_arg, p, inv_keep = _dropout_args(seed, p, x)
    R = A.shape[0]
    S = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M * R == 0:
        return S
    if K == 0:
        return S.zero_()
    _, lr_prec = _precisions(x.dtype)
    bm, bk, warps, stages = _shrink_config(M, x.dtype)
    rb = _rank_block(R)
    # Split K when the row tiles alone are too few programs: at M = 128 (16-row tiles) the H200 ran 8
    # programs, whose S pass took longer than the GEMM after it (bench/results/2026-12-04-h200/
    # run2-tune_lora.log: 63 us with dropout, where _fwd_kernel took 16). Partials summed by torch over
    # dim 0 (deterministic; the split depends on the shape only).
    tiles = cdiv(M, bm) * cdiv(R, rb)
    k_per_split, splits = _splits(K, tiles, bk)
    out = S if splits == 1 else torch.empty((splits, M, R), dtype=torch.float32, device=x.device)
    _shrink_kernel[(cdiv(M, bm), cdiv(R, rb), splits)](
        x, A, seed_arg, out, M, K, R, x.stride(0), A.stride(0), A.stride(1), k_per_split, p, inv_keep,
        BM=bm, BK=bk, RB=rb, DROPOUT=dropout, PREC=lr_prec, num_warps=warps, num_stages=stages)
    return S if splits == 1 else torch.sum(out, 0, out=S)


@on_input_device
def lora_forward(x: Tensor, weight: Tensor, fan_in_fan_out: bool, A: Tensor, B: Tensor, scaling: float,
                 bias: Tensor | None, lora_bias: Tensor | None, seed: Tensor | None, p: float, save_s: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """Fused LoRA forward: ``y = x Wᵀ + bias + s·((dropout(x) Aᵀ) Bᵀ + lora_bias)``.

    Parameters
    ----------
    x : Tensor
        ``[M, K]``, contiguous, fp16/bf16/fp32.
    weight : Tensor
        ``[N, K]``, or ``[K, N]`` when ``fan_in_fan_out`` (GPT-2 Conv1D); x's dtype; any
        strides, read in place.
    A : Tensor
        ``[r, K]``, fp32 or x's dtype. B: ``[N, r]``, fp32 or x's dtype.
    scaling : float
        s (``alpha / r`` or ``alpha / sqrt(r)``).
    bias, lora_bias : Tensor or None
        ``[N]``, floating (any float dtype; added in fp32).
    seed : Tensor or None
        int64 ``[1]`` on the device; None (or ``p == 0``): no dropout.
    p : float
        Dropout probability of the LoRA branch, in [0, 1).
    save_s : bool
        Also return S for the backward.

    Returns
    -------
    (Tensor, Tensor or None)
        ``y [M, N]`` in x's dtype; ``S [M, r]`` fp32 (``dropout(x) Aᵀ``) if ``save_s`` else None.
    """
    _check_x(x)
    M, K = x.shape
    N, swn, swk = _check_weight(weight, fan_in_fan_out, K, x.dtype)
    R = _check_adapters(A, B, N, K, x.dtype)
    _check_vector(bias, "bias", N)
    _check_vector(lora_bias, "lora_bias", N)
    _check_same_device(x, weight=weight, A=A, B=B, bias=bias, lora_bias=lora_bias)
    dropout, seed_arg, p, inv_keep = _dropout_args(seed, p, x)
    scaling = float(scaling)
    prec, lr_prec = _precisions(x.dtype)
    dev = x.device
    y = torch.empty((M, N), dtype=x.dtype, device=dev)
    if M == 0 or N == 0:
        S = torch.zeros((M, R), dtype=torch.float32, device=dev)
        return y, (S if save_s else None)
    rb = _rank_block(R)
    # The [N] vectors are indexed as contiguous (.contiguous() copies only a strided view).
    bias_arg = bias.contiguous() if bias is not None else y
    lbias_arg = lora_bias.contiguous() if lora_bias is not None else y
    if M > _SMALL_M or K == 0:
        S = lora_shrink(x, A, seed, p)
        if _cublas_mm(x, weight if fan_in_fan_out else weight.t(), y):  # y = x Wᵀ; the kernel adds the rest
            _fwd_update_kernel[(cdiv(M, _UPDATE_BM), cdiv(N, _UPDATE_BN))](
                y, S, B, bias_arg, lbias_arg, M, N, R, B.stride(0), B.stride(1), scaling, BM=_UPDATE_BM,
                BN=_UPDATE_BN, RB=rb, HAS_BIAS=bias is not None, HAS_LBIAS=lora_bias is not None, LR_PREC=lr_prec,
                num_warps=4)
            return y, (S if save_s else None)
        bm, bn, bk, group, warps, stages = _gemm_config(M, N, x.dtype)
        grid = (cdiv(M, bm) * cdiv(N, bn),)
        x_arg, w_arg, tma = _tma_operands(x, weight, [bm, bk], bn, bk, fan_in_fan_out)
        _fwd_kernel[grid](
            x_arg, w_arg, S, B, bias_arg, lbias_arg, y, M, N, K, R, x.stride(0), swn, swk, B.stride(0), B.stride(1),
            scaling, BM=bm, BN=bn, BK=bk, RB=rb, GROUP_M=group, HAS_BIAS=bias is not None,
            HAS_LBIAS=lora_bias is not None, PREC=prec, LR_PREC=lr_prec, TMA=tma, W_KN=fan_in_fan_out,
            num_warps=warps, num_stages=stages)
        return y, (S if save_s else None)
    # Decode: split K so that (N tiles + rank blocks) · splits programs fill the GPU.
    bm, bn, bk, _, warps, stages = _gemm_config(M, N, x.dtype)
    m_tiles = cdiv(M, bm)
    n_tiles, r_tiles = cdiv(N, bn), cdiv(R, rb)
    k_per_split, splits = _splits(K, (n_tiles + r_tiles) * m_tiles, bk)
    yp = torch.empty((splits, M, N), dtype=torch.float32, device=dev)
    sp = torch.empty((splits, M, R), dtype=torch.float32, device=dev)
    S = torch.empty((M, R), dtype=torch.float32, device=dev) if save_s else None
    _fwd_splitk_kernel[(n_tiles + r_tiles, m_tiles, splits)](
        x, weight, A, seed_arg, yp, sp, M, N, K, R, x.stride(0), swn, swk, A.stride(0), A.stride(1),
        k_per_split, p, inv_keep, BM=bm, BN=bn, BK=bk, RB=rb, DROPOUT=dropout, PREC=prec, LR_PREC=lr_prec,
        num_warps=warps, num_stages=stages)
    _fwd_splitk_reduce_kernel[(n_tiles, m_tiles)](
        yp, sp, B, bias_arg, lbias_arg, y, S if save_s else sp, M, N, R, splits, B.stride(0), B.stride(1),
        scaling, BM=bm, BN=bn, RB=rb, HAS_BIAS=bias is not None, HAS_LBIAS=lora_bias is not None,
        SAVE_S=save_s, LR_PREC=lr_prec, num_warps=4)
    return y, S


def _dy_config(M: int) -> tuple[int, int, int]:
    """(BM, BN, num_warps) of the dy pass. BM sets the dB/colsum partial layout (fixed per
    shape) and its size: partials are M/BM · N · r fp32 (2r/BM of a bf16 dy's bytes)."""
    if INTERPRETED:
        return 16, 16, 4
    return min(128, max(16, next_pow2(M))), 64, 8


@on_input_device
def lora_backward(dy: Tensor, x: Tensor, weight: Tensor, fan_in_fan_out: bool, A: Tensor, B: Tensor, scaling: float,
                  S: Tensor, seed: Tensor | None, p: float, need_dx: bool, need_dA: bool, need_dB: bool,
                  need_dy_colsum: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Fused LoRA backward (deterministic: every reduction over M is fixed-order partials).

    Parameters
    ----------
    dy : Tensor
        ``[M, N]``, contiguous, x's dtype.
    x : Tensor
        ``[M, K]``, contiguous, fp16/bf16/fp32 (read for dA only).
    weight, fan_in_fan_out, A, B, scaling :
        As in :func:`lora_forward`.
    S : Tensor
        ``[M, r]`` fp32, the forward's ``dropout(x) Aᵀ`` (read for dB only).
    seed, p :
        The forward's dropout (the mask is regenerated, never stored).
    need_dx, need_dA, need_dB, need_dy_colsum : bool
        Which outputs to compute; the others are returned as None.

    Returns
    -------
    (dx, dA, dB, colsum)
        ``dx [M, K]`` in x's dtype = dy W + s·(G A) ⊙ mask/(1-p) with ``G = dy B``;
        ``dA [r, K]`` fp32 = s·Gᵀ (x ⊙ mask/(1-p)); ``dB [N, r]`` fp32 = s·dyᵀ S;
        ``colsum [N]`` fp32 = dy.sum(0) (for dbias and dlora_bias).
    """
    _check_x(x, contiguous=need_dA)  # (x is read for dA only: a caller that needs no dA may pass a stand-in)
    _check_x(dy, "dy")
    M, K = x.shape
    N, swn, swk = _check_weight(weight, fan_in_fan_out, K, x.dtype)
    R = _check_adapters(A, B, N, K, x.dtype)
    if tuple(dy.shape) != (M, N) or dy.dtype != x.dtype:
        raise ValueError(f"lora triton: dy must be [{M}, {N}] {x.dtype}; got {list(dy.shape)} {dy.dtype}")
    if need_dB and (tuple(S.shape) != (M, R) or S.dtype != torch.float32 or not S.is_contiguous()):
        raise ValueError(f"lora triton: S must be a contiguous [{M}, {R}] float32 tensor; got {list(S.shape)} "
                         f"{S.dtype}")
    _check_same_device(x, dy=dy, weight=weight, A=A, B=B, S=S)
    dropout, seed_arg, p, inv_keep = _dropout_args(seed, p, x)
    scaling = float(scaling)
    prec, lr_prec = _precisions(x.dtype)
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    need_g = need_dx or need_dA
    dx = dA = dB = colsum = None
    if M == 0 or N == 0 or R == 0:
        # Degenerate sizes (an empty dimension, or r = 0): empty sums are zeros, and dx is the
        # plain dy W, left to torch.
        dA = torch.zeros((R, K), **f32) if need_dA else None
        dB = torch.zeros((N, R), **f32) if need_dB else None
        colsum = dy.float().sum(0) if need_dy_colsum else None
        if need_dx:
            w = weight.t() if fan_in_fan_out else weight
            dx = (dy.float() @ w.float()).to(x.dtype) if M * N * K > 0 else torch.zeros((M, K), dtype=x.dtype,
                                                                                       device=dev)
        return dx, dA, dB, colsum

    rb = _rank_block(R)
    r_tiles = cdiv(R, rb)
    G = None
    if need_g or need_dB or need_dy_colsum:
        bm, bn, warps = _dy_config(M)
        m_blocks = cdiv(M, bm)
        n_per_split, n_splits = _splits(N, m_blocks * r_tiles, bn)
        gp = torch.empty((n_splits, M, R), **f32) if need_g else None
        dbp = torch.empty((m_blocks, N, R), **f32) if need_dB else None
        csp = torch.empty((m_blocks, N), **f32) if need_dy_colsum else None
        dummy = next(t for t in (gp, dbp, csp) if t is not None)
        _bwd_dy_kernel[(m_blocks, n_splits, r_tiles)](
            dy, B, S if need_dB else dummy, gp if need_g else dummy, dbp if need_dB else dummy,
            csp if need_dy_colsum else dummy, M, N, R, n_per_split, B.stride(0), B.stride(1), scaling,
            BM=bm, BN=bn, RB=rb, NEED_G=need_g, NEED_DB=need_dB, NEED_CS=need_dy_colsum, LR_PREC=lr_prec,
            num_warps=warps)
        # Fixed-order sums of the partials (torch's reduction over dim 0 is deterministic).
        if need_g:
            G = gp[0] if n_splits == 1 else gp.sum(0)
        if need_dB:
            dB = dbp[0] if m_blocks == 1 else dbp.sum(0)
        if need_dy_colsum:
            colsum = csp[0] if m_blocks == 1 else csp.sum(0)
    if need_g and K > 0:
        bm, bk, bn, group, warps, stages = _dx_config(M, K, x.dtype, dropout)
        m_tiles = cdiv(M, bm)
        dx = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else None
        dap = torch.empty((m_tiles, R, K), **f32) if need_dA else None
        # dx = dy W by cuBLAS where it takes it; the kernel then adds the low-rank term (and dA's partials) in place
        cublas = need_dx and _cublas_mm(dy, weight.t() if fan_in_fan_out else weight, dx)
        dy_arg, w_arg, tma = (_tma_operands(dy, weight, [bm, bn], bn, bk, fan_in_fan_out) if need_dx and not cublas
                              else (dy, weight, False))  # (dA alone, or cuBLAS's dx, reads neither)
        _bwd_dx_kernel[(m_tiles * cdiv(K, bk),)](
            dy_arg, w_arg, G, A, x, seed_arg, dx if need_dx else G, dap if need_dA else G,
            M, N, K, R, swn, swk, A.stride(0), A.stride(1), scaling, p, inv_keep,
            BM=bm, BK=bk, BN=bn, RB=rb, GROUP_M=group, DROPOUT=dropout, NEED_DX=need_dx, NEED_DA=need_dA,
            PREC=prec, LR_PREC=lr_prec, TMA=tma, W_T=fan_in_fan_out, CUBLAS=cublas, num_warps=warps,
            num_stages=stages)
        if need_dA:
            dA = dap[0] if m_tiles == 1 else dap.sum(0)
    elif need_g:  # K == 0
        dx = torch.empty((M, 0), dtype=x.dtype, device=dev) if need_dx else None
        dA = torch.zeros((R, 0), **f32) if need_dA else None
    return dx, dA, dB, colsum


@on_input_device
def lora_multi_forward(x: Tensor, weight: Tensor, fan_in_fan_out: bool, A_stack: Tensor, B_stack: Tensor,
                       scalings: Tensor, ranks: Tensor, adapter_ids: Tensor, bias: Tensor | None) -> Tensor:
    """Several adapters in one batch (serving): ``y[m] = x[m] Wᵀ + bias + s_a·(x[m] A_aᵀ) B_aᵀ``
    with ``a = adapter_ids[m]`` (-1: base only). No host synchronisation, no data-dependent
    shapes: capturable in a CUDA graph.

    Parameters
    ----------
    x : Tensor
        ``[M, K]``, contiguous, fp16/bf16/fp32.
    weight : Tensor
        ``[N, K]`` (``[K, N]`` when ``fan_in_fan_out``), x's dtype.
    A_stack : Tensor
        ``[L, r_max, K]``; B_stack ``[L, N, r_max]``; fp32 or x's dtype, any strides. Entries
        past an adapter's rank are never read (they may hold anything).
    scalings : Tensor
        ``[L]`` floating (fp32). ranks: ``[L]`` integer; clamped to [0, r_max] in the kernel.
    adapter_ids : Tensor
        ``[M]`` int32/int64. Ids outside [-1, L) are the caller's to reject; here they are
        treated as -1 (never used as an address).
    bias : Tensor or None
        ``[N]``, floating.

    Returns
    -------
    Tensor
        ``y [M, N]`` in x's dtype.
    """
    _check_x(x)
    M, K = x.shape
    N, swn, swk = _check_weight(weight, fan_in_fan_out, K, x.dtype)
    if A_stack.ndim != 3 or B_stack.ndim != 3:
        raise ValueError(f"lora triton: A_stack must be [L, r_max, K] and B_stack [L, N, r_max]; got "
                         f"{list(A_stack.shape)} and {list(B_stack.shape)}")
    L, R = A_stack.shape[0], A_stack.shape[1]
    _check_adapter(A_stack, "A_stack", (L, R, K), x.dtype)
    _check_adapter(B_stack, "B_stack", (L, N, R), x.dtype)
    if tuple(scalings.shape) != (L,) or not scalings.is_floating_point():
        raise ValueError(f"lora triton: scalings must be a floating [{L}] tensor; got {scalings.dtype} "
                         f"{list(scalings.shape)}")
    if tuple(ranks.shape) != (L,) or ranks.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora triton: ranks must be an int32/int64 [{L}] tensor; got {ranks.dtype} "
                         f"{list(ranks.shape)}")
    if tuple(adapter_ids.shape) != (M,) or adapter_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lora triton: adapter_ids must be an int32/int64 [{M}] tensor; got {adapter_ids.dtype} "
                         f"{list(adapter_ids.shape)}")
    _check_vector(bias, "bias", N)
    _check_same_device(x, weight=weight, A_stack=A_stack, B_stack=B_stack, scalings=scalings, ranks=ranks,
                       adapter_ids=adapter_ids, bias=bias)
    prec, lr_prec = _precisions(x.dtype)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    # The small per-row / per-adapter vectors are indexed as contiguous (.contiguous() copies
    # only a strided view; no host sync either way).
    ids, ranks, scalings = adapter_ids.contiguous(), ranks.contiguous(), scalings.contiguous()
    R_eff = R if (L > 0 and K > 0) else 0
    rb = _rank_block(R_eff)
    splits = 1
    sp = y  # not read when R_eff == 0
    if R_eff > 0:
        bm, bk, warps, stages = _shrink_config(M, x.dtype)
        m_tiles, r_tiles = cdiv(M, bm), cdiv(R_eff, rb)
        # Every GEMM tile sums the splits' partials of its rows, so their number is capped:
        # (GEMM tiles) · splits · BM · r fp32 reads. Tune the cap with _shrink_config on the GPU.
        k_per_split, splits = _splits(K, m_tiles * r_tiles, bk, _MULTI_MAX_SPLITS)
        sp = torch.empty((splits, M, R_eff), dtype=torch.float32, device=x.device)
        _multi_shrink_kernel[(m_tiles, r_tiles, splits)](
            x, ids, A_stack, ranks, sp, M, K, L, R_eff, x.stride(0), A_stack.stride(0), A_stack.stride(1),
            A_stack.stride(2), k_per_split, BM=bm, BK=bk, RB=rb, PREC=lr_prec, num_warps=warps, num_stages=stages)
    bm, bn, bk, group, warps, stages = _multi_config(M, N, x.dtype)
    # x Wᵀ by cuBLAS where it takes it; the kernel then adds each row's adapter term and the bias in place
    cublas = _cublas_mm(x, weight if fan_in_fan_out else weight.t(), y)
    _multi_fwd_kernel[(cdiv(M, bm) * cdiv(N, bn),)](
        x, weight, sp, ids, B_stack, ranks, scalings, bias.contiguous() if bias is not None else y, y,
        M, N, K, L, R_eff, splits, x.stride(0), swn, swk, B_stack.stride(0), B_stack.stride(1), B_stack.stride(2),
        BM=bm, BN=bn, BK=bk, RB=rb, GROUP_M=group, HAS_BIAS=bias is not None, PREC=prec, LR_PREC=lr_prec,
        CUBLAS=cublas, num_warps=warps, num_stages=stages)
    return y
