// DEU CUDA kernels: forward and backward over x viewed as [M, N, K] (N = neurons).
//
// All math comes from deu_math.h (plan, forward_one, backward_one, plan_with_jacobian,
// apply_jacobian); this file only decides who computes what, where. Plain CUDA, no torch
// headers (~17 s per architecture: the element loops are instantiated per term mask).
//
// Two layouts:
//  * "rows"   (K == 1, N >= 32): x is [M, N] with neurons along the contiguous axis. A thread
//    owns one column (neuron) and walks a chunk of rows, so its plan is computed once and kept
//    in registers; a warp reads 32 adjacent columns of a row (coalesced, full sectors). One
//    column per thread rather than 16-byte vectors: a thread owning V columns would keep V
//    plans (~22 registers each) live, cutting occupancy, and the per-element transcendental
//    work, not the load-instruction count, dominates. Loads are unrolled over rows and
//    software-pipelined instead, to keep enough bytes in flight (see RowGroup).
//  * "planes" (K > 1, or N < 32): each (m, n) plane of K elements is contiguous. A warp owns a
//    tile "R rows x one neuron x a chunk of K", so the plan is uniform per warp and lives in
//    registers; lanes stride over the tile with 16-byte vector loads when K and the pointers
//    allow it (scalar otherwise). Tiling by warps (not blocks) keeps small planes (7x7, 14x14)
//    from idling most of a block.
//
// Backward: every program reduces its own tile's 19 plan-parameter gradients (in registers,
// then across the block's row lanes in shared memory, or across the warp with shuffles, in a
// fixed order) and writes them to its own row of workspace[P, 19, N]. A second kernel sums the
// P rows of each neuron in a fixed order and maps the sums to (a, b, c, c1, c2) with the
// neuron's Jacobian, once per neuron: the Jacobian (forward-mode duals over all 11 cases, ~2k
// instructions of SASS, divergent across a warp's neurons) done per tile instead was ~10% of
// the backward's instructions at 128 rows per tile. No atomics, so the result is deterministic.
//
// Instruction budget (sm_90 SASS from `cuobjdump -sass`, the rows kernels' 4-row fast path for
// the common neurons, term mask 0; loads, stores and loop control included): forward ~35 per
// element (deu_math.h's forward_fast), backward ~90. Commit a65fb6c's single loops for all
// neurons took 87 and 148. An H200 issues 132 SMs x 4 warp instructions per clock (1.98 GHz):
// 8192 x 4096 at 87 per element is ~87 us of issue alone, against the 104 us that forward
// measured (issue-bound then); at 35 it is ~36 us, well under the 65 us copy floor. Measured
// (H200, 2026-11-26, bench/results/2026-11-26-h200-deu-36c7ae7.md, 8192 x 4096 fp32): forward
// 82.3 us (3e24ac8: 85.4, a65fb6c: 109.2), backward 176.7 us (a65fb6c: 245.7). The forward is
// bound by load latency, not issue nor bandwidth: ncu gives DRAM 66%, SM 54%, and 11.1 of the
// 17.1 cycles between a warp's instructions waiting on loads; going from ~45 to ~35
// instructions per element took only 1.5% off it (bf16: 8%). What did not help it (same
// day): more bytes in flight through shared memory (cp.async, 2-8 stages: 86.8-88.5 us
// against 84.1), L2 prefetches ahead of the loads (88.4, 94.8), 8-row groups (91.8).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "deu.h"
#include "deu_math.h"

namespace kfuse {
namespace deu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// ---- storage <-> compute ----------------------------------------------------------------
template <typename S> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S> __device__ __forceinline__ S from_acc(typename AccOf<S>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive storage elements moved as one (16-byte when V = 16 / sizeof(S)) access.
template <typename S, int V>
struct alignas(sizeof(S) * V) Pack {
  S v[V];
};

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kfuse deu CUDA kernel '") + what +
                             "' failed to launch: " + cudaGetErrorString(err));
  }
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- tiling (pure functions of the sizes, so the workspace size and the launch agree) -------
// The rows kernels step between a thread's rows with a 32-bit stride, ty·N <= max(N, 256)
// elements (one IMAD.WIDE per access instead of a pair of 64-bit adds; the float backward
// keeps 64-bit ones, see BwdStride); rows of 2^24 neurons or more go by planes.
constexpr int64_t kRowsMaxN = int64_t(1) << 24;
bool use_rows_layout(int64_t N, int64_t K) { return K == 1 && N >= 32 && N < kRowsMaxN; }

struct RowTiling {
  int tx, ty;               // block = tx columns x ty row lanes (tx * ty <= 256)
  int64_t col_blocks;       // ceil(N / tx)
  int64_t rows_per_block;   // multiple of ty
  int64_t row_blocks;       // ceil(M / rows_per_block)
};

