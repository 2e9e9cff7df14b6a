// Multi-table embedding-bag CPU kernels (python/kfuse/ops/embedding.py, backend "cpu"; the
// definition is python/kfuse/reference/embedding.py, the layout embedding.h's).
//
// Forward: tasks of up to 256 consecutive bags of one feature (forward_bags_per_task: 64 or more unless the
// bags are long); a bag's rows are summed in A in registers, a whole row of up to kFwdBlockBytes of
// accumulators at a time (vectorised over dim), the rows kFwdPrefetchBytes ahead prefetched.
// Backward: per table a stable counting sort of its occurrences by row (plan_backward, tables in
// parallel), then one task per unique row: its run of occurrences summed in increasing flat position
// by one thread, into the output (sparse) or into a per-thread buffer applied to the row at once
// (fused optimizer). The order of every sum is fixed by the data alone, so the bits do not depend on
// the thread count or the schedule.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../cpu_convert.h"
#include "../cpu_isa.h"
#include "embedding.h"

// No fused multiply-adds: every product and sum is rounded on its own, so the bits are the same in
// the AVX-512, AVX2 + FMA and baseline clones (and equal PyTorch's op-by-op float32 update, which
// the tests check bit for bit). GCC contracted 616 of them otherwise; the kernels are memory-bound.
#pragma GCC optimize("fp-contract=off")
#if defined(__clang__)  // which ignores the GCC pragma, and contracts by default (aarch64: 590 FMAs)
#pragma clang fp contract(off)
#endif

namespace kfuse {
namespace embedding {
namespace {

using cpu::Acc;
using cpu::as_bits;
using cpu::as_float;
using cpu::BF16;
using cpu::Half;
using cpu::load;
using cpu::pick;
using cpu::store;

// The per-task loops are KF_CLONES (cpu_isa.h), or one entry per ISA (the forward's); the OpenMP regions are not.
#define KF_INLINE inline __attribute__((always_inline))
// A lambda inlined into its caller, so it is compiled for the caller's clone's ISA (a lambda's body is
// otherwise a function of its own, compiled for the baseline ISA).
#define KF_INLINE_LAMBDA __attribute__((always_inline))

// Bags per psw task, and the fewest per forward task: 64 bags of ~20 indices give ~200 tasks for the
// medical shape (3 features x 4096 bags), plenty for dynamic balancing, each long enough to
// amortise the scheduling.
constexpr int64_t kBagsPerTask = 64;
// Prefetch distances: table rows this many indices ahead in the forward and grad_out slices this
// many occurrences ahead in the backward (within a task), and the table row (Adam: and its states)
// kRowsAhead unique rows ahead of a fused update, a cold line of a table of tens of MB otherwise
// loaded only when the update needs it. Medical shape, one thread, best of 3 on the shared 2-core
// box: forward 15.1 -> 11.2 ms, plan + fused row-wise Adagrad 20.1 -> 16.2 ms (16 and 4: 11.3 and
// 19.6 ms).
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kRowsAhead = 2;
// The forward's own choices, each timed on the medical shape in fp32 against the per-table
// nn.EmbeddingBag loop (ATen's, i.e. FBGEMM's JIT kernel) in the same process, best of 25 x 3 on
// the shared 2-core box (AMD EPYC, AVX-512; load 1-10 from other jobs, so ratios, not times):
// - kFwdBlockBytes: a bag's accumulators held in registers at a time, 8 vectors: 512 bytes with AVX-512 (a
//   whole D = 128 float row in 8 zmm), so each bag's rows are read once; 256-byte blocks (two passes over the
//   rows) took 1.05x the loop's time where 512 took 0.87x (1 thread, 16 rows ahead). With AVX2 too: 16 ymm
//   accumulators, all the registers there are, each row's loads folded into their vaddps (once sum_block hid
//   its zero row from GCC, which had kept every load on the stack). Zen 3 VM, 2026-12-08, old and new builds'
//   _C.embedding_forward alternating in one process: medical shape 0.83-0.89x the 256-byte blocks' time
//   (2 threads; 1 thread 0.88x; with per-sample weights 0.83x; fp16 0.96x, bf16 0.99x), FBGEMM's shape 0.88x;
//   one table of 100k x 128, B 512 bags of 20, 1 thread: 0.88x (8 rows, all in L1: 0.69x); D = 32-96 0.95-0.97x,
//   D = 256 1.05x (bench/results/2026-12-08-cpu-embedding-avx2-blocks.md).
// - kFwdPrefetchBytes: how far ahead the forward prefetches, in bytes of rows (the distance in rows
//   is this over the row size, 4 to 256): 32 KiB, 64 rows of 512 bytes. The rows of a bag come from
//   L2 / L3 (the medical shape touches 19 MB of distinct rows per call; the Zipf-hot ones stay in
//   L2), so the distance must cover L3 latency: 8 rows ahead took 1.13x the loop's time, 16 0.87x,
//   32 0.64x, 64 0.58x (1 thread; 2 threads: 1.05, 0.85, 0.66, 0.58x); in another run 48 and 64
//   took 0.63 and 0.62x, 96 0.66x, 128 0.68x. Every line of a row needs its own prefetch: every
//   other line (the adjacent-line prefetcher fetching the rest) took 1.3-1.4x where all took
//   0.61-0.66x, and a second, prefetcht1 pass twice as far ahead 0.80-0.86x.
// - kFwdPrefetchLocality: prefetcht1 (into L2; locality 2), not prefetcht0 (into L1): 32 KiB of rows
//   ahead is all of a Zen 4 core's L1D, so prefetcht0 evicted rows before their use (and the
//   Zipf-hot rows). On a later VM (2026-12-02 evening, 2 threads, interleaved with the loop, three
//   rounds): prefetcht0 0.78, 0.84, 0.82x the loop's time; prefetcht1 0.67, 0.77, 0.70x; prefetcht2
//   0.72, 0.77, 0.72x (1 thread: t0 1.01, 1.12x; t1 0.86, 1.11x; t2 0.84, 0.96x). With t1, 16 and
//   64 KiB ahead measured the same as 32 (0.64-0.80x).
// - Those two are AMD's for tables of more than kFwdNearTableBytes in all (fwd_prefetch_l1; smaller ones take Intel's:
//   bench/results/2026-12-07-cpu-embedding-table-sizes.md). On Intel CPUs the forward prefetches 8 KiB ahead (16 rows
//   of 512 bytes) into L1 (prefetcht0). 2026-12-06, a 2-core Xeon VM with AMX (Sapphire Rapids class, 2 MiB L2 a core),
//   a temporary build with runtime switches, the candidates in shuffled order, each timed in a block (steady state;
//   bench/results/2026-12-06-cpu-embedding-prefetch.md), kfuse / loop, 2 threads: fp32 medical t1 at 32 KiB 1.01x, t0
//   at 8 KiB 0.82x (1 thread: 1.03 -> 0.83x), t0 at 16 KiB 0.83x, t1 at 64 KiB 0.95x; fp16 0.81 -> 0.76x; bf16 1.06 ->
//   1.00x. No prefetch took 1.8x; every other line (Intel's spatial prefetcher fetching its pair) was no better. On the
//   Ice Lake VM of 2026-12-05 no prefetch setting made a measurable difference.
// - kFwdStreamBytes: float outputs of at least 1 MiB (a core's L2) are written with streaming stores
//   (on AMD CPUs, for bags of >= 16 indices: stream_output)
//   (movntps: a line written whole is not first read into the cache). 2026-12-03, 2 threads,
//   interleaved in one process (streaming / regular / loop, 20 rounds): medical shape (6 MiB of
//   output) 0.54-0.63x the loop's time where regular stores took 0.64-0.68x (streaming / regular
//   0.84-0.94). With a consumer reading the output after: + out.sum() 0.89-0.91x, + a 384 -> 256
//   linear 0.98-0.99x, so the reader's trip to memory costs less than the saved reads. Smaller
//   outputs (the first B bags of each table, + out.sum()): 1.5 MiB 0.91x, 384 KiB 1.01x, 96 KiB
//   1.00x, so below a core's L2 the output stays cached for its reader.
template <int L> constexpr int64_t kFwdBlockBytes = L == 8 ? 512 : 32 * L;  // AVX2: 16 vectors; else 8
template <bool kL1> constexpr int kFwdPrefetchLocality = kL1 ? 3 : 2;
template <bool kL1> constexpr int64_t kFwdPrefetchBytes = kL1 ? 8 * 1024 : 32 * 1024;
constexpr int64_t kFwdStreamBytes = int64_t(1) << 20;
constexpr int64_t kFwdNearTableBytes = int64_t(32) << 20;
// Unique rows per backward task (dynamic schedule: Zipf-hot rows are much longer runs than the rest).
constexpr int64_t kRowsPerTask = 16;

template <int kLocality = 3> KF_INLINE void prefetch(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(p) + c, 0, kLocality);
}

[[noreturn]] void value_error(const std::string& msg) { throw std::invalid_argument(msg); }
[[noreturn]] void index_error(const std::string& msg) { throw std::out_of_range(msg); }
std::string str(int64_t v) { return std::to_string(v); }

// Type-tag dispatch over the storage dtype S and the index type I.
template <typename F> void with_dtype(DType dt, F&& fn) {
  switch (dt) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::f16: return fn(Half{});
    case DType::bf16: return fn(BF16{});
  }
  throw std::runtime_error("kfuse embedding: unsupported dtype");
}
template <typename F> void with_types(DType dt, bool index64, F&& fn) {
  with_dtype(dt, [&](auto s) {
    if (index64) fn(s, int64_t{});
    else fn(s, int32_t{});
  });
}

// Sum over d in [0, D) of term(d) in A: 16 interleaved partial sums (lane d mod 16, vectorisable
// without reassociation) combined pairwise in a fixed order.
template <typename A, typename F> KF_INLINE A lane_sum(int64_t D, F&& term) {
  A p[16] = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int j = 0; j < 16; ++j) p[j] += term(d + j);
  for (int j = 0; d + j < D; ++j) p[j] += term(d + j);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  return p[0];
}

