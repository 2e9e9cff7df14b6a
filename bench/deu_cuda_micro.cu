// Standalone timing of the DEU CUDA kernels against a device copy, without torch. Built by
// bench/gpu_check.sh from this tree (optionally also with -DKFUSE_DEU_PRECISE_MATH: what the
// hardware transcendentals buy) and against a baseline commit's csrc/ (A/B of a kernel change in
// one run; the mean |y|, |grad_x| and |grad_coeffs| checksums of the builds should agree to
// ~1e-6). `deu_micro sanitize` runs odd shapes once each instead, for compute-sanitizer;
// `deu_micro profile` the target shape's rows kernels once each, for ncu. Usage:
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90 -DKFUSE_WITH_CUDA -Icsrc/deu
//   bench/deu_cuda_micro.cu -o deu_micro && ./deu_micro
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "deu_cuda.cu"

using kfuse::DType;

namespace {

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
float time_us(F f, int iters = 20) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  f();
  f();
  cudaDeviceSynchronize();
  std::vector<float> ts;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    ts.push_back(ms * 1e3f);
  }
  return median(ts);
}

size_t elem_size(DType dt) { return dt == DType::f64 ? 8 : dt == DType::f32 ? 4 : 2; }
size_t acc_size(DType dt) { return dt == DType::f64 ? 8 : 4; }

void put(DType dt, char* p, size_t i, double v) {
  switch (dt) {
    case DType::f64: { const double d = v; std::memcpy(p + i * 8, &d, 8); break; }
    case DType::f32: { const float f = static_cast<float>(v); std::memcpy(p + i * 4, &f, 4); break; }
    case DType::bf16: { const __nv_bfloat16 h = __float2bfloat16(static_cast<float>(v)); std::memcpy(p + i * 2, &h, 2); break; }
    case DType::f16: { const __half h = __float2half(static_cast<float>(v)); std::memcpy(p + i * 2, &h, 2); break; }
  }
}

double get(DType dt, const char* p, size_t i) {
  switch (dt) {
    case DType::f64: { double d; std::memcpy(&d, p + i * 8, 8); return d; }
    case DType::f32: { float f; std::memcpy(&f, p + i * 4, 4); return f; }
    case DType::bf16: { __nv_bfloat16 h; std::memcpy(&h, p + i * 2, 2); return __bfloat162float(h); }
    case DType::f16: { __half h; std::memcpy(&h, p + i * 2, 2); return __half2float(h); }
  }
  return 0;
}

// Mean |v| of n device elements of type dt.
double mean_abs(const void* d, DType dt, size_t n) {
  std::vector<char> h(n * elem_size(dt));
  cudaMemcpy(h.data(), d, h.size(), cudaMemcpyDeviceToHost);
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += std::fabs(get(dt, h.data(), i));
  return s / static_cast<double>(n);
}

uint32_t rng = 12345;
float urand() {
  rng = rng * 1664525u + 1013904223u;
  return (rng >> 8) * (1.0f / 16777216.0f);
}

// Device buffers of one case, each allocated to its exact size (so compute-sanitizer flags any
// access past a tensor's end). Paper's init (a, b, c ~ U(0, 1)) with c1, c2 ~ U(-0.5, 0.5),
// and every fifth neuron a smooth step (a = b = 0); x ~ U(-3, 3).
// The backward's scratch, in accumulation-type elements: the workspace, or (kernels before
// KFUSE_DEU_CUDA_BACKWARD_WRITES_GRAD_COEFFS) the partials, whose sum over tiles, a separate
// torch op then, is not timed.
int64_t scratch_elems(DType dt, int64_t M, int64_t N, int64_t K) {
#ifdef KFUSE_DEU_CUDA_BACKWARD_WRITES_GRAD_COEFFS
  return kfuse::deu::backward_cuda_workspace_elems(dt, M, N, K);
#else
  return kfuse::deu::backward_cuda_num_partials(M, N, K) * N * 5;
#endif
}