// target_blocks: blocks to aim for, at most (min_rows allowing); min_rows: rows per thread at
// least, so the per-block plan cost is amortised. The number of row blocks never exceeds
// max(1, target_blocks / col_blocks), which keeps grid.y small and, in the backward, the
// workspace small (e.g. 8192 x 4096: 64 row chunks, 20 MB of fp32 sums, written and read
// once: ~5 us).
RowTiling row_tiling(int64_t M, int64_t N, int64_t target_blocks, int64_t min_rows) {
  RowTiling t;
  t.tx = static_cast<int>(std::min<int64_t>(kThreads, cdiv(N, 32) * 32));
  t.ty = kThreads / t.tx;
  t.col_blocks = cdiv(N, t.tx);
  const int64_t want_row_blocks = std::max<int64_t>(1, target_blocks / t.col_blocks);
  int64_t rpb = std::max<int64_t>(cdiv(M, want_row_blocks), t.ty * min_rows);
  rpb = cdiv(rpb, t.ty) * t.ty;
  t.rows_per_block = rpb;
  t.row_blocks = cdiv(M, rpb);
  return t;
}
// Both rows kernels launch one wave of blocks (every block resident at once, see
// resident_blocks), all with the same rows, so no partial last wave idles most SMs: the fixed
// 2048 forward blocks of 8192 x 4096 were 3.1 waves at the pipelined kernel's 5 blocks per SM,
// the last ~10% full. The backward's partition, hence the order of its sums, then depends on
// the device: it is deterministic run to run on one device, as before.
constexpr int64_t kRowsFwdMinRows = 32, kRowsBwdMinRows = 32;

struct PlaneTiling {
  int64_t R;        // rows (m) per warp tile
  int64_t CK;       // K elements per warp tile (a multiple of 8 when K is split)
  int64_t kchunks;  // ceil(K / CK)
  int64_t mchunks;  // ceil(M / R)
  int64_t tiles;    // mchunks * N * kchunks
};

// A warp tile holds about `elems` elements: whole planes stacked over R rows when K is
// small, a chunk of one plane when K is large. Forward uses 2048 (the plan costs ~1
// instruction per element), backward 4096 (larger tiles amortise the per-tile reduction and
// keep the workspace, 19 sums per tile, ~0.5% of the data).
PlaneTiling plane_tiling(int64_t M, int64_t N, int64_t K, int64_t elems) {
  PlaneTiling t;
  t.CK = K <= elems ? K : elems;
  t.kchunks = cdiv(K, t.CK);
  t.R = std::min<int64_t>(M, std::max<int64_t>(1, elems / t.CK));
  t.mchunks = cdiv(M, t.R);
  t.tiles = t.mchunks * N * t.kchunks;
  return t;
}
constexpr int64_t kPlaneFwdElems = 2048, kPlaneBwdElems = 4096;

// ---- rows layout (K == 1) ---------------------------------------------------------------
// A thread walks rows m, m + ty, m + 2ty, ... of its column in groups of U rows (4), and
// loads the next group before computing the current one (software pipelining), so its loads
// are in flight while it computes instead of only while other warps do. The first group is
// loaded before the plan, overlapping the plan's computation with that latency too. (Before
// this, the forward issued half the instructions the SM could and the backward, at 16 warps
// per SM, 49%: bench/results/2026-11-26-h200-deu.md; the kernels were latency-bound.)
// (-DKFUSE_DEU_FWD_ROW_UNROLL=n overrides the forward's 4, for bench/deu_cuda_micro.cu's A/B
// builds: 8 rows per group keep 48 registers under a 5-blocks-per-SM bound, without spills, but
// the forward took 91.8 us instead of 84.1 on an H200 (2026-11-26); the backward at 8 spills
// ~1 KB per thread.)
#ifndef KFUSE_DEU_FWD_ROW_UNROLL
#define KFUSE_DEU_FWD_ROW_UNROLL 4
#endif
constexpr int kFwdRowUnroll = KFUSE_DEU_FWD_ROW_UNROLL, kBwdRowUnroll = 4;

// One group: rows r, r + ty, ..., r + (U - 1)·ty of a thread's column, r counted from the start
// of its block's row chunk (int: a chunk has far fewer than 2^31 rows). Rows at or past `rows`
// (the chunk's end) read as 0 and are never written. The bounds are checked once per group on
// the fast path: only a chunk's last group or two take the per-row checks.
template <typename S, int U>
struct RowGroup {
  typename AccOf<S>::type v[U];
  // p points at row r of the column; stride = ty·N elements between the group's rows.
  template <typename I>
  __device__ __forceinline__ void load(const S* __restrict__ p, int r, int rows, int ty, I stride) {
    if (r + (U - 1) * ty < rows) {
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = to_acc(p[u * stride]);
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) v[u] = r + u * ty < rows ? to_acc(p[u * stride]) : 0;
    }
  }
};

// The optional terms (deu_math.h's kTerm* bits) used by any neuron of the calling thread's warp
// (its active lanes): warp-uniform, so kernels branch on it once, to the element loop compiled
// for exactly those terms (with_mask, deu_math.h). Each lane's own terms are in the union, so
// the result is right whatever the lanes that vote together.
template <typename A>
__device__ __forceinline__ int warp_terms(const Plan<A>& p) {
  const unsigned mine = static_cast<unsigned>(plan_terms(p));
  const unsigned lanes = __activemask();  // the lanes converged here; each votes with its own set
  return static_cast<int>(__reduce_or_sync(lanes, mine));
}

