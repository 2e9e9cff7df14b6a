// cuda_emu's C entry points shared by every op: choose the emulated device.
#include <cuda_runtime.h>

extern "C" {
// Makes `dev` current and gives it `sms` SMs with `blocks_per_sm` resident blocks of any kernel
// (what the occupancy queries answer). Kernels cache such answers per device id: use a new id
// for each configuration.
int kfemu_set_device(int dev, int sms, int blocks_per_sm) {
  if (dev < 0 || dev >= 64 || sms <= 0 || blocks_per_sm <= 0) return cudaErrorInvalidDevice;
  kfemu::State& s = kfemu::state();
  s.device = dev;
  s.devices[dev] = kfemu::Device{sms, blocks_per_sm};
  return cudaSuccess;
}
}
