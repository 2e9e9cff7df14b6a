// cuda_emu's C entry points shared by every op: the emulated device and the schedule.
#include <cuda_runtime.h>

// Makes `dev` current and gives it `sms` SMs with `blocks_per_sm` resident blocks of any kernel
// (what the occupancy queries answer). Kernels cache such answers per device id: use a new id
// for each configuration.
KFEMU_API int kfemu_set_device(int dev, int sms, int blocks_per_sm) {
  if (dev < 0 || dev >= 64 || sms <= 0 || blocks_per_sm <= 0) return cudaErrorInvalidDevice;
  kfemu::State& s = kfemu::state();
  s.device = dev;
  s.devices[dev] = kfemu::Device{sms, blocks_per_sm};
  return cudaSuccess;
}

// 0: threads and blocks in rising order; otherwise shuffled orders and split active masks,
// drawn from `seed` (see cuda_runtime.h).
KFEMU_API void kfemu_set_schedule(uint64_t seed) {
  kfemu::state().seed = seed;
  kfemu::state().rng = seed;
}
