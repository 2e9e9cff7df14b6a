// A CPU emulator of the CUDA execution model, for testing CUDA kernels on machines without a GPU
// (the way TRITON_INTERPRET=1 tests the Triton kernels). Included in place of the real
// cuda_runtime.h when tests/cuda_emu.py compiles a framework-free .cu file with the host C++
// compiler (after rewriting its launches and __shared__ declarations).
//
// What it models. Every block of a launch runs its threads as cooperative fibers (ucontext) on
// the calling OS thread, one block at a time. A fiber runs until it exits or reaches
// __syncthreads or a warp collective (__shfl_*_sync, __ballot_sync, __reduce_*_sync,
// __syncwarp, __activemask); once every fiber is blocked, the scheduler completes the
// collectives whose non-exited lanes have all arrived, and the barrier once every non-exited
// thread of the block is at it. The schedule is seeded (kfemu_set_schedule): seed 0 runs
// threads and blocks in rising order; any other seed shuffles the order of the threads every
// round and of the blocks every launch, and splits the lanes that reach an __activemask
// together into random groups (as divergence may on a GPU), so code that relies on an order
// or on a full active mask shows it under some seed. Shared memory (static and dynamic) starts
// every block as 0xff bytes (NaN as floats); dynamic shared memory ends at an inaccessible
// page; fiber stacks sit between inaccessible pages.
// Errors it reports: launch configurations the hardware rejects (block or grid too large, too
// much dynamic shared memory, a shuffle width not a power of 2), a collective whose mask omits
// the caller, lanes of one mask at different collectives, deadlock, and (after KFEMU_TIMEOUT_S,
// default 600 s, by aborting the process) a launch that never ends, e.g. a spin-wait on
// another block. Reading a lane that has exited or is outside the mask gives all-ones bits.
// What it does not: device math (__CUDA_ARCH__ is undefined, so kernels take their host code
// paths, e.g. libm instead of the hardware approximations), inline PTX, device-side assert,
// memory ordering between blocks, concurrent launches, and speed. Only the runtime calls the
// kernels here use are provided.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
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
#define warpSize 32
// Every __shared__ declaration is rewritten (tests/cuda_emu.py); one it could not parse (e.g.
// several names in one declaration, or one split over lines) fails to compile, naming this.
#define __shared__ __shared___declaration_not_rewritten_by_cuda_emu_py
// Entry points that tests load with ctypes. Everything else is hidden (tests/cuda_emu.py builds
// with -fvisibility=hidden), so each loaded library has its own emulator state.
#define KFEMU_API extern "C" __attribute__((visibility("default")))

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

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("cuda_emu: " + what); }

