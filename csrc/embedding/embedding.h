// Multi-table embedding-bag kernel entry points (framework-free: raw pointers and sizes;
// bindings.cpp checks the tensors). The layout and semantics are python/kfuse/reference/embedding.py's:
//   tables   T tables of one dtype, table t a contiguous [rows[t], dims[t]] array, padding_idx[t]
//            (-1 = none) skipped everywhere (no output, not counted for mean, no gradient).
//   bags     indices [N] (int32 or int64), offsets [F * B + 1] of the same type (feature-major: bag b
//            of feature f is indices[offsets[f * B + b] : offsets[f * B + b + 1]]), feature_table [F]
//            (feature f looks up table feature_table[f]; several features may share a table),
//            pooling 0 = sum, 1 = mean, per_sample_weights [N] in the accumulation type or null.
//   out      [B, out_width], the tables' dtype; feature f fills columns out_col[f] .. + dims of its
//            table (out_col the exclusive cumulative sum of the features' dims).
// Accumulation type A: double for f64 tables, else float. num_threads: the OpenMP team size
// (at::get_num_threads(), passed by the caller, as for deu).
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"

namespace kfuse {
namespace embedding {

struct Tables {
  DType dtype;
  int64_t num_tables;
  void* const* weights;        // [T]
  const int64_t* rows;         // [T]
  const int64_t* dims;         // [T]
  const int64_t* padding_idx;  // [T]
};

struct Bags {
  const void* indices;  // [N]
  const void* offsets;  // [F * B + 1]
  bool index64;         // indices and offsets are int64 (else int32)
  int64_t N, F, B;
  const int64_t* feature_table;  // [F]
  int64_t pooling;               // 0 sum, 1 mean
  const void* psw;               // [N] in A, or nullptr
};

// Checks everything a kernel relies on, reading nothing out of bounds, and throws before any
// kernel runs: std::invalid_argument (ValueError) for bad pooling, per_sample_weights with mean,
// padding_idx outside [-1, rows), offsets not of F * B + 1 entries with B >= 0 (so never empty),
// not starting at 0, decreasing or not ending at N; std::out_of_range (IndexError) for a
// feature_table entry outside [0, T) or an index outside [0, rows) of its feature's table. Messages
// name the argument and the position, e.g. "indices[17] = 80000 is out of range [0, 79000) for
// feature 1 (table 1)". The caller derives B from the offsets' length and passes N = len(indices),
// checking len(per_sample_weights) == N.
void validate(const Tables& tables, const Bags& bags, int64_t num_offsets);

// Output width: the sum of the features' dims.
int64_t out_width(const Tables& tables, const Bags& bags);

// out [B, out_width] in the tables' dtype. Each bag's sum runs in A in the order of its indices;
// mean multiplies by 1 / count in A.
void forward_cpu(const Tables& tables, const Bags& bags, void* out, int num_threads);

// The occurrences of each table sorted stably by row (a counting sort): the table's unique rows
// ascending (rows), the start of each row's run (start, U + 1 entries) and, per occurrence of a run,
// in increasing flat position i: its bag f * B + b (bag) and, with per_sample_weights, i (pos).
struct TablePlan {
  std::vector<int64_t> rows, start, pos, bag;
};
struct Plan {
  std::vector<TablePlan> tables;
  std::vector<int64_t> out_col;  // [F]
  std::vector<int64_t> first;    // [T + 1]: global index of each table's first unique row
  std::vector<int64_t> count;    // mean pooling: [F * B] non-padding indices per bag (else empty)
};
Plan plan_backward(const Tables& tables, const Bags& bags, int num_threads);

// The gradient of each table t with grads[t] non-null (the others are skipped), row-sparse or dense.
// Row-sparse (dense false): grads[t] [U_t, dims[t]] in A, the rows plan.tables[t].rows. Dense: grads[t] is
// the table's shape [rows[t], dims[t]] in its dtype, zeroed by the caller; each of those rows' sums is
// stored at its row, rounded to the dtype (nearest even, as torch's cast; a NaN stays a NaN, its bits
// may differ from torch's). Row r's gradient is sum_i scale_i * grad_out[bag(i), out_col[f(i)] : + dim]
// over its occurrences in increasing i
// (scale_i = psw[i], 1 / count(bag) computed in A, or 1), summed by one thread: the bits do not depend
// on the thread count. grad_out [B, out_width] in the tables' dtype.
void backward_rows_cpu(const Tables& tables, const Bags& bags, const Plan& plan, const void* grad_out,
                       void* const* grads, bool dense, int num_threads);

// grad_psw [N] in A: <grad_out[bag(i), cols of f(i)], W_t[idx_i]> (0 for padding), summed in A over
// 16 interleaved partial sums (lane d mod 16) combined in a fixed order.
void backward_psw_cpu(const Tables& tables, const Bags& bags, const void* grad_out, void* grad_psw,
                      int num_threads);

// Fused optimizer: each unique row's gradient (the same sum as backward_rows_cpu, in a per-thread
// buffer) is applied to the row at once; the tables and states are updated in place. All arithmetic
// in A from the table's value converted to A, hyper-parameters rounded to A once:
//   sgd              w -= lr * (g + wd * w)
//   rowwise_adagrad  g' = g + wd * w; s += sum(g'^2) / dim (16 interleaved partial sums, as the psw
//                    dot); w -= (lr / (sqrt(s) + eps)) * g'  (FBGEMM's multiplier form);
//                    states1[t] [rows[t]] in A
//   adam             m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;
//                    w -= lr * ((m / c1) / (sqrt(v / c2) + eps) + wd * w), c1 = 1 - b1^step and
//                    c2 = 1 - b2^step computed in double; states1[t] = m, states2[t] = v
//                    [rows[t], dims[t]] in A
// fp16/bf16 tables store the new float value by stochastic rounding (the design's definition:
// embedding_cpu.cpp's sr_round) with the random bits of (seed, step, table, row, col) below;
// f32/f64 tables store it as is.
enum class Optimizer : int { sgd = 0, rowwise_adagrad = 1, adam = 2 };
struct OptimizerArgs {
  Optimizer kind;
  double lr, eps, beta1, beta2, weight_decay;
  int64_t step;  // >= 1
  uint32_t seed;
  void* const* states1;  // [T] or nullptr (sgd)
  void* const* states2;  // [T] or nullptr (sgd, rowwise_adagrad)
};
void backward_fused_cpu(const Tables& tables, const Bags& bags, const Plan& plan, const void* grad_out,
                        const OptimizerArgs& opt, int num_threads);

// The stochastic-rounding hash (lowbias32, all arithmetic mod 2^32).
inline uint32_t sr_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0xd35a2d97u;
  x ^= x >> 15;
  return x;
}
// The bits of (row, col) are sr_mix(sr_mix(sr_table_key(seed, step, table) ^ row) ^ col).
inline uint32_t sr_table_key(uint32_t seed, uint32_t step, uint32_t table) {
  return sr_mix(sr_mix(sr_mix(seed) ^ step) ^ table);
}

}  // namespace embedding
}  // namespace kfuse
