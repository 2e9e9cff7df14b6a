// DEU CPU kernels: forward and backward over x viewed as [M, N, K].
//
// f64 (the gradcheck path) is scalar and precise: deu_math.h's forward_one/backward_one
// with std::exp/sin/cos. f32/f16/bf16 compute in float on 16 SIMD lanes (deu_cpu_simd.h):
// plans are built once per call into structure-of-arrays form, x is cut into tiles
// (rows x neuron group), lanes run over 16 neurons when K == 1 and along K otherwise.
// Measured on the 2-core AVX-512 Xeon dev box, 4096x1024 fp32, paper init with
// c1, c2 ~ N(0,1), 1 thread CPU time: the scalar kernel took ~95 ms forward; this one
// 5.1 ms forward and 13.7 ms backward (2 threads: 2.6 ms and 7.1 ms).
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../cpu_convert.h"
#include "../cpu_isa.h"
#include "deu.h"
#include "deu_math.h"
#include "deu_cpu_simd.h"

namespace kfuse {
namespace deu {
namespace {

using cpu::BF16;
using cpu::from_acc;
using cpu::Half;
using cpu::to_acc;

// Rows of M handled by one partial of the parameter gradient. Fixed (not a function of
// the thread count) so the reduction order, and hence the result, is deterministic.
constexpr int64_t kRowsPerPartial = 64;
// Elements of K per partial (and backward tile) when K is larger: bounds the f16/bf16 staging
// buffers (3 x 64 x 16384 floats per thread).
constexpr int64_t kKPerPartial = 16384;
// Accuracy of grad_coeffs: bwd_tile's running sums restart every kSumElems elements of a row
// (256 additions per SIMD lane), their totals adding up per tile (at most 64 x 4 more). Running
// sums over whole tiles (64 x 50176 elements at 224 x 224) lost up to 1e-2 of grad_coeffs in
// fp32, against 4e-6 for PyTorch's sum. (Partials of 256 elements of K fixed it too but made
// an NCHW fwd+bwd 1.5x slower: short row segments defeat the prefetcher.)
constexpr int64_t kSumElems = 4096;
inline int64_t partial_k(int64_t K) { return std::min(K, kKPerPartial); }
inline int64_t k_chunks(int64_t K, int64_t kc) { return (K + kc - 1) / kc; }

// ---- f64: scalar, precise (std::exp/sin/cos through deu_math.h); used for gradcheck ------
// Each neuron runs the element code compiled for its own terms (with_mask), the code the
// CUDA kernels run for a warp: so the CPU float64 tests, at float64 tolerances, check every
// term mask's math, not only the all-terms one.

void forward_f64(const double* x, double* y, const double* coeffs, int64_t M, int64_t N, int64_t K, int nt) {
  std::vector<Plan<double>> plans(N);
  for (int64_t n = 0; n < N; ++n) plans[n] = plan_from_coeffs(coeffs + 5 * n);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < M * N; ++r) {
    const Plan<double>& p = plans[r % N];
    with_mask(plan_terms(p), [&](auto terms) {
      for (int64_t k = 0; k < K; ++k) y[r * K + k] = forward_one<decltype(terms)::value>(p, x[r * K + k]);
    });
  }
}

void backward_f64(const double* gy, const double* x, const double* coeffs, double* gx,
                  double* partials, int64_t M, int64_t N, int64_t K, int nt) {
  std::vector<Plan<double>> plans(N);
  std::vector<double> jac(static_cast<size_t>(N) * kPlanParams * kCoeffs);
  for (int64_t n = 0; n < N; ++n) {
    auto* j = reinterpret_cast<double(*)[kCoeffs]>(jac.data() + n * kPlanParams * kCoeffs);
    plans[n] = plan_with_jacobian(coeffs + 5 * n, j);
  }
  const int64_t kc = partial_k(K), KC = k_chunks(K, kc);
  const int64_t P = (M + kRowsPerPartial - 1) / kRowsPerPartial * KC;
  // One task per (partial, neuron): each partial entry has one writer, fixed order.
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t pn = 0; pn < P * N; ++pn) {
    const int64_t pi = pn / N, n = pn % N, t = pi / KC, k0 = pi % KC * kc, k1 = std::min(K, k0 + kc);
    double acc[kPlanParams] = {};
    const Plan<double>& p = plans[n];
    const int64_t m1 = std::min(M, (t + 1) * kRowsPerPartial);
    with_mask(plan_terms(p), [&](auto terms) {
      for (int64_t m = t * kRowsPerPartial; m < m1; ++m) {
        const int64_t base = (m * N + n) * K;
        for (int64_t k = k0; k < k1; ++k)
          gx[base + k] = backward_one<decltype(terms)::value>(p, x[base + k], gy[base + k], acc);
      }
    });
    auto* j = reinterpret_cast<const double(*)[kCoeffs]>(jac.data() + n * kPlanParams * kCoeffs);
    apply_jacobian(acc, j, partials + (pi * N + n) * kCoeffs);
  }
}

// ---- float compute (f32, f16, bf16 storage): W-lane SIMD, deu_cpu_simd.h ---------------
using simd::kBlock;

// Load / store W floats (cnt < W: a partial block, padded with zeros).
template <int W> KF_SIMD typename simd::Lanes<W>::vf load_lanes(const float* p, int cnt) {
  using V = simd::Lanes<W>;
  if (cnt == W) return V::loadu(p);
  float buf[W] = {};
  std::memcpy(buf, p, sizeof(float) * cnt);
  return V::loadu(buf);
}
template <int W> KF_SIMD void store_lanes(float* p, typename simd::Lanes<W>::vf v, int cnt) {
  using V = simd::Lanes<W>;
  if (cnt == W) return V::storeu(p, v);
  float buf[W];
  V::storeu(buf, v);
  std::memcpy(p, buf, sizeof(float) * cnt);
}

// Which Jacobian layout a FloatPlans holds: none (forward), rows (one [kPlanParams][kCoeffs]
// block per neuron: the K > 1 backward, a neuron per loop) or lanes (structure of arrays: the
// K == 1 backward, W neurons per vector). One, not both: building the second one as well took
// 7% of a [1, 1024] backward (one thread: 150 against 139 us).
enum class Jac { none, rows, lanes };

// Neurons from which a call's plans are built on all its threads: planning is per neuron, O(N)
// whatever the rows (~0.7 us a neuron with the Jacobian), and ran on one thread after a serial zero
// fill of the plan rows: a [1, 131072] fp32 DEU took 5.3 ms forward and 95 ms forward + backward
// on 1 and 2 threads alike (the PyTorch reference: 111 ms at [2, 131072]); on all threads, 2.8 ms
// and 52 ms on 2 (before plan_block's ISA clones; bench/deu_cpu_wide.py,
// bench/results/2026-12-07-cpu-deu-wide.md).
constexpr int64_t kParallelPlans = 1024;

// rows x stride floats, uninitialised but for the padding columns [N, stride), which are zero: the
// planning loop writes every column below N (so the pages are first touched by its threads, not by
// a serial zero fill: 50 MB of Jacobian at N = 131072).
struct PlanRows {
  std::unique_ptr<float[]> p;
  void init(int64_t rows, int64_t N, int64_t stride) {
    p.reset(new float[static_cast<size_t>(rows * stride)]);
    for (int64_t r = 0; r < rows; ++r) std::fill(p.get() + r * stride + N, p.get() + (r + 1) * stride, 0.0f);
  }
  float* data() { return p.get(); }
  const float* data() const { return p.get(); }
};

// Plans (and Jacobians) of neurons [n0, n1) into FloatPlans' arrays; *bflag ORs their flags.
// KF_CLONES and flatten (the plan math inlined into each clone, FMAs included): the dual-number
// Jacobian is most of a wide, short backward ([1, 131072] fp32 fwd + bwd, 1 thread: 99 -> 80 ms; 2
// threads 55 -> 47 ms). Plans without the Jacobian came out bit for bit the same; grad_coeffs moved
// in its last bits (max relative error against float64 unchanged: bench/results/2026-12-07-cpu-deu-wide.md).
KF_CLONES __attribute__((flatten)) void plan_block(const float* coeffs, int64_t n0, int64_t n1, Jac layout,
                                                   float* soa, int64_t stride, uint8_t* flags, uint8_t* bflag,
                                                   float* jac, float* jac_soa) {
  for (int64_t n = n0; n < n1; ++n) {
    float j[kPlanParams][kCoeffs];  // Jac::lanes: this neuron's, scattered into jac_soa below
    float(*jn)[kCoeffs] =
        layout == Jac::rows ? reinterpret_cast<float(*)[kCoeffs]>(jac + n * kPlanParams * kCoeffs) : j;
    const Plan<float> p =
        layout == Jac::none ? plan_from_coeffs(coeffs + 5 * n) : plan_with_jacobian(coeffs + 5 * n, jn);
    simd::plan_to_soa(p, soa, stride, n);
    flags[n] = static_cast<uint8_t>(simd::plan_flags(p));
    *bflag |= flags[n];
    for (int64_t e = 0; layout == Jac::lanes && e < kPlanParams * kCoeffs; ++e)
      jac_soa[e * stride + n] = j[e / kCoeffs][e % kCoeffs];
  }
}

// Per-call plans of the float path.
struct FloatPlans {
  int64_t N = 0, stride = 0;
  PlanRows soa;                 // [simd::kSoaRows][stride]
  std::vector<uint8_t> flags;   // per neuron
  std::vector<uint8_t> bflags;  // per block of kBlock neurons (OR of its neurons)
  PlanRows jac;                 // Jac::rows: [N][kPlanParams][kCoeffs] (no padding)
  PlanRows jac_soa;             // Jac::lanes: [kPlanParams][kCoeffs][stride]