// The rows walk of one thread: `cur` holds the group at row r (relative to the chunk start),
// xp/yp point at that row; the next group is loaded before this one is computed.
template <int kTerms, typename S, typename A>
__device__ __forceinline__ void fwd_rows_walk(const Plan<A>& p, RowGroup<S, kFwdRowUnroll> cur,
                                              const S* __restrict__ xp, S* __restrict__ yp, int r,
                                              int rows, int ty, int stride) {
  const int step = kFwdRowUnroll * ty;
  const int64_t adv = int64_t(kFwdRowUnroll) * stride;
  for (; r < rows; r += step, xp += adv, yp += adv) {
    RowGroup<S, kFwdRowUnroll> next;
    next.load(xp + adv, r + step, rows, ty, stride);
    if (r + (kFwdRowUnroll - 1) * ty < rows) {
#pragma unroll
      for (int u = 0; u < kFwdRowUnroll; ++u) yp[u * stride] = from_acc<S>(forward_one<kTerms>(p, cur.v[u]));
    } else {
#pragma unroll
      for (int u = 0; u < kFwdRowUnroll; ++u) {
        if (r + u * ty < rows) yp[u * stride] = from_acc<S>(forward_one<kTerms>(p, cur.v[u]));
      }
    }
    cur = next;
  }
}

// Which rows a block of a rows kernel walks: a contiguous chunk of rows_per_block rows (block
// row index blockIdx.y), or, "sweeping", every gridDim.y-th row from row blockIdx.y on, so that
// at any moment the whole grid works on nearby rows and sweeps memory front to back, as a copy
// does, instead of ~gridDim.y regions at once. The forward sweeps: fp32 8192 x 4096 on an H200
// took 80.3 us (80.5 at 5 blocks per SM) against 84.2 (84.9) in chunks, and 81.5 against 83.0
// in a second run; 2-byte types the same either way (bf16: 76.4 against 77.0 us), 2026-11-26
// (bench/results/2026-11-26-h200-deu-5cdc7c1.md; the backward sweeping: 177.9 against 179.1).
// The same grid either way, so the backward's workspace (one row of sums per block) is
// unchanged.
// -DKFUSE_DEU_FWD_ROWS_SWEEP=0 / -DKFUSE_DEU_BWD_ROWS_SWEEP=1 flip them, for
// bench/deu_cuda_micro.cu's A/B builds.
#ifndef KFUSE_DEU_FWD_ROWS_SWEEP
#define KFUSE_DEU_FWD_ROWS_SWEEP 1
#endif
#ifndef KFUSE_DEU_BWD_ROWS_SWEEP
#define KFUSE_DEU_BWD_ROWS_SWEEP 0
#endif
constexpr bool kFwdRowsSweep = KFUSE_DEU_FWD_ROWS_SWEEP != 0, kBwdRowsSweep = KFUSE_DEU_BWD_ROWS_SWEEP != 0;

// The rows of the calling thread's block (`rows`: how many), the stride between the thread's
// rows in elements, and the offset of its first row in column n. A sweep's stride ty·gridDim.y·N
// is at most ~256·max(col_blocks, target blocks) (row_tiling), and N < kRowsMaxN: it fits an int.
template <bool kSweep, typename I>
struct BlockRows {
  int rows;
  I stride;
  int64_t off;
  __device__ __forceinline__ BlockRows(int64_t M, int64_t N, int64_t rows_per_block, int64_t n) {
    const int ty = blockDim.y, r = threadIdx.y;
    if (kSweep) {
      const int64_t rb = gridDim.y;
      rows = static_cast<int>((M - blockIdx.y + rb - 1) / rb);
      stride = ty * static_cast<I>(rb * N);
      off = (blockIdx.y + rb * r) * N + n;
    } else {
      const int64_t m0 = blockIdx.y * rows_per_block;
      rows = static_cast<int>(std::min(M - m0, rows_per_block));
      stride = ty * static_cast<I>(N);  // see kRowsMaxN
      off = (m0 + r) * N + n;
    }
  }
};

// Blocks per SM the forward rows kernel is compiled for, for float storage: 6 on sm_90 (40
// registers, 48 warps per SM; 8 bytes of spills since the rows sweep, none in chunks): 82.3 us
// against 84.1 at the 48 registers ptxas picks unbounded (5 blocks), H200, 2026-11-26, same run
// (sweeping: 80.3 against 80.5, 81.5 against 82.0). (Before this file's forward lost ~9
// instructions per element, the bound spilled and took 92.4 us against 85.8.) Unbounded on
// sm_80, where the bound spills 8 bytes (not measured there). 2-byte types spill 8 bytes at 6
// and took 76.1 us against 75.6 at the 48 registers (5 blocks) ptxas then picked unbounded; the
// plan's range scaling (deu_math.h: range_scale) took them to 58 unbounded (4 blocks), so they
// are bound to 5 (48 registers, no spills, sm_90; not yet timed). Double: 1 block (~120
// registers). Float: 16 bytes of spills with the range scaling, in the loops of rare term masks.
// -DKFUSE_DEU_FWD_ROWS_MIN_BLOCKS=n (0: unbounded) overrides the float bound, for
// bench/deu_cuda_micro.cu's A/B builds.
#ifndef KFUSE_DEU_FWD_ROWS_MIN_BLOCKS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define KFUSE_DEU_FWD_ROWS_MIN_BLOCKS 0
#else
#define KFUSE_DEU_FWD_ROWS_MIN_BLOCKS 6
#endif
#endif
template <typename S>
constexpr int kFwdRowsMinBlocks = sizeof(S) == 8 ? 1 : std::is_same<S, float>::value ? KFUSE_DEU_FWD_ROWS_MIN_BLOCKS : 5;

