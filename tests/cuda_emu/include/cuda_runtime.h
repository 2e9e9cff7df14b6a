// A CPU emulator of the CUDA execution model, for testing CUDA kernels on machines without a GPU
// (the way TRITON_INTERPRET=1 tests the Triton kernels). Included in place of the real
// cuda_runtime.h when tests/cuda_emu.py compiles a framework-free .cu file with the host C++
// compiler.
//
// What it models: every block of a launch runs its threads as cooperative fibers (ucontext) on
// the calling OS thread, one block at a time (in reverse order, so a kernel that relies on
// block order shows it). A fiber runs until it exits or reaches __syncthreads or a warp
// collective (__shfl_*_sync, __ballot_sync, __reduce_*_sync, __syncwarp); the scheduler
// resolves a collective once every lane of its mask has reached it, and a barrier once every
// thread of the block that has not exited has. It reports, as errors: launch configurations
// the hardware rejects (block or grid too large, too much dynamic shared memory), a lane mask
// that names an exited lane or omits the caller, lanes of one mask at different collectives,
// and deadlock. Dynamic shared memory starts as 0xff bytes (NaN as floats), so reading it
// before writing shows up.
// What it does not: device math (__CUDA_ARCH__ is undefined, so kernels take their host code
// paths, e.g. libm instead of the hardware approximations), memory ordering between blocks,
// performance, and inline PTX. Only the runtime calls the kernels here use are provided.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ __attribute__((always_inline)) inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Static shared arrays become function statics: one per kernel instantiation, shared by the
// threads of the (single) running block, as on a GPU.
#define __shared__ static
#define warpSize 32

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace kfemu {

constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kStackBytes = 256 * 1024;

enum class Op { none, activemask, shfl, ballot, reduce_or, reduce_and, reduce_add, syncwarp };

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  int lane = 0, warp = 0;
  enum State { ready, at_barrier, at_warp, done } state = ready;
  // The pending warp collective: op, mask, this lane's value and argument (source lane for
  // shfl, already resolved against its width), and the result the scheduler hands back.
  Op op = Op::none;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  int src = 0;
};

// Emulated devices: id -> (SMs, resident blocks per SM) for the occupancy queries. Kernels
// often cache per device id, so tests use a fresh id per configuration.
struct Device {
  int sms = 132, blocks_per_sm = 4;
};

struct State {
  std::mutex launch_mutex;
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<unsigned char> dynamic_shared;
  Thread* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  cudaError_t last_error = cudaSuccess;
  int device = 0;
  Device devices[64];
};
inline State& state() {
  static State s;
  return s;
}

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("cuda_emu: " + what); }

inline void yield() {
  State& s = state();
  swapcontext(&s.current->ctx, &s.scheduler);
}

inline void fiber_main() {
  State& s = state();
  s.body();
  s.current->state = Thread::done;  // uc_link returns to the scheduler
}

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp values up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline uint64_t collective(Op op, unsigned mask, uint64_t in, int src = 0) {
  Thread* t = state().current;
  t->op = op;
  t->mask = mask;
  t->in = in;
  t->src = src;
  t->state = Thread::at_warp;
  yield();
  return t->out;
}

inline std::string lane_name(const Thread& t) {
  return "thread (" + std::to_string(t.idx.x) + "," + std::to_string(t.idx.y) + "," + std::to_string(t.idx.z) +
         ") of block (" + std::to_string(state().block_idx.x) + "," + std::to_string(state().block_idx.y) + "," +
         std::to_string(state().block_idx.z) + ")";
}