// ---- validation -----------------------------------------------------------------------------
// Branch-free scans over every index and offset, KF_CLONES so that they run in zmm registers: the
// medical shape's 245k int64 indices and 12k offsets took 80 us in baseline code (best of 200),
// as much as a tenth of the two-thread forward, 18 us so (int32: 94 and 9 us); the first bad
// position is looked for only when there is one.
// Any x[i] outside [0, hi), compared unsigned in I's width (int32: hi capped at 2^31, above every
// int32 index).
template <typename I> KF_CLONES bool any_outside(const I* x, int64_t n, int64_t hi) {
  using U = std::make_unsigned_t<I>;
  const U h = static_cast<U>(sizeof(I) == 8 ? hi : std::min<int64_t>(hi, int64_t(1) << 31));
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>(x[i]) >= h;
  return bad != 0;
}
template <typename I> KF_CLONES bool any_decrease(const I* x, int64_t n) {
  uint64_t bad = 0;
  for (int64_t k = 1; k < n; ++k) bad |= x[k] < x[k - 1];
  return bad != 0;
}

template <typename I> void validate_t(const Tables& tb, const Bags& bg, int64_t num_offsets) {
  const int64_t T = tb.num_tables, F = bg.F, B = bg.B, N = bg.N;
  if (bg.pooling != 0 && bg.pooling != 1)
    value_error("pooling must be 0 (sum) or 1 (mean); got " + str(bg.pooling));
  if (bg.psw && bg.pooling != 0)
    value_error("per_sample_weights are only supported with sum pooling (pooling = 0)");
  if (F < 1) value_error("feature_table must name at least one feature");
  for (int64_t f = 0; f < F; ++f)
    if (bg.feature_table[f] < 0 || bg.feature_table[f] >= T)
      index_error("feature_table[" + str(f) + "] = " + str(bg.feature_table[f]) + " is out of range [0, " + str(T) +
                  ")");
  for (int64_t t = 0; t < T; ++t)
    if (tb.padding_idx[t] < -1 || tb.padding_idx[t] >= tb.rows[t])
      value_error("padding_idx[" + str(t) + "] = " + str(tb.padding_idx[t]) + " is out of range [-1, " +
                  str(tb.rows[t]) + ") for table " + str(t));
  // B < 0: the caller's B = (num_offsets - 1) / F of empty offsets, which F * B + 1 would match for F = 1
  // (and off[0] below would be read past the end).
  if (B < 0 || num_offsets != F * B + 1)
    value_error("offsets must have F * B + 1 entries (B >= 0 bags) for F = " + str(F) + " features; got " +
                str(num_offsets));
  const I* off = static_cast<const I*>(bg.offsets);
  if (off[0] != 0) value_error("offsets[0] must be 0; got " + str(off[0]));
  if (any_decrease(off, num_offsets))
    for (int64_t k = 1; k < num_offsets; ++k)
      if (off[k] < off[k - 1])
        value_error("offsets must be non-decreasing: offsets[" + str(k) + "] = " + str(off[k]) + " < offsets[" +
                    str(k - 1) + "] = " + str(off[k - 1]));
  if (off[num_offsets - 1] != N)
    value_error("offsets[" + str(num_offsets - 1) + "] = " + str(off[num_offsets - 1]) +
                " must equal the number of indices, " + str(N));
  // The offsets are sound, so every feature's positions lie in [0, N).
  const I* idx = static_cast<const I*>(bg.indices);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = bg.feature_table[f], rows = tb.rows[t], i0 = off[f * B], i1 = off[(f + 1) * B];
    if (!any_outside(idx + i0, i1 - i0, rows)) continue;
    for (int64_t i = i0; i < i1; ++i)
      if (idx[i] < 0 || idx[i] >= rows)
        index_error("indices[" + str(i) + "] = " + str(idx[i]) + " is out of range [0, " + str(rows) +
                    ") for feature " + str(f) + " (table " + str(t) + ")");
  }
}

std::vector<int64_t> out_cols(const Tables& tb, const Bags& bg) {
  std::vector<int64_t> col(bg.F + 1, 0);
  for (int64_t f = 0; f < bg.F; ++f) col[f + 1] = col[f] + tb.dims[bg.feature_table[f]];
  return col;
}

// Vec<L>: vectors of L floats, and of as many uint32 / uint16 lanes (GCC's vector types: lane-wise operations). L is
// the width of the entry's registers (pick_isa, cpu_isa.h): 16 in the AVX-512 entries, 8 in the AVX2 ones, 4 in
// the baseline's.
template <int L> struct Vec {
  typedef float F __attribute__((vector_size(4 * L)));
  typedef uint32_t U __attribute__((vector_size(4 * L)));
  typedef uint16_t H __attribute__((vector_size(2 * L)));
};

