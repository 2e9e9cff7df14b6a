// KV attention CPU kernels: paged decode and prefill attention over one layer's K/V pools
// (python/kfuse/ops/kv.py, backend "cpu"; the definition is python/kfuse/reference/kv.py).
//
// One code path for both ops: a task owns R query rows of one KV head of one sequence (decode:
// the G = Hq / Hkv heads of the KV head, several KV heads side by side in one task, see decode;
// prefill: G heads x a block of new tokens), each row with its last visible position (decode:
// length - 1; prefill: causal), and runs an online softmax over key tiles of kTile positions in
// [p0, p1). A tile's K rows are gathered through the block table and staged transposed ([D][kTile],
// in the accumulation type); its V rows are read in place (converted first for half types). Each
// K/V element is loaded once for all R rows; the scores of a row are one kTile-lane vector
// (broadcast q[d] x K^T[d][:], no horizontal sums) and the output update is an axpy over D, both
// over register blocks of kRB rows. A task of at most kDotRows rows
// (decode with G <= 2) reads K in place instead and takes each score as a dot product (no
// transpose). Positions at or past a row's limit are -inf before the max, so NaN poison in unread
// slots never enters (and slots past the length and their block-table entries are never read at
// all).
//
// Determinism: tiles start at multiples of kTile, decode chunks at multiples of kDecodeChunk
// (kv.h), prefill query blocks at multiples of kQBlock, all counted from the sequence's own
// position 0, and chunks merge in chunk order; so a sequence's output bits depend on nothing but
// its own inputs (not on the thread count, the schedule, or the rest of the batch).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../cpu_convert.h"
#include "../cpu_isa.h"
#include "../deu/deu_cpu_simd.h"  // vexp (float exp on W lanes) and the KF_SIMD always_inline macro
#include "kv.h"

