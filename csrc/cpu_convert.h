// Storage <-> float conversions shared by the CPU kernels (deu, kv, embedding). fp16 uses the compiler's
// _Float16; bf16 rounds to nearest even (NaN kept quiet), as torch does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kfuse {
namespace cpu {

struct BF16 { uint16_t bits; };

inline float to_acc(float v) { return v; }
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

// The accumulation type of storage type S (double for double, else float), and element conversions
// that pass double through: the kernels template on S and read/write through these.
template <typename S> using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
template <typename A, typename S> inline __attribute__((always_inline)) A load(S v) {
  if constexpr (std::is_same_v<S, double>) return v;
  else return to_acc(v);
}
template <typename S, typename A> inline __attribute__((always_inline)) S store(A v) {
  if constexpr (std::is_same_v<S, double>) return v;
  else return from_acc<S>(v);
}

}  // namespace cpu
}  // namespace kfuse