// fp16 rows with F16C: L halves -> floats in one vcvtph2ps (16 in a zmm with AVX-512, 8 in a ymm with AVX2),
// where cpu_convert.h's exact integer form takes ~10 operations (AVX-512 VM, medical shape, 2 threads: 4.5 ms
// against the loop's 1.4, whose kernel converts with F16C; a Zen 3 VM with AVX2 only, 2026-12-07, at
// B = 1024: 10.1 ms against the loop's 0.67). Inline asm, because GCC 12 neither vectorises the conversion
// without AVX512-FP16 nor inlines the intrinsic into a function compiled for another ISA; only the AVX-512
// and AVX2 entries (compiled for x86-64-v4 / v3, which have F16C, and called where the CPU has it: the
// forward's, and on AVX-512 the backward's sums of grad_out rows) instantiate it, and store_half
// (vcvtps2ph) for the forward's output.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KF_F16_ASM 1
#define KF_F16_ENTRY(f) f
template <int L> KF_INLINE typename Vec<L>::F cvt_half(const Half* p) {
  static_assert(L == 8 || L == 16, "vcvtph2ps widens 8 halves into a ymm, 16 into a zmm");
  typename Vec<L>::F r;
  asm("vcvtph2ps %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const char(*)[2 * L]>(p)));
  return r;
}
// L floats -> halves at p, rounded to nearest even (imm 0): vcvtps2ph, bit for bit from_acc's.
template <int L> KF_INLINE void store_half(Half* p, typename Vec<L>::F v) {
  static_assert(L == 8 || L == 16, "vcvtps2ph narrows a ymm into 8 halves, a zmm into 16");
  asm("vcvtps2ph $0, %1, %0" : "=m"(*reinterpret_cast<char(*)[2 * L]>(p)) : "v"(v));
}
#else
#define KF_F16_ENTRY(f) nullptr
template <int L> KF_INLINE typename Vec<L>::F cvt_half(const Half* p) {  // never called: no entry instantiates it
  typename Vec<L>::F r;
  for (int j = 0; j < L; ++j) r[j] = cpu::to_acc(p[j]);
  return r;
}
template <int L> KF_INLINE void store_half(Half* p, typename Vec<L>::F v) {  // never called, as cvt_half
  for (int j = 0; j < L; ++j) p[j] = cpu::from_acc<Half>(v[j]);
}
#endif

// L bf16 -> floats: each the high half of its float (as cpu::to_acc).
template <int L> KF_INLINE typename Vec<L>::F bf16_load(const BF16* p) {
  typename Vec<L>::H h;
  std::memcpy(&h, p, sizeof(h));
  const typename Vec<L>::U u = __builtin_convertvector(h, typename Vec<L>::U) << 16;
  typename Vec<L>::F f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// L floats -> bf16 at p, bit for bit cpu::from_acc<BF16>'s (nearest even; a NaN stays a quiet NaN), in vector
// types: lane by lane, the accumulators went through memory and the forward took 1.8x torch's time (D = 128).
template <int L> KF_INLINE void store_bf16(BF16* p, typename Vec<L>::F v) {
  using U = typename Vec<L>::U;
  U u;
  std::memcpy(&u, &v, sizeof(u));
  const U nan = (u & 0x7fffffffu) > 0x7f800000u;  // all ones where a NaN
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const typename Vec<L>::H h = __builtin_convertvector((nan & ((u >> 16) | 0x40u)) | (~nan & rounded),
                                                        typename Vec<L>::H);
  std::memcpy(p, &h, sizeof(h));
}

// The lanes of e (a block's even columns) and o (its odd ones) in column order: the block's first L columns, or
// (kHi) its last L.
template <int L, bool kHi, int... k>
KF_INLINE typename Vec<L>::F zip(typename Vec<L>::F e, typename Vec<L>::F o, std::integer_sequence<int, k...>) {
  return __builtin_shufflevector(e, o, ((kHi ? L / 2 : 0) + k / 2 + (k % 2) * L)...);
}

// L floats to p (16-byte aligned) past the caches: movntps, 16 bytes at a time (SSE, so every entry has
// it); the line is written whole, so the core does not first read it (no read-for-ownership). Used for
// large float outputs (kFwdStreamBytes).
template <int L> KF_INLINE void stream(float* p, typename Vec<L>::F v) {
#if defined(__x86_64__)
  __m128 q[L / 4];
  std::memcpy(q, &v, sizeof(v));
  for (int k = 0; k < L / 4; ++k) _mm_stream_ps(p + 4 * k, q[k]);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

// The backward's fp16 entry where it applies (fp16 tables, and the CPU's ISA level, cpu_isa.h, one that the
// entry is compiled for: x86-64-v4 or v3, both with F16C), else the generic one.
template <typename S, typename F, typename G> F entry(F generic, G f16_avx512, G f16_avx2) {
#ifdef KF_F16_ASM
  if constexpr (std::is_same_v<S, Half>)
    if (cpu::isa_level() > 0) return cpu::pick_isa(f16_avx512, f16_avx2, f16_avx2);
#endif
  (void)f16_avx512, (void)f16_avx2;
  return generic;
}

// ---- forward --------------------------------------------------------------------------------
// The forward's loops are not turned into library calls: GCC made the zeroing of a bag's accumulators
// a memset (a rep stos per bag, of a stack copy it then loaded into registers), 10% of the forward's
// time with every row in L1 (all indices 0), and 0.59x -> 0.55x the loop's time on the medical
// shape (1 thread; 2 threads: 0.62x -> 0.60x) without it.
#pragma GCC push_options
#pragma GCC optimize("no-tree-loop-distribute-patterns")
// The columns [d0, d0 + N) of one bag's sum (indices [i0, i1)) into o (the bag's output at column d0):
// the N accumulators stay in registers over all its rows (N a compile-time width the vectoriser keeps
// there), then are scaled (mean: by 1 / count, as the reference; else by 1) and stored. ahead > 0: the
// rows `ahead` indices on (below pf_end, the task's end) are prefetched, one instruction per line: their
// columns [d0, d0 + N), or [d0, D) with to_end (the row's last block that prefetches).
// nt: streaming stores (the float vector path; the caller checked the alignment and fences). L: the
// entry's vector width in floats (Vec).
template <int L, int64_t N, bool kPsw, bool kAsm, bool kL1, typename S, typename I>
KF_INLINE void sum_block(const S* W, int64_t D, int64_t d0, int64_t pad, const I* idx, int64_t i0, int64_t i1,
                         const Acc<S>* psw, Acc<S> scale, int64_t ahead, int64_t pf_end, S* o, bool nt,
                         bool to_end) {
  using A = Acc<S>;
  // A padding index adds a row of zeros (weight 0) instead of being skipped, and sums are always
  // scaled (by 1 unless mean pooling counts a row): acc + 0 = acc and acc * 1 = acc bit for bit (acc
  // starts at +0, so it is never -0; a nan stays the same quiet nan). Without those branches GCC
  // stores acc from registers to out instead of zeroing a stack copy of it (rep stos) per bag and
  // copying that: medical shape, 1 thread, 0.61x -> 0.57x the loop's time for the padding (2
  // threads: 0.56x both), 0.72x -> 0.65x for the scale (2 threads: 0.55x -> 0.53x; with every row
  // in L1, all indices 0: 1.18x -> 1.07x).
  static const S zeros[N] = {};
  // float (and fp16 on AVX-512) sums live in vectors of L floats (GCC's vector type: the same
  // lane-wise adds), scaled and stored from them. As a float array GCC kept them in registers only
  // inside a bag and went through the stack around it (spill, reload to scale, zero a stack copy):
  // with every row in L1 (indices mod 64) the forward took 2.28 -> 1.54 ms on 1 thread (the loop
  // 1.74), 0.98 -> 0.76 on 2 (loop 1.15-1.2), rows in L2 3.17 -> 2.20 (loop 2.67). The Zipf medical
  // shape is bound by memory on this VM and did not move (1.00-1.03x the loop on 1 thread). fp16
  // sums are stored by vcvtps2ph too (store_half) instead of the scalar-array route through from_acc:
  // the fp16 medical forward took 0.96 -> 0.65-0.86x the loop's time on 2 threads, 1.29 -> 0.90-0.94x
  // on 1 (interleaved runs). Blocks narrower than L take the scalar path (its fixed width vectorises).
  // bf16 rows too, 2L columns at a time: 2L bf16 read as L uint32 hold the even columns' floats in their low
  // halves and the odd ones' in their high halves (a shift, a mask: exact), summed in two vectors of L and
  // put back in column order for the store (zip), rounded as the scalar path rounds (store_bf16). A block of L
  // widens its bf16 (bf16_load), which GCC splits into 256-bit halves for L = 16: 1.8x torch's time at
  // D = 128, where the scalar path took 1.45x and 5.7x at D = 16 (256 bags of 100, 2 threads; CPU hunt,
  // 2026-12-07).

  using F = typename Vec<L>::F;
  using U = typename Vec<L>::U;
  constexpr bool kBf16 = std::is_same_v<S, BF16>;
  constexpr bool kVec = N % L == 0 && (kAsm || kBf16 || std::is_same_v<S, float>);
  const int64_t row_bytes = D * int64_t(sizeof(S));
  A acc[kVec ? 1 : N];  // the scalar path's sums (the vector path keeps vacc)
  if constexpr (!kVec)
    for (int64_t d = 0; d < N; ++d) acc[d] = A(0);
  F vacc[kVec ? N / L : 1] = {};
  const auto add = [&](int64_t i) KF_INLINE_LAMBDA {
    const int64_t r = idx[i];
    const S* row = r == pad ? zeros : W + r * D + d0;
    // Opaque to the optimiser: knowing zeros' contents, GCC -O3 made each of the block's vector loads a phi of
    // the row's value and 0, held on the stack, so every row went through memory twice and the 16
    // accumulators of a 512-byte AVX2 block spilled. Hidden, each load folds into its vaddps.
    asm("" : "+r"(row));
    if constexpr (kVec && kBf16 && N % (2 * L) == 0) {  // vacc[2j]: columns 2Lj, 2Lj + 2, ...; vacc[2j + 1]: the odd
      for (int64_t j = 0; j < N / (2 * L); ++j) {
        U w;
        std::memcpy(&w, row + 2 * L * j, sizeof(w));
        const U lo = w << 16, hi = w & 0xffff0000u;
        F even, odd;
        std::memcpy(&even, &lo, sizeof(even));
        std::memcpy(&odd, &hi, sizeof(odd));
        if constexpr (kPsw) {
          even *= r == pad ? A(0) : psw[i];
          odd *= r == pad ? A(0) : psw[i];
        }
        vacc[2 * j] += even;
        vacc[2 * j + 1] += odd;
      }
    } else if constexpr (kVec) {  // the same sums, L lanes a vector
      for (int64_t j = 0; j < N / L; ++j) {
        F x;
        if constexpr (kAsm) x = cvt_half<L>(row + L * j);
        else if constexpr (kBf16) x = bf16_load<L>(row + L * j);
        else std::memcpy(&x, row + L * j, sizeof(x));
        if constexpr (kPsw) x *= r == pad ? A(0) : psw[i];
        vacc[j] += x;
      }
    } else if constexpr (kPsw) {
      const A s = r == pad ? A(0) : psw[i];
      for (int64_t d = 0; d < N; ++d) acc[d] += s * load<A>(row[d]);
    } else {
      for (int64_t d = 0; d < N; ++d) acc[d] += load<A>(row[d]);
    }
  };
  // The rows whose index `ahead` on is still below pf_end prefetch it, the rest do not: two loops
  // rather than one testing each row (and a whole block's line count known at compile time).
  const int64_t i_pf = ahead > 0 ? std::clamp(pf_end - ahead, i0, i1) : i0;
  const int64_t pf_bytes = to_end ? row_bytes - d0 * int64_t(sizeof(S)) : N * int64_t(sizeof(S));
  int64_t i = i0;
  if (pf_bytes == N * int64_t(sizeof(S))) {
    for (; i < i_pf; ++i) {
      const char* p = reinterpret_cast<const char*>(W + int64_t(idx[i + ahead]) * D + d0);
      for (int64_t c = 0; c < N * int64_t(sizeof(S)); c += 64) __builtin_prefetch(p + c, 0, kFwdPrefetchLocality<kL1>);
      add(i);
    }
  } else {
    for (; i < i_pf; ++i) {
      prefetch<kFwdPrefetchLocality<kL1>>(W + int64_t(idx[i + ahead]) * D + d0, pf_bytes);
      add(i);
    }
  }
  for (; i < i1; ++i) add(i);
  if constexpr (kVec && kBf16 && N % (2 * L) == 0) {
    constexpr auto lanes = std::make_integer_sequence<int, L>{};
    for (int64_t j = 0; j < N / (2 * L); ++j) {
      const F e = vacc[2 * j] * scale, d = vacc[2 * j + 1] * scale;
      store_bf16<L>(o + 2 * L * j, zip<L, false>(e, d, lanes));
      store_bf16<L>(o + 2 * L * j + L, zip<L, true>(e, d, lanes));
    }
  } else if constexpr (kVec) {
    for (int64_t j = 0; j < N / L; ++j) {
      const F y = vacc[j] * scale;
      if constexpr (kAsm) store_half<L>(o + L * j, y);
      else if constexpr (kBf16) store_bf16<L>(o + L * j, y);
      else if (nt) stream<L>(o + L * j, y);
      else std::memcpy(o + L * j, &y, sizeof(y));
    }
  } else {
    for (int64_t d = 0; d < N; ++d) o[d] = store<S>(acc[d] * scale);
  }
}

// The columns [d0, d0 + n) for any n (the last few elements of a row), as sum_block (prefetching [d0, D)),
// accumulated in acc (scratch).
template <bool kPsw, bool kL1, typename S, typename I>
KF_INLINE void sum_tail(const S* W, int64_t D, int64_t d0, int64_t n, int64_t pad, const I* idx, int64_t i0,
                        int64_t i1, const Acc<S>* psw, Acc<S> scale, int64_t ahead, int64_t pf_end, S* o,
                        Acc<S>* acc) {
  using A = Acc<S>;
  const int64_t row_bytes = D * int64_t(sizeof(S));
  for (int64_t d = 0; d < n; ++d) acc[d] = A(0);
  for (int64_t i = i0; i < i1; ++i) {
    if (ahead > 0 && i + ahead < pf_end)
      prefetch<kFwdPrefetchLocality<kL1>>(W + int64_t(idx[i + ahead]) * D + d0, row_bytes - d0 * int64_t(sizeof(S)));
    const int64_t r = idx[i];
    if (r == pad) continue;
    const S* row = W + r * D + d0;
    if constexpr (kPsw) {
      const A s = psw[i];
      for (int64_t d = 0; d < n; ++d) acc[d] += s * load<A>(row[d]);
    } else {
      for (int64_t d = 0; d < n; ++d) acc[d] += load<A>(row[d]);
    }
  }
  for (int64_t d = 0; d < n; ++d) o[d] = store<S>(acc[d] * scale);
}

// One bag's columns [d0, D) after its full blocks (D - d0 < 2n): blocks of n, n / 2, ... down to `last`
// columns, each at most once, then the tail (sum_tail). a: the prefetch distance, for the first block only
// (which prefetches the rows' columns [d0, D)).
// A template that always inlines, not a lambda: a lambda's body is a function of its own, compiled for the
// baseline ISA rather than the forward's ISA entries' (D = 32, on its quarter block, took 2.8x torch's time that
// way, 1.1x inlined).
template <int L, int64_t n, int64_t last, bool kPsw, bool kAsm, bool kL1, typename S, typename I>
KF_INLINE void narrow_blocks(const S* W, int64_t D, int64_t d0, int64_t pad, const I* idx, int64_t i0, int64_t i1,
                             const Acc<S>* psw, Acc<S> scale, int64_t a, int64_t pf_end, S* o, bool nt,
                             Acc<S>* acc) {
  if (d0 + n <= D) {
    sum_block<L, n, kPsw, kAsm, kL1>(W, D, d0, pad, idx, i0, i1, psw, scale, a, pf_end, o + d0, nt, true);
    d0 += n, a = 0;
  }
  if (d0 == D) return;
  if constexpr (n <= 16) {
    // Fewer than n columns left of a row of n or more: one more block of n, the row's last n columns, which
    // sums some columns a second time (the same sums, stored again; not streamed: its start is unaligned).
    // The smaller blocks and the scalar tail each made a pass over the bag's rows: D = 15 took 3.8x torch's
    // time (8 + 4 + 3 columns), D = 31 3.4x, D = 127 2.1x (256 bags of 100, 2 threads; CPU hunt, 2026-12-07).
    if (D >= n) {
      sum_block<L, n, kPsw, kAsm, kL1>(W, D, D - n, pad, idx, i0, i1, psw, scale, a, pf_end, o + D - n, false, true);
      return;
    }
  }
  if constexpr (n > last)
    narrow_blocks<L, n / 2, last, kPsw, kAsm, kL1>(W, D, d0, pad, idx, i0, i1, psw, scale, a, pf_end, o, nt, acc);
  else if (d0 < D)
    sum_tail<kPsw, kL1>(W, D, d0, D - d0, pad, idx, i0, i1, psw, scale, a, pf_end, o + d0, acc);
}

// Bags [fb0, fb1) of one feature (table W [., D], padding pad) into out, bag by bag; each bag's
// columns in blocks of kFwdBlockBytes of accumulators, then of a half, a quarter, ... a 32nd of that,
// and a tail. Bag by bag, so a bag's rows come from memory once and from L1 for its later blocks: with
// the blocks outside the bags (each block a pass over the task's rows, megabytes) a width that is not a
// multiple of 128 floats took up to 3.5x the time of D = 128 (D = 120), and D = 256 .. 2048 1.6-1.9x torch's
// (CPU hunt of 2026-12-05). Each block prefetches its own columns of the rows ahead, not the first block
// whole rows: on the Zen 3 VM (2026-12-08, 1 thread, 50k x 256 fp32, B 512 bags of 20, the same rows each
// call) whole rows on the first block took 1.27-1.47x torch's time, block by block 0.98-1.12x (a temporary
// build with a run-time switch). acc: D elements of scratch.
template <int L, bool kPsw, bool kAsm, bool kL1, typename S, typename I>
KF_INLINE void forward_bags(const S* W, int64_t D, int64_t pad, const I* idx, const I* off, const Acc<S>* psw,
                            bool mean, int64_t fb0, int64_t fb1, int64_t B, S* out, int64_t width, Acc<S>* acc,
                            bool stream) {
  using A = Acc<S>;
  constexpr int64_t N = kFwdBlockBytes<L> / int64_t(sizeof(A));
  if (D == 0) return;
  const int64_t row_bytes = D * int64_t(sizeof(S)), pf_end = off[fb1];
  const int64_t ahead = std::clamp<int64_t>(kFwdPrefetchBytes<kL1> / row_bytes, 4, 256);
  for (int64_t i = off[fb0]; i < std::min<int64_t>(pf_end, off[fb0] + ahead); ++i)
    prefetch<kFwdPrefetchLocality<kL1>>(W + int64_t(idx[i]) * D, row_bytes);
  S* o = out + (fb0 % B) * width;
  // Streaming stores on the float vector path when rows are 16-byte aligned (blocks start at
  // multiples of 16 floats).
  const bool nt = std::is_same_v<S, float> && !kAsm && stream &&
                  (reinterpret_cast<uintptr_t>(o) | uintptr_t(width * int64_t(sizeof(S)))) % 16 == 0;
  for (int64_t fb = fb0; fb < fb1; ++fb, o += width) {
    const int64_t i0 = off[fb], i1 = off[fb + 1];
    int64_t cnt = 0;
    for (int64_t i = i0; mean && i < i1; ++i) cnt += idx[i] != pad;
    const A scale = cnt > 0 ? A(1) / A(cnt) : A(1);
    // Each full block prefetches its own columns of the rows ahead, the first narrower one the rest of them.
    int64_t d0 = 0;
    for (; d0 + N <= D; d0 += N)
      sum_block<L, N, kPsw, kAsm, kL1>(W, D, d0, pad, idx, i0, i1, psw, scale, ahead, pf_end, o + d0, nt, false);
    narrow_blocks<L, N / 2, N / 32, kPsw, kAsm, kL1>(W, D, d0, pad, idx, i0, i1, psw, scale, ahead, pf_end, o, nt,
                                                     acc);
  }
#if defined(__x86_64__)
  if (nt) _mm_sfence();  // streaming stores are weakly ordered: visible before the task ends
#endif
}

// One task: the weighted and unweighted loops apart, so neither tests psw per row, and the two
// prefetch policies (fwd_prefetch_l1) apart, so the locality is an instruction's immediate.
template <int L, bool kAsm, typename S, typename I>
KF_INLINE void forward_variant(const S* W, int64_t D, int64_t pad, const I* idx, const I* off, const Acc<S>* psw,
                               bool mean, int64_t fb0, int64_t fb1, int64_t B, S* out, int64_t width, Acc<S>* acc,
                               bool stream, bool l1) {
  const auto run = [&](auto weighted, auto near) KF_INLINE_LAMBDA {
    forward_bags<L, weighted(), kAsm, near()>(W, D, pad, idx, off, psw, mean, fb0, fb1, B, out, width, acc, stream);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (psw && l1) run(T{}, T{});
  else if (psw) run(T{}, F{});
  else if (l1) run(F{}, T{});
  else run(F{}, F{});
}

// The forward's entries, one per ISA (pick_isa, cpu_isa.h), each compiled for its target with vectors of its
// registers' width. The AVX-512 and AVX2 entries convert fp16 tables with cvt_half's vcvtph2ps (kAsm), bit for
// bit the conversion of the base entry.
#define KF_FORWARD_ARGS                                                                                           \
  const S *W, int64_t D, int64_t pad, const I *idx, const I *off, const Acc<S> *psw, bool mean, int64_t fb0,     \
      int64_t fb1, int64_t B, S *out, int64_t width, Acc<S> *acc, bool stream, bool l1
#ifdef KF_F16_ASM
template <typename S> constexpr bool kF16C = std::is_same_v<S, Half>;
#else
template <typename S> constexpr bool kF16C = false;
#endif
template <typename S, typename I> KF_TARGET_AVX512 void forward_task_avx512(KF_FORWARD_ARGS) {
  forward_variant<16, kF16C<S>>(W, D, pad, idx, off, psw, mean, fb0, fb1, B, out, width, acc, stream, l1);
}
template <typename S, typename I> KF_TARGET_AVX2 void forward_task_avx2(KF_FORWARD_ARGS) {
  forward_variant<8, kF16C<S>>(W, D, pad, idx, off, psw, mean, fb0, fb1, B, out, width, acc, stream, l1);
}
template <typename S, typename I> void forward_task_base(KF_FORWARD_ARGS) {
  forward_variant<4, false>(W, D, pad, idx, off, psw, mean, fb0, fb1, B, out, width, acc, stream, l1);
}
#undef KF_FORWARD_ARGS

#pragma GCC pop_options

// The tasks of a per-bag pass: (feature, first bag) pairs of up to `per_task` bags.
struct BagTask {
  int64_t f, fb0, fb1;
};
std::vector<BagTask> bag_tasks(const Bags& bg, int64_t per_task = kBagsPerTask) {
  std::vector<BagTask> tasks;
  for (int64_t f = 0; f < bg.F; ++f)
    for (int64_t b = 0; b < bg.B; b += per_task)
      tasks.push_back({f, f * bg.B + b, f * bg.B + std::min(bg.B, b + per_task)});
  return tasks;
}

// Bags per forward task: up to 4 x kBagsPerTask while that leaves at least 8 tasks per thread. Each
// task restarts the prefetch stream (a burst of a distance of rows, none past its end); the medical
// shape took 0.70x the loop's time in tasks of 64 bags, 0.61x in 128 and 0.60x in 256 (2 threads;
// 1 thread: 0.69, 0.66, 0.66x).
// Long bags make smaller tasks, down to one bag: at least ~64 bags' worth of the medical shape's ~20 indices
// (kIndicesPerTask). With 64 bags a task whatever their length, 64 bags or fewer ran on one thread: 32 bags of
// 1000 indices took 2.2x torch's time on 2 threads (CPU hunt, 2026-12-07).
constexpr int64_t kIndicesPerTask = kBagsPerTask * 20;
int64_t forward_bags_per_task(const Bags& bg, int nt) {
  const int64_t bags = bg.F * bg.B;
  const int64_t fewest = std::clamp<int64_t>(kIndicesPerTask * bags / std::max<int64_t>(bg.N, 1), 1, kBagsPerTask);
  return std::clamp<int64_t>(bags / (8 * int64_t(std::max(nt, 1))), fewest, 4 * kBagsPerTask);
}

int64_t max_dim(const Tables& tb) {
  int64_t D = 0;
  for (int64_t t = 0; t < tb.num_tables; ++t) D = std::max(D, tb.dims[t]);
  return D;
}

bool cpu_is_amd() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

// Whether the forward writes its output with streaming stores (kFwdStreamBytes): only where they were
// measured to pay, an AMD CPU (Zen 4) and bags of 16 or more indices on average (the medical shape's
// ~20: 0.84-0.94x regular stores' time there). On an Intel Ice Lake (2026-12-05, 1 thread, interleaved in
// one process, 100k x 128 table, uniform indices) they took 3.0x regular stores' time at 1 index a bag,
// 1.56x at 4, 1.13x at 16, 1.05x at 32 and 1.19x on the medical shape: with few rows gathered per bag the
// output is most of the traffic, and its next reader then finds it in memory, not in a cache.
bool stream_output(int64_t out_bytes, int64_t indices, int64_t bags) {
  return cpu_is_amd() && out_bytes >= kFwdStreamBytes && indices >= 16 * bags;
}

// Whether the forward prefetches rows into L1, 8 KiB ahead (Intel, and AMD for tables of up to
// kFwdNearTableBytes in all), or into L2, 32 KiB ahead (AMD's larger tables): each measured where it is
// used (kFwdPrefetchLocality). Other CPUs (aarch64, ...) keep the older setting, measured on none of them.
bool fwd_prefetch_l1(const Tables& tb, int64_t elem_bytes) {
#if defined(__x86_64__)
  int64_t bytes = 0;
  for (int64_t t = 0; t < tb.num_tables; ++t) bytes += tb.rows[t] * tb.dims[t] * elem_bytes;
  return !cpu_is_amd() || bytes <= kFwdNearTableBytes;
#else
  (void)tb, (void)elem_bytes;
  return false;
#endif
}

template <typename S, typename I> void forward_t(const Tables& tb, const Bags& bg, S* out, int nt) {
  using A = Acc<S>;
  const std::vector<int64_t> col = out_cols(tb, bg);
  const std::vector<BagTask> tasks = bag_tasks(bg, forward_bags_per_task(bg, nt));
  const I* idx = static_cast<const I*>(bg.indices);
  const I* off = static_cast<const I*>(bg.offsets);
  const int64_t width = col[bg.F], D_max = max_dim(tb);
  const auto task = cpu::pick_isa(forward_task_avx512<S, I>, forward_task_avx2<S, I>, forward_task_base<S, I>);
  const bool stream = stream_output(bg.B * width * int64_t(sizeof(S)), bg.N, bg.F * bg.B);
  const bool l1 = fwd_prefetch_l1(tb, sizeof(S));
#pragma omp parallel num_threads(nt)
  {
    std::vector<A> acc(D_max);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < static_cast<int64_t>(tasks.size()); ++k) {
      const BagTask& tk = tasks[k];
      const int64_t t = bg.feature_table[tk.f];
      task(static_cast<const S*>(tb.weights[t]), tb.dims[t], tb.padding_idx[t], idx, off,
                         static_cast<const A*>(bg.psw), bg.pooling == 1, tk.fb0, tk.fb1, bg.B, out + col[tk.f],
                         width, acc.data(), stream, l1);
    }
  }
}

// ---- backward plan: per table, a stable sort of its occurrences by row -------------------------
// A counting sort costs O(rows + n) per table and step; when the table has many more rows than the
// step has occurrences (a 20M-row table and a small batch: 160 MB of counters per step) a radix sort
// of the n occurrences by row costs O(n) a pass instead, over as few passes of up to kRadixBits bits
// as the largest row needs. Both are stable, so both give the same plan: rows increasing, each row's
// occurrences in increasing flat position. Measured (the sparse backward of one table, B bags of 20,
// 1 thread, 2026-12-07, AMD EPYC VM), counting against radix at rows = ratio x occurrences: 10240
// occurrences, ratio 1: 0.146 against 0.187 ms, 4: 0.195 / 0.223, 6: 0.219 / 0.209, 8: 0.292 / 0.216,
// 16: 0.381 / 0.213; 81920 occurrences, ratio 1: 2.69 / 3.35 ms, 4: 23.9 / 24.3 (both then mostly
// the page faults of a > 32 MiB output), 6: 25.1 / 24.8. The std::stable_sort of 24-byte records this
// replaced took 0.75-0.85 ms from ratio 16 up (10240 occurrences): a 1.8x step at the switch.
constexpr int64_t kSortRowsPerOccurrence = 6;
constexpr int kRadixBits = 11;

template <typename I>
void plan_table_by_sort(TablePlan& tp, const std::vector<int64_t>& feats, const I* idx, const I* off, int64_t B,
                        int64_t pad, bool weighted, int64_t occurrences, int64_t rows) {
  struct Occ {
    int64_t row, bag, pos;
  };
  // Uninitialised buffers and raw pointers, every slot written before it is read, in place of vectors' push_back
  // (a capacity check a record) and resize (zeroing 24 bytes a record): the row-sparse backward of one table took
  // 0.90-0.92x its time (64 columns, 512 bags of 20, 100k and 1M rows, 1 thread; Zen 3 VM, old and new builds
  // called alternately in one process).
  std::unique_ptr<Occ[]> buf(new Occ[occurrences]), spare;
  Occ* occ = buf.get();
  int64_t n = 0;
  for (int64_t f : feats)
    for (int64_t fb = f * B; fb < (f + 1) * B; ++fb)
      for (int64_t i = off[fb]; i < off[fb + 1]; ++i)
        if (static_cast<int64_t>(idx[i]) != pad) occ[n++] = {static_cast<int64_t>(idx[i]), fb, i};
  // Least significant digit first, each pass stable: passes of equal width, as few as the rows' bits need.
  const int bits = rows > 1 ? 64 - __builtin_clzll(static_cast<uint64_t>(rows - 1)) : 0;
  const int passes = (bits + kRadixBits - 1) / kRadixBits;
  if (passes > 0) {
    const int width = (bits + passes - 1) / passes;
    const int64_t mask = (int64_t(1) << width) - 1;
    std::vector<int64_t> next(mask + 1);
    spare.reset(new Occ[occurrences]);
    Occ* tmp = spare.get();
    for (int shift = 0; shift < bits; shift += width) {
      std::fill(next.begin(), next.end(), 0);
      for (int64_t k = 0; k < n; ++k) ++next[(occ[k].row >> shift) & mask];
      for (int64_t d = 0, s = 0; d <= mask; ++d) s += std::exchange(next[d], s);
      for (int64_t k = 0; k < n; ++k) tmp[next[(occ[k].row >> shift) & mask]++] = occ[k];
      std::swap(occ, tmp);
    }
  }
  tp.bag.resize(n);
  tp.pos.resize(weighted ? n : 0);
  tp.rows.resize(n);  // at most n unique rows: trimmed below
  tp.start.resize(n + 1);
  int64_t* row = tp.rows.data();
  int64_t* start = tp.start.data();
  int64_t* bag = tp.bag.data();
  int64_t* pos = weighted ? tp.pos.data() : nullptr;
  int64_t U = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (k == 0 || occ[k].row != occ[k - 1].row) {
      row[U] = occ[k].row;
      start[U++] = k;
    }
    bag[k] = occ[k].bag;
    if (pos) pos[k] = occ[k].pos;
  }
  start[U] = n;
  tp.rows.resize(U);
  tp.start.resize(U + 1);
}

template <typename I> Plan plan_t(const Tables& tb, const Bags& bg, int nt) {
  const int64_t T = tb.num_tables, F = bg.F, B = bg.B;
  const I* idx = static_cast<const I*>(bg.indices);
  const I* off = static_cast<const I*>(bg.offsets);
  Plan p;
  p.tables.resize(T);
  const std::vector<int64_t> col = out_cols(tb, bg);
  p.out_col.assign(col.begin(), col.end() - 1);
  std::vector<std::vector<int64_t>> feats(T);  // the features of each table, in order (increasing i)
  for (int64_t f = 0; f < F; ++f) feats[bg.feature_table[f]].push_back(f);
  if (bg.pooling == 1) p.count.resize(F * B);
#pragma omp parallel num_threads(nt)
  {
    if (bg.pooling == 1) {
#pragma omp for schedule(static) nowait
      for (int64_t fb = 0; fb < F * B; ++fb) {
        const int64_t pad = tb.padding_idx[bg.feature_table[fb / B]];
        int64_t c = 0;
        for (int64_t i = off[fb]; i < off[fb + 1]; ++i) c += idx[i] != pad;
        p.count[fb] = c;
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < T; ++t) {
      TablePlan& tp = p.tables[t];
      const int64_t pad = tb.padding_idx[t], rows = tb.rows[t];
      int64_t occurrences = 0;
      for (int64_t f : feats[t]) occurrences += off[(f + 1) * B] - off[f * B];
      if (rows > kSortRowsPerOccurrence * occurrences) {
        plan_table_by_sort(tp, feats[t], idx, off, B, pad, bg.psw != nullptr, occurrences, rows);
        continue;
      }
      std::vector<int64_t> cur(rows, 0);  // counts, then each row's next slot
      for (int64_t f : feats[t])
        for (int64_t i = off[f * B]; i < off[(f + 1) * B]; ++i) cur[idx[i]] += idx[i] != pad;
      int64_t U = 0;
      for (int64_t r = 0; r < rows; ++r) U += cur[r] != 0;
      tp.rows.resize(U);
      tp.start.resize(U + 1);
      int64_t n = 0;
      for (int64_t r = 0, u = 0; r < rows; ++r) {
        if (cur[r] == 0) continue;
        tp.rows[u] = r;
        tp.start[u++] = n;
        const int64_t cnt = cur[r];
        cur[r] = n;
        n += cnt;
      }
      tp.start[U] = n;
      tp.bag.resize(n);
      if (bg.psw) tp.pos.resize(n);
      // Raw pointers (through the vectors GCC reloaded their data pointers after every store, which
      // might alias them) and the positions stored only when weighted: the medical shape's plan took
      // 3.9 instead of 5.4 ms (one thread, best of 4 on the shared 2-core box).
      int64_t* c = cur.data();
      int64_t* bag = tp.bag.data();
      int64_t* pos = tp.pos.data();
      for (int64_t f : feats[t])
        for (int64_t fb = f * B; fb < (f + 1) * B; ++fb)
          for (int64_t i = off[fb]; i < off[fb + 1]; ++i) {
            const int64_t r = idx[i];
            if (r == pad) continue;
            const int64_t k = c[r]++;
            bag[k] = fb;
            if (pos) pos[k] = i;
          }
    }
  }
  p.first.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) p.first[t + 1] = p.first[t] + static_cast<int64_t>(p.tables[t].rows.size());
  return p;
}

// Everything a backward task needs besides the table.
template <typename S> struct Grad {
  const S* go;
  int64_t width, B;
  const int64_t* out_col;
  const Acc<S>* psw;
  const int64_t* count;  // mean pooling, else nullptr
  const S* slice(int64_t fb) const { return go + (fb % B) * width + out_col[fb / B]; }
};

// acc[d] += s * x[d] (kScale) or x[d], d < D, in A: with kF16 > 0 (fp16 tables in the AVX-512 / AVX2 entries)
// kF16 lanes a vcvtph2ps, the rest through load<A>; the same operations, in the same order, either way. kFirst:
// acc[d] = 0 + ..., the same bits as zeroing acc first (-0 becomes +0), without the zeroing (a memset call per
// row) and the read back of its stores: the backward kernels took 0.91-0.96x their time (one table of 100k x 64,
// 512 bags of 20, 1 and 2 threads; 0.92x at 20k rows, 2048 bags of 8; Zen 3 VM, 2026-12-07, old and new builds
// called alternately in one process).
template <int kF16, bool kScale, bool kFirst, typename S, typename A>
KF_INLINE void add_row(A* acc, const S* x, int64_t D, A s) {
  int64_t d = 0;
  if constexpr (kF16 > 0) {
    for (; d + kF16 <= D; d += kF16) {
      typename Vec<kF16>::F v = cvt_half<kF16>(x + d), a;
      if constexpr (kScale) v *= s;
      if constexpr (kFirst) a = typename Vec<kF16>::F{};
      else std::memcpy(&a, acc + d, sizeof(a));
      a += v;
      std::memcpy(acc + d, &a, sizeof(a));
    }
  }
  for (; d < D; ++d) {
    const A v = kScale ? s * load<A>(x[d]) : load<A>(x[d]);
    acc[d] = (kFirst ? A(0) : acc[d]) + v;
  }
}

// The gradient of one unique row (the run [k0, k1) of tp, never empty: a plan's unique rows occur) into acc [D],
// in increasing flat position, the first occurrence written over acc. The grad_out slices kPrefetchAhead
// occurrences ahead (up to k_end, the task's end) are prefetched.
template <int kF16, typename S>
KF_INLINE void reduce_run(const TablePlan& tp, int64_t k0, int64_t k1, int64_t k_end, const Grad<S>& g, int64_t D,
                          Acc<S>* acc) {
  using A = Acc<S>;
  for (int64_t k = k0; k < k1; ++k) {
    if (k + kPrefetchAhead < k_end) prefetch(g.slice(tp.bag[k + kPrefetchAhead]), D * int64_t(sizeof(S)));
    const int64_t fb = tp.bag[k];
    const S* x = g.slice(fb);
    const bool scale = g.psw || g.count;
    const A s = g.psw ? g.psw[tp.pos[k]] : g.count ? A(1) / A(g.count[fb]) : A(1);
    if (k == k0) {
      if (scale) add_row<kF16, true, true>(acc, x, D, s);
      else add_row<kF16, false, true>(acc, x, D, s);
    } else {
      if (scale) add_row<kF16, true, false>(acc, x, D, s);
      else add_row<kF16, false, false>(acc, x, D, s);
    }
  }
}

// The gradients of the unique rows [u0, u1) of tp into grads: row-sparse (kDense false: [U, D] in A, row u's
// at u * D) or dense (true: the table's shape [rows, D] in S, zeroed by the caller: row u's at tp.rows[u] * D,
// its sum made in acc, a buffer of D, then rounded to S as torch's cast rounds numbers; fp32/fp64 tables in
// place).
template <int kF16, bool kDense, typename S>
KF_INLINE void grad_rows(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, int64_t D, void* grads,
                         Acc<S>* acc) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t k0 = tp.start[u], k1 = tp.start[u + 1], k_end = tp.start[u1];
    if constexpr (!kDense) {
      reduce_run<kF16>(tp, k0, k1, k_end, g, D, static_cast<Acc<S>*>(grads) + u * D);
    } else if constexpr (std::is_same_v<S, Acc<S>>) {
      reduce_run<kF16>(tp, k0, k1, k_end, g, D, static_cast<S*>(grads) + tp.rows[u] * D);
    } else {
      reduce_run<kF16>(tp, k0, k1, k_end, g, D, acc);
      S* o = static_cast<S*>(grads) + tp.rows[u] * D;
      for (int64_t d = 0; d < D; ++d) o[d] = store<S>(acc[d]);
    }
  }
}
template <bool kDense, typename S>
KF_CLONES void grad_task(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, int64_t D, void* grads,
                         Acc<S>* acc) {
  grad_rows<0, kDense>(tp, u0, u1, g, D, grads, acc);
}
#ifdef KF_F16_ASM
template <bool kDense>
KF_TARGET_AVX512 void grad_task_f16_avx512(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<Half>& g,
                                           int64_t D, void* grads, float* acc) {
  grad_rows<16, kDense>(tp, u0, u1, g, D, grads, acc);
}
template <bool kDense>
KF_TARGET_AVX2 void grad_task_f16_avx2(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<Half>& g, int64_t D,
                                       void* grads, float* acc) {
  grad_rows<8, kDense>(tp, u0, u1, g, D, grads, acc);
}
#endif