template <typename S>
__global__ void __launch_bounds__(kThreads, kFwdRowsMinBlocks<S>)
    fwd_rows_kernel(const S* __restrict__ x, S* __restrict__ y,
                    const typename AccOf<S>::type* __restrict__ coeffs, int64_t M, int64_t N,
                    int64_t rows_per_block) {
  using A = typename AccOf<S>::type;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;  // no block-wide synchronisation in this kernel
  const int ty = blockDim.y, r = threadIdx.y;
  const BlockRows<kFwdRowsSweep, int> b(M, N, rows_per_block, n);
  RowGroup<S, kFwdRowUnroll> cur;
  cur.load(x + b.off, r, b.rows, ty, b.stride);
  const Plan<A> p = plan_from_coeffs(coeffs + kCoeffs * n);
  with_mask(warp_terms(p), [&](auto terms) {
    fwd_rows_walk<decltype(terms)::value>(p, cur, x + b.off, y + b.off, r, b.rows, ty, b.stride);
  });
}

// The backward's row stride: 32-bit for 2-byte types (202.4 us instead of 215.1 for bf16 on an
// H200, 2026-11-26, same run), 64-bit for float (176.2 us instead of 187.5) and double.
template <typename S>
using BwdStride = std::conditional_t<sizeof(S) == 2, int, int64_t>;

template <int kTerms, typename S, typename A>
__device__ __forceinline__ void bwd_rows_walk(const Plan<A>& p, RowGroup<S, kBwdRowUnroll> xs,
                                              RowGroup<S, kBwdRowUnroll> gs,
                                              const S* __restrict__ xp, const S* __restrict__ gp,
                                              S* __restrict__ gxp, int r, int rows, int ty,
                                              BwdStride<S> stride, A* acc) {
  const int step = kBwdRowUnroll * ty;
  const int64_t adv = int64_t(kBwdRowUnroll) * stride;
  for (; r < rows; r += step, xp += adv, gp += adv, gxp += adv) {
    RowGroup<S, kBwdRowUnroll> xn, gn;
    xn.load(xp + adv, r + step, rows, ty, stride);
    gn.load(gp + adv, r + step, rows, ty, stride);
    if (r + (kBwdRowUnroll - 1) * ty < rows) {
#pragma unroll
      for (int u = 0; u < kBwdRowUnroll; ++u)
        gxp[u * stride] = from_acc<S>(backward_one<kTerms>(p, xs.v[u], gs.v[u], acc));
    } else {
#pragma unroll
      for (int u = 0; u < kBwdRowUnroll; ++u) {
        if (r + u * ty < rows) gxp[u * stride] = from_acc<S>(backward_one<kTerms>(p, xs.v[u], gs.v[u], acc));
      }
    }
    xs = xn;
    gs = gn;
  }
}

// Blocks per SM the backward rows kernel is compiled for: 3 (at most 80 registers) for float
// compute, for 24 warps per SM instead of 16. Uncapped it took 97 registers (sm_90), so 2
// blocks of 256 threads; capped, the element loops of every term mask stay within ~2% of their
// size and only loops of masks with several rare terms spill (a few words; none in the
// common mask-0 loop). Timed (H200, 2026-11-26, 8192 x 4096 fp32): 176.7 us capped, 183.3 us
// uncapped. Double compute takes ~160 registers.
// (-DKFUSE_DEU_BWD_ROWS_MIN_BLOCKS=n overrides the 3, for bench/deu_cuda_micro.cu's A/B builds.)
#ifndef KFUSE_DEU_BWD_ROWS_MIN_BLOCKS
#define KFUSE_DEU_BWD_ROWS_MIN_BLOCKS 3
#endif
template <typename S>
constexpr int kBwdRowsMinBlocks = sizeof(S) == 8 ? 1 : KFUSE_DEU_BWD_ROWS_MIN_BLOCKS;

// grid = (col_blocks, row_blocks): block (bx, rb) writes workspace[rb, :, its columns].
template <typename S>
__global__ void __launch_bounds__(kThreads, kBwdRowsMinBlocks<S>)
    bwd_rows_kernel(const S* __restrict__ gy, const S* __restrict__ x,
                    const typename AccOf<S>::type* __restrict__ coeffs, S* __restrict__ gx,
                    typename AccOf<S>::type* __restrict__ workspace, int64_t M, int64_t N,
                    int64_t rows_per_block) {
  using A = typename AccOf<S>::type;
  extern __shared__ unsigned char smem_raw[];  // [kPlanParams][tx * ty] when ty > 1
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = n < N;
  const int ty = blockDim.y;
  const int64_t rb = blockIdx.y;
  A acc[kPlanParams];
#pragma unroll
  for (int i = 0; i < kPlanParams; ++i) acc[i] = A(0);
  if (active) {
    const int r = threadIdx.y;
    const BlockRows<kBwdRowsSweep, BwdStride<S>> b(M, N, rows_per_block, n);
    RowGroup<S, kBwdRowUnroll> xs, gs;
    xs.load(x + b.off, r, b.rows, ty, b.stride);
    gs.load(gy + b.off, r, b.rows, ty, b.stride);
    const Plan<A> p = plan_from_coeffs(coeffs + kCoeffs * n);
    with_mask(warp_terms(p), [&](auto terms) {
      bwd_rows_walk<decltype(terms)::value>(p, xs, gs, x + b.off, gy + b.off, gx + b.off, r, b.rows, ty, b.stride,
                                            acc);
    });
  }
  if (ty > 1) {
    // Row lanes of one column are summed by lane 0 in increasing order: deterministic.
    A* red = reinterpret_cast<A*>(smem_raw);
    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int i = 0; i < kPlanParams; ++i) red[i * nthreads + tid] = acc[i];
    __syncthreads();
    if (threadIdx.y == 0) {
      for (int j = 1; j < ty; ++j) {
#pragma unroll
        for (int i = 0; i < kPlanParams; ++i) acc[i] += red[i * nthreads + j * blockDim.x + threadIdx.x];
      }
    }
  }
  if (active && threadIdx.y == 0) {
    A* dst = workspace + rb * kPlanParams * N + n;  // coalesced across the block's columns
#pragma unroll
    for (int i = 0; i < kPlanParams; ++i) dst[i * N] = acc[i];
  }
}