// What any float32 evaluation of deu_math.h's formula may be off by at t, where it is y (0 where
// the output is clamped): 8 ε32 times the magnitudes y is made of, each term's (the rounding of the plan's
// coefficients and of the products) and |t| times each term's derivative (the rounding of the
// arguments ρt, ωt and of the rates), in double. It matters where y is a near-cancellation of
// large terms: at [515, 70, 1]'s worst element (an underdamped neuron, t = -2.17, terms ~1e5,
// y = -949, near a zero of its oscillation) the host's own float32 evaluation, the CPU kernel's
// math, is off by 1.16 x the tests' bound, and the GPU's was by 1.18 x (H200, 2026-11-26).
// The shifted-basis term m·(E1 − 1) (Side::m, Pieces::m1: csrc/deu since 1427949), or 0 with a baseline
// commit's headers that predate it (KFUSE_BASE in bench/gpu_check.sh: the micro is built against them too).
template <class S, class = void> struct HasM : std::false_type {};
template <class S> struct HasM<S, std::void_t<decltype(std::declval<S>().m)>> : std::true_type {};
template <class S> double side_m(const S& s) {
  if constexpr (HasM<S>::value) return s.m;
  else return 0.0;
}
template <class Q, class = void> struct HasM1 : std::false_type {};
template <class Q> struct HasM1<Q, std::void_t<decltype(std::declval<Q>().m1)>> : std::true_type {};
template <class Q> double pieces_m1(const Q& q) {
  if constexpr (HasM1<Q>::value) return q.m1;
  else return 0.0;
}

double float32_spread(const kfuse::deu::Plan<double>& p, double t, double y) {
  using namespace kfuse::deu;
  if (std::fabs(y) >= kOutClamp) return 0.0;
  const Pieces<double> q = pieces(p, t);
  const Side<double> s = side_of(p, t > 0);
  const double* k = s.k;
  const double lin = std::fabs(k[4]) + std::fabs(k[5] * t), e1 = std::fabs(q.e1), e2 = std::fabs(k[7] * q.e2);
  const double terms = std::fabs(k[0]) + std::fabs(k[1] * t) + std::fabs(k[2] * t * t) + std::fabs(k[3] * q.sig) +
                       e1 * (lin + std::fabs(k[6])) + e2 + std::fabs(side_m(s) * pieces_m1(q));
  const double slopes = std::fabs(t) * (e1 * (std::fabs(p.rho1) + std::fabs(p.omega)) * (lin + std::fabs(k[6])) +
                                        e2 * std::fabs(p.rho2) + std::fabs(k[3]) * kStepSlope * q.sig * (1 - q.sig) +
                                        e1 * std::fabs(p.rho1 * side_m(s)));
  return 8 * 0x1p-24 * (terms + slopes);
}