// Runs fn(t, u0, u1) over the unique rows of all tables in tasks of kRowsPerTask rows of one table.
template <typename F> void for_row_tasks(const Plan& p, int nt, F&& fn) {
  const int64_t T = static_cast<int64_t>(p.tables.size());
  std::vector<int64_t> task_first(T + 1, 0);  // first task of each table
  for (int64_t t = 0; t < T; ++t)
    task_first[t + 1] = task_first[t] + (p.first[t + 1] - p.first[t] + kRowsPerTask - 1) / kRowsPerTask;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t k = 0; k < task_first[T]; ++k) {
    const int64_t t = std::upper_bound(task_first.begin(), task_first.end(), k) - task_first.begin() - 1;
    const int64_t u0 = (k - task_first[t]) * kRowsPerTask;
    fn(t, u0, std::min(u0 + kRowsPerTask, p.first[t + 1] - p.first[t]));
  }
}

template <typename S> Grad<S> grad_of(const Tables& tb, const Bags& bg, const Plan& p, const void* grad_out) {
  return {static_cast<const S*>(grad_out), out_width(tb, bg), bg.B, p.out_col.data(),
          static_cast<const Acc<S>*>(bg.psw), p.count.empty() ? nullptr : p.count.data()};
}

// ---- grad of per_sample_weights -------------------------------------------------------------
template <typename S, typename I>
KF_CLONES void psw_task(const S* W, int64_t D, int64_t pad, const I* idx, const I* off, int64_t fb0, int64_t fb1,
                        int64_t B, const S* go, int64_t width, Acc<S>* gpsw) {
  using A = Acc<S>;
  for (int64_t fb = fb0; fb < fb1; ++fb) {
    const S* g = go + (fb % B) * width;
    for (int64_t i = off[fb]; i < off[fb + 1]; ++i) {
      const int64_t r = idx[i];
      const S* row = W + r * D;
      gpsw[i] = r == pad ? A(0) : lane_sum<A>(D, [&](int64_t d) { return load<A>(g[d]) * load<A>(row[d]); });
    }
  }
}