  // Neurons are planned on nt threads when there are at least kParallelPlans of them (each
  // neuron's plan is its own: the same bits on any number of threads).
  FloatPlans(const float* coeffs, int64_t n_, Jac layout, int nt) : N(n_) {
    // An odd number of kBlock-float (64-byte) blocks per row: with N a multiple of 1024 the rows
    // were 4 KB apart, so the scattered writes below (19 plan rows, 95 Jacobian rows per
    // neuron) all fell into one L1 set. Backward of [1, 1024] fp32, one thread: 411 -> 150 us.
    stride = ((N + kBlock - 1) / kBlock | 1) * kBlock;
    soa.init(simd::kSoaRows, N, stride);
    flags.assign(N, 0);
    bflags.assign(stride / kBlock, 0);
    if (layout == Jac::rows) jac.init(N, kPlanParams * kCoeffs, kPlanParams * kCoeffs);
    if (layout == Jac::lanes) jac_soa.init(kPlanParams * kCoeffs, N, stride);
    // Blocks of kBlock neurons, so that one thread writes each bflags entry.
    const int64_t blocks = (N + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (N >= kParallelPlans) num_threads(nt)
    for (int64_t b = 0; b < blocks; ++b)
      plan_block(coeffs, b * kBlock, std::min(N, (b + 1) * kBlock), layout, soa.data(), stride, flags.data(),
                 &bflags[b], jac.data(), jac_soa.data());
  }
  const float (*jac_of(int64_t n) const)[kCoeffs] {
    return reinterpret_cast<const float(*)[kCoeffs]>(jac.data() + n * kPlanParams * kCoeffs);
  }
};

// apply_jacobian (deu_math.h) on W lanes of neurons nb.. (the lanes of acc), written to
// out[l * kCoeffs + k] for the first cnt lanes. The same sums in the same order; structural
// zeros are skipped by a select, so an unused accumulator's inf cannot make 0·inf = NaN.
// Scalar, once per lane and 64-row partial, it took ~15% of a [4096, 1024] backward.
template <int W>
KF_SIMD void apply_jacobian_lanes(const typename simd::Lanes<W>::VAcc& acc, const FloatPlans& P, int64_t nb, int cnt,
                                  float* out) {
  using V = simd::Lanes<W>;
  float lanes[kCoeffs][W];
  for (int k = 0; k < kCoeffs; ++k) {
    typename V::vf s = V::splat(0.0f);
    for (int i = 0; i < kPlanParams; ++i) {
      const typename V::vf j = V::loadu(P.jac_soa.data() + (i * kCoeffs + k) * P.stride + nb);
      s += j != 0.0f ? acc.a[i] * j : V::splat(0.0f);
    }
    V::storeu(lanes[k], s);
  }
  for (int l = 0; l < cnt; ++l)
    for (int k = 0; k < kCoeffs; ++k) out[l * kCoeffs + k] = lanes[k][l];
}

// With K == 1 a tile is walked neuron block outer, rows inner: consecutive loads are a row
// apart (N floats, a different page each for N = 1024), which no hardware prefetcher
// follows. Measured on the 2-core Xeon (1 thread, 4096x1024 fp32): the backward spent 50%
// of its time stalled on the x load (45 ms). So while a block is processed, each row
// prefetches its next block (the line after the current one), which is then used one
// full block pass later; the first block of a tile is prefetched up front.
KF_SIMD void prefetch_block(const float* in, const float* out, const float* in2 = nullptr) {
  __builtin_prefetch(in, 0, 3);
  __builtin_prefetch(out, 1, 3);
  if (in2) __builtin_prefetch(in2, 0, 3);
}

// A tile is rows [0, rows) x neurons [n0, n1) x klen elements of K of float data; element
// (m, n, k) is at p[m * ld + (n - n0) * K + k] (a tile has one neuron or whole rows of K, so
// this holds for staged tiles too). With K == 1 lanes run over W neurons (n0 a multiple of
// kBlock) and the loops are neuron block outer, rows inner, so a block's plan and, in the
// backward, its 19 accumulators stay in registers; with K > 1 lanes run along K with the
// neuron's plan broadcast.
// The two tile kernels have one entry per ISA (below); one instantiation (float data) keeps the build
// time down: f16/bf16 tiles are staged.

template <int W>
KF_SIMD void fwd_tile_lanes(const float* x, float* y, int64_t ld, const FloatPlans& P, int64_t n0, int64_t n1,
                            int64_t rows, int64_t K, int64_t klen) {
  using V = simd::Lanes<W>;
  if (K == 1) {
    for (int64_t m = 0; m < rows; ++m) prefetch_block(x + m * ld, y + m * ld);
    for (int64_t nb = n0; nb < n1; nb += W) {
      const int cnt = static_cast<int>(std::min<int64_t>(W, n1 - nb));
      const typename V::VPlan p = V::load_plan(P.soa.data(), P.stride, nb);
      with_mask<simd::kFwdFlags>(P.bflags[nb / kBlock], [&](auto F) __attribute__((always_inline)) {
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t o = m * ld + (nb - n0);
          prefetch_block(x + o + kBlock, y + o + kBlock);
          store_lanes<W>(y + o, V::template vforward<F()>(p, load_lanes<W>(x + o, cnt)), cnt);
        }
      });
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const typename V::VPlan p = V::splat_plan(P.soa.data(), P.stride, n);
    with_mask<simd::kFwdFlags>(P.flags[n], [&](auto F) __attribute__((always_inline)) {
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t k = 0; k < klen; k += W) {
          const int cnt = static_cast<int>(std::min<int64_t>(W, klen - k));
          const int64_t o = m * ld + (n - n0) * K + k;
          store_lanes<W>(y + o, V::template vforward<F()>(p, load_lanes<W>(x + o, cnt)), cnt);
        }
      }
    });
  }
}