// At least `bytes` of memory between two inaccessible pages.
class Mapped {
 public:
  void ensure(size_t bytes) {
    if (bytes <= span_) return;
    release();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    span_ = (bytes + page - 1) / page * page;
    void* p = mmap(nullptr, span_ + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<unsigned char*>(p);
    mprotect(base_, page, PROT_NONE);
    mprotect(base_ + page + span_, page, PROT_NONE);
  }
  unsigned char* begin() const { return base_ + static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  unsigned char* end() const { return begin() + span_; }
  ~Mapped() { release(); }

 private:
  void release() {
    if (base_) munmap(base_, span_ + 2 * static_cast<size_t>(sysconf(_SC_PAGESIZE)));
    base_ = nullptr;
    span_ = 0;
  }
  unsigned char* base_ = nullptr;
  size_t span_ = 0;
};

enum class Op { none, activemask, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, reduce_or, reduce_and, reduce_add, syncwarp };

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  int lane = 0, warp = 0;
  enum State { ready, at_barrier, at_warp, done } state = ready;
  // The pending warp collective: its kind, mask, shuffle width and value size, this lane's
  // value, source lane (shuffles) or call site (__activemask), and the result handed back.
  Op op = Op::none;
  unsigned mask = 0;
  int width = 32, size = 0, src = 0;
  uintptr_t site = 0;  // also: which __syncthreads a thread waits at
  uint64_t in = 0, out = 0;
};

// Emulated devices: id -> (SMs, resident blocks per SM) for the occupancy queries. Kernels
// often cache per device id, so tests use a new id for each configuration.
struct Device {
  int sms = 132, blocks_per_sm = 4;
};

struct State {
  std::mutex launch_mutex;
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<Mapped>> stacks;
  Mapped dynamic;
  unsigned char* dynamic_shared = nullptr;
  std::vector<std::pair<unsigned char*, size_t>> static_shared;  // every static __shared__ area so far
  Thread* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  std::function<void()> body;
  cudaError_t last_error = cudaSuccess;
  int device = 0;
  Device devices[64];
  uint64_t seed = 0, rng = 0;
  std::string kernel_error;  // raised in a fiber: thrown once the scheduler has control back
};
inline State& state() {
  static State s;
  return s;
}

inline uint64_t random_u64() {  // splitmix64 over the schedule's seed
  uint64_t z = (state().rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
template <typename T> void shuffle(std::vector<T>& v) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[random_u64() % i]);
}

inline void yield() {
  State& s = state();
  swapcontext(&s.current->ctx, &s.scheduler);
}

inline std::string coords(dim3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}
inline std::string where(const Thread& t) {
  return "thread " + coords(t.idx) + " of block " + coords(state().block_idx);
}

// An error found by a thread itself: exceptions cannot unwind a fiber's stack into the
// scheduler, so the thread hands the message over and is never resumed.
[[noreturn]] inline void fail_in_thread(const std::string& what) {
  State& s = state();
  s.kernel_error = what + ", at " + where(*s.current);
  yield();
  std::abort();  // unreachable: the scheduler throws instead of resuming this thread
}

inline void fiber_main() {
  State& s = state();
  try {
    s.body();
  } catch (const std::exception& e) {
    fail_in_thread(std::string("a kernel threw: ") + e.what());
  }
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

// Blocks the calling lane at a warp collective until the scheduler completes it.
inline uint64_t collective(Op op, unsigned mask, uint64_t in, int size, int src = 0, int width = 32,
                           uintptr_t site = 0) {
  Thread* t = state().current;
  t->op = op;
  t->mask = mask;
  t->in = in;
  t->size = size;
  t->src = src;
  t->width = width;
  t->site = site;
  t->state = Thread::at_warp;
  yield();
  return t->out;
}


inline void release(Thread* t, uint64_t out) {
  t->out = out;
  t->op = Op::none;
  t->state = Thread::ready;
}

// Lanes at __activemask, grouped by call site: each learns its group (a random part of it,
// under a seeded schedule). Returns whether any were released.
inline bool resolve_activemask(Thread* const* lanes) {
  std::map<uintptr_t, unsigned> sites;
  for (int l = 0; l < 32; ++l) {
    if (lanes[l] && lanes[l]->state == Thread::at_warp && lanes[l]->op == Op::activemask) sites[lanes[l]->site] |= 1u << l;
  }
  for (const auto& [site, group] : sites) {
    const uint64_t parts = state().seed ? 1 + random_u64() % 3 : 1;
    unsigned part_mask[3] = {}, part_of[32] = {};
    for (int l = 0; l < 32; ++l) {
      if (!(group >> l & 1u)) continue;
      part_of[l] = static_cast<unsigned>(random_u64() % parts);
      part_mask[part_of[l]] |= 1u << l;
    }
    for (int l = 0; l < 32; ++l) {
      if (group >> l & 1u) release(lanes[l], part_mask[part_of[l]]);
    }
  }
  return !sites.empty();
}

// Completes the warp collectives whose non-exited lanes have all arrived; returns whether any did.
// Lanes of one mask waiting at different collectives are not (yet) an error: one of them may
// complete first with a narrower mask. If nothing can progress, `mismatch` says where.
inline bool resolve_warps(std::vector<Thread>& threads, std::string& mismatch) {
  bool released = false;
  const int nthreads = static_cast<int>(threads.size());
  for (int w = 0; w * 32 < nthreads; ++w) {
    Thread* lanes[32] = {};  // null: past the end of the block, which counts as exited
    for (int l = 0; l < 32 && w * 32 + l < nthreads; ++l) lanes[l] = &threads[w * 32 + l];
    released |= resolve_activemask(lanes);
    for (int l = 0; l < 32; ++l) {
      Thread* t = lanes[l];
      if (!t || t->state != Thread::at_warp) continue;
      const unsigned mask = t->mask;
      if (!(mask >> l & 1u)) fail("a warp collective's mask omits the calling lane, at " + where(*t));
      unsigned members = 0;  // the non-exited lanes of the mask, all of which must take part
      bool all_here = true;
      for (int k = 0; k < 32; ++k) {
        const Thread* o = lanes[k];
        if (!(mask >> k & 1u) || !o || o->state == Thread::done) continue;
        if (o->state != Thread::at_warp) {
          all_here = false;
          continue;
        }
        if (o->op != t->op || o->mask != mask || o->width != t->width || o->size != t->size) {
          mismatch = "lanes of one mask wait at different warp collectives (kind, mask, width or value size): " +
                     where(*t) + " and " + where(*o);
          all_here = false;
          continue;
        }
        members |= 1u << k;
      }
      if (!all_here) continue;
      uint64_t acc = t->op == Op::reduce_and ? 0xffffffffull : 0;
      for (int k = 0; k < 32; ++k) {
        if (!(members >> k & 1u)) continue;
        const uint64_t v = lanes[k]->in;
        switch (t->op) {
          case Op::ballot: acc |= uint64_t(v != 0) << k; break;
          case Op::reduce_or: acc |= v; break;
          case Op::reduce_and: acc &= v; break;
          case Op::reduce_add: acc = static_cast<uint32_t>(acc + v); break;
          default: break;
        }
      }
      const bool shuffle_op = t->op == Op::shfl_idx || t->op == Op::shfl_up || t->op == Op::shfl_down ||
                              t->op == Op::shfl_xor;
      for (int k = 0; k < 32; ++k) {
        if (!(members >> k & 1u)) continue;
        Thread* o = lanes[k];
        // A shuffle reading an exited lane or one outside the mask gets an undefined value.
        uint64_t out = acc;
        if (shuffle_op) out = members >> o->src & 1u ? lanes[o->src]->in : ~uint64_t(0);  // src in [0, 32)
        release(o, out);
      }
      released = true;
    }
  }
  return released;
}

// Runs one block to completion.
inline void run_block(State& s) {
  const dim3 b = s.block_dim;
  const size_t n = size_t(b.x) * b.y * b.z;
  std::memset(s.dynamic.begin(), 0xff, s.dynamic.end() - s.dynamic.begin());
  for (const auto& [area, bytes] : s.static_shared) std::memset(area, 0xff, bytes);
  s.threads.assign(n, Thread{});
  while (s.stacks.size() < n) {
    s.stacks.emplace_back(new Mapped);
    s.stacks.back()->ensure(kStackBytes);
  }
  for (size_t i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.idx = dim3(unsigned(i % b.x), unsigned(i / b.x % b.y), unsigned(i / (size_t(b.x) * b.y)));
    t.lane = int(i % 32);
    t.warp = int(i / 32);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = s.stacks[i]->begin();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &s.scheduler;
    makecontext(&t.ctx, fiber_main, 0);
  }
  std::vector<Thread*> order;
  for (;;) {
    order.clear();
    for (Thread& t : s.threads) {
      if (t.state == Thread::ready) order.push_back(&t);
    }
    if (s.seed) shuffle(order);
    for (Thread* t : order) {
      s.current = t;
      swapcontext(&s.scheduler, &t->ctx);
      if (!s.kernel_error.empty()) {
        const std::string what = std::move(s.kernel_error);
        s.kernel_error.clear();
        fail(what);
      }
    }
    s.current = nullptr;
    size_t done = 0, at_barrier = 0;
    for (const Thread& t : s.threads) {
      done += t.state == Thread::done;
      at_barrier += t.state == Thread::at_barrier;
    }
    if (done == n) return;
    std::string mismatch;
    if (resolve_warps(s.threads, mismatch)) continue;
    if (at_barrier + done == n) {  // exited threads count as arrived (PTX: exit releases barriers)
      const Thread* first = nullptr;
      for (Thread& t : s.threads) {
        if (t.state != Thread::at_barrier) continue;
        // bar.sync is .aligned: every thread must wait at the same __syncthreads.
        if (first && t.site != first->site) fail("threads wait at different __syncthreads: " + where(*first) + " and " + where(t));
        first = first ? first : &t;
        t.state = Thread::ready;
      }
      continue;
    }
    if (order.empty()) {
      fail("deadlock in block " + coords(s.block_idx) + ": " + std::to_string(at_barrier) + " threads at __syncthreads, " + std::to_string(n - done - at_barrier) +
           " at warp collectives that cannot complete" + (mismatch.empty() ? "" : "; " + mismatch));
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

// Aborts the process (with a message) if a launch runs longer than KFEMU_TIMEOUT_S: a fiber
// that spins never yields, so nothing else could stop it.
class Watchdog {
 public:
  Watchdog() : thread_([this] { watch(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void watch() {
    static const double seconds = timeout_seconds();
    std::unique_lock<std::mutex> lock(mutex_);
    if (seconds <= 0) {  // disabled
      cv_.wait(lock, [this] { return done_; });
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::duration<double>(seconds), [this] { return done_; })) {
      std::fprintf(stderr, "cuda_emu: a kernel launch ran for more than %.0f s (KFEMU_TIMEOUT_S); a spin-wait on "
                   "another thread or block never ends under this emulator\n", seconds);
      std::fflush(stderr);
      std::abort();
    }
  }
  // KFEMU_TIMEOUT_S: seconds (default 600); 0, a negative or non-finite value, or one past a
  // year disables the watchdog.
  static double timeout_seconds() {
    const char* text = std::getenv("KFEMU_TIMEOUT_S");
    if (!text) return 600;
    char* end = nullptr;
    const double v = std::strtod(text, &end);
    if (end == text || *end) {
      std::fprintf(stderr, "cuda_emu: KFEMU_TIMEOUT_S=%s is not a number; using 600 s\n", text);
      return 600;
    }
    return std::isfinite(v) && v > 0 && v < 3.2e7 ? v : 0;
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

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
  s.dynamic.ensure(std::max<size_t>(c.smem, 1));
  s.dynamic_shared = s.dynamic.end() - (c.smem + 15) / 16 * 16;  // ends (within 16 bytes) at the guard page
  const Watchdog watchdog;
  const dim3 g = c.grid;
  std::vector<int64_t> blocks(size_t(g.x) * g.y * g.z);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = int64_t(i);
  if (s.seed) shuffle(blocks);
  for (const int64_t i : blocks) {
    s.block_idx = dim3(unsigned(i % g.x), unsigned(i / g.x % g.y), unsigned(i / (int64_t(g.x) * g.y)));
    run_block(s);
  }
  s.body = nullptr;
}

// `extern __shared__ T name[];` is rewritten to `T* name = ::kfemu::dynamic_shared<T>();`, which
// is right inside a kernel only.
template <typename T> T* dynamic_shared() {
  if (!state().current) {
    std::fprintf(stderr, "cuda_emu: extern __shared__ outside a kernel (e.g. at namespace scope) is not supported; "
                 "declare it inside the kernel\n");
    std::abort();
  }
  return reinterpret_cast<T*>(state().dynamic_shared);
}

// A static __shared__ variable of type T: `__shared__ T name;` (in a kernel, at namespace scope,
// `static` or not) is rewritten to `auto& name = ::kfemu::static_shared<T, __COUNTER__>();`. One
// area per declaration (and template instantiation), at a fixed address, refilled with 0xff
// bytes (with the 64 spare bytes after it) before every block.
inline unsigned char* new_shared_area(size_t bytes) {
  auto* area = static_cast<unsigned char*>(::operator new(bytes + 64, std::align_val_t(64)));
  std::memset(area, 0xff, bytes + 64);
  state().static_shared.emplace_back(area, bytes + 64);
  return area;
}
namespace {  // per translation unit: __COUNTER__ is unique only within one
template <typename T, int Id> T& static_shared() {
  static unsigned char* const area = new_shared_area(sizeof(T));
  return *reinterpret_cast<T*>(area);
}
}  // namespace

}  // namespace kfemu

// ---- built-in variables and device functions ---------------------------------------------
#define threadIdx (::kfemu::state().current->idx)
#define blockIdx (::kfemu::state().block_idx)
#define blockDim (::kfemu::state().block_dim)
#define gridDim (::kfemu::state().grid_dim)

// Not inlined: its return address names the call site.
__attribute__((noinline)) inline void __syncthreads() {
  ::kfemu::Thread* t = ::kfemu::state().current;
  t->site = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  t->state = ::kfemu::Thread::at_barrier;
  ::kfemu::yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::kfemu::collective(::kfemu::Op::syncwarp, mask, 0, 0); }
// The lanes that reach this call site together (not inlined: its return address names the site).
__attribute__((noinline)) inline unsigned __activemask() {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::activemask, 0, 0, 0, 0, 32,
                                                   reinterpret_cast<uintptr_t>(__builtin_return_address(0))));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::ballot, mask, pred != 0, 4));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_or, mask, v, 4));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_and, mask, v, 4));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(::kfemu::collective(::kfemu::Op::reduce_add, mask, v, 4));
}
namespace kfemu {
// The source lanes of CUDA's shuffles within sub-warps of `width` lanes (PTX shfl.sync: the
// lane/offset operand's low 5 bits count): idx wraps within the caller's group; up/down/xor
// past the group's end (or, for up, before its start) read the caller's own value; xor may
// read an earlier group.
template <typename T> T shfl(Op op, unsigned mask, T v, int arg, int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) {
    fail_in_thread("shuffle width " + std::to_string(width) + " is not a power of 2 <= 32");
  }
  const int lane = state().current->lane, base = lane & ~(width - 1);
  arg &= 31;
  int src = lane;
  switch (op) {
    case Op::shfl_idx: src = base + (arg & (width - 1)); break;
    case Op::shfl_up: src = lane - arg >= base ? lane - arg : lane; break;
    case Op::shfl_down: src = lane + arg < base + width ? lane + arg : lane; break;
    default: src = (lane ^ arg) < base + width ? lane ^ arg : lane; break;
  }
  return from_bits<T>(collective(op, mask, to_bits(v), sizeof(T), src, width));
}
}  // namespace kfemu
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::kfemu::shfl(::kfemu::Op::shfl_idx, mask, v, src, width);
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
  return ::kfemu::shfl(::kfemu::Op::shfl_xor, mask, v, m, width);
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::kfemu::shfl(::kfemu::Op::shfl_down, mask, v, int(d), width);
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return ::kfemu::shfl(::kfemu::Op::shfl_up, mask, v, int(d), width);
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
// Runs `f` (host code that launches kernels) for a KFEMU_API entry point: nullptr on success,
// else the message of the exception it threw (an emulator error, or the launcher's own) or of
// a launch error it left unchecked. ctypes cannot catch C++ exceptions.
template <typename F> const char* guarded(F&& f) {
  static thread_local std::string error;
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