// ---- fused optimizers -----------------------------------------------------------------------
// Stochastic rounding of y to H (the design's definition): lo = the largest magnitude <= |y| with
// y's sign, hi the next one up, hi with probability (|y| - |lo|) / (|hi| - |lo|) (r = the top 24
// bits of u as a fraction); never up to infinity (hi = inf gives probability 0); nan: y rounded to
// nearest. Computed without branches or conversions to H, so that the vectoriser turns
// update_row's loops into zmm / ymm code (medical shape, one thread, plan + fused row-wise Adagrad:
// bf16 77 -> 12 ms, fp16 93 -> 21 ms; fp32 12 ms): hi - lo is a power of two, one unit in lo's last
// place (ulp), so the probability test r < (|y| - lo) / ulp is r * ulp < |y| - lo, every operand
// exact; for bf16 that is (u >> 16) < the low 16 bits of |y|. Checked bit for bit against the
// definition's float form on every 13th float with 4 values of u each, in the AVX-512, AVX2 and
// baseline builds, by an offline harness (the tests: edge floats against reference.stochastic_round).
template <typename H> KF_INLINE uint16_t sr_bits(float y, uint32_t u) {
  const uint32_t b = as_bits(y), a = b & 0x7fffffffu, sign = (b >> 16) & 0x8000u;
  if constexpr (std::is_same_v<H, BF16>) {
    const uint32_t mb = a >> 16, up = ((u >> 16) < (a & 0xffffu)) & (mb != 0x7f7fu);
    return static_cast<uint16_t>(pick(a > 0x7f800000u, (b >> 16) | 0x40u, sign | (mb + up)));
  } else {
    const uint32_t normal = a >= 0x38800000u;  // |y| >= 2^-14, H's smallest normal
    // Normal: lo is |y| with the 13 mantissa bits H lacks cleared. Subnormal: k units of 2^-24
    // (|y| is replaced by 0 elsewhere before the conversion, which is undefined past int's range).
    const uint32_t lo_bits = a & ~0x1fffu, ulp_bits = (a & 0x7f800000u) - (10u << 23);
    const int32_t k = static_cast<int32_t>(as_float(pick(normal, 0u, a)) * 0x1p24f);
    const float lo = as_float(pick(normal, lo_bits, as_bits(static_cast<float>(k) * 0x1p-24f)));
    const float ulp = as_float(pick(normal, ulp_bits, as_bits(0x1p-24f)));
    const float r = static_cast<float>(u >> 8) * 0x1p-24f;
    const uint32_t up = r * ulp < as_float(a) - lo, below = a < 0x477fe000u;  // below 65504, H's largest
    const uint32_t fin = pick(below, pick(normal, (lo_bits >> 13) - (112u << 10), static_cast<uint32_t>(k)) + up,
                              0x7bffu);
    return static_cast<uint16_t>(sign | pick(a >= 0x7f800000u, cpu::half_inf_nan(a), fin));
  }
}

