// LoRA's CPU kernels: the dropout mask, and the product with it (see lora.h). Why in C++: the cpu backend drew
// its mask with torch.rand on a seeded torch.Generator (mt19937, one thread): ~6 ns an element, twice a layer per
// step (forward, and the backward's regeneration): 19 % of a GPT-2 LoRA training step with dropout
// 0.1 (width 128, 2 threads; bench/results/2026-12-06-cpu-lora-dropout.md). Philox here: one call per
// four elements, threads over rows.
#include "lora.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "../cpu_isa.h"

namespace kfuse {
namespace lora {
namespace {

// tl.rand's conversion of a word w to [0, 1): uniform = v * 2^-31 in float32, v the folded word (w as int32,
// -w - 1 when negative). The element is kept when uniform >= p; uniform is non-decreasing in v, so that is v >= the smallest v whose uniform reaches p (binary
// search, 31 steps): the row loop then compares integers (converting each word to float cost more than Philox).
uint32_t keep_threshold(float p) {
  uint32_t lo = 0, hi = 0x80000000u;  // answer in [lo, hi]; hi = "none kept" (p > every uniform)
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (static_cast<float>(static_cast<int32_t>(mid)) * 4.6566127342e-10f >= p) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// One row: Philox4x32-10 (Triton's constants, Random123's) on counters (base + g, as lo/hi words, 0, 0), key
// (k0, k1), for g over the row's ceil(K / 4) groups, kL counters at a time in arrays so the rounds vectorise
// (32 x 32 -> 64-bit multiplies). One call per element at a time ran 1.9 ns an element on 2 threads (Zen 4),
// torch.rand's 3.4. kL = 32, one thread, Zen 4, GCC 12: 0.85 ns an element at K = 128 and 512 against 1.39 with
// kL = 16 and 3.6 with 8; 64 was faster at K = 512 (0.74) but wastes a block's work past a short row's end (1.48
// at K = 128). Rows past a multiple of 4 kL elements compute the rest of their last block and drop it.
KF_CLONES void keep_row(uint64_t base, int64_t K, uint32_t k0, uint32_t k1, uint32_t threshold, uint8_t* row) {
  constexpr int64_t kL = 32;
  const int64_t groups = (K + 3) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += kL) {
    uint32_t c0[kL], c1[kL], c2[kL], c3[kL];
    for (int64_t i = 0; i < kL; ++i) {
      const uint64_t ctr = base + static_cast<uint64_t>(g0 + i);
      c0[i] = static_cast<uint32_t>(ctr);
      c1[i] = static_cast<uint32_t>(ctr >> 32);
      c2[i] = 0;
      c3[i] = 0;
    }
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
      for (int64_t i = 0; i < kL; ++i) {
        const uint64_t p0 = uint64_t{0xCD9E8D57u} * c2[i], p2 = uint64_t{0xD2511F53u} * c0[i];
        const uint32_t n0 = static_cast<uint32_t>(p0 >> 32) ^ c1[i] ^ a;
        const uint32_t n2 = static_cast<uint32_t>(p2 >> 32) ^ c3[i] ^ b;
        c1[i] = static_cast<uint32_t>(p0);
        c3[i] = static_cast<uint32_t>(p2);
        c0[i] = n0;
        c2[i] = n2;
      }
      a += 0x9E3779B9u;
      b += 0xBB67AE85u;
    }
    uint8_t out[4 * kL];
    for (int64_t i = 0; i < kL; ++i) {  // the folded word: w ^ (w >> 31 ? 0x7fffffff : 0), top bit cleared
      out[4 * i] = ((c0[i] ^ (0u - (c0[i] >> 31))) & 0x7fffffffu) >= threshold;
      out[4 * i + 1] = ((c1[i] ^ (0u - (c1[i] >> 31))) & 0x7fffffffu) >= threshold;
      out[4 * i + 2] = ((c2[i] ^ (0u - (c2[i] >> 31))) & 0x7fffffffu) >= threshold;
      out[4 * i + 3] = ((c3[i] ^ (0u - (c3[i] >> 31))) & 0x7fffffffu) >= threshold;
    }
    const int64_t k = 4 * g0;
    std::memcpy(row + k, out, static_cast<size_t>(std::min(4 * kL, K - k)));
  }
}

// dst[k] = src[k] * keep[k] (0 or 1): a product, not a select, so a NaN or inf in a dropped element gives NaN,
// as torch's x * mask does on the other backends' reference.
// keep: bytes, not bool, and restrict: with a bool* (which may alias anything) GCC 12 left this loop scalar
// (vcvtusi2ss per element: 0.6 ns an element on top of the mask's 1.4); now it vectorises (0.1).
KF_CLONES void mul_row(const float* src, const uint8_t* __restrict keep, float* dst, int64_t K) {
  for (int64_t k = 0; k < K; ++k) dst[k] = src[k] * static_cast<float>(keep[k]);
}
KF_CLONES void mul_row(const double* src, const uint8_t* __restrict keep, double* dst, int64_t K) {
  for (int64_t k = 0; k < K; ++k) dst[k] = src[k] * static_cast<double>(keep[k]);
}

// At least ~64k elements a thread: a small mask is not worth waking the team for.
int team(int nt, int64_t M, int64_t K) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, M * K / 65536)));
}

}  // namespace

void dropout_keep_cpu(uint64_t seed, int64_t M, int64_t K, float p, bool* keep, int nt) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t groups = static_cast<uint64_t>((K + 3) / 4);  // Philox calls per row
  const uint32_t threshold = keep_threshold(p);
#pragma omp parallel for schedule(static) num_threads(team(nt, M, K))
  for (int64_t m = 0; m < M; ++m)  // (bool is one byte holding 0 or 1: the bytes keep_row writes)
    keep_row(static_cast<uint64_t>(m) * groups, K, k0, k1, threshold, reinterpret_cast<uint8_t*>(keep) + m * K);
}

template <class T>
void dropout_mul_cpu(uint64_t seed, int64_t M, int64_t K, float p, int n, const T* const* src, T* const* dst,
                     int nt) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t groups = static_cast<uint64_t>((K + 3) / 4);
  const uint32_t threshold = keep_threshold(p);
#pragma omp parallel num_threads(team(nt, M, K))
  {
    const std::unique_ptr<uint8_t[]> keep(new uint8_t[static_cast<size_t>(K)]);  // one row's mask, in L1
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      keep_row(static_cast<uint64_t>(m) * groups, K, k0, k1, threshold, keep.get());
      for (int j = 0; j < n; ++j) mul_row(src[j] + m * K, keep.get(), dst[j] + m * K, K);
    }
  }
}

template void dropout_mul_cpu<float>(uint64_t, int64_t, int64_t, float, int, const float* const*, float* const*, int);
template void dropout_mul_cpu<double>(uint64_t, int64_t, int64_t, float, int, const double* const*, double* const*,
                                      int);

}  // namespace lora
}  // namespace kfuse
