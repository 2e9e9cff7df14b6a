// ISA dispatch for the CPU kernels' hot loops, shared by every op.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// A function marked KF_CLONES is compiled for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and
// baseline x86-64 and picked once at load time (ifunc), so the extension runs on any x86-64 host
// and uses zmm registers where they exist. Mark only the leaves (tile or task loops): the OpenMP
// regions stay in baseline code and call them, and every clone multiplies the build time.
#define KF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KF_CLONES
#endif