// Resolves the warp collectives whose lanes have all arrived; returns whether any did.
inline bool resolve_warps(std::vector<Thread>& threads) {
  bool released = false;
  const int nwarps = static_cast<int>((threads.size() + 31) / 32);
  for (int w = 0; w < nwarps; ++w) {
    Thread* lanes[32] = {};
    for (int l = 0; l < 32 && w * 32 + l < static_cast<int>(threads.size()); ++l) lanes[l] = &threads[w * 32 + l];
    unsigned here = 0;  // lanes at __activemask: released together, each told the set
    for (int l = 0; l < 32; ++l) {
      if (lanes[l] && lanes[l]->state == Thread::at_warp && lanes[l]->op == Op::activemask) here |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(here >> l & 1u)) continue;
      lanes[l]->out = here;
      lanes[l]->op = Op::none;
      lanes[l]->state = Thread::ready;
      released = true;
    }
    for (int l = 0; l < 32; ++l) {
      Thread* t = lanes[l];
      if (!t || t->state != Thread::at_warp) continue;
      const unsigned mask = t->mask;
      if (!(mask >> l & 1u)) fail("warp collective with a mask that omits the calling lane, at " + lane_name(*t));
      bool all_here = true;
      for (int k = 0; k < 32; ++k) {
        if (!(mask >> k & 1u)) continue;
        Thread* o = lanes[k];
        if (!o || o->state == Thread::done) {
          fail("warp collective's mask names lane " + std::to_string(k) + ", which has exited or does not exist, at " +
               lane_name(*t));
        }
        if (o->state != Thread::at_warp) {
          all_here = false;
          continue;
        }
        if (o->op != t->op || o->mask != mask) {
          fail("lanes of one mask reached different warp collectives (or masks), at " + lane_name(*t) + " and " +
               lane_name(*o));
        }
      }
      if (!all_here) continue;
      uint64_t acc = t->op == Op::reduce_and ? ~uint64_t(0) : 0;
      for (int k = 0; k < 32; ++k) {
        if (!(mask >> k & 1u)) continue;
        const Thread* o = lanes[k];
        switch (t->op) {
          case Op::ballot: acc |= uint64_t(o->in != 0) << k; break;
          case Op::reduce_or: acc |= o->in; break;
          case Op::reduce_and: acc &= o->in; break;
          case Op::reduce_add: acc = static_cast<uint32_t>(acc + o->in); break;
          default: break;
        }
      }
      for (int k = 0; k < 32; ++k) {
        if (!(mask >> k & 1u)) continue;
        Thread* o = lanes[k];
        if (o->op == Op::shfl) {
          // A source lane outside the mask is undefined behaviour on the GPU: report it.
          if (!(mask >> o->src & 1u)) fail("__shfl_*_sync reads lane " + std::to_string(o->src) + ", outside its mask, at " + lane_name(*o));
          o->out = lanes[o->src]->in;
        } else {
          o->out = acc;
        }
        o->state = Thread::ready;
        o->op = Op::none;
      }
      released = true;
    }
  }
  return released;
}

// Runs one block to completion.
inline void run_block(State& s, size_t smem) {
  const dim3 b = s.block_dim;
  const size_t n = size_t(b.x) * b.y * b.z;
  s.threads.assign(n, Thread{});
  while (s.stacks.size() < n) s.stacks.emplace_back(new char[kStackBytes]);
  std::fill(s.dynamic_shared.begin(), s.dynamic_shared.begin() + smem, 0xff);
  for (size_t i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.idx = dim3(unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (size_t(b.x) * b.y)));
    t.lane = int(i % 32);
    t.warp = int(i / 32);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = s.stacks[i].get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &s.scheduler;
    makecontext(&t.ctx, fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (Thread& t : s.threads) {
      if (t.state != Thread::ready) continue;
      s.current = &t;
      swapcontext(&s.scheduler, &t.ctx);
      ran = true;
    }
    s.current = nullptr;
    size_t done = 0, at_barrier = 0;
    for (const Thread& t : s.threads) {
      done += t.state == Thread::done;
      at_barrier += t.state == Thread::at_barrier;
    }
    if (done == n) return;
    if (resolve_warps(s.threads)) continue;
    if (at_barrier + done == n) {  // exited threads count as arrived, as on sm_70+
      for (Thread& t : s.threads) {
        if (t.state == Thread::at_barrier) t.state = Thread::ready;
      }
      continue;
    }
    if (!ran) {
      fail("deadlock in block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
           std::to_string(s.block_idx.z) + "): " + std::to_string(at_barrier) + " threads at __syncthreads, " +
           std::to_string(n - done - at_barrier) + " at warp collectives that cannot complete");
    }
  }
}

inline cudaError_t check_config(dim3 g, dim3 b, size_t smem) {
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > kMaxThreads || b.x > 1024 || b.y > 1024 || b.z > 64) return cudaErrorInvalidConfiguration;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  if (smem > kMaxDynamicShared) return cudaErrorInvalidValue;
  return cudaSuccess;
}

