// Storage <-> float conversions shared by the CPU kernels (deu, kv, embedding). fp16 is the compiler's
// _Float16 type (Half: a struct of its bits where C++ lacks it), converted with integer and float ops
// rather than casts: GCC 12 scalarises _Float16 <-> float without AVX512-FP16 (a vpinsrw and a scalar
// vcvtph2ps per element, or a libgcc call in the baseline clone), which made every fp16 CPU kernel
// several times slower than in fp32 (one thread, 2026-12-02: DEU forward 4096x1024 86.7 ms against
// 8.5, KV decode 76.6 ms against 35.1, the embedding forward at the medical shape 12.7 ms against 6.5).
// Written so, the vectoriser turns them into zmm / ymm code in every ISA clone. Both are exact and
// give the hardware's bits (vcvtph2ps / vcvtps2ph rounding to nearest even, a nan quieted with its
// payload's top bits), checked for every half and every float in each ISA clone by an offline harness
// (2026-12-02; the tests run every half and 20k edge floats through the embedding kernels). bf16
// rounds to nearest even (nan kept quiet), as torch does.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace kfuse {
namespace cpu {

struct BF16 { uint16_t bits; };

// fp16 storage: the compiler's _Float16 where C++ has it (GCC 12 on x86-64, GCC 13 on aarch64, clang 15),
// else its 16 bits in a struct, as BF16: aarch64 GCC 12 (Debian 12's) and clang 14 refused _Float16 and
// failed the build (portability hunt, 2026-12-06). Every conversion below moves the bits with memcpy, so
// both forms give the same values; KFUSE_NO_FLOAT16 forces the struct (tests/test_build.py compiles and
// runs that form here).
#if defined(KFUSE_NO_FLOAT16)
#define KF_HALF_IS_FLOAT16 0
#elif defined(__clang__)
#if __clang_major__ >= 15 && (defined(__x86_64__) || defined(__aarch64__))
#define KF_HALF_IS_FLOAT16 1
#else
#define KF_HALF_IS_FLOAT16 0
#endif
#elif defined(__GNUC__) && ((__GNUC__ >= 12 && defined(__x86_64__)) || (__GNUC__ >= 13 && defined(__aarch64__)))
#define KF_HALF_IS_FLOAT16 1
#else
#define KF_HALF_IS_FLOAT16 0
#endif
#if KF_HALF_IS_FLOAT16
using Half = _Float16;
#else
struct Half { uint16_t bits; };
#endif

// Branch-free selection and bit casts. The fp16 conversions select with pick instead of ?:, which
// GCC turns into branches (and jump-threads into phis of more than 4 arguments) that it then cannot
// if-convert, leaving the loops around them scalar (the float operations in them might trap).
inline __attribute__((always_inline)) uint32_t pick(uint32_t c, uint32_t x, uint32_t y) {  // c ? x : y, c 0 or 1
  const uint32_t m = 0u - c;
  return (x & m) | (y & ~m);
}
inline __attribute__((always_inline)) float as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline __attribute__((always_inline)) uint32_t as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

inline float to_acc(float v) { return v; }
// Half -> float: the exponent rebiased; inf / nan to 255 (nan quieted); zeros and subnormals
// (m * 2^-24) by one exact float subtraction (from a normal operand, so denormals-are-zero cannot
// change it). By reference, like load: the bits are then read from memory as an integer, which GCC
// vectorises 16 lanes wide; a _Float16 passed by value is loaded as one, 4 lanes at a time.
inline float to_acc(const Half& v) {
  uint16_t h;
  std::memcpy(&h, &v, 2);
  const uint32_t em = uint32_t(h & 0x7fffu) << 13, e = em & (0x1fu << 23);
  const uint32_t sub = as_bits(as_float(em + (113u << 23)) - 0x1p-14f);  // 2^-14 * (m / 1024) for e = 0
  const uint32_t inf_nan = (em + (224u << 23)) | (uint32_t(em > (0x1fu << 23)) << 22);
  const uint32_t mag = pick(e == 0, sub, pick(e == (0x1fu << 23), inf_nan, em + (112u << 23)));
  return as_float(mag | (uint32_t(h & 0x8000u) << 16));
}
inline float to_acc(BF16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// The half magnitude of a float magnitude a (bits) >= inf: inf, or nan quieted (bit 9) with its
// payload's top bits, as vcvtps2ph gives.
inline __attribute__((always_inline)) uint32_t half_inf_nan(uint32_t a) {
  return 0x7c00u | (uint32_t(a > 0x7f800000u) << 9) | ((a >> 13) & 0x3ffu);
}
template <typename S> inline S from_acc(float v);
template <> inline float from_acc<float>(float v) { return v; }
// Float -> half, to nearest even: normal results by adding half an ulp less one (plus the kept
// mantissa's lowest bit: ties to even) and shifting, the carry rounding up into the exponent (65520
// and up to inf); below 2^-14 by one float addition of 0.5, whose rounding (to nearest even, the
// default mode) leaves the result's 2^-24 units in the low bits; nan quieted, its payload's top bits
// kept.
template <> inline Half from_acc<Half>(float v) {
  const uint32_t f = as_bits(v), a = f & 0x7fffffffu, tiny = a < 0x38800000u;  // below H's smallest normal
  const uint32_t sub = as_bits(as_float(pick(tiny, a, 0u)) + 0.5f) - 0x3f000000u;  // (else 0: exact)
  const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // 65536 and up (inf and nan too): 0x7c00 and the nan bits
  const uint32_t mag = pick(a >= 0x47800000u, pick(a > 0x7f800000u, half_inf_nan(a), 0x7c00u), pick(tiny, sub, normal));
  const uint16_t h = static_cast<uint16_t>(mag | ((f >> 16) & 0x8000u));
  Half out;
  std::memcpy(&out, &h, 2);
  return out;
}
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
template <typename A, typename S> inline __attribute__((always_inline)) A load(const S& v) {
  if constexpr (std::is_same_v<S, double>) return v;
  else return to_acc(v);
}
template <typename S, typename A> inline __attribute__((always_inline)) S store(A v) {
  if constexpr (std::is_same_v<S, double>) return v;
  else return from_acc<S>(v);
}

}  // namespace cpu
}  // namespace kfuse
