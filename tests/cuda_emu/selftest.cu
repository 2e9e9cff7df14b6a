// Kernels that check tests/cuda_emu itself (tests/test_cuda_emu.py): correct ones whose results
// depend on every intrinsic being emulated right, racy ones whose results depend on the
// schedule, and bugs the emulator must report.
#include <cuda_runtime.h>

#include <stdexcept>

namespace {

__shared__ int g_shared[1];  // namespace scope: as fresh per block as the others

// Per-block sums: each warp reduces with __shfl_down_sync, then warp 0 reduces the warps'
// sums, read from shared memory after __syncthreads, with __shfl_xor_sync. Threads past n
// keep going with 0 (full-mask shuffles need every lane).
__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float partial[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31, warps = blockDim.x / 32;
  float v = i < n ? x[i] : 0.f;
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xffffffffu, v, d);
  if (lane == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x >= 32) return;
  v = lane < warps ? partial[lane] : 0.f;
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if (lane == 0) out[blockIdx.x] = v;
}

// One warp; lanes at or past `alive` exit first. The rest write kWarpOps results each.
constexpr int kWarpOps = 14;
__global__ void warp_ops(const int* in, int* out, int alive) {
  const int lane = threadIdx.x;
  if (lane >= alive) return;
  const int v = in[lane];
  const unsigned all = 0xffffffffu;
  int* o = out + lane * kWarpOps;
  o[0] = __shfl_sync(all, v, (lane * 7 + 3) & 31);
  o[1] = __shfl_up_sync(all, v, 3);
  o[2] = __shfl_down_sync(all, v, 5);
  o[3] = __shfl_xor_sync(all, v, 6);
  o[4] = __shfl_xor_sync(all, v, 16, 16);
  o[5] = __shfl_down_sync(all, v, 2, 8);
  o[6] = __shfl_up_sync(all, v, 1, 4);
  o[7] = __shfl_sync(all, v, 9, 8);
  o[8] = static_cast<int>(__ballot_sync(all, v & 1));
  o[9] = static_cast<int>(__reduce_add_sync(all, static_cast<unsigned>(v)));
  o[10] = static_cast<int>(__reduce_or_sync(all, static_cast<unsigned>(v)));
  o[11] = static_cast<int>(__reduce_and_sync(all, static_cast<unsigned>(v)));
  o[12] = __shfl_down_sync(all, v, 33);  // offsets count modulo 32
  o[13] = __shfl_xor_sync(all, v, -1);
}

// Lanes 16.. shuffle among themselves (a narrower mask), then the whole warp meets.
__global__ void narrow_then_wide(int* out) {
  const int lane = threadIdx.x;
  int v = lane;
  if (lane >= 16) v = __shfl_xor_sync(0xffff0000u, v, 8);
  __syncwarp();
  out[lane] = v;
}

// Lanes at or past n exit; the rest report their __activemask.
__global__ void active_mask(unsigned* out, int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  out[threadIdx.x] = __activemask();
}

// Each thread writes its slot, then reads its neighbours' (one up, one down) after a barrier:
// __syncwarp (one warp) or __syncthreads (the block); with sync = 0, after none (a race).
__global__ void neighbours(int* out, int sync) {
  __shared__ int slot[256];
  const int t = threadIdx.x, n = blockDim.x;
  slot[t] = 3 * t;
  if (sync == 1) __syncwarp();
  if (sync == 2) __syncthreads();
  out[2 * t] = slot[(t + 1) % n];
  out[2 * t + 1] = slot[(t + n - 1) % n];
}

// Thread 0 of each block reads shared memory (static, static local, namespace-scope, dynamic,
// and one past the launch's 4 bytes of dynamic) before anything writes it, then writes it.
constexpr int kFresh = 5;
__global__ void fresh_shared(int* out) {
  __shared__ int stale[1];
  static __shared__ int kept[1];
  extern __shared__ int dynamic[];
  if (threadIdx.x != 0) return;
  int* o = out + kFresh * blockIdx.x;
  o[0] = stale[0];
  o[1] = kept[0];
  o[2] = g_shared[0];
  o[3] = dynamic[0];
  o[4] = dynamic[1];
  stale[0] = kept[0] = g_shared[0] = dynamic[0] = dynamic[1] = static_cast<int>(blockIdx.x);
}

// y[i + write_offset] = x[i + read_offset] for i < n: offsets other than 0 are bugs that
// cuda_emu.Guarded must catch.
__global__ void copy_offset(const float* x, float* y, int n, int read_offset, int write_offset) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i + write_offset] = x[i + read_offset];
}

// Bugs, by number: 0 half the warp waits at __syncthreads, the other half at a shuffle
// (deadlock); 1 a mask without the caller; 2 two kinds of shuffle under one mask; 3 a shuffle
// width that is not a power of 2; 4 a spin-wait on a flag nobody sets; 5 two __syncthreads
// in divergent branches; 6 an exception.
__global__ void bug(float* out, int which, volatile int* flag) {
  float v = 1.f;
  const unsigned lane = threadIdx.x & 31;
  if (which == 0) {
    if (lane < 16) {
      __syncthreads();
    } else {
      v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
  } else if (which == 1) {
    v = __shfl_xor_sync(0xfffffffeu, v, 1);
  } else if (which == 2) {
    v = lane < 16 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 1);
  } else if (which == 3) {
    v = __shfl_xor_sync(0xffffffffu, v, 1, 12);
  } else if (which == 5) {
    if (lane < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (which == 6) {
    throw std::runtime_error("boom");
  } else {
    while (!*flag) {
    }
  }
  out[threadIdx.x] = v;
}

}  // namespace

KFEMU_API const char* emu_block_sum(const float* x, float* out, int n, int threads) {
  return kfemu::guarded([&] { block_sum<<<(n + threads - 1) / threads, threads>>>(x, out, n); });
}
KFEMU_API const char* emu_warp_ops(const int* in, int* out, int alive) {
  return kfemu::guarded([&] { warp_ops<<<1, 32>>>(in, out, alive); });
}
KFEMU_API const char* emu_narrow_then_wide(int* out) {
  return kfemu::guarded([&] { narrow_then_wide<<<1, 32>>>(out); });
}
KFEMU_API const char* emu_active_mask(unsigned* out, int n) {
  return kfemu::guarded([&] { active_mask<<<1, 32>>>(out, n); });
}
KFEMU_API const char* emu_neighbours(int* out, int threads, int sync) {
  return kfemu::guarded([&] { neighbours<<<1, threads>>>(out, sync); });
}
KFEMU_API const char* emu_fresh_shared(int* out, int blocks) {
  return kfemu::guarded([&] { fresh_shared<<<blocks, 32, sizeof(int)>>>(out); });
}
KFEMU_API const char* emu_copy_offset(const float* x, float* y, int n, int read_offset, int write_offset) {
  return kfemu::guarded([&] { copy_offset<<<(n + 127) / 128, 128>>>(x, y, n, read_offset, write_offset); });
}
KFEMU_API const char* emu_bug(float* out, int which, int threads) {
  static volatile int flag = 0;
  return kfemu::guarded([&] { bug<<<1, threads>>>(out, which, &flag); });
}
