// The one translation unit that sees torch: checks tensors, maps dtypes, picks the stream,
// and calls the framework-free kernels in csrc/<op>/. User-facing validation (messages that
// name the argument) lives in python/kfuse/ops/<op>.py; the checks here are invariants.
#include <torch/extension.h>

#include <optional>

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

// A tensor the kernels walk as [M, N, K] with N = t.size(dim): contiguous, backed by memory. The
// split is done here rather than by views in Python: each Python-side view cost ~0.6 us, a fair
// part of the ~17 us of an eager forward of a [4, 32] tensor (2 CPU cores).
struct Mnk {
  int64_t M, N, K;
};
Mnk split_at(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.is_contiguous() && dim >= 0 && dim < t.dim(), "kfuse: ", name,
              " must be a contiguous tensor and dim in [0, ", name, ".dim()); got dim ", dim, " for ", t.dim(),
              " dims");
  check_memory(t, name);
  Mnk s{1, t.size(dim), 1};
  for (int64_t d = 0; d < dim; ++d) s.M *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) s.K *= t.size(d);
  return s;
}

// A tensor that must match x in shape, dtype and device, and be contiguous.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                  t.is_contiguous(),
              "kfuse: ", name, " must be a contiguous tensor matching x in shape, dtype and device");
  check_memory(t, name);
}

// ---- deu ------------------------------------------------------------------------------
void check_coeffs(const at::Tensor& coeffs, const at::Tensor& x, int64_t N) {
  TORCH_CHECK(coeffs.is_contiguous() && coeffs.scalar_type() == acc_type(x) && coeffs.device() == x.device() &&
                  coeffs.dim() == 2 && coeffs.size(0) == N && coeffs.size(1) == 5,
              "kfuse: coeffs must be a contiguous [N, 5] tensor in the accumulation dtype on x's device");
  check_memory(coeffs, "coeffs");
}

// y = DEU(x) along dim, written into out when given (contiguous, like x: the caller's view of a
// tensor laid out like its own x, which it returns, and which is then not a view) or into a new
// tensor, returned.
at::Tensor deu_forward(const at::Tensor& x, const at::Tensor& coeffs, int64_t dim,
                       const std::optional<at::Tensor>& out_opt) {
  const Mnk s = split_at(x, dim, "x");
  check_coeffs(coeffs, x, s.N);
  const at::Tensor out = out_opt ? *out_opt : at::empty_like(x, at::MemoryFormat::Contiguous);
  check_like_x(out, x, "out");
  if (x.numel() == 0) return out;
  if (x.is_cuda()) {
#ifdef KFUSE_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    kfuse::deu::forward_cuda(to_dtype(x), x.data_ptr(), out.data_ptr(), coeffs.data_ptr(), s.M, s.N, s.K,
                             at::cuda::getCurrentCUDAStream().stream());
#else
    TORCH_CHECK(false, "kfuse: the extension was built without CUDA");
#endif
  } else {
    kfuse::deu::forward_cpu(to_dtype(x), x.data_ptr(), out.data_ptr(), coeffs.data_ptr(), s.M, s.N, s.K,
                            at::get_num_threads());
  }
  return out;
}

// (grad_x, contiguous like x; grad_coeffs [N, 5] in the accumulation dtype).
std::tuple<at::Tensor, at::Tensor> deu_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                const at::Tensor& coeffs, int64_t dim) {
  const Mnk s = split_at(x, dim, "x");
  check_like_x(grad_y, x, "grad_y");
  check_coeffs(coeffs, x, s.N);
  const int64_t M = s.M, N = s.N, K = s.K;
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
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
                           grad_x.data_ptr(), partials.data_ptr(), M, N, K, at::get_num_threads());
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
  m.def("deu_forward", &deu_forward,
        "DEU along dim of a contiguous x, coeffs [N, 5] (N = x.shape[dim]); returns y, written into out "
        "(contiguous, like x) when given",
        py::arg("x"), py::arg("coeffs"), py::arg("dim"), py::arg("out") = py::none());
  m.def("deu_backward", &deu_backward,
        "DEU backward along dim of contiguous grad_y and x; returns (grad_x like x, grad_coeffs [N, 5])",
        py::arg("grad_y"), py::arg("x"), py::arg("coeffs"), py::arg("dim"));
}