struct Config {
  dim3 grid, block;
  size_t smem;
  Config(dim3 g, dim3 b, size_t sm = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(sm) {}
};

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to launch(Config(...), kernel, args...).
// Runs the whole grid before returning (every stream is synchronous here).
template <typename... P, typename... Args>
void launch(Config c, void (*kernel)(P...), Args&&... args) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.launch_mutex);
  if (const cudaError_t e = check_config(c.grid, c.block, c.smem)) {
    s.last_error = e;
    return;
  }
  std::tuple<typename std::decay<P>::type...> params(std::forward<Args>(args)...);
  s.body = [&] { std::apply(kernel, params); };
  s.grid_dim = c.grid;
  s.block_dim = c.block;
  s.dynamic_shared.assign(c.smem, 0xff);
  const dim3 g = c.grid;
  for (int64_t i = int64_t(g.x) * g.y * g.z - 1; i >= 0; --i) {
    s.block_idx = dim3(unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / (int64_t(g.x) * g.y)));
    run_block(s, c.smem);
  }
  s.body = nullptr;
}

template <typename T> T* dynamic_shared() { return reinterpret_cast<T*>(state().dynamic_shared.data()); }

}  // namespace kfemu

// ---- built-in variables and device functions ---------------------------------------------
#define threadIdx (::kfemu::state().current->idx)
#define blockIdx (::kfemu::state().block_idx)
#define blockDim (::kfemu::state().block_dim)
#define gridDim (::kfemu::state().grid_dim)

inline void __syncthreads() {
  ::kfemu::state().current->state = ::kfemu::Thread::at_barrier;
  ::kfemu::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::kfemu::collective(::kfemu::Op::syncwarp, mask, 0); }
// The lanes of the caller's warp that reach __activemask together: those of its lanes that
// are blocked there once every lane has run as far as it can (not those still to exit).
inline unsigned __activemask() { return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::activemask, 0, 0)); }
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::ballot, mask, pred != 0));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_or, mask, v));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_and, mask, v));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_add, mask, v));
}
namespace kfemu {
// Source lane for a shuffle within sub-warps of `width` lanes; out of range: the caller's own.
template <typename T> T shfl(unsigned mask, T v, int src, int width) {
  const int lane = state().current->lane, base = lane & ~(width - 1);
  if (src < base || src >= base + width) src = lane;
  return from_bits<T>(collective(Op::shfl, mask, to_bits(v), src));
}
}  // namespace kfemu
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int base = ::kfemu::state().current->lane & ~(width - 1);
  return ::kfemu::shfl(mask, v, base + (src & (width - 1)), width);
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return ::kfemu::shfl(mask, v, ::kfemu::state().current->lane ^ m, width);
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::kfemu::shfl(mask, v, ::kfemu::state().current->lane + int(d), width);
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::kfemu::shfl(mask, v, ::kfemu::state().current->lane - int(d), width);
}

// ---- runtime API (the subset kernels' launchers use) --------------------------------------
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::kfemu::state().last_error;
  ::kfemu::state().last_error = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = ::kfemu::state().device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev) {
  if (dev < 0 || dev >= 64 || attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = ::kfemu::state().devices[dev].sms;
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads, size_t smem) {
  if (threads <= 0 || threads > ::kfemu::kMaxThreads || smem > ::kfemu::kMaxDynamicShared) return cudaErrorInvalidValue;
  *blocks = ::kfemu::state().devices[::kfemu::state().device].blocks_per_sm;
  return cudaSuccess;
}

namespace kfemu {
// Runs `f` (host code that launches kernels) for an extern "C" entry point: nullptr on success,
// else the message of the exception it threw (an emulator error, or the launcher's own) or of
// a launch error it left unchecked. ctypes cannot catch C++ exceptions.
template <typename F> const char* guarded(F&& f) {
  static std::string error;
  try {
    f();
  } catch (const std::exception& e) {
    error = e.what();
    return error.c_str();
  }
  if (const cudaError_t e = cudaGetLastError()) {
    error = std::string("kernel launch failed: ") + cudaGetErrorString(e);
    return error.c_str();
  }
  return nullptr;
}
}  // namespace kfemu