// ---- planes layout (K > 1, or narrow N) -------------------------------------------------
// Walks the units (V-element vectors) of one warp tile: rows x lenv units, lane-strided.
// (r, c) is advanced incrementally instead of dividing per unit.
struct TileWalk {
  int r, c, q, s, lenv;
  __device__ __forceinline__ TileWalk(int lane, int lenv_) : lenv(lenv_) {
    r = lane / lenv; c = lane % lenv; q = 32 / lenv; s = 32 % lenv;
  }
  __device__ __forceinline__ void next() {
    c += s; r += q;
    if (c >= lenv) { c -= lenv; ++r; }
  }
};

struct TileCoords {
  int64_t n, mc, kc, base;  // base: element offset of (m0, n, k0)
  int rows, lenv;           // rows in this tile, units per row
  __device__ __forceinline__ int64_t offset(const TileWalk& w, int64_t row_stride, int V) const {
    return base + w.r * row_stride + static_cast<int64_t>(w.c) * V;
  }
};

// The planes kernels' warps grid-stride over the warp tiles: this warp's first tile, and the
// stride between its tiles.
struct WarpTiles {
  int64_t first, stride;
};
__device__ __forceinline__ WarpTiles warp_tiles() {
  return {static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5),
          static_cast<int64_t>(gridDim.x) * kWarpsPerBlock};
}

template <typename S, int V>
__device__ __forceinline__ Pack<S, V> load_pack(const S* __restrict__ p) {
  return *reinterpret_cast<const Pack<S, V>*>(p);
}

__device__ __forceinline__ TileCoords tile_coords(int64_t tile, int64_t M, int64_t N, int64_t K,
                                                  const PlaneTiling& pt, int V) {
  TileCoords c;
  c.kc = tile % pt.kchunks;
  const int64_t rest = tile / pt.kchunks;
  c.n = rest % N;
  c.mc = rest / N;
  const int64_t m0 = c.mc * pt.R, k0 = c.kc * pt.CK;
  c.rows = static_cast<int>(std::min(pt.R, M - m0));
  c.lenv = static_cast<int>(std::min(pt.CK, K - k0) / V);
  c.base = (m0 * N + c.n) * K + k0;
  return c;
}

// A lane's walk over one tile: `cur` holds its unit at w (loaded by the caller before the
// plan); the next unit is loaded before the current one is computed, as in the rows layout.
template <int kTerms, typename S, int V, typename A>
__device__ __forceinline__ void fwd_tile(const Plan<A>& p, const TileCoords& tc, const S* __restrict__ x,
                                         S* __restrict__ y, int lane, int64_t row_stride, TileWalk w,
                                         Pack<S, V> cur) {
  using P = Pack<S, V>;
  const int units = tc.rows * tc.lenv;
  for (int u = lane; u < units; u += 32) {
    const int64_t off = tc.offset(w, row_stride, V);
    w.next();
    P next = {};
    if (u + 32 < units) next = load_pack<S, V>(x + tc.offset(w, row_stride, V));
    P out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = from_acc<S>(forward_one<kTerms>(p, to_acc(cur.v[j])));
    *reinterpret_cast<P*>(y + off) = out;
    cur = next;
  }
}

// The planes forward's blocks per SM as before Plan::m7 (sm_90 ptxas, 2026-12-04: V = 1 at 48
// registers, 5 blocks of 256 threads; float V = 4 at 62, 4; half V = 8 at 64, 4; bf16 V = 8 at 73, 3):
// its kTermPoly variant (two expm1f) took V = 1 to 56-58 registers (4 blocks) for every neuron's
// tiles; the bound moves that variant's excess into spills (8 bytes) instead. (A bound of 1 block
// let ptxas take 88-141 registers for V > 1.)
template <typename S, int V>
constexpr int kFwdPlanesMinBlocks = sizeof(S) == 8 ? 1 : V == 1 ? 5 : std::is_same<S, __nv_bfloat16>::value ? 3 : 4;