template <typename A> struct OptA {
  Optimizer kind;
  A lr, eps, beta1, beta2, one_m_beta1, one_m_beta2, wd, c1, c2;
};

// Applies the summed gradient g [D] (overwritten: rowwise_adagrad keeps g + wd * w there) to the
// table row w; s1, s2: the row's states (nullptr where the optimizer has none); key: the row's
// stochastic-rounding key, sr_mix(sr_table_key(...) ^ row).
template <typename S>
KF_INLINE void update_row(S* w, Acc<S>* g, int64_t D, const OptA<Acc<S>>& o, Acc<S>* s1, Acc<S>* s2, uint32_t key) {
  using A = Acc<S>;
  auto put = [&](int64_t d, A y) {
    if constexpr (std::is_same_v<S, Half> || std::is_same_v<S, BF16>) {
      const uint16_t h = sr_bits<S>(y, sr_mix(key ^ static_cast<uint32_t>(d)));
      std::memcpy(w + d, &h, 2);
    } else {
      w[d] = y;
    }
  };
  switch (o.kind) {
    case Optimizer::sgd:
      for (int64_t d = 0; d < D; ++d) {
        const A x = load<A>(w[d]);
        put(d, x - o.lr * (g[d] + o.wd * x));
      }
      break;
    case Optimizer::rowwise_adagrad: {
      for (int64_t d = 0; d < D; ++d) g[d] = g[d] + o.wd * load<A>(w[d]);
      *s1 = *s1 + lane_sum<A>(D, [&](int64_t d) { return g[d] * g[d]; }) / A(D);
      const A mult = o.lr / (std::sqrt(*s1) + o.eps);
      for (int64_t d = 0; d < D; ++d) put(d, load<A>(w[d]) - mult * g[d]);
      break;
    }
    case Optimizer::adam:
      for (int64_t d = 0; d < D; ++d) {
        const A x = load<A>(w[d]);
        const A m = o.beta1 * s1[d] + o.one_m_beta1 * g[d];
        // (1 − β2)·(g·g), as the reference and the Triton kernel round it: (1 − β2)·g·g was 1 ulp off.
        const A v = o.beta2 * s2[d] + o.one_m_beta2 * (g[d] * g[d]);
        s1[d] = m;
        s2[d] = v;
        put(d, x - o.lr * ((m / o.c1) / (std::sqrt(v / o.c2) + o.eps) + o.wd * x));
      }
      break;
  }
}

