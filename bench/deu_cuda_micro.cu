// Standalone timing of the DEU CUDA kernels against a device copy, without torch. Built three
// times by bench/gpu_check.sh: with and without -DKFUSE_DEU_PRECISE_MATH (what the hardware
// transcendentals buy) and against a baseline commit's csrc/ (A/B of a kernel change in one run;
// the mean |y| and |grad_x| checksums of the builds should agree to ~1e-6). Usage:
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90 -DKFUSE_WITH_CUDA -Icsrc/deu
//   bench/deu_cuda_micro.cu -o deu_micro && ./deu_micro
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
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

// Mean |v| of n device elements of type dt (f32 or bf16).
double mean_abs(const void* d, DType dt, size_t n) {
  const size_t esz = dt == DType::f32 ? 4 : 2;
  std::vector<char> h(n * esz);
  cudaMemcpy(h.data(), d, n * esz, cudaMemcpyDeviceToHost);
  double s = 0;
  for (size_t i = 0; i < n; ++i) {
    float v;
    if (dt == DType::f32) {
      std::memcpy(&v, &h[i * 4], 4);
    } else {
      __nv_bfloat16 b;
      std::memcpy(&b, &h[i * 2], 2);
      v = __bfloat162float(b);
    }
    s += std::fabs(v);
  }
  return s / static_cast<double>(n);
}

uint32_t rng = 12345;
float urand() {
  rng = rng * 1664525u + 1013904223u;
  return (rng >> 8) * (1.0f / 16777216.0f);
}

// Paper's init (a, b, c ~ U(0, 1)) with c1, c2 ~ U(-0.5, 0.5); x ~ U(-3, 3).
void run(const char* name, DType dt, size_t esz, int64_t M, int64_t N, int64_t K) {
  const size_t n = static_cast<size_t>(M) * N * K;
  std::vector<char> hx(n * esz);
  for (size_t i = 0; i < n; ++i) {
    const float v = (urand() * 2 - 1) * 3;
    if (dt == DType::f32) std::memcpy(&hx[i * 4], &v, 4);
    if (dt == DType::bf16) { const __nv_bfloat16 h = __float2bfloat16(v); std::memcpy(&hx[i * 2], &h, 2); }
  }
  std::vector<float> hc(N * 5);
  for (int64_t j = 0; j < N; ++j) {
    for (int k = 0; k < 3; ++k) hc[j * 5 + k] = urand();
    hc[j * 5 + 3] = urand() - 0.5f;
    hc[j * 5 + 4] = urand() - 0.5f;
  }
  void *x, *y, *gy, *gx, *co, *part;
  const int64_t P = kfuse::deu::backward_cuda_num_partials(M, N, K);
  cudaMalloc(&x, n * esz); cudaMalloc(&y, n * esz); cudaMalloc(&gy, n * esz); cudaMalloc(&gx, n * esz);
  cudaMalloc(&co, N * 20); cudaMalloc(&part, P * N * 20);
  cudaMemcpy(x, hx.data(), n * esz, cudaMemcpyHostToDevice);
  cudaMemcpy(gy, hx.data(), n * esz, cudaMemcpyHostToDevice);
  cudaMemcpy(co, hc.data(), N * 20, cudaMemcpyHostToDevice);
  const float tc = time_us([&] { cudaMemcpyAsync(y, x, n * esz, cudaMemcpyDeviceToDevice); });
  const float tf = time_us([&] { kfuse::deu::forward_cuda(dt, x, y, co, M, N, K, nullptr); });
  const float tb = time_us([&] { kfuse::deu::backward_cuda(dt, gy, x, co, gx, part, M, N, K, nullptr); });
  const cudaError_t e = cudaDeviceSynchronize();
  // Checksums of y and grad_x (mean |v|), to compare builds run on the same inputs.
  const double cy = mean_abs(y, dt, n), cgx = mean_abs(gx, dt, n);
  // Floors at the copy rate: forward moves 2 tensors, backward 3 (x, grad_y in; grad_x out).
  const double per_tensor = tc / 2.0;
  std::printf("%-26s copy %7.1f us | fwd %7.1f us %5.2fx floor | bwd %7.1f us %5.2fx | fwd+bwd %5.2fx | "
              "mean|y| %.7g mean|gx| %.7g | %s\n",
              name, tc, tf, tf / (2 * per_tensor), tb, tb / (3 * per_tensor), (tf + tb) / (5 * per_tensor),
              cy, cgx, cudaGetErrorString(e));
  cudaFree(x); cudaFree(y); cudaFree(gy); cudaFree(gx); cudaFree(co); cudaFree(part);
}

}  // namespace

int main() {
#ifdef KFUSE_MICRO_LABEL
  std::printf("build: %s\n", KFUSE_MICRO_LABEL);
#endif
#ifdef KFUSE_DEU_PRECISE_MATH
  std::printf("math: precise (libm expf/sincosf)\n");
#else
  std::printf("math: hardware approximations (__expf/__sincosf after range reduction)\n");
#endif
  run("rows f32 8192x4096", DType::f32, 4, 8192, 4096, 1);
  run("rows bf16 8192x4096", DType::bf16, 2, 8192, 4096, 1);
  run("planes f32 32x256x56x56", DType::f32, 4, 32, 256, 3136);
  run("planes bf16 32x256x56x56", DType::bf16, 2, 32, 256, 3136);
  return 0;
}