namespace kfuse {
namespace kv {
namespace {

using cpu::Acc;
using cpu::BF16;
using cpu::Half;
using cpu::load;
using cpu::store;

// Key positions per tile: 16 scores per query row (two 8-lane vexp calls in float).
constexpr int kTile = 16;
// Query rows per register block: kRB x kTile score accumulators (8 ymm with AVX2 in float), so the
// adds of different rows overlap instead of waiting on one dependency chain.
constexpr int kRB = 4;
// New tokens per prefill task (x G heads = its query rows): enough rows to amortise staging each
// K/V tile, few enough that a prompt of a few hundred tokens gives tens of tasks per KV head.
// Prefill of 2 x 256 tokens (Hq 8, Hkv 2, D 64, fp32, 1 thread): 5.5 ms; 6.3 ms with 8 or 32.
constexpr int64_t kQBlock = 16;
// Tasks of at most this many query rows (float accumulation) take their scores as dot products of
// the K rows in place (dot_scores), one row at a time, instead of transposing the tile: the transpose
// is paid once per tile for all rows, the dot form's horizontal sums once per row. With it (and the
// 8-chain axpy), decode of 4 x 256 tokens, fp32, 1 thread, Hq = Hkv = 8 (G = 1, multi-head
// attention): D 64 0.23 -> 0.18 ms, D 128 0.46 -> 0.26 ms (SDPA on contiguous K/V: 0.12, 0.27 ms;
// the rest at D 64 is the call's fixed ~45 us); bf16 D 128 0.45 -> 0.28 ms; G = 2 (Hkv 4), D 64
// 0.146 -> 0.133 ms. G >= 4 keeps the transpose (measured at G = 4 before the dot form existed).
constexpr int kDotRows = 2;


// One layer's pools [num_pages, page_size, hkv, D] and the block table (row stride table_stride).
template <typename S> struct Pool {
  const S* k;
  const S* v;
  const int32_t* table;
  int64_t table_stride, page_size, hkv, D;
};

// One task's query rows and running state; Dp = D rounded up to kTile (zero padding).
template <typename A> struct Rows {
  int64_t table_row, h;  // the sequence's block-table row, the KV head
  int64_t p0, p1;        // key positions visited: [p0, p1), p0 a multiple of kTile
  int R;
  int64_t Dp;
  const int64_t* last;  // [R] last position each row sees
  const A* q;           // [R][Dp] q * scale
  A* m;                 // [R] running max (-inf before any position)
  A* l;                 // [R] running sum of exp(s - m)
  A* acc;               // [R][Dp] running sum of exp(s - m) * v
  A* kt;                // scratch [Dp][kTile]: the tile's K, transposed
  A* vb;                // scratch [kTile][Dp]: the tile's V rows converted (half pools, odd D)
  A* kb;                // scratch [kTile][Dp]: the tile's K rows converted (half pools)
  const A** vrows;      // scratch [kTile]: the tile's V rows (Dp elements each)
  const A** krows;      // scratch [kTile]: the tile's K rows (D elements each; the dot form's)
  bool dot;             // scores as dot products of K rows (no transpose): see kDotRows
};

// Per-thread buffers of a task (sized for the largest task; padding stays zero).
template <typename A> struct Scratch {
  std::vector<A> q, m, l, acc, kt, vb, kb;
  std::vector<int64_t> last;
  std::vector<const A*> vrows, krows;
  Scratch(int64_t R, int64_t Dp)
      : q(R * Dp), m(R), l(R), acc(R * Dp), kt(Dp * kTile), vb(kTile * Dp), kb(kTile * Dp), last(R),
        vrows(kTile), krows(kTile) {}
  // The task rows r0 .. r0 + R - 1 (of KV head h), their state reset; staging scratch shared by all.
  Rows<A> rows(int64_t table_row, int64_t h, int64_t p0, int64_t p1, int R, int64_t Dp, int64_t r0 = 0) {
    std::fill(m.begin() + r0, m.begin() + r0 + R, -std::numeric_limits<A>::infinity());
    std::fill(l.begin() + r0, l.begin() + r0 + R, A(0));
    std::fill(acc.begin() + r0 * Dp, acc.begin() + (r0 + R) * Dp, A(0));
    return {table_row, h, p0, p1, R, Dp, last.data() + r0, q.data() + r0 * Dp, m.data() + r0, l.data() + r0,
            acc.data() + r0 * Dp, kt.data(), vb.data(), kb.data(), vrows.data(), krows.data(),
            std::is_same_v<A, float> && R <= kDotRows};
  }
};

// s = exp(s - mx) over one row's kTile scores (-inf gives 0).
KF_SIMD void exp_row(float* s, float mx) {
  using E = deu::simd::Lanes<8>;  // 32-byte vectors, as this file's (Lanes below)
  for (int t = 0; t < kTile; t += 8) E::storeu(s + t, E::vexp(E::loadu(s + t) - E::splat(mx)));
}
KF_SIMD void exp_row(double* s, double mx) {
  for (int t = 0; t < kTile; ++t) s[t] = std::exp(s[t] - mx);
}

// 32-byte vectors of A (GCC vector extension: one ymm with AVX2; two xmm in the baseline clone).
// Neither plain arrays (GCC vectorised the loops with xmm shuffles, accumulators on the stack) nor
// 64-byte vectors (lowered through 8-byte GPR moves on AVX2) kept the accumulators in registers:
// 2.15 and 1.64 ms against 0.77 ms with these (decode 8 x 512 tokens, Hq 8, Hkv 2, D 64, fp32, 1
// thread, on the 2-core AVX2 EPYC; the figures below are of the same case).
template <typename A> struct Lanes {
  typedef A type __attribute__((vector_size(32)));
};
template <typename A> using V = typename Lanes<A>::type;
template <typename A> constexpr int kVW = 32 / sizeof(A);      // lanes per vector
template <typename A> constexpr int kNV = kTile / kVW<A>;      // vectors per kTile
template <typename A> KF_SIMD V<A> loadv(const A* p) {
  V<A> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A> KF_SIMD void storev(A* p, V<A> v) { std::memcpy(p, &v, sizeof(v)); }

// Transposes 8 x 8 floats in registers (unpack, shuffle, 128-bit permute with AVX2). Written with
// __builtin_shufflevector, which GCC (12 and later) and clang both have; clang has no __builtin_shuffle.
KF_SIMD void transpose8(V<float> (&r)[8]) {
  V<float> t[8], u[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int j = 0; j < 8; j += 4)
    for (int h = 0; h < 2; ++h) {
      u[j + 2 * h] = __builtin_shufflevector(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[j + 2 * h + 1] = __builtin_shufflevector(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// kt[d][t] = rows[t][d] for the kTile rows. In float, 8 x 8 blocks transposed in registers: 0.54 ms
// against 0.77 ms with the element-wise transpose (kTile-strided scalar stores). It still takes ~40%
// of a decode at G = 4 (0.56 ms, 0.34 ms without it); tasks of few rows skip it (kDotRows).
template <typename A> KF_SIMD void transpose_tile(const A* const* rows, int64_t D, A* kt) {
  int64_t d = 0;
  if constexpr (std::is_same_v<A, float>) {
    for (; d + 8 <= D; d += 8)
      for (int t0 = 0; t0 < kTile; t0 += 8) {
        V<float> r[8];
        for (int j = 0; j < 8; ++j) r[j] = loadv(rows[t0 + j] + d);
        transpose8(r);
        for (int j = 0; j < 8; ++j) storev(kt + (d + j) * kTile + t0, r[j]);
      }
  }
  for (; d < D; ++d)
    for (int t = 0; t < kTile; ++t) kt[d * kTile + t] = rows[t][d];
}

// Gathers positions t0 .. t0 + T - 1 (all below the length): K transposed into w.kt, V row pointers
// into w.vrows. Rows of a pool in the accumulation type are read in place (K for the transpose; V
// too when D needs no padding); others are converted into w.kb / w.vb first. K rows past T come from
// w.kb (zero or an earlier tile's finite values: their scores are replaced by -inf). The slot
// advances by one per position. (With V read in place, 0.69 -> 0.56 ms; a division per position
// and the V copy were the rest of the staging besides the transpose.)
template <typename S, typename A>
KF_SIMD void stage(const Pool<S>& P, const Rows<A>& w, int64_t t0, int T) {
  constexpr bool in_place = std::is_same_v<S, A>;
  const int32_t* pages = P.table + w.table_row * P.table_stride + t0 / P.page_size;
  int64_t slot = t0 % P.page_size;
  const A* krow[kTile];
  for (int t = 0; t < kTile; ++t) {
    krow[t] = w.kb + t * w.Dp;
    if (t >= T) continue;
    if (slot == P.page_size) {
      ++pages;
      slot = 0;
    }
    const int64_t off = ((*pages * P.page_size + slot++) * P.hkv + w.h) * P.D;
    const S* kr = P.k + off;
    const S* vr = P.v + off;
    const A* vin = nullptr;
    if constexpr (in_place) {
      krow[t] = kr;
      if (P.D == w.Dp) vin = vr;
    } else {
      for (int64_t d = 0; d < P.D; ++d) w.kb[t * w.Dp + d] = load<A>(kr[d]);
    }
    if (vin == nullptr) {
      A* vo = w.vb + t * w.Dp;
      for (int64_t d = 0; d < P.D; ++d) vo[d] = load<A>(vr[d]);
      vin = vo;
    }
    w.vrows[t] = vin;
  }
  if (w.dot)
    std::copy(krow, krow + kTile, w.krows);
  else
    transpose_tile(krow, P.D, w.kt);
}

// s[t] = q . krows[t] over D for the kTile rows (the dot form): per 8 positions, 8 lane-wise partial
// sums over D, reduced by one 8 x 8 transpose and 7 adds.
KF_SIMD void dot_scores(const float* q, const float* const* krows, int64_t D, float* s) {
  for (int t0 = 0; t0 < kTile; t0 += 8) {
    V<float> a[8] = {};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      const V<float> qd = loadv(q + d);
      for (int j = 0; j < 8; ++j) a[j] += qd * loadv(krows[t0 + j] + d);
    }
    transpose8(a);
    V<float> sum = a[0];
    for (int j = 1; j < 8; ++j) sum += a[j];
    storev(s + t0, sum);
    for (; d < D; ++d)
      for (int j = 0; j < 8; ++j) s[t0 + j] += q[d] * krows[t0 + j][d];
  }
}

// acc[i][d0 .. d0 + NA x kVW) = acc[i][..] * alpha[i] + sum over t < T of s[i][t] v[t][..], for RB rows
// (acc rows Dp apart), NA vectors per row held in registers; v[t] is w.vrows[t].
template <int RB, int NA, typename A>
KF_SIMD void axpy(const Rows<A>& w, A* acc, const A (*s)[kTile], const A* alpha, int64_t d0, int T) {
  constexpr int VW = kVW<A>;
  V<A> a[RB][NA];
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NA; ++v) a[i][v] = loadv(acc + i * w.Dp + d0 + v * VW) * alpha[i];
  for (int t = 0; t < T; ++t) {
    V<A> vr[NA];
    for (int v = 0; v < NA; ++v) vr[v] = loadv(w.vrows[t] + d0 + v * VW);
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NA; ++v) a[i][v] += s[i][t] * vr[v];
  }
  for (int i = 0; i < RB; ++i)
    for (int v = 0; v < NA; ++v) storev(acc + i * w.Dp + d0 + v * VW, a[i][v]);
}

// Rows r0 .. r0 + RB - 1 against the staged tile of T positions starting at t0. Both products keep
// RB x kNV accumulators (8 ymm in float) in registers, enough independent FMA chains to fill the
// FMA units.
template <int RB, bool Dot, typename A>
KF_SIMD void tile_block(const Rows<A>& w, int64_t D, int r0, int64_t t0, int T) {
  constexpr int NV = kNV<A>, VW = kVW<A>;
  alignas(64) A s[RB][kTile];
  const A* q = w.q + r0 * w.Dp;
  if constexpr (Dot) {
    for (int i = 0; i < RB; ++i) dot_scores(q + i * w.Dp, w.krows, D, s[i]);
  } else {
    V<A> sv[RB][NV];
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NV; ++v) sv[i][v] = V<A>{};
    for (int64_t d = 0; d < D; ++d) {
      V<A> kd[NV];
      for (int v = 0; v < NV; ++v) kd[v] = loadv(w.kt + d * kTile + v * VW);
      for (int i = 0; i < RB; ++i) {
        const A qd = q[i * w.Dp + d];
        for (int v = 0; v < NV; ++v) sv[i][v] += qd * kd[v];
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int v = 0; v < NV; ++v) storev(s[i] + v * VW, sv[i][v]);
  }
  A alpha[RB];
  for (int i = 0; i < RB; ++i) {
    const int r = r0 + i;
    const int64_t lim = std::min<int64_t>(T, w.last[r] + 1 - t0);
    if (lim <= 0) {  // the whole tile is past this row (prefill): no change
      alpha[i] = 1;
      std::fill(s[i], s[i] + kTile, A(0));
      continue;
    }
    for (int t = static_cast<int>(lim); t < kTile; ++t) s[i][t] = -std::numeric_limits<A>::infinity();
    // max and sum: lane-wise over the kNV vectors, then over the lanes (fixed order; the serial
    // 16-step chains they replace cost as much as the row's products)
    V<A> mv = loadv(s[i]);
    for (int v = 1; v < NV; ++v) mv = mv > loadv(s[i] + v * VW) ? mv : loadv(s[i] + v * VW);
    A mx = mv[0];
    for (int j = 1; j < VW; ++j) mx = std::max(mx, mv[j]);
    const A mn = std::max(w.m[r], mx);
    // Exponents from 0 while every score so far is -inf (masked keys, -inf in K): -inf - -inf made the
    // row NaN though later tiles held finite scores (numerical hunt). Its terms are 0 then, as softmax's.
    const A base = mn == -std::numeric_limits<A>::infinity() ? A(0) : mn;
    alpha[i] = std::exp(w.m[r] - base);  // 0 on the first tile (m = -inf)
    w.m[r] = mn;
    exp_row(s[i], base);
    V<A> sm = loadv(s[i]);
    for (int v = 1; v < NV; ++v) sm += loadv(s[i] + v * VW);
    A sum = sm[0];
    for (int j = 1; j < VW; ++j) sum += sm[j];
    w.l[r] = w.l[r] * alpha[i] + sum;
  }
  // acc[i] = acc[i] * alpha[i] + sum_t s[i][t] v[t], CH kTile-column chunks per pass so that RB x CH x
  // kNV (8 in float) independent FMA chains stay in flight: one row with one chunk per pass ran two
  // chains 16 FMAs deep, latency-bound (the G = 1 decode; figures at kDotRows). Each element's sum
  // over t keeps its order: the same bits as one chunk per pass.
  constexpr int CH = kRB / RB;
  A* acc = w.acc + r0 * w.Dp;
  int64_t d0 = 0;
  for (; d0 + CH * kTile <= w.Dp; d0 += CH * kTile) axpy<RB, CH * NV>(w, acc, s, alpha, d0, T);
  for (; d0 < w.Dp; d0 += kTile) axpy<RB, NV>(w, acc, s, alpha, d0, T);
}

// The online softmax of the rows of ws[0 .. n) (KV heads of one sequence, one range [p0, p1)), tile by
// tile, the heads inner: a tile's rows of all n heads are adjacent in the pools ([slot][Hkv][D]).
template <typename S, typename A>
KF_SIMD void attend(const Pool<S>& P, const Rows<A>* ws, int n) {
  for (int64_t t0 = ws[0].p0; t0 < ws[0].p1; t0 += kTile) {
    const int T = static_cast<int>(std::min<int64_t>(kTile, ws[0].p1 - t0));
    for (int i = 0; i < n; ++i) {
      const Rows<A>& w = ws[i];
      stage(P, w, t0, T);
      if constexpr (std::is_same_v<A, float>) {
        if (w.dot) {
          for (int r = 0; r < w.R; ++r) tile_block<1, true>(w, P.D, r, t0, T);
          continue;
        }
      }
      int r0 = 0;
      for (; r0 + kRB <= w.R; r0 += kRB) tile_block<kRB, false>(w, P.D, r0, t0, T);
      switch (w.R - r0) {
        case 3: tile_block<3, false>(w, P.D, r0, t0, T); break;
        case 2: tile_block<2, false>(w, P.D, r0, t0, T); break;
        case 1: tile_block<1, false>(w, P.D, r0, t0, T); break;
        default: break;
      }
    }
  }
}

// The task loops are KF_CLONES (cpu_isa.h); the OpenMP regions and the per-task setup are not.

KF_CLONES void attend_task(const Pool<float>& P, const Rows<float>* ws, int n) { attend(P, ws, n); }
KF_CLONES void attend_task(const Pool<Half>& P, const Rows<float>* ws, int n) { attend(P, ws, n); }
KF_CLONES void attend_task(const Pool<BF16>& P, const Rows<float>* ws, int n) { attend(P, ws, n); }
KF_CLONES void attend_task(const Pool<double>& P, const Rows<double>* ws, int n) { attend(P, ws, n); }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Query row qrow (D elements) times scale into dst (zero padding already there).
template <typename S, typename A> void load_q(const S* qrow, A scale, int64_t D, A* dst) {
  for (int64_t d = 0; d < D; ++d) dst[d] = load<A>(qrow[d]) * scale;
}

// out row = acc / l.
template <typename S, typename A> void store_row(const A* acc, A l, int64_t D, S* dst) {
  const A inv = A(1) / l;
  for (int64_t d = 0; d < D; ++d) dst[d] = store<S>(acc[d] * inv);
}

template <typename S>
void decode(const S* q, const Pool<S>& P, const int32_t* seq_ids, const int32_t* lens, S* out, int64_t B,
            int64_t Hq, double scale_d, int nt) {
  using A = Acc<S>;
  const int64_t D = P.D, Dp = round_up(D, kTile), G = Hq / P.hkv, W = Dp + 2;
  const A scale = static_cast<A>(scale_d);
  // first[b] .. first[b + 1]: the chunks of sequence b (one for a length of 0).
  std::vector<int64_t> first(B + 1, 0);
  for (int64_t b = 0; b < B; ++b)
    first[b + 1] = first[b] + std::max<int64_t>(1, (lens[b] + kDecodeChunk - 1) / kDecodeChunk);
  const int64_t chunks = first[B];
  // Partial results of multi-chunk sequences: [chunk][Hq][m, l, acc[Dp]].
  std::vector<A> part(chunks > B ? chunks * Hq * W : 0);
  // KV heads per task: a task runs hg heads of one chunk tile by tile, the heads inner, so it reads
  // each tile's slots whole ([slot][Hkv][D] rows adjacent) rather than one head's D elements every
  // Hkv x D. All heads per task while the chunks alone give each thread 4 tasks, else the largest
  // divisor of Hkv that does. Decode of 4 x 4096 tokens, 2 threads, K/V (67-134 MB) past the L3
  // cache, best of 3 (bench/kv_cpu_decode_groups.py --threads 2 --ctx 4096): MHA Hq = Hkv = 16,
  // D 64: fp32 9.7 -> 8.3 ms (SDPA on contiguous K/V 6.3-7.6), bf16 12.0 -> 8.2 ms; Hq 32 / Hkv 8,
  // D 128, fp32 10.2 -> 8.2 ms (SDPA 19-22). A head's bits do not depend on hg: its rows see the
  // same tiles in the same order (tested: 1 thread against 2).
  int64_t hg = P.hkv;
  while (hg > 1 && chunks * (P.hkv / hg) < 4 * static_cast<int64_t>(nt)) {
    do {
      --hg;
    } while (P.hkv % hg != 0);
  }
  const int64_t groups = P.hkv / hg;
#pragma omp parallel num_threads(nt)
  {
    Scratch<A> sc(hg * G, Dp);
    std::vector<Rows<A>> ws(hg);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < chunks * groups; ++task) {
      const int64_t ci = task / groups, h0 = task % groups * hg;
      const int64_t b = std::upper_bound(first.begin(), first.end(), ci) - first.begin() - 1;
      const int64_t n = lens[b], p0 = (ci - first[b]) * kDecodeChunk;
      // query heads h0 G .. (h0 + hg) G - 1 are the task's rows 0 .. hg G - 1
      S* o = out + (b * Hq + h0 * G) * D;
      if (n == 0) {
        std::fill(o, o + hg * G * D, store<S>(A(0)));
        continue;
      }
      for (int64_t i = 0; i < hg; ++i)
        ws[i] = sc.rows(seq_ids[b], h0 + i, p0, std::min(n, p0 + kDecodeChunk), static_cast<int>(G), Dp, i * G);
      for (int64_t r = 0; r < hg * G; ++r) {
        load_q(q + (b * Hq + h0 * G + r) * D, scale, D, sc.q.data() + r * Dp);
        sc.last[r] = n - 1;
      }
      attend_task(P, ws.data(), static_cast<int>(hg));
      const bool split = first[b + 1] - first[b] > 1;
      for (int64_t r = 0; r < hg * G; ++r) {
        if (!split) {
          store_row(sc.acc.data() + r * Dp, sc.l[r], D, o + r * D);
          continue;
        }
        A* pp = part.data() + (ci * Hq + h0 * G + r) * W;
        pp[0] = sc.m[r];
        pp[1] = sc.l[r];
        std::copy(sc.acc.data() + r * Dp, sc.acc.data() + (r + 1) * Dp, pp + 2);
      }
    }
    // Merge the chunks of each split (sequence, query head) in chunk order.
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * Hq; ++bh) {
      const int64_t b = bh / Hq, hq = bh % Hq;
      if (part.empty() || first[b + 1] - first[b] == 1) continue;
      A mx = -std::numeric_limits<A>::infinity();
      for (int64_t c = first[b]; c < first[b + 1]; ++c) mx = std::max(mx, part[(c * Hq + hq) * W]);
      A* acc = sc.acc.data();  // Dp >= D scratch
      std::fill(acc, acc + D, A(0));
      A l = 0;
      for (int64_t c = first[b]; c < first[b + 1]; ++c) {
        const A* pp = part.data() + (c * Hq + hq) * W;
        const A f = std::exp(pp[0] - mx);
        l += pp[1] * f;
        for (int64_t d = 0; d < D; ++d) acc[d] += pp[2 + d] * f;
      }
      store_row(acc, l, D, out + bh * D);
    }
  }
}

template <typename S>
void prefill(const S* q, const Pool<S>& P, const int32_t* seq_ids, const int32_t* lens, const int32_t* q_lens,
             S* out, int64_t num_seqs, int64_t Hq, double scale_d, int nt) {
  using A = Acc<S>;
  const int64_t D = P.D, Dp = round_up(D, kTile), G = Hq / P.hkv;
  const A scale = static_cast<A>(scale_d);
  // Tasks (sequence, query block), each run for every KV head: first query row and block start.
  std::vector<int64_t> seq_of, block0, qoff(num_seqs + 1, 0);
  for (int64_t i = 0; i < num_seqs; ++i) {
    qoff[i + 1] = qoff[i] + q_lens[i];
    for (int64_t j = 0; j < q_lens[i]; j += kQBlock) {
      seq_of.push_back(i);
      block0.push_back(j);
    }
  }
  const int64_t blocks = static_cast<int64_t>(seq_of.size());
#pragma omp parallel num_threads(nt)
  {
    Scratch<A> sc(kQBlock * G, Dp);
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < blocks * P.hkv; ++task) {
      const int64_t i = seq_of[task / P.hkv], h = task % P.hkv, j0 = block0[task / P.hkv];
      const int64_t j1 = std::min<int64_t>(q_lens[i], j0 + kQBlock), pos0 = lens[i] - q_lens[i];
      const int R = static_cast<int>((j1 - j0) * G);
      const Rows<A> w = sc.rows(seq_ids[i], h, 0, pos0 + j1, R, Dp);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (j - j0) * G + g;
          load_q(q + ((qoff[i] + j) * Hq + h * G + g) * D, scale, D, sc.q.data() + r * Dp);
          sc.last[r] = pos0 + j;
        }
      attend_task(P, &w, 1);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (j - j0) * G + g;
          store_row(w.acc + r * Dp, w.l[r], D, out + ((qoff[i] + j) * Hq + h * G + g) * D);
        }
    }
  }
}