// Backward of one tile that is (part of) partial `pt` = partials + t * N * 5: every
// partials[t, n, :] of the tile's neurons is written here, once, in a fixed order.
template <int W>
KF_SIMD void bwd_tile_lanes(const float* gy, const float* x, float* gx, int64_t ld, const FloatPlans& P, float* pt,
                            int64_t n0, int64_t n1, int64_t rows, int64_t K, int64_t klen) {
  using V = simd::Lanes<W>;
  if (K == 1) {
    for (int64_t m = 0; m < rows; ++m) prefetch_block(x + m * ld, gx + m * ld, gy + m * ld);
    for (int64_t nb = n0; nb < n1; nb += W) {
      const int cnt = static_cast<int>(std::min<int64_t>(W, n1 - nb));
      const typename V::VPlan p = V::load_plan(P.soa.data(), P.stride, nb);
      typename V::VAcc acc;
      for (int i = 0; i < kPlanParams; ++i) acc.a[i] = V::splat(0.0f);
      simd::with_bwd_flags(P.bflags[nb / kBlock], [&](auto F) __attribute__((always_inline)) {
        for (int64_t m = 0; m < rows; ++m) {
          const int64_t o = m * ld + (nb - n0);
          prefetch_block(x + o + kBlock, gx + o + kBlock, gy + o + kBlock);
          const auto g = load_lanes<W>(gy + o, cnt);
          store_lanes<W>(gx + o, V::template vbackward<F()>(p, load_lanes<W>(x + o, cnt), g, acc), cnt);
        }
      });
      apply_jacobian_lanes<W>(acc, P, nb, cnt, pt + nb * kCoeffs);
    }
    return;
  }
  const bool restart = klen >= 16 * W;  // else a tile's sums are short (< 64 x 16 per lane)
  for (int64_t n = n0; n < n1; ++n) {
    const typename V::VPlan p = V::splat_plan(P.soa.data(), P.stride, n);
    typename V::VAcc acc, total;
    for (int i = 0; i < kPlanParams; ++i) acc.a[i] = total.a[i] = V::splat(0.0f);
    simd::with_bwd_flags(P.flags[n], [&](auto F) __attribute__((always_inline)) {
      for (int64_t m = 0; m < rows; ++m) {
        for (int64_t kb = 0; kb < klen; kb += kSumElems) {
          const int64_t kend = std::min(klen, kb + kSumElems);
          for (int64_t k = kb; k < kend; k += W) {
            const int cnt = static_cast<int>(std::min<int64_t>(W, kend - k));
            const int64_t o = m * ld + (n - n0) * K + k;
            const auto g = load_lanes<W>(gy + o, cnt);
            store_lanes<W>(gx + o, V::template vbackward<F()>(p, load_lanes<W>(x + o, cnt), g, acc), cnt);
          }
          if (restart) {
            for (int i = 0; i < kPlanParams; ++i) {
              total.a[i] += acc.a[i];
              acc.a[i] = V::splat(0.0f);
            }
          }
        }
      }
    });
    for (int i = 0; i < kPlanParams; ++i) acc.a[i] += total.a[i];
    float a[kPlanParams];
    for (int i = 0; i < kPlanParams; ++i) {  // lane sums in a fixed order
      float lanes[W];
      V::storeu(lanes, acc.a[i]);
      float s = 0.0f;
      for (int l = 0; l < W; ++l) s += lanes[l];
      a[i] = s;
    }
    apply_jacobian(a, P.jac_of(n), pt + n * kCoeffs);
  }
}

