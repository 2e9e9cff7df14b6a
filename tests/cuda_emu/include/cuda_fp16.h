// cuda_emu: __half on the host compiler's _Float16 (conversions round to nearest even, as the
// CUDA intrinsics do). Only what the kernels use.
#pragma once

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
