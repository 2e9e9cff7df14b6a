// The one translation unit that sees torch: checks tensors, maps dtypes, picks the stream,
// and calls the framework-free kernels in csrc/<op>/. User-facing validation (messages that
// name the argument) lives in python/kfuse/ops/<op>.py; the checks here are invariants.
#include <torch/extension.h>

#ifdef KFUSE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "common.h"
#include "deu/deu.h"

#ifndef KFUSE_SOURCES_HASH
#define KFUSE_SOURCES_HASH "unknown"
#endif

namespace {

kfuse::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kfuse::DType::f32;
    case at::kDouble: return kfuse::DType::f64;
    case at::kHalf: return kfuse::DType::f16;
    case at::kBFloat16: return kfuse::DType::bf16;
    default: TORCH_CHECK(false, "kfuse: unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernels read and write raw memory: a tensor without any (meta, a FakeTensor, a wrapper
// subclass) must fail here, not crash in a kernel (FakeTensorMode once did, through a Python path
// that skipped the dispatcher).
void check_memory(const at::Tensor& t, const char* name) {
  TORCH_CHECK((t.is_cpu() || t.is_cuda()) && t.has_storage() && (t.numel() == 0 || t.const_data_ptr() != nullptr),
              "kfuse: ", name, " must be a CPU or CUDA tensor backed by memory; got one on ", t.device());
}

void check_mnk(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), "kfuse: ", name, " must be a contiguous [M, N, K] tensor");
  check_memory(t, name);
}

// ---- deu ------------------------------------------------------------------------------
void check_coeffs(const at::Tensor& coeffs, const at::Tensor& x) {
  TORCH_CHECK(coeffs.is_contiguous() && coeffs.scalar_type() == acc_type(x) &&
                  coeffs.device() == x.device() && coeffs.dim() == 2 && coeffs.size(0) == x.size(1) &&
                  coeffs.size(1) == 5,
              "kfuse: coeffs must be a contiguous [N, 5] tensor in the accumulation dtype on x's device");
  check_memory(coeffs, "coeffs");
}

// Writes y into out, a [M, N, K] tensor like x: the caller passes a view of a tensor shaped like
// its own x, and returns that tensor, which is then not a view.
void deu_forward(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& out) {
  check_mnk(x, "x");
  check_mnk(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.device() == x.device(),
              "kfuse: out must match x in shape, dtype and device");
  const int64_t M = x.size(0), N = x.size(1), K = x.size(2);
  check_coeffs(coeffs, x);
  if (x.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef KFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    kfuse::deu::forward_cuda(to_dtype(x), x.data_ptr(), out.data_ptr(), coeffs.data_ptr(), M, N, K,
                             at::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "kfuse: the extension was built without CUDA");
#endif
  } else {
    kfuse::deu::forward_cpu(to_dtype(x), x.data_ptr(), out.data_ptr(), coeffs.data_ptr(), M, N, K);
  }
}

std::tuple<at::Tensor, at::Tensor> deu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& coeffs) {
  check_mnk(x, "x");
  check_mnk(grad_y, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "kfuse: grad_y must match x in shape, dtype and device");
  const int64_t M = x.size(0), N = x.size(1), K = x.size(2);
  check_coeffs(coeffs, x);
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_x, at::zeros_like(coeffs)};
  if (x.is_cuda()) {
#ifdef KFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor grad_coeffs = at::empty_like(coeffs);
    at::Tensor workspace = at::empty({kfuse::deu::backward_cuda_workspace_elems(to_dtype(x), M, N, K)}, coeffs.options());
    kfuse::deu::backward_cuda(to_dtype(x), grad_y.data_ptr(), x.data_ptr(), coeffs.data_ptr(),
                              grad_x.data_ptr(), grad_coeffs.data_ptr(), workspace.data_ptr(), M, N, K,
                              at::cuda::getCurrentCUDAStream().stream());
    return {grad_x, grad_coeffs};
#else
    TORCH_CHECK(false, "kfuse: the extension was built without CUDA");
#endif
  }
  at::Tensor partials = at::empty({kfuse::deu::backward_cpu_num_partials(M, N, K), N, 5}, coeffs.options());
  kfuse::deu::backward_cpu(to_dtype(x), grad_y.data_ptr(), x.data_ptr(), coeffs.data_ptr(),
                           grad_x.data_ptr(), partials.data_ptr(), M, N, K);
  return {grad_x, partials.size(0) == 1 ? partials[0] : partials.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kfuse compiled kernels (CPU always; CUDA when built with it)";
  m.def("has_cuda", []() {
#ifdef KFUSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("sources_hash", []() { return std::string(KFUSE_SOURCES_HASH); },
        "Hash of csrc/ at build time; kfuse compares it with the tree to detect a stale build.");
  m.def("deu_forward", &deu_forward, "DEU forward into out; x and out [M, N, K] contiguous, coeffs [N, 5]",
        py::arg("x"), py::arg("coeffs"), py::arg("out"));
  m.def("deu_backward", &deu_backward,
        "DEU backward; returns (grad_x [M, N, K], grad_coeffs [N, 5])", py::arg("grad_y"),
        py::arg("x"), py::arg("coeffs"));
}