// The tile kernels' entries, one per ISA (cpu::pick_isa): W = 16 lanes with AVX-512, 8 with AVX2, 4 otherwise.
// [1024, 512] fp32 on a Zen 3 VM (AVX2), 2 threads: forward 12.96 ms with 16 lanes in the AVX2 clone (GCC kept the
// vectors in memory), 5x the compiled PyTorch baseline's 2.58 ms.
#define KF_FWD_TILE_ARGS                                                                                \
  const float *x, float *y, int64_t ld, const FloatPlans &P, int64_t n0, int64_t n1, int64_t rows, int64_t K, \
      int64_t klen
#define KF_BWD_TILE_ARGS                                                                                      \
  const float *gy, const float *x, float *gx, int64_t ld, const FloatPlans &P, float *pt, int64_t n0, int64_t n1, \
      int64_t rows, int64_t K, int64_t klen
KF_TARGET_AVX512 void fwd_tile_avx512(KF_FWD_TILE_ARGS) { fwd_tile_lanes<16>(x, y, ld, P, n0, n1, rows, K, klen); }
KF_TARGET_AVX2 void fwd_tile_avx2(KF_FWD_TILE_ARGS) { fwd_tile_lanes<8>(x, y, ld, P, n0, n1, rows, K, klen); }
void fwd_tile_base(KF_FWD_TILE_ARGS) { fwd_tile_lanes<4>(x, y, ld, P, n0, n1, rows, K, klen); }
KF_TARGET_AVX512 void bwd_tile_avx512(KF_BWD_TILE_ARGS) {
  bwd_tile_lanes<16>(gy, x, gx, ld, P, pt, n0, n1, rows, K, klen);
}
KF_TARGET_AVX2 void bwd_tile_avx2(KF_BWD_TILE_ARGS) { bwd_tile_lanes<8>(gy, x, gx, ld, P, pt, n0, n1, rows, K, klen); }
void bwd_tile_base(KF_BWD_TILE_ARGS) { bwd_tile_lanes<4>(gy, x, gx, ld, P, pt, n0, n1, rows, K, klen); }
#undef KF_FWD_TILE_ARGS
#undef KF_BWD_TILE_ARGS