template <int kF16, typename S>
KF_INLINE void fused_rows(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, S* W, int64_t D,
                          const OptA<Acc<S>>& o, Acc<S>* st1, Acc<S>* st2, uint32_t table_key, Acc<S>* acc) {
  const int64_t U = static_cast<int64_t>(tp.rows.size()), row_bytes = D * int64_t(sizeof(S));
  const bool adam = o.kind == Optimizer::adam;
  for (int64_t u = u0; u < u1; ++u) {
    if (u + kRowsAhead < U) {
      const int64_t ra = tp.rows[u + kRowsAhead];
      prefetch(W + ra * D, row_bytes);
      if (adam) {
        prefetch(st1 + ra * D, D * int64_t(sizeof(Acc<S>)));
        prefetch(st2 + ra * D, D * int64_t(sizeof(Acc<S>)));
      }
    }
    const int64_t r = tp.rows[u];
    reduce_run<kF16>(tp, tp.start[u], tp.start[u + 1], tp.start[u1], g, D, acc);
    Acc<S>* s1 = st1 ? (adam ? st1 + r * D : st1 + r) : nullptr;
    Acc<S>* s2 = st2 ? st2 + r * D : nullptr;
    update_row<S>(W + r * D, acc, D, o, s1, s2, sr_mix(table_key ^ static_cast<uint32_t>(r)));
  }
}
template <typename S>
KF_CLONES void fused_task(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, S* W, int64_t D,
                          const OptA<Acc<S>>& o, Acc<S>* st1, Acc<S>* st2, uint32_t table_key, Acc<S>* acc) {
  fused_rows<0>(tp, u0, u1, g, W, D, o, st1, st2, table_key, acc);
}
#ifdef KF_F16_ASM
KF_TARGET_AVX512 void fused_task_f16_avx512(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<Half>& g, Half* W,
                                            int64_t D, const OptA<float>& o, float* st1, float* st2,
                                            uint32_t table_key, float* acc) {
  fused_rows<16>(tp, u0, u1, g, W, D, o, st1, st2, table_key, acc);
}
KF_TARGET_AVX2 void fused_task_f16_avx2(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<Half>& g, Half* W,
                                        int64_t D, const OptA<float>& o, float* st1, float* st2, uint32_t table_key,
                                        float* acc) {
  fused_rows<8>(tp, u0, u1, g, W, D, o, st1, st2, table_key, acc);
}
#endif


}  // namespace