template <typename F> void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::f16: f(Half{}); break;
    case DType::bf16: f(BF16{}); break;
  }
}

}  // namespace

void decode_attention_cpu(DType dtype, const void* q, const void* k_pages, const void* v_pages,
                          const int32_t* block_table, int64_t table_stride, const int32_t* seq_ids,
                          const int32_t* lens, void* out, int64_t batch, int64_t num_q_heads, int64_t page_size,
                          int64_t num_kv_heads, int64_t head_dim, double scale, int num_threads) {
  by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const Pool<S> P{static_cast<const S*>(k_pages), static_cast<const S*>(v_pages), block_table, table_stride,
                    page_size, num_kv_heads, head_dim};
    decode(static_cast<const S*>(q), P, seq_ids, lens, static_cast<S*>(out), batch, num_q_heads, scale,
           num_threads);
  });
}

void prefill_attention_cpu(DType dtype, const void* q, const void* k_pages, const void* v_pages,
                           const int32_t* block_table, int64_t table_stride, const int32_t* seq_ids,
                           const int32_t* lens, const int32_t* q_lens, void* out, int64_t num_seqs,
                           int64_t num_q_heads, int64_t page_size, int64_t num_kv_heads, int64_t head_dim,
                           double scale, int num_threads) {
  by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    const Pool<S> P{static_cast<const S*>(k_pages), static_cast<const S*>(v_pages), block_table, table_stride,
                    page_size, num_kv_heads, head_dim};
    prefill(static_cast<const S*>(q), P, seq_ids, lens, q_lens, static_cast<S*>(out), num_seqs, num_q_heads,
            scale, num_threads);
  });
}

}  // namespace kv
}  // namespace kfuse
