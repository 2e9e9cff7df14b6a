// Multi-table embedding-bag CPU kernels (python/kfuse/ops/embedding.py, backend "cpu"; the
// definition is python/kfuse/reference/embedding.py, the layout embedding.h's).
//
// Forward: tasks of kBagsPerTask consecutive bags of one feature; a bag's rows are summed in A, in
// registers over column blocks of kColBytes (vectorised over dim), the rows kPrefetchAhead indices
// ahead prefetched.
// Backward: per table a stable counting sort of its occurrences by row (plan_backward, tables in
// parallel), then one task per unique row: its run of occurrences summed in increasing flat position
// by one thread, into the output (sparse) or into a per-thread buffer applied to the row at once
// (fused optimizer). The order of every sum is fixed by the data alone, so the bits do not depend on
// the thread count or the schedule.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "../cpu_convert.h"
#include "../cpu_isa.h"
#include "embedding.h"

// No fused multiply-adds: every product and sum is rounded on its own, so the bits are the same in
// the AVX-512, AVX2 + FMA and baseline clones (and equal PyTorch's op-by-op float32 update, which
// the tests check bit for bit). GCC contracted 616 of them otherwise; the kernels are memory-bound.
#pragma GCC optimize("fp-contract=off")

namespace kfuse {
namespace embedding {
namespace {

using cpu::Acc;
using cpu::BF16;
using cpu::from_acc;
using cpu::load;
using cpu::store;
using cpu::to_acc;

// The per-task loops are KF_CLONES (cpu_isa.h); the OpenMP regions are not.
#define KF_INLINE inline __attribute__((always_inline))

// Bags per forward / psw task: 64 bags of ~20 indices give ~200 tasks for the medical shape (3
// features x 4096 bags), plenty for dynamic balancing, each long enough to amortise the scheduling.
constexpr int64_t kBagsPerTask = 64;
// Prefetch distances: table rows this many indices ahead in the forward and grad_out slices this
// many occurrences ahead in the backward (within a task), and the table row (Adam: and its states)
// kRowsAhead unique rows ahead of a fused update, a cold line of a table of tens of MB otherwise
// loaded only when the update needs it. Medical shape, one thread, best of 3 on the shared 2-core
// box: forward 15.1 -> 11.2 ms, plan + fused row-wise Adagrad 20.1 -> 16.2 ms (16 and 4: 11.3 and
// 19.6 ms).
constexpr int64_t kPrefetchAhead = 8;
constexpr int64_t kRowsAhead = 2;
// Columns of a bag's sum held in registers at a time: 256 bytes, 8 AVX2 registers (64 floats).
constexpr int64_t kColBytes = 256;
// Unique rows per backward task (dynamic schedule: Zipf-hot rows are much longer runs than the rest).
constexpr int64_t kRowsPerTask = 16;

KF_INLINE void prefetch(const void* p, int64_t bytes) {
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(static_cast<const char*>(p) + c);
}

[[noreturn]] void value_error(const std::string& msg) { throw std::invalid_argument(msg); }
[[noreturn]] void index_error(const std::string& msg) { throw std::out_of_range(msg); }
std::string str(int64_t v) { return std::to_string(v); }

// Type-tag dispatch over the storage dtype S and the index type I.
template <typename F> void with_dtype(DType dt, F&& fn) {
  switch (dt) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::f16: return fn(_Float16{});
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
  if (num_offsets != F * B + 1)
    value_error("offsets must have F * B + 1 entries for F = " + str(F) + " features; got " + str(num_offsets));
  const I* off = static_cast<const I*>(bg.offsets);
  if (off[0] != 0) value_error("offsets[0] must be 0; got " + str(off[0]));
  for (int64_t k = 1; k < num_offsets; ++k)
    if (off[k] < off[k - 1])
      value_error("offsets must be non-decreasing: offsets[" + str(k) + "] = " + str(off[k]) + " < offsets[" +
                  str(k - 1) + "] = " + str(off[k - 1]));
  if (off[num_offsets - 1] != N)
    value_error("offsets[" + str(num_offsets - 1) + "] = " + str(off[num_offsets - 1]) +
                " must equal the number of indices, " + str(N));
  // The offsets are sound, so every feature's positions lie in [0, N). A branch-free OR over each
  // feature first (vectorised); the first bad position is looked for only when there is one.
  const I* idx = static_cast<const I*>(bg.indices);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = bg.feature_table[f], rows = tb.rows[t], i0 = off[f * B], i1 = off[(f + 1) * B];
    bool bad = false;
    for (int64_t i = i0; i < i1; ++i) bad |= static_cast<uint64_t>(static_cast<int64_t>(idx[i])) >= uint64_t(rows);
    if (!bad) continue;
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

// ---- forward --------------------------------------------------------------------------------
// acc[0, w) += the columns [d0, d0 + w) of the rows of indices [i0, i1) (times psw); the whole rows
// kPrefetchAhead indices ahead (below pf_end) are prefetched.
template <typename S, typename I>
KF_INLINE void add_rows(Acc<S>* acc, int64_t w, const S* W, int64_t D, int64_t d0, int64_t pad, const I* idx,
                        const Acc<S>* psw, int64_t i0, int64_t i1, int64_t pf_end) {
  using A = Acc<S>;
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kPrefetchAhead < pf_end) prefetch(W + idx[i + kPrefetchAhead] * D, D * int64_t(sizeof(S)));
    const int64_t r = idx[i];
    if (r == pad) continue;
    const S* row = W + r * D + d0;
    if (psw) {
      const A s = psw[i];
      for (int64_t d = 0; d < w; ++d) acc[d] += s * load<A>(row[d]);
    } else {
      for (int64_t d = 0; d < w; ++d) acc[d] += load<A>(row[d]);
    }
  }
}

// Columns [d0, d0 + n) of a bag's sum into dst. N > 0: n = N, a compile-time width whose
// accumulators stay in registers (kColBytes of them); N = 0: any n, accumulated in dst. Rows are
// prefetched (pf_end > 0) on a bag's first column block; later blocks find them in cache. Medical
// shape forward, one thread's CPU time, best of 3: 11.5 ms with a D-wide accumulator row in memory
// (two loads and a store per vector of a row), 10.6 ms so.
template <int64_t N, typename S, typename I>
KF_INLINE void sum_columns(const S* W, int64_t D, int64_t d0, int64_t n, int64_t pad, const I* idx,
                           const Acc<S>* psw, int64_t i0, int64_t i1, int64_t pf_end, Acc<S>* dst) {
  using A = Acc<S>;
  if constexpr (N > 0) {
    A acc[N];
    for (int64_t d = 0; d < N; ++d) acc[d] = A(0);
    add_rows<S, I>(acc, N, W, D, d0, pad, idx, psw, i0, i1, pf_end);
    for (int64_t d = 0; d < N; ++d) dst[d] = acc[d];
  } else {
    for (int64_t d = 0; d < n; ++d) dst[d] = A(0);
    add_rows<S, I>(dst, n, W, D, d0, pad, idx, psw, i0, i1, pf_end);
  }
}

// Bags [fb0, fb1) of one feature (table W [., D], padding pad) into out (the feature's first
// column; rows `width` apart); acc: D elements of scratch.
template <typename S, typename I>
KF_CLONES void forward_task(const S* W, int64_t D, int64_t pad, const I* idx, const I* off, const Acc<S>* psw,
                            bool mean, int64_t fb0, int64_t fb1, int64_t B, S* out, int64_t width, Acc<S>* acc) {
  using A = Acc<S>;
  constexpr int64_t N = kColBytes / int64_t(sizeof(A));
  const int64_t end = off[fb1];
  for (int64_t i = off[fb0]; i < std::min(end, off[fb0] + kPrefetchAhead); ++i)
    prefetch(W + idx[i] * D, D * int64_t(sizeof(S)));
  for (int64_t fb = fb0; fb < fb1; ++fb) {
    const int64_t i0 = off[fb], i1 = off[fb + 1];
    int64_t d0 = 0;
    for (; d0 + N <= D; d0 += N) sum_columns<N>(W, D, d0, N, pad, idx, psw, i0, i1, d0 == 0 ? end : 0, acc + d0);
    if (d0 < D) sum_columns<0>(W, D, d0, D - d0, pad, idx, psw, i0, i1, d0 == 0 ? end : 0, acc + d0);
    S* o = out + (fb % B) * width;
    int64_t cnt = 0;
    for (int64_t i = i0; mean && i < i1; ++i) cnt += idx[i] != pad;
    if (cnt > 0) {
      const A s = A(1) / A(cnt);
      for (int64_t d = 0; d < D; ++d) o[d] = store<S>(acc[d] * s);
    } else {
      for (int64_t d = 0; d < D; ++d) o[d] = store<S>(acc[d]);
    }
  }
}

// The tasks of a per-bag pass: (feature, first bag) pairs of up to kBagsPerTask bags.
struct BagTask {
  int64_t f, fb0, fb1;
};
std::vector<BagTask> bag_tasks(const Bags& bg) {
  std::vector<BagTask> tasks;
  for (int64_t f = 0; f < bg.F; ++f)
    for (int64_t b = 0; b < bg.B; b += kBagsPerTask)
      tasks.push_back({f, f * bg.B + b, f * bg.B + std::min(bg.B, b + kBagsPerTask)});
  return tasks;
}

int64_t max_dim(const Tables& tb) {
  int64_t D = 0;
  for (int64_t t = 0; t < tb.num_tables; ++t) D = std::max(D, tb.dims[t]);
  return D;
}

template <typename S, typename I> void forward_t(const Tables& tb, const Bags& bg, S* out, int nt) {
  using A = Acc<S>;
  const std::vector<int64_t> col = out_cols(tb, bg);
  const std::vector<BagTask> tasks = bag_tasks(bg);
  const I* idx = static_cast<const I*>(bg.indices);
  const I* off = static_cast<const I*>(bg.offsets);
  const int64_t width = col[bg.F], D_max = max_dim(tb);
#pragma omp parallel num_threads(nt)
  {
    std::vector<A> acc(D_max);
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < static_cast<int64_t>(tasks.size()); ++k) {
      const BagTask& tk = tasks[k];
      const int64_t t = bg.feature_table[tk.f];
      forward_task<S, I>(static_cast<const S*>(tb.weights[t]), tb.dims[t], tb.padding_idx[t], idx, off,
                         static_cast<const A*>(bg.psw), bg.pooling == 1, tk.fb0, tk.fb1, bg.B, out + col[tk.f],
                         width, acc.data());
    }
  }
}

// ---- backward plan: per table, a stable counting sort of its occurrences by row ---------------
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

// The gradient of one unique row (the run [k0, k1) of tp) into acc [D], in increasing flat position.
// The grad_out slices kPrefetchAhead occurrences ahead (up to k_end, the task's end) are prefetched.
template <typename S>
KF_INLINE void reduce_run(const TablePlan& tp, int64_t k0, int64_t k1, int64_t k_end, const Grad<S>& g, int64_t D,
                          Acc<S>* acc) {
  using A = Acc<S>;
  for (int64_t d = 0; d < D; ++d) acc[d] = A(0);
  for (int64_t k = k0; k < k1; ++k) {
    if (k + kPrefetchAhead < k_end) prefetch(g.slice(tp.bag[k + kPrefetchAhead]), D * int64_t(sizeof(S)));
    const int64_t fb = tp.bag[k];
    const S* x = g.slice(fb);
    if (g.psw || g.count) {
      const A s = g.psw ? g.psw[tp.pos[k]] : A(1) / A(g.count[fb]);
      for (int64_t d = 0; d < D; ++d) acc[d] += s * load<A>(x[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) acc[d] += load<A>(x[d]);
    }
  }
}

template <typename S>
KF_CLONES void sparse_task(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, int64_t D, Acc<S>* grads) {
  for (int64_t u = u0; u < u1; ++u) reduce_run<S>(tp, tp.start[u], tp.start[u + 1], tp.start[u1], g, D, grads + u * D);
}

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
// bits of u as a fraction).
template <typename H> KF_INLINE uint16_t bits_of(H h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
template <typename H> KF_INLINE H from_bits(uint16_t b) {
  H h;
  std::memcpy(&h, &b, 2);
  return h;
}
template <typename H> KF_INLINE H sr_round(float y, uint32_t u) {
  const H n = from_acc<H>(y);
  if (y != y) return n;
  const float ay = std::fabs(y);
  uint16_t mb = bits_of(n) & 0x7fff;
  if (std::fabs(to_acc(n)) > ay) mb -= 1;
  const float lo = to_acc(from_bits<H>(mb)), hi = to_acc(from_bits<H>(static_cast<uint16_t>(mb + 1)));
  const float p = ay == lo ? 0.0f : (ay - lo) / (hi - lo);
  const float r = static_cast<float>(u >> 8) * 0x1p-24f;
  if (r < p) mb += 1;
  return from_bits<H>(static_cast<uint16_t>((std::signbit(y) ? 0x8000 : 0) | mb));
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
    if constexpr (std::is_same_v<S, _Float16> || std::is_same_v<S, BF16>)
      w[d] = sr_round<S>(y, sr_mix(key ^ static_cast<uint32_t>(d)));
    else
      w[d] = y;
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
        const A v = o.beta2 * s2[d] + o.one_m_beta2 * g[d] * g[d];
        s1[d] = m;
        s2[d] = v;
        put(d, x - o.lr * ((m / o.c1) / (std::sqrt(v / o.c2) + o.eps) + o.wd * x));
      }
      break;
  }
}

template <typename S>
KF_CLONES void fused_task(const TablePlan& tp, int64_t u0, int64_t u1, const Grad<S>& g, S* W, int64_t D,
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
    reduce_run<S>(tp, tp.start[u], tp.start[u + 1], tp.start[u1], g, D, acc);
    Acc<S>* s1 = st1 ? (adam ? st1 + r * D : st1 + r) : nullptr;
    Acc<S>* s2 = st2 ? st2 + r * D : nullptr;
    update_row<S>(W + r * D, acc, D, o, s1, s2, sr_mix(table_key ^ static_cast<uint32_t>(r)));
  }
}

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

void backward_sparse_cpu(const Tables& tables, const Bags& bags, const Plan& plan, const void* grad_out,
                         void* const* grads, int num_threads) {
  with_dtype(tables.dtype, [&](auto s) {
    using S = decltype(s);
    const Grad<S> g = grad_of<S>(tables, bags, plan, grad_out);
    for_row_tasks(plan, num_threads, [&](int64_t t, int64_t u0, int64_t u1) {
      sparse_task<S>(plan.tables[t], u0, u1, g, tables.dims[t], static_cast<Acc<S>*>(grads[t]));
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
    for_row_tasks(plan, num_threads, [&](int64_t t, int64_t u0, int64_t u1) {
      fused_task<S>(plan.tables[t], u0, u1, g, static_cast<S*>(tables.weights[t]), tables.dims[t], o,
                    opt.states1 ? static_cast<A*>(opt.states1[t]) : nullptr,
                    opt.states2 ? static_cast<A*>(opt.states2[t]) : nullptr,
                    sr_table_key(opt.seed, static_cast<uint32_t>(opt.step), static_cast<uint32_t>(t)),
                    bufs[omp_get_thread_num()].data());
    });
  });
}

}  // namespace embedding
}  // namespace kfuse
