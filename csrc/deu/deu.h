// DEU kernel entry points. Shapes: x, y, grad_y, grad_x are [M, N, K] contiguous (N is the
// neuron axis: M = product of the dims before it, K = product of the dims after it).
// coeffs is [N, 5] and partials is [num_partials, N, 5], both in the accumulation type
// (double when dtype == f64, else float). The caller sums partials over dim 0 (a fixed
// order, so the parameter gradient is deterministic).
#pragma once

#include <cstdint>

#include "../common.h"

namespace kfuse {
namespace deu {

void forward_cpu(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                 int64_t K);
int64_t backward_cpu_num_partials(int64_t M, int64_t N, int64_t K);
void backward_cpu(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                  void* grad_x, void* partials, int64_t M, int64_t N, int64_t K);

#ifdef KFUSE_WITH_CUDA
// stream is a cudaStream_t.
void forward_cuda(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                  int64_t K, void* stream);
int64_t backward_cuda_num_partials(int64_t M, int64_t N, int64_t K);
void backward_cuda(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                   void* grad_x, void* partials, int64_t M, int64_t N, int64_t K, void* stream);
#endif

}  // namespace deu
}  // namespace kfuse