template <typename S, int V>
__global__ void __launch_bounds__(kThreads, kFwdPlanesMinBlocks<S, V>)
    fwd_planes_kernel(const S* __restrict__ x, S* __restrict__ y,
                      const typename AccOf<S>::type* __restrict__ coeffs, int64_t M, int64_t N,
                      int64_t K, PlaneTiling pt) {
  using A = typename AccOf<S>::type;
  using P = Pack<S, V>;
  const int lane = threadIdx.x & 31;
  const WarpTiles wt = warp_tiles();
  const int64_t row_stride = N * K;
  for (int64_t tile = wt.first; tile < pt.tiles; tile += wt.stride) {
    const TileCoords tc = tile_coords(tile, M, N, K, pt, V);
    const TileWalk w(lane, tc.lenv);
    P first = {};
    if (lane < tc.rows * tc.lenv) first = load_pack<S, V>(x + tc.offset(w, row_stride, V));
    const Plan<A> p = plan_from_coeffs(coeffs + kCoeffs * tc.n);
    with_mask(plan_terms(p), [&](auto terms) {  // warp-uniform: one neuron per tile
      fwd_tile<decltype(terms)::value, S, V>(p, tc, x, y, lane, row_stride, w, first);
    });
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

template <int kTerms, typename S, int V, typename A>
__device__ __forceinline__ void bwd_tile(const Plan<A>& p, const TileCoords& tc, const S* __restrict__ gy,
                                         const S* __restrict__ x, S* __restrict__ gx, int lane,
                                         int64_t row_stride, TileWalk w, Pack<S, V> xs, Pack<S, V> gs,
                                         A* acc) {
  using P = Pack<S, V>;
  const int units = tc.rows * tc.lenv;
  for (int u = lane; u < units; u += 32) {
    const int64_t off = tc.offset(w, row_stride, V);
    w.next();
    P xn = {}, gn = {};
    if (u + 32 < units) {
      const int64_t noff = tc.offset(w, row_stride, V);
      xn = load_pack<S, V>(x + noff);
      gn = load_pack<S, V>(gy + noff);
    }
    P out;
#pragma unroll
    for (int j = 0; j < V; ++j)
      out.v[j] = from_acc<S>(backward_one<kTerms>(p, to_acc(xs.v[j]), to_acc(gs.v[j]), acc));
    *reinterpret_cast<P*>(gx + off) = out;
    xs = xn;
    gs = gn;
  }
}

// Warp tile (mc, n, kc) writes workspace[mc * kchunks + kc, :, n].
template <typename S, int V>
__global__ void __launch_bounds__(kThreads)
    bwd_planes_kernel(const S* __restrict__ gy, const S* __restrict__ x,
                      const typename AccOf<S>::type* __restrict__ coeffs, S* __restrict__ gx,
                      typename AccOf<S>::type* __restrict__ workspace, int64_t M, int64_t N,
                      int64_t K, PlaneTiling pt) {
  using A = typename AccOf<S>::type;
  using P = Pack<S, V>;
  const int lane = threadIdx.x & 31;
  const WarpTiles wt = warp_tiles();
  const int64_t row_stride = N * K;
  // tile is warp-uniform, so every lane runs the same iterations (full-mask shuffles are safe).
  for (int64_t tile = wt.first; tile < pt.tiles; tile += wt.stride) {
    const TileCoords tc = tile_coords(tile, M, N, K, pt, V);
    A acc[kPlanParams];
#pragma unroll
    for (int i = 0; i < kPlanParams; ++i) acc[i] = A(0);
    {
      const TileWalk w(lane, tc.lenv);
      P xs = {}, gs = {};
      if (lane < tc.rows * tc.lenv) {
        const int64_t off = tc.offset(w, row_stride, V);
        xs = load_pack<S, V>(x + off);
        gs = load_pack<S, V>(gy + off);
      }
      const Plan<A> p = plan_from_coeffs(coeffs + kCoeffs * tc.n);
      with_mask(plan_terms(p), [&](auto terms) {  // warp-uniform: one neuron per tile
        bwd_tile<decltype(terms)::value, S, V>(p, tc, gy, x, gx, lane, row_stride, w, xs, gs, acc);
      });
    }
    // Butterfly reduction: fixed order, every lane ends with the same (deterministic) sum.
#pragma unroll
    for (int i = 0; i < kPlanParams; ++i) {
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) acc[i] += shfl_xor(acc[i], m);
    }
    if (lane == 0) {
      A* dst = workspace + (tc.mc * pt.kchunks + tc.kc) * kPlanParams * N + tc.n;
#pragma unroll
      for (int i = 0; i < kPlanParams; ++i) dst[i * N] = acc[i];
    }
  }
}

// ---- the per-neuron finish of the backward ----------------------------------------------
// Block = kFinishNeurons neurons x kFinishLanes lanes over the P workspace rows (loads coalesced
// across neurons; enough parallel loads that the ~P·19 reads per neuron are not one chain).
// Lane y sums rows y, y + kFinishLanes, ... in order, then lane 0 sums the lanes in order:
// a fixed order, so grad_coeffs is deterministic.
constexpr int kFinishNeurons = 32, kFinishLanes = 8;

template <typename A>
__global__ void __launch_bounds__(kFinishNeurons * kFinishLanes)
    bwd_finish_kernel(const A* __restrict__ workspace, const A* __restrict__ coeffs,
                      A* __restrict__ grad_coeffs, int64_t P, int64_t N) {
  __shared__ A red[kFinishLanes][kPlanParams][kFinishNeurons];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kFinishNeurons + threadIdx.x;
  A acc[kPlanParams];
#pragma unroll
  for (int i = 0; i < kPlanParams; ++i) acc[i] = A(0);
  if (n < N) {
    for (int64_t p = threadIdx.y; p < P; p += kFinishLanes) {
      const A* src = workspace + p * kPlanParams * N + n;
#pragma unroll
      for (int i = 0; i < kPlanParams; ++i) acc[i] += src[i * N];
    }
  }
#pragma unroll
  for (int i = 0; i < kPlanParams; ++i) red[threadIdx.y][i][threadIdx.x] = acc[i];
  __syncthreads();
  if (threadIdx.y != 0 || n >= N) return;
  for (int j = 1; j < kFinishLanes; ++j) {
#pragma unroll
    for (int i = 0; i < kPlanParams; ++i) acc[i] += red[j][i][threadIdx.x];
  }
  A jac[kPlanParams][kCoeffs];
  plan_with_jacobian(coeffs + kCoeffs * n, jac);
  A out[kCoeffs];
  apply_jacobian(acc, jac, out);
#pragma unroll
  for (int k = 0; k < kCoeffs; ++k) grad_coeffs[kCoeffs * n + k] = out[k];
}

// ---- launchers ----------------------------------------------------------------------------
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t plane_blocks(const PlaneTiling& pt) {
  // Grid-stride over tiles beyond this (gridDim.x itself allows 2^31 - 1).
  return std::min<int64_t>(cdiv(pt.tiles, kWarpsPerBlock), int64_t(1) << 30);
}

// Blocks of `kernel` (kThreads each, `smem` bytes of dynamic shared memory) resident at once on
// the current device: SMs x blocks per SM, cached per device in `cache`; 2048 if the runtime
// cannot say.
constexpr int kMaxDevices = 64;
// (-DKFUSE_DEU_ROWS_BLOCKS=n makes it n instead, for bench/deu_cuda_micro.cu's A/B builds; 2048
// blocks instead of one wave: backward 207.2 us instead of 176.7 on an H200, 2026-11-26.)
template <typename Kernel>
int64_t resident_blocks(Kernel kernel, size_t smem, std::atomic<int64_t>* cache) {
#ifdef KFUSE_DEU_ROWS_BLOCKS
  return KFUSE_DEU_ROWS_BLOCKS;
#endif
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 2048;
  if (dev < kMaxDevices) {
    if (const int64_t c = cache[dev].load(std::memory_order_relaxed)) return c;
  }
  int sms = 0, per_sm = 0;
  int64_t blocks = 2048;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) == cudaSuccess) {
    if (sms > 0 && per_sm > 0) blocks = static_cast<int64_t>(sms) * per_sm;
  } else {
    cudaGetLastError();  // the failed query's error must not be taken for the launch's
  }
  if (dev < kMaxDevices) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <typename S>