// Elements per tile: enough to amortise the per-tile overhead, small enough that the
// tiles balance over the cores and a staged tile stays in L2.
constexpr int64_t kTileElems = 16384;

// Tiles: rows x a group of neurons x kc elements of K (kc < K only with one neuron per tile),
// numbered row tile outer, then K chunk, then neuron group.
struct Tiling {
  int64_t rows, group, kc;  // rows, neurons and elements of K per tile
  int64_t n_groups, k_chunks, row_tiles;
  int64_t count() const { return row_tiles * k_chunks * n_groups; }
};
// rows_fixed > 0: that many rows (the backward's partials), else as many as fit kTileElems.
inline Tiling tiling(int64_t M, int64_t N, int64_t K, int64_t rows_fixed, int64_t kc) {
  Tiling t;
  t.kc = kc;
  t.k_chunks = k_chunks(K, kc);
  const int64_t unit = K == 1 ? kBlock : 1;  // neuron groups are whole lane blocks when K == 1
  if (rows_fixed > 0) {
    t.rows = rows_fixed;
  } else {
    t.rows = std::max<int64_t>(1, std::min<int64_t>(M, kTileElems / std::max<int64_t>(1, N * kc)));
  }
  int64_t g = kc < K ? 1 : std::max<int64_t>(1, kTileElems / (t.rows * kc));
  g = (g + unit - 1) / unit * unit;
  t.group = std::min(g, N);
  t.n_groups = (N + t.group - 1) / t.group;
  t.row_tiles = (M + t.rows - 1) / t.rows;
  return t;
}

