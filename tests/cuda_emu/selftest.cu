// Kernels that check tests/cuda_emu itself (tests/test_cuda_emu.py): two correct ones whose
// results depend on every collective being emulated right, and bugs it must report.
#include <cuda_runtime.h>

namespace {

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

// Lanes at or past n exit; the rest vote: out[i] = the set of lanes still running, for i < n.
__global__ void vote_after_exit(unsigned* out, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  out[i] = __ballot_sync(__activemask(), 1) & __reduce_or_sync(__activemask(), 1u << i);
}

// Bug: half the warp waits at __syncthreads, the other half at a full-warp shuffle.
__global__ void split_warp(float* out) {
  float v = 1.f;
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Bug: lanes 8.. exit, then the rest shuffle with a full mask.
__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x >= 8) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// y[i + write_offset] = x[i + read_offset] for i < n: offsets other than 0 are bugs that
// cuda_emu.Guarded must catch.
__global__ void copy_offset(const float* x, float* y, int n, int read_offset, int write_offset) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i + write_offset] = x[i + read_offset];
}

}  // namespace

extern "C" {
const char* emu_block_sum(const float* x, float* out, int n, int threads) {
  return kfemu::guarded([&] { block_sum<<<(n + threads - 1) / threads, threads>>>(x, out, n); });
}
const char* emu_vote_after_exit(unsigned* out, int n) {
  return kfemu::guarded([&] { vote_after_exit<<<1, 32>>>(out, n); });
}
const char* emu_split_warp(float* out) {
  return kfemu::guarded([&] { split_warp<<<1, 32>>>(out); });
}
const char* emu_shuffle_after_exit(float* out) {
  return kfemu::guarded([&] { shuffle_after_exit<<<1, 32>>>(out); });
}
const char* emu_copy_offset(const float* x, float* y, int n, int read_offset, int write_offset) {
  return kfemu::guarded([&] { copy_offset<<<(n + 127) / 128, 128>>>(x, y, n, read_offset, write_offset); });
}
}
