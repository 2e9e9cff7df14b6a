// DEU kernel entry points. Shapes: x, y, grad_y, grad_x are [M, N, K] contiguous (N is the
// neuron axis: M = product of the dims before it, K = product of the dims after it).
// coeffs and grad_coeffs are [N, 5] in the accumulation type (double when dtype == f64, else
// float), as are partials and workspace.
// CPU: partials is [backward_cpu_num_partials, N, 5]; the caller sums it over dim 0 (a fixed
// order, so the parameter gradient is deterministic).
// CUDA: backward_cuda writes grad_coeffs itself (deterministically), using a workspace of
// backward_cuda_workspace_elems elements (for the current device): 19 sums per tile and
// neuron (for [M, N] inputs at most ~19 per resident block and column block of 256 neurons plus
// 19 per neuron, a few MB; for planes ~0.5% of x's element count).
#pragma once

#include <cstdint>

#include "../common.h"

namespace kfuse {
namespace deu {

// num_threads: the OpenMP team size (torch's intra-op setting, at::get_num_threads(), passed by
// the caller: a team started from a new thread would otherwise take OpenMP's default size).
void forward_cpu(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                 int64_t K, int num_threads);
int64_t backward_cpu_num_partials(int64_t M, int64_t N, int64_t K);
void backward_cpu(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                  void* grad_x, void* partials, int64_t M, int64_t N, int64_t K, int num_threads);

#ifdef KFUSE_WITH_CUDA
// stream is a cudaStream_t.
void forward_cuda(DType dtype, const void* x, void* y, const void* coeffs, int64_t M, int64_t N,
                  int64_t K, void* stream);
// (An API version for bench/deu_cuda_micro.cu, which also builds against older kernels, whose
// backward_cuda left grad_coeffs as partials for the caller to sum.)
#define KFUSE_DEU_CUDA_BACKWARD_WRITES_GRAD_COEFFS 1
int64_t backward_cuda_workspace_elems(DType dtype, int64_t M, int64_t N, int64_t K);
void backward_cuda(DType dtype, const void* grad_y, const void* x, const void* coeffs,
                   void* grad_x, void* grad_coeffs, void* workspace, int64_t M, int64_t N, int64_t K,
                   void* stream);
#endif

}  // namespace deu
}  // namespace kfuse