int64_t fwd_rows_resident_blocks() {
  static std::atomic<int64_t> cache[kMaxDevices];  // static: zeroed, 0 = not yet known
  return resident_blocks(fwd_rows_kernel<S>, 0, cache);
}

// The backward's shared memory (row lanes' sums) when a block has several row lanes (N < 256).
template <typename S>
size_t bwd_rows_smem(const RowTiling& t) {
  return t.ty > 1 ? sizeof(typename AccOf<S>::type) * kPlanParams * t.tx * t.ty : 0;
}

template <typename S>
RowTiling bwd_row_tiling(int64_t M, int64_t N) {
  static std::atomic<int64_t> cache[2][kMaxDevices];  // [with row lanes][device]
  const RowTiling probe = row_tiling(M, N, 1, kRowsBwdMinRows);  // tx, ty depend on N only
  const size_t smem = bwd_rows_smem<S>(probe);
  return row_tiling(M, N, resident_blocks(bwd_rows_kernel<S>, smem, cache[smem > 0]), kRowsBwdMinRows);
}

template <typename S>
void forward_typed(const S* x, S* y, const typename AccOf<S>::type* coeffs, int64_t M, int64_t N,
                   int64_t K, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  if (use_rows_layout(N, K)) {
    const RowTiling t = row_tiling(M, N, fwd_rows_resident_blocks<S>(), kRowsFwdMinRows);
    const dim3 grid(static_cast<unsigned>(t.col_blocks), static_cast<unsigned>(t.row_blocks));
    fwd_rows_kernel<S><<<grid, dim3(t.tx, t.ty), 0, stream>>>(x, y, coeffs, M, N, t.rows_per_block);
    return check_launch("deu fwd_rows");
  }
  const PlaneTiling pt = plane_tiling(M, N, K, kPlaneFwdElems);
  constexpr int V = 16 / sizeof(S);
  const unsigned blocks = static_cast<unsigned>(plane_blocks(pt));
  if (K % V == 0 && aligned16(x) && aligned16(y)) {
    fwd_planes_kernel<S, V><<<blocks, kThreads, 0, stream>>>(x, y, coeffs, M, N, K, pt);
  } else {
    fwd_planes_kernel<S, 1><<<blocks, kThreads, 0, stream>>>(x, y, coeffs, M, N, K, pt);
  }
  check_launch("deu fwd_planes");
}