// Tile i of a tiling: its rows [m0, m0 + rows), neurons [n0, n1), K range [k0, k0 + klen).
struct Tile {
  int64_t m0, rows, n0, n1, k0, klen, k_chunk;
  Tile(const Tiling& t, int64_t i, int64_t M, int64_t N, int64_t K) {
    const int64_t g = i % t.n_groups, rest = i / t.n_groups;
    k_chunk = rest % t.k_chunks;
    m0 = rest / t.k_chunks * t.rows;
    rows = std::min(t.rows, M - m0);
    n0 = g * t.group;
    n1 = std::min(N, n0 + t.group);
    k0 = k_chunk * t.kc;
    klen = std::min(t.kc, K - k0);
  }
};

// Copies a rows x width tile between a strided tensor (row stride ld) and a dense buffer. KF_CLONES:
// the fp16 conversions (cpu_convert.h) are ~10 integer operations a lane, 16 lanes wide with AVX-512
// against 4 in the baseline ISA.
template <typename D, typename S>
KF_CLONES void copy_tile(const S* src, int64_t lds, D* dst, int64_t ldd, int64_t rows, int64_t width) {
  for (int64_t m = 0; m < rows; ++m) {
    const S* s = src + m * lds;
    D* d = dst + m * ldd;
    for (int64_t i = 0; i < width; ++i) {
      if constexpr (std::is_same_v<D, float>) d[i] = to_acc(s[i]);
      else d[i] = from_acc<D>(s[i]);
    }
  }
}

template <typename S>
void forward_float(const S* x, S* y, const float* coeffs, int64_t M, int64_t N, int64_t K, int nt) {
  const FloatPlans P(coeffs, N, Jac::none, nt);
  const Tiling tl = tiling(M, N, K, 0, std::min(K, kTileElems));  // bounded staging buffers
  const int64_t ld = N * K;
  const auto fwd_tile = cpu::pick_isa(fwd_tile_avx512, fwd_tile_avx2, fwd_tile_base);
  // One tile runs on the calling thread: starting the OpenMP team for it cost more than the
  // tile (the extension's forward of a [4, 32] fp32 tensor, 2 cores: 2.2 -> 1.1 us). The same
  // in backward_float.
#pragma omp parallel if (tl.count() > 1) num_threads(nt)
  {
    std::vector<float> bx, by;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tl.count(); ++i) {
      const Tile t(tl, i, M, N, K);
      const int64_t off = t.m0 * ld + t.n0 * K + t.k0;
      if constexpr (std::is_same_v<S, float>) {
        fwd_tile(x + off, y + off, ld, P, t.n0, t.n1, t.rows, K, t.klen);
      } else {  // one neuron, or whole rows of K: each row of the tile is contiguous
        const int64_t w = (t.n1 - t.n0) * t.klen;
        bx.resize(t.rows * w);
        by.resize(t.rows * w);
        copy_tile(x + off, ld, bx.data(), w, t.rows, w);
        fwd_tile(bx.data(), by.data(), w, P, t.n0, t.n1, t.rows, K, t.klen);
        copy_tile(by.data(), w, y + off, ld, t.rows, w);
      }
    }
  }
}

