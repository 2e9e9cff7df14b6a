// DEU CPU kernels: forward and backward over x viewed as [M, N, K].
#include <algorithm>
#include <cstring>
#include <vector>

#include "deu.h"
#include "deu_math.h"

namespace kfuse {
namespace deu {
namespace {

// Storage <-> compute conversions. fp16 uses the compiler's _Float16; bf16 rounds to
// nearest even (NaN kept quiet), as torch does.
struct BF16 { uint16_t bits; };

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(_Float16 v) { return static_cast<float>(v); }
inline float to_acc(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename S> inline S from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline _Float16 from_acc<_Float16>(float v) { return static_cast<_Float16>(v); }
template <> inline BF16 from_acc<BF16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>(u >> 16)};
}
template <typename S> inline S from_acc(double v);
template <> inline double from_acc<double>(double v) { return v; }

template <typename A> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Rows of M handled by one partial of the parameter gradient. Fixed (not a function of
// the thread count) so the reduction order, and hence the result, is deterministic.
constexpr int64_t kRowsPerPartial = 64;

template <typename S>
void forward_impl(const S* x, S* y, const typename AccOf<S>::type* coeffs, int64_t M, int64_t N,
                  int64_t K) {
  using A = typename AccOf<S>::type;
  std::vector<Plan<A>> plans(N);
  for (int64_t n = 0; n < N; ++n) plans[n] = plan_from_coeffs(coeffs + 5 * n);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const Plan<A>& p = plans[n];
      const int64_t base = (m * N + n) * K;
      for (int64_t k = 0; k < K; ++k) y[base + k] = from_acc<S>(forward_one(p, to_acc(x[base + k])));
    }
  }
}

template <typename S>
void backward_impl(const S* gy, const S* x, const typename AccOf<S>::type* coeffs, S* gx,
                   typename AccOf<S>::type* partials, int64_t M, int64_t N, int64_t K) {
  using A = typename AccOf<S>::type;
  std::vector<Plan<A>> plans(N);
  std::vector<A> jac(static_cast<size_t>(N) * kPlanParams * kCoeffs);
  for (int64_t n = 0; n < N; ++n) {
    auto* j = reinterpret_cast<A(*)[kCoeffs]>(jac.data() + n * kPlanParams * kCoeffs);
    plans[n] = plan_with_jacobian(coeffs + 5 * n, j);
  }
  const int64_t T = (M + kRowsPerPartial - 1) / kRowsPerPartial;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    std::vector<A> acc(static_cast<size_t>(N) * kPlanParams, A(0));
    const int64_t m1 = std::min(M, (t + 1) * kRowsPerPartial);
    for (int64_t m = t * kRowsPerPartial; m < m1; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        const Plan<A>& p = plans[n];
        A* a = acc.data() + n * kPlanParams;
        const int64_t base = (m * N + n) * K;
        for (int64_t k = 0; k < K; ++k) {
          gx[base + k] = from_acc<S>(backward_one(p, to_acc(x[base + k]), to_acc(gy[base + k]), a));
        }
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      auto* j = reinterpret_cast<const A(*)[kCoeffs]>(jac.data() + n * kPlanParams * kCoeffs);
      apply_jacobian(acc.data() + n * kPlanParams, j, partials + (t * N + n) * kCoeffs);
    }
  }
}

}  // namespace

void forward_cpu(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                 int64_t K) {
  switch (dtype) {
    case DType::f32:
      return forward_impl(static_cast<const float*>(x), static_cast<float*>(y),
                          static_cast<const float*>(coeffs), M, N, K);
    case DType::f64:
      return forward_impl(static_cast<const double*>(x), static_cast<double*>(y),
                          static_cast<const double*>(coeffs), M, N, K);
    case DType::f16:
      return forward_impl(static_cast<const _Float16*>(x), static_cast<_Float16*>(y),
                          static_cast<const float*>(coeffs), M, N, K);
    case DType::bf16:
      return forward_impl(static_cast<const BF16*>(x), static_cast<BF16*>(y),
                          static_cast<const float*>(coeffs), M, N, K);
  }
}

int64_t backward_cpu_num_partials(int64_t M, int64_t, int64_t) {
  return (M + kRowsPerPartial - 1) / kRowsPerPartial;
}

void backward_cpu(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                  void* grad_x, void* partials, int64_t M, int64_t N, int64_t K) {
  switch (dtype) {
    case DType::f32:
      return backward_impl(static_cast<const float*>(grad_y), static_cast<const float*>(x),
                           static_cast<const float*>(coeffs), static_cast<float*>(grad_x),
                           static_cast<float*>(partials), M, N, K);
    case DType::f64:
      return backward_impl(static_cast<const double*>(grad_y), static_cast<const double*>(x),
                           static_cast<const double*>(coeffs), static_cast<double*>(grad_x),
                           static_cast<double*>(partials), M, N, K);
    case DType::f16:
      return backward_impl(static_cast<const _Float16*>(grad_y), static_cast<const _Float16*>(x),
                           static_cast<const float*>(coeffs), static_cast<_Float16*>(grad_x),
                           static_cast<float*>(partials), M, N, K);
    case DType::bf16:
      return backward_impl(static_cast<const BF16*>(grad_y), static_cast<const BF16*>(x),
                           static_cast<const float*>(coeffs), static_cast<BF16*>(grad_x),
                           static_cast<float*>(partials), M, N, K);
  }
}

}  // namespace deu
}  // namespace kfuse