// Workspace rows P: one per row block (rows layout) or per (m chunk, k chunk) (planes).
template <typename S>
int64_t num_partials(int64_t M, int64_t N, int64_t K) {
  if (use_rows_layout(N, K)) return bwd_row_tiling<S>(M, N).row_blocks;
  const PlaneTiling pt = plane_tiling(M, N, K, kPlaneBwdElems);
  return pt.mchunks * pt.kchunks;
}

template <typename S>
void backward_typed(const S* gy, const S* x, const typename AccOf<S>::type* coeffs, S* gx,
                    typename AccOf<S>::type* grad_coeffs, typename AccOf<S>::type* workspace,
                    int64_t M, int64_t N, int64_t K, cudaStream_t stream) {
  using A = typename AccOf<S>::type;
  if (M <= 0 || N <= 0 || K <= 0) return;
  if (use_rows_layout(N, K)) {
    const RowTiling t = bwd_row_tiling<S>(M, N);
    const dim3 grid(static_cast<unsigned>(t.col_blocks), static_cast<unsigned>(t.row_blocks));
    const size_t smem = bwd_rows_smem<S>(t);
    bwd_rows_kernel<S><<<grid, dim3(t.tx, t.ty), smem, stream>>>(gy, x, coeffs, gx, workspace, M, N,
                                                                 t.rows_per_block);
    check_launch("deu bwd_rows");
  } else {
    const PlaneTiling pt = plane_tiling(M, N, K, kPlaneBwdElems);
    constexpr int V = 16 / sizeof(S);
    const unsigned blocks = static_cast<unsigned>(plane_blocks(pt));
    if (K % V == 0 && aligned16(x) && aligned16(gy) && aligned16(gx)) {
      bwd_planes_kernel<S, V><<<blocks, kThreads, 0, stream>>>(gy, x, coeffs, gx, workspace, M, N, K, pt);
    } else {
      bwd_planes_kernel<S, 1><<<blocks, kThreads, 0, stream>>>(gy, x, coeffs, gx, workspace, M, N, K, pt);
    }
    check_launch("deu bwd_planes");
  }
  const unsigned finish_blocks = static_cast<unsigned>(cdiv(N, kFinishNeurons));
  bwd_finish_kernel<A><<<finish_blocks, dim3(kFinishNeurons, kFinishLanes), 0, stream>>>(
      workspace, coeffs, grad_coeffs, num_partials<S>(M, N, K), N);
  check_launch("deu bwd_finish");
}

}  // namespace

void forward_cuda(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                  int64_t K, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32:
      return forward_typed(static_cast<const float*>(x), static_cast<float*>(y),
                           static_cast<const float*>(coeffs), M, N, K, s);
    case DType::f64:
      return forward_typed(static_cast<const double*>(x), static_cast<double*>(y),
                           static_cast<const double*>(coeffs), M, N, K, s);
    case DType::f16:
      return forward_typed(static_cast<const __half*>(x), static_cast<__half*>(y),
                           static_cast<const float*>(coeffs), M, N, K, s);
    case DType::bf16:
      return forward_typed(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y),
                           static_cast<const float*>(coeffs), M, N, K, s);
  }
  throw std::runtime_error("kfuse deu forward_cuda: unsupported dtype");
}

int64_t backward_cuda_workspace_elems(DType dtype, int64_t M, int64_t N, int64_t K) {
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  switch (dtype) {
    case DType::f32: return num_partials<float>(M, N, K) * kPlanParams * N;
    case DType::f64: return num_partials<double>(M, N, K) * kPlanParams * N;
    case DType::f16: return num_partials<__half>(M, N, K) * kPlanParams * N;
    case DType::bf16: return num_partials<__nv_bfloat16>(M, N, K) * kPlanParams * N;
  }
  throw std::runtime_error("kfuse deu backward_cuda_workspace_elems: unsupported dtype");
}

void backward_cuda(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                   void* grad_x, void* grad_coeffs, void* workspace, int64_t M, int64_t N, int64_t K,
                   void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32:
      return backward_typed(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                            static_cast<const float*>(coeffs), static_cast<float*>(grad_x),
                            static_cast<float*>(grad_coeffs), static_cast<float*>(workspace), M, N, K, s);
    case DType::f64:
      return backward_typed(static_cast<const double*>(grad_y), static_cast<const double*>(x),
                            static_cast<const double*>(coeffs), static_cast<double*>(grad_x),
                            static_cast<double*>(grad_coeffs), static_cast<double*>(workspace), M, N, K, s);
    case DType::f16:
      return backward_typed(static_cast<const __half*>(grad_y), static_cast<const __half*>(x),
                            static_cast<const float*>(coeffs), static_cast<__half*>(grad_x),
                            static_cast<float*>(grad_coeffs), static_cast<float*>(workspace), M, N, K, s);
    case DType::bf16:
      return backward_typed(static_cast<const __nv_bfloat16*>(grad_y),
                            static_cast<const __nv_bfloat16*>(x), static_cast<const float*>(coeffs),
                            static_cast<__nv_bfloat16*>(grad_x), static_cast<float*>(grad_coeffs),
                            static_cast<float*>(workspace), M, N, K, s);
  }
  throw std::runtime_error("kfuse deu backward_cuda: unsupported dtype");
}

}  // namespace deu
}  // namespace kfuse