template <typename S>
void backward_float(const S* gy, const S* x, const float* coeffs, S* gx, float* partials,
                    int64_t M, int64_t N, int64_t K, int nt) {
  const FloatPlans P(coeffs, N, K == 1 ? Jac::lanes : Jac::rows, nt);
  const Tiling tl = tiling(M, N, K, kRowsPerPartial, partial_k(K));
  const int64_t ld = N * K;
  const auto bwd_tile = cpu::pick_isa(bwd_tile_avx512, bwd_tile_avx2, bwd_tile_base);
  // Tiles are (partial = (row tile, K chunk), neuron group); each partials[p, n, :] has one
  // writer and a fixed summation order, whatever the thread count.
#pragma omp parallel if (tl.count() > 1) num_threads(nt)
  {
    std::vector<float> bx, bg, bo;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < tl.count(); ++i) {
      const Tile t(tl, i, M, N, K);
      const int64_t off = t.m0 * ld + t.n0 * K + t.k0;
      float* pt = partials + (t.m0 / kRowsPerPartial * tl.k_chunks + t.k_chunk) * N * kCoeffs;
      if constexpr (std::is_same_v<S, float>) {
        bwd_tile(gy + off, x + off, gx + off, ld, P, pt, t.n0, t.n1, t.rows, K, t.klen);
      } else {  // one neuron, or whole rows of K: each row of the tile is contiguous
        const int64_t w = (t.n1 - t.n0) * t.klen;
        bx.resize(t.rows * w);
        bg.resize(t.rows * w);
        bo.resize(t.rows * w);
        copy_tile(x + off, ld, bx.data(), w, t.rows, w);
        copy_tile(gy + off, ld, bg.data(), w, t.rows, w);
        bwd_tile(bg.data(), bx.data(), bo.data(), w, P, pt, t.n0, t.n1, t.rows, K, t.klen);
        copy_tile(bo.data(), w, gx + off, ld, t.rows, w);
      }
    }
  }
}

}  // namespace

void forward_cpu(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                 int64_t K, int num_threads) {
  const int nt = std::max(num_threads, 1);
  switch (dtype) {
    case DType::f32:
      return forward_float(static_cast<const float*>(x), static_cast<float*>(y),
                          static_cast<const float*>(coeffs), M, N, K, nt);
    case DType::f64:
      return forward_f64(static_cast<const double*>(x), static_cast<double*>(y),
                         static_cast<const double*>(coeffs), M, N, K, nt);
    case DType::f16:
      return forward_float(static_cast<const Half*>(x), static_cast<Half*>(y),
                          static_cast<const float*>(coeffs), M, N, K, nt);
    case DType::bf16:
      return forward_float(static_cast<const BF16*>(x), static_cast<BF16*>(y),
                          static_cast<const float*>(coeffs), M, N, K, nt);
  }
}

int64_t backward_cpu_num_partials(int64_t M, int64_t, int64_t K) {
  return (M + kRowsPerPartial - 1) / kRowsPerPartial * k_chunks(K, partial_k(K));
}

void backward_cpu(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                  void* grad_x, void* partials, int64_t M, int64_t N, int64_t K, int num_threads) {
  const int nt = std::max(num_threads, 1);
  switch (dtype) {
    case DType::f32:
      return backward_float(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                           static_cast<const float*>(coeffs), static_cast<float*>(grad_x),
                           static_cast<float*>(partials), M, N, K, nt);
    case DType::f64:
      return backward_f64(static_cast<const double*>(grad_y), static_cast<const double*>(x),
                          static_cast<const double*>(coeffs), static_cast<double*>(grad_x),
                          static_cast<double*>(partials), M, N, K, nt);
    case DType::f16:
      return backward_float(static_cast<const Half*>(grad_y), static_cast<const Half*>(x),
                           static_cast<const float*>(coeffs), static_cast<Half*>(grad_x),
                           static_cast<float*>(partials), M, N, K, nt);
    case DType::bf16:
      return backward_float(static_cast<const BF16*>(grad_y), static_cast<const BF16*>(x),
                           static_cast<const float*>(coeffs), static_cast<BF16*>(grad_x),
                           static_cast<float*>(partials), M, N, K, nt);
  }
}

}  // namespace deu
}  // namespace kfuse