struct Case {
  DType dt;
  int64_t M, N, K, S;
  size_t n;
  void *x, *y, *gy, *gx, *co, *gc, *part;
  Case(DType dt_, int64_t M_, int64_t N_, int64_t K_, bool with_steps)
      : dt(dt_), M(M_), N(N_), K(K_), S(scratch_elems(dt_, M_, N_, K_)), n(static_cast<size_t>(M_) * N_ * K_) {
    const size_t es = elem_size(dt), as = acc_size(dt);
    std::vector<char> hx(n * es), hc(N * 5 * as);
    for (size_t i = 0; i < n; ++i) put(dt, hx.data(), i, (urand() * 2 - 1) * 3);
    for (int64_t j = 0; j < N; ++j) {
      const bool step = with_steps && j % 5 == 0;
      const DType acc = dt == DType::f64 ? DType::f64 : DType::f32;
      for (int k = 0; k < 3; ++k) put(acc, hc.data(), j * 5 + k, step && k < 2 ? 0.0 : urand());
      put(acc, hc.data(), j * 5 + 3, urand() - 0.5);
      put(acc, hc.data(), j * 5 + 4, urand() - 0.5);
    }
    cudaMalloc(&x, n * es); cudaMalloc(&y, n * es); cudaMalloc(&gy, n * es); cudaMalloc(&gx, n * es);
    cudaMalloc(&co, hc.size()); cudaMalloc(&gc, hc.size()); cudaMalloc(&part, S * as);
    cudaMemcpy(x, hx.data(), n * es, cudaMemcpyHostToDevice);
    cudaMemcpy(gy, hx.data(), n * es, cudaMemcpyHostToDevice);
    cudaMemcpy(co, hc.data(), hc.size(), cudaMemcpyHostToDevice);
  }
  ~Case() {
    for (void* p : {x, y, gy, gx, co, gc, part}) cudaFree(p);
  }
  void fwd() const { kfuse::deu::forward_cuda(dt, x, y, co, M, N, K, nullptr); }
  // Worst error of y (after fwd()) against deu_math.h's forward in double on the host (from the
  // stored x and coeffs), as a multiple of the tests' tolerance (tests/tolerances.py: atol ·
  // max(1, max|y|) + rtol · |y|) widened by float32_spread (what any float32 evaluation of the
  // formula may be off by): above 1 for a row read from or written to the wrong place, or
  // skipped, which compute-sanitizer does not see. NaN if y holds a NaN.
  double forward_error_over_tolerance() const {
    const DType acc = dt == DType::f64 ? DType::f64 : DType::f32;
    std::vector<char> hx(n * elem_size(dt)), hy(n * elem_size(dt)), hc(N * 5 * acc_size(dt));
    cudaMemcpy(hx.data(), x, hx.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(hy.data(), y, hy.size(), cudaMemcpyDeviceToHost);
    cudaMemcpy(hc.data(), co, hc.size(), cudaMemcpyDeviceToHost);
    std::vector<double> want(n), spread(n);
    double scale = 1;
    for (int64_t j = 0; j < N; ++j) {
      double cj[5];
      for (int k = 0; k < 5; ++k) cj[k] = get(acc, hc.data(), j * 5 + k);
      const auto plan = kfuse::deu::plan_from_coeffs<double>(cj);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) {
          const size_t i = static_cast<size_t>((m * N + j) * K + k);
          const double t = get(dt, hx.data(), i);
          want[i] = kfuse::deu::forward_one(plan, t);
          spread[i] = dt == DType::f64 ? 0.0 : float32_spread(plan, t, want[i]);
          scale = std::max(scale, std::fabs(want[i]));
        }
      }
    }
    // (atol, rtol) of tests/tolerances.py per dtype.
    const double atol = dt == DType::f64 ? 1e-9 : dt == DType::f32 ? 5e-5 : dt == DType::f16 ? 2e-3 : 1e-2;
    const double rtol = dt == DType::f64 ? 1e-9 : dt == DType::f32 ? 1e-4 : dt == DType::f16 ? 4e-3 : 3e-2;
    double worst = 0;
    for (size_t i = 0; i < n; ++i) {
      const double bound = atol * scale + rtol * std::fabs(want[i]) + spread[i];
      const double r = std::fabs(get(dt, hy.data(), i) - want[i]) / bound;
      if (!(r <= worst)) worst = r;  // NaN sticks
    }
    return worst;
  }
  // mean |grad_coeffs| after bwd() (older kernels: of the partials summed here, in order).
  double grad_coeffs_mean_abs() const {
    const DType acc = dt == DType::f64 ? DType::f64 : DType::f32;
#ifdef KFUSE_DEU_CUDA_BACKWARD_WRITES_GRAD_COEFFS
    return mean_abs(gc, acc, N * 5);
#else
    std::vector<char> h(S * acc_size(dt));
    cudaMemcpy(h.data(), part, h.size(), cudaMemcpyDeviceToHost);
    const int64_t P = S / (N * 5);
    double s = 0;
    for (int64_t i = 0; i < N * 5; ++i) {
      double v = 0;
      for (int64_t p = 0; p < P; ++p) v += get(acc, h.data(), p * N * 5 + i);
      s += std::fabs(v);
    }
    return s / static_cast<double>(N * 5);
#endif
  }
  void bwd() const {
#ifdef KFUSE_DEU_CUDA_BACKWARD_WRITES_GRAD_COEFFS
    kfuse::deu::backward_cuda(dt, gy, x, co, gx, gc, part, M, N, K, nullptr);
#else
    kfuse::deu::backward_cuda(dt, gy, x, co, gx, part, M, N, K, nullptr);
#endif
  }
};