// ---- entry points ---------------------------------------------------------------------------
void validate(const Tables& tables, const Bags& bags, int64_t num_offsets) {
  if (bags.index64) validate_t<int64_t>(tables, bags, num_offsets);
  else validate_t<int32_t>(tables, bags, num_offsets);
}

int64_t out_width(const Tables& tables, const Bags& bags) { return out_cols(tables, bags)[bags.F]; }

void forward_cpu(const Tables& tables, const Bags& bags, void* out, int num_threads) {
  with_types(tables.dtype, bags.index64, [&](auto s, auto i) {
    using S = decltype(s);
    forward_t<S, decltype(i)>(tables, bags, static_cast<S*>(out), num_threads);
  });
}

Plan plan_backward(const Tables& tables, const Bags& bags, int num_threads) {
  return bags.index64 ? plan_t<int64_t>(tables, bags, num_threads) : plan_t<int32_t>(tables, bags, num_threads);
}

void backward_rows_cpu(const Tables& tables, const Bags& bags, const Plan& plan, const void* grad_out,
                       void* const* grads, bool dense, int num_threads) {
  with_dtype(tables.dtype, [&](auto s) {
    using S = decltype(s);
    const Grad<S> g = grad_of<S>(tables, bags, plan, grad_out);
    // One dim-length buffer per thread: a dense half-precision gradient's sums before their rounding.
    std::vector<std::vector<Acc<S>>> bufs(std::max(num_threads, 1), std::vector<Acc<S>>(dense ? max_dim(tables) : 0));
    const auto task = dense ? entry<S>(grad_task<true, S>, KF_F16_ENTRY(grad_task_f16_avx512<true>),
                                       KF_F16_ENTRY(grad_task_f16_avx2<true>))
                            : entry<S>(grad_task<false, S>, KF_F16_ENTRY(grad_task_f16_avx512<false>),
                                       KF_F16_ENTRY(grad_task_f16_avx2<false>));
    for_row_tasks(plan, num_threads, [&](int64_t t, int64_t u0, int64_t u1) {
      if (grads[t]) task(plan.tables[t], u0, u1, g, tables.dims[t], grads[t], bufs[omp_get_thread_num()].data());
    });
  });
}

void backward_psw_cpu(const Tables& tables, const Bags& bags, const void* grad_out, void* grad_psw,
                      int num_threads) {
  with_types(tables.dtype, bags.index64, [&](auto s, auto i) {
    using S = decltype(s);
    using I = decltype(i);
    const std::vector<int64_t> col = out_cols(tables, bags);
    const std::vector<BagTask> tasks = bag_tasks(bags);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t k = 0; k < static_cast<int64_t>(tasks.size()); ++k) {
      const BagTask& tk = tasks[k];
      const int64_t t = bags.feature_table[tk.f];
      psw_task<S, I>(static_cast<const S*>(tables.weights[t]), tables.dims[t], tables.padding_idx[t],
                     static_cast<const I*>(bags.indices), static_cast<const I*>(bags.offsets), tk.fb0, tk.fb1,
                     bags.B, static_cast<const S*>(grad_out) + col[tk.f], col[bags.F],
                     static_cast<Acc<S>*>(grad_psw));
    }
  });
}

void backward_fused_cpu(const Tables& tables, const Bags& bags, const Plan& plan, const void* grad_out,
                        const OptimizerArgs& opt, int num_threads) {
  with_dtype(tables.dtype, [&](auto s) {
    using S = decltype(s);
    using A = Acc<S>;
    const Grad<S> g = grad_of<S>(tables, bags, plan, grad_out);
    const double step = static_cast<double>(opt.step);
    const OptA<A> o{opt.kind, A(opt.lr), A(opt.eps), A(opt.beta1), A(opt.beta2), A(1.0 - opt.beta1),
                    A(1.0 - opt.beta2), A(opt.weight_decay), A(1.0 - std::pow(opt.beta1, step)),
                    A(1.0 - std::pow(opt.beta2, step))};
    // One dim-length buffer per thread: the only gradient storage.
    std::vector<std::vector<A>> bufs(std::max(num_threads, 1), std::vector<A>(max_dim(tables)));
    const auto task = entry<S>(fused_task<S>, KF_F16_ENTRY(fused_task_f16_avx512), KF_F16_ENTRY(fused_task_f16_avx2));
    for_row_tasks(plan, num_threads, [&](int64_t t, int64_t u0, int64_t u1) {
      task(plan.tables[t], u0, u1, g, static_cast<S*>(tables.weights[t]), tables.dims[t], o,
                    opt.states1 ? static_cast<A*>(opt.states1[t]) : nullptr,
                    opt.states2 ? static_cast<A*>(opt.states2[t]) : nullptr,
                    sr_table_key(opt.seed, static_cast<uint32_t>(opt.step), static_cast<uint32_t>(t)),
                    bufs[omp_get_thread_num()].data());
    });
  });
}

}  // namespace embedding
}  // namespace kfuse
