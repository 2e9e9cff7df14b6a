// LoRA kernel entry points (framework-free; bindings.cpp checks the arguments). The GEMMs of the
// cpu backend are torch's (BLAS); what is here is what BLAS has no call for.
#pragma once

#include <cstdint>

namespace kfuse {
namespace lora {

// The dropout mask of an [M, K] input, the Triton kernels' draw (triton_kernels/lora.py, _keep):
// keep[m * K + k] = u(word k % 4 of Philox4x32-10(key = seed, counter = m * ceil(K / 4) + k / 4)) >= p,
// u(w) = (w as int32, or -w - 1 when negative) * 4.6566127342e-10 in float32, as tl.rand makes it.
// So one seed gives the same mask on the cpu and triton backends. OpenMP over rows (nt threads).
void dropout_keep_cpu(uint64_t seed, int64_t M, int64_t K, float p, bool* keep, int nt);

// dst[j] = src[j] * keep for j < n (row-major [M, K] each; dst[j] may be src[j]), keep that mask made row by row
// on the fly, once for all n: the cpu backend's dropout without a mask tensor or its conversion to src's dtype, and
// one draw for the backward's two products (T: float or double).
template <class T>
void dropout_mul_cpu(uint64_t seed, int64_t M, int64_t K, float p, int n, const T* const* src, T* const* dst,
                     int nt);

}  // namespace lora
}  // namespace kfuse