void run(const char* name, DType dt, int64_t M, int64_t N, int64_t K) {
  const Case c(dt, M, N, K, false);
  const size_t bytes = c.n * elem_size(dt);
  const float tc = time_us([&] { cudaMemcpyAsync(c.y, c.x, bytes, cudaMemcpyDeviceToDevice); });
  const float tf = time_us([&] { c.fwd(); });
  const float tb = time_us([&] { c.bwd(); });
  const cudaError_t e = cudaDeviceSynchronize();
  // Checksums of y and grad_x (mean |v|), to compare builds run on the same inputs.
  const double cy = mean_abs(c.y, dt, c.n), cgx = mean_abs(c.gx, dt, c.n), cgc = c.grad_coeffs_mean_abs();
  // Floors at the copy rate: forward moves 2 tensors, backward 3 (x, grad_y in; grad_x out).
  const double per_tensor = tc / 2.0;
  std::printf("%-26s copy %7.1f us | fwd %7.1f us %5.2fx floor | bwd %7.1f us %5.2fx | fwd+bwd %5.2fx | "
              "mean|y| %.7g mean|gx| %.7g mean|gc| %.7g | %s\n",
              name, tc, tf, tf / (2 * per_tensor), tb, tb / (3 * per_tensor), (tf + tb) / (5 * per_tensor),
              cy, cgx, cgc, cudaGetErrorString(e));
}

// One forward and backward on odd shapes of both layouts, every dtype, with and without step
// neurons: run under `compute-sanitizer --tool memcheck` to catch out-of-bounds accesses; the
// forward's values are also checked against the host (forward_error_over_tolerance).
int sanitize() {
  const int64_t shapes[][3] = {{515, 70, 1}, {67, 33, 1}, {3, 1000, 1}, {129, 15, 1}, {2, 300, 1},
                               {3, 33, 63}, {2, 19, 3}, {5, 7, 4100}, {1, 1, 1}};
  const DType dts[] = {DType::f32, DType::bf16, DType::f16, DType::f64};
  int bad = 0;
  double worst = 0;
  for (const auto& s : shapes) {
    for (const DType dt : dts) {
      for (const bool steps : {false, true}) {
        const Case c(dt, s[0], s[1], s[2], steps);
        c.fwd();
        c.bwd();
        const cudaError_t e = cudaDeviceSynchronize();
        const double err = e == cudaSuccess ? c.forward_error_over_tolerance() : NAN;
        if (!(err <= worst)) worst = err;  // NaN sticks
        if (e != cudaSuccess || !(err <= 1)) {
          ++bad;
          std::printf("sanitize [%lld, %lld, %lld] dtype %d: %s, y off the host's by %.3g x the tolerance\n",
                      static_cast<long long>(s[0]), static_cast<long long>(s[1]), static_cast<long long>(s[2]),
                      static_cast<int>(dt), cudaGetErrorString(e), err);
        }
      }
    }
  }
  std::printf("sanitize: %d of %zu cases failed; worst forward error %.3g x the tests' tolerance (+ float32 spread)\n", bad,
              sizeof(shapes) / sizeof(shapes[0]) * 8, worst);
  return bad != 0;
}

}  // namespace

// The rows kernels once each on the target shape, fp32 and bf16: for ncu.
int profile() {
  for (const DType dt : {DType::f32, DType::bf16}) {
    const Case c(dt, 8192, 4096, 1, false);
    c.fwd();
    c.bwd();
  }
  return cudaDeviceSynchronize() != cudaSuccess;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "sanitize") == 0) return sanitize();
  if (argc > 1 && std::strcmp(argv[1], "profile") == 0) return profile();
#ifdef KFUSE_MICRO_LABEL
  std::printf("build: %s\n", KFUSE_MICRO_LABEL);
#endif
#ifdef KFUSE_DEU_PRECISE_MATH
  std::printf("math: precise (libm expf/sincosf)\n");
#else
  std::printf("math: hardware approximations (MUFU ex2/rcp, __sincosf after range reduction)\n");
#endif
  run("rows f32 8192x4096", DType::f32, 8192, 4096, 1);
  run("rows bf16 8192x4096", DType::bf16, 8192, 4096, 1);
  run("planes f32 32x256x56x56", DType::f32, 32, 256, 3136);
  run("planes bf16 32x256x56x56", DType::bf16, 32, 256, 3136);
  return 0;
}
