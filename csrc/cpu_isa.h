// ISA dispatch for the CPU kernels' hot loops, shared by every op.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// A function marked KF_CLONES is compiled for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and
// baseline x86-64 and picked once at load time (ifunc), so the extension runs on any x86-64 host
// and uses zmm registers where they exist. Mark only the leaves (tile or task loops): the OpenMP
// regions stay in baseline code and call them, and every clone multiplies the build time.
#define KF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// Where a kernel's vectors must be as wide as the ISA's registers, it has one entry per ISA instead, each
// compiled for its target (KF_TARGET_*) with its own vector width, and pick_isa chooses one at run time. GCC
// 12 does not split a vector type wider than the clone's registers into registers: a 64-byte vector in an
// AVX2 clone lives in memory, each operation a round trip through the stack (and a select lane by lane), so
// the AVX2 clone of the embedding forward, written with 16-float vectors, took 4.3x torch's time on a Zen 3
// VM (2026-12-07).
#define KF_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define KF_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define KF_HAS_ISA_ENTRIES 1
#else
#define KF_CLONES
#define KF_TARGET_AVX512
#define KF_TARGET_AVX2
#endif

namespace kfuse {
namespace cpu {
// The ISA whose entries pick_isa chooses: 2 where the CPU has all of x86-64-v4 (AVX-512), 1 where it has
// x86-64-v3 (AVX2 + FMA), else 0; the environment variable KFUSE_CPU_ISA=avx2 or =base lowers it (never
// raises it), so that the tests run every entry this CPU can (tests/test_backends.py). Read once per process.
inline int isa_level() {
  static const int level = [] {
    int l = 0;
#ifdef KF_HAS_ISA_ENTRIES
    l = __builtin_cpu_supports("x86-64-v4") ? 2 : __builtin_cpu_supports("x86-64-v3") ? 1 : 0;
#endif
    const char* env = std::getenv("KFUSE_CPU_ISA");
    const std::string want = env ? env : "";
    if (want == "base") l = 0;
    if (want == "avx2" && l > 1) l = 1;
    return l;
  }();
  return level;
}
inline const char* isa_name() { return isa_level() == 2 ? "avx512" : isa_level() == 1 ? "avx2" : "base"; }

// The entry for this CPU (isa_level): avx512, avx2 or base.
template <typename F> F pick_isa(F avx512, F avx2, F base) {
  const int l = isa_level();
  return l == 2 ? avx512 : l == 1 ? avx2 : base;
}
}  // namespace cpu
}  // namespace kfuse
