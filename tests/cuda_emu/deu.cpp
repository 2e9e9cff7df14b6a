// cuda_emu entry points of the DEU CUDA kernels (csrc/deu/deu_cuda.cu, compiled for the CPU).
// Each returns nullptr on success or the error message (kfemu::guarded).
#include <cuda_runtime.h>

#include "deu.h"

using kfemu::guarded;
using kfuse::DType;

KFEMU_API const char* kfemu_deu_forward(int dtype, const void* x, void* y, const void* coeffs, int64_t M,
                                        int64_t N, int64_t K) {
  return guarded([&] { kfuse::deu::forward_cuda(DType(dtype), x, y, coeffs, M, N, K, nullptr); });
}
KFEMU_API int64_t kfemu_deu_backward_workspace_elems(int dtype, int64_t M, int64_t N, int64_t K) {
  return kfuse::deu::backward_cuda_workspace_elems(DType(dtype), M, N, K);
}
KFEMU_API const char* kfemu_deu_backward(int dtype, const void* grad_y, const void* x, const void* coeffs,
                                         void* grad_x, void* grad_coeffs, void* workspace, int64_t M, int64_t N,
                                         int64_t K) {
  return guarded([&] {
    kfuse::deu::backward_cuda(DType(dtype), grad_y, x, coeffs, grad_x, grad_coeffs, workspace, M, N, K, nullptr);
  });
}
