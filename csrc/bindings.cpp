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
#include "kv/kv.h"

#if __has_include("kfuse_sources_hash.h")
#include "kfuse_sources_hash.h"  // written by setup.py (CMake passes -DKFUSE_SOURCES_HASH instead)
#endif
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

// ---- kv cache --------------------------------------------------------------------------
// The host-side metadata of a PagedKVCache, bound once per cache (its tensors are kept alive
// here), so that each call passes only its ids and lengths: per-call conversion of the seven
// state tensors would cost more than the work itself (~0.4 us each).
class KVHostState {
 public:
  KVHostState(at::Tensor table, at::Tensor lens, at::Tensor npages, at::Tensor active, at::Tensor ref,
              at::Tensor free_stack, at::Tensor free_top, int64_t page_size)
      : tensors_{table, lens, npages, active, ref, free_stack, free_top} {
    const char* names[] = {"block_table", "seq_lens", "npages", "active", "page_refcount", "free_stack", "free_top"};
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const at::Tensor& t = tensors_[i];
      TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == (i == 3 ? at::kByte : at::kInt),
                  "kfuse: ", names[i], " must be a contiguous CPU ", i == 3 ? "uint8" : "int32", " tensor");
      check_memory(t, names[i]);
    }
    TORCH_CHECK(table.dim() == 2 && lens.numel() == table.size(0) && npages.numel() == table.size(0) &&
                    active.numel() == table.size(0) && free_stack.numel() == ref.numel() + 1 && free_top.numel() == 1 &&
                    page_size > 0,
                "kfuse: inconsistent KV host-state shapes");
    st_ = {table.data_ptr<int32_t>(), table.size(1), lens.data_ptr<int32_t>(), npages.data_ptr<int32_t>(),
           active.data_ptr<uint8_t>(), table.size(0), ref.data_ptr<int32_t>(), free_stack.data_ptr<int32_t>(),
           free_top.data_ptr<int32_t>(), ref.numel(), page_size};
  }
  void check_ids(const at::Tensor& ids, const std::string& what) const {
    kfuse::kv::check_ids(st_, ptr(ids, "ids"), ids.numel(), what.c_str());
  }
  void rollback(const at::Tensor& ids, const at::Tensor& new_lens, bool check_lens) const {
    TORCH_CHECK(ids.numel() == new_lens.numel(), "kfuse: ids and new_lens differ in length");
    kfuse::kv::rollback(st_, ptr(ids, "ids"), ptr(new_lens, "new_lens"), ids.numel(), check_lens);
  }
  // (tok_page, tok_slot, cow_src, cow_dst, tbl_row, tbl_col, tbl_val, rc_idx, rc_delta, popped);
  // int64 tensors.
  py::tuple plan_step(const at::Tensor& ids, const at::Tensor& counts) const {
    TORCH_CHECK(ids.numel() == counts.numel(), "kfuse: ids and counts differ in length");
    const kfuse::kv::StepPlan p = kfuse::kv::plan_step(st_, ptr(ids, "ids"), ptr(counts, "counts"), ids.numel());
    auto t = [](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong); };
    return py::make_tuple(t(p.tok_page), t(p.tok_slot), t(p.cow_src), t(p.cow_dst), t(p.tbl_row), t(p.tbl_col),
                          t(p.tbl_val), t(p.rc_idx), t(p.rc_delta), p.popped);
  }

 private:
  static const int64_t* ptr(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), "kfuse: ", name,
                " must be a contiguous 1-D CPU int64 tensor");
    return t.const_data_ptr<int64_t>();
  }
  std::vector<at::Tensor> tensors_;
  kfuse::kv::HostState st_{};
};

// ---- kv attention ----------------------------------------------------------------------
// The checks of both ops: q [tokens, Hq, D]; one layer's pools [num_pages, page_size, Hkv, D]; int32
// block_table [max_seqs, P]; int32 seq_ids and lens [rows]; all contiguous CPU tensors. The values
// the kernels follow (table rows, lengths, the pages below each length) are checked too: O(pages
// read), against O(pages x page_size x Hq x D) for the attention.
struct KVAttn {
  int64_t page_size, hkv, d, stride;
};
KVAttn check_kv_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                          const at::Tensor& block_table, const at::Tensor& seq_ids, const at::Tensor& lens,
                          int64_t rows) {
  TORCH_CHECK(q.is_cpu() && q.dim() == 3 && q.is_contiguous(),
              "kfuse: q must be a contiguous [tokens, Hq, D] CPU tensor");
  TORCH_CHECK(k_pages.dim() == 4 && v_pages.sizes() == k_pages.sizes() && k_pages.is_contiguous() &&
                  v_pages.is_contiguous() && k_pages.is_cpu() && v_pages.is_cpu(),
              "kfuse: k_pages and v_pages must be contiguous [num_pages, page_size, Hkv, D] CPU tensors of one shape");
  TORCH_CHECK(k_pages.scalar_type() == q.scalar_type() && v_pages.scalar_type() == q.scalar_type(),
              "kfuse: q, k_pages and v_pages must share a dtype");
  const int64_t num_pages = k_pages.size(0), ps = k_pages.size(1), hkv = k_pages.size(2), d = k_pages.size(3);
  TORCH_CHECK(ps > 0 && hkv > 0 && d > 0 && q.size(2) == d && q.size(1) > 0 && q.size(1) % hkv == 0,
              "kfuse: q must be [tokens, Hq, D] with D the pools' head dim and Hq a positive multiple of Hkv");
  TORCH_CHECK(block_table.is_cpu() && block_table.dim() == 2 && block_table.is_contiguous() &&
                  block_table.scalar_type() == at::kInt,
              "kfuse: block_table must be a contiguous int32 [max_seqs, max_pages] CPU tensor");
  for (const auto* t : {&seq_ids, &lens})
    TORCH_CHECK(t->is_cpu() && t->dim() == 1 && t->numel() == rows && t->is_contiguous() &&
                    t->scalar_type() == at::kInt,
                "kfuse: seq_ids and lens must be contiguous int32 [", rows, "] CPU tensors");
  check_memory(q, "q");
  check_memory(k_pages, "k_pages");
  check_memory(v_pages, "v_pages");
  check_memory(block_table, "block_table");
  check_memory(seq_ids, "seq_ids");
  check_memory(lens, "lens");
  const int64_t max_seqs = block_table.size(0), stride = block_table.size(1);
  const int32_t* table = block_table.const_data_ptr<int32_t>();
  const int32_t* ids = seq_ids.const_data_ptr<int32_t>();
  const int32_t* ln = lens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(ids[b] >= 0 && ids[b] < max_seqs && ln[b] >= 0 && ln[b] <= stride * ps, "kfuse: seq_ids[", b, "] = ",
                ids[b], " or lens[", b, "] = ", ln[b], " out of range");
    for (int64_t j = 0; j < (ln[b] + ps - 1) / ps; ++j) {
      const int32_t page = table[ids[b] * stride + j];
      TORCH_CHECK(page >= 0 && page < num_pages, "kfuse: block_table[", ids[b], ", ", j, "] = ", page,
                  " is not a page, but lens[", b, "] = ", ln[b], " needs it");
    }
  }
  return {ps, hkv, d, stride};
}

// out [B, Hq, D] like q: decode attention of one token per sequence (see kv.h).
at::Tensor kv_decode_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                               const at::Tensor& block_table, const at::Tensor& seq_ids, const at::Tensor& lens,
                               double scale) {
  const KVAttn a = check_kv_attention(q, k_pages, v_pages, block_table, seq_ids, lens, q.dim() == 3 ? q.size(0) : -1);
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  kfuse::kv::decode_attention_cpu(to_dtype(q), q.const_data_ptr(), k_pages.const_data_ptr(), v_pages.const_data_ptr(),
                                  block_table.const_data_ptr<int32_t>(), a.stride, seq_ids.const_data_ptr<int32_t>(),
                                  lens.const_data_ptr<int32_t>(), out.data_ptr(), q.size(0), q.size(1), a.page_size,
                                  a.hkv, a.d, scale, at::get_num_threads());
  return out;
}

// out [sum(q_lens), Hq, D] like q: causal prefill attention of the last q_lens[i] tokens of each
// sequence (see kv.h).
at::Tensor kv_prefill_attention(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                const at::Tensor& block_table, const at::Tensor& seq_ids, const at::Tensor& lens,
                                const at::Tensor& q_lens, double scale) {
  const int64_t n = seq_ids.dim() == 1 ? seq_ids.size(0) : -1;
  const KVAttn a = check_kv_attention(q, k_pages, v_pages, block_table, seq_ids, lens, n);
  TORCH_CHECK(q_lens.is_cpu() && q_lens.dim() == 1 && q_lens.numel() == n && q_lens.is_contiguous() &&
                  q_lens.scalar_type() == at::kInt,
              "kfuse: q_lens must be a contiguous int32 [", n, "] CPU tensor");
  check_memory(q_lens, "q_lens");
  const int32_t* ql = q_lens.const_data_ptr<int32_t>();
  const int32_t* ln = lens.const_data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ql[i] >= 0 && ql[i] <= ln[i], "kfuse: q_lens[", i, "] = ", ql[i], " must be in [0, lens[", i, "] = ",
                ln[i], "]");
    total += ql[i];
  }
  TORCH_CHECK(total == q.size(0), "kfuse: q has ", q.size(0), " rows; q_lens sums to ", total);
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  kfuse::kv::prefill_attention_cpu(to_dtype(q), q.const_data_ptr(), k_pages.const_data_ptr(),
                                   v_pages.const_data_ptr(), block_table.const_data_ptr<int32_t>(), a.stride,
                                   seq_ids.const_data_ptr<int32_t>(), ln, ql, out.data_ptr(), n, q.size(1),
                                   a.page_size, a.hkv, a.d, scale, at::get_num_threads());
  return out;
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
  py::class_<KVHostState>(m, "KVHostState",
                          "The host-side metadata of a PagedKVCache (block_table, seq_lens, npages, active, "
                          "page_refcount, free_stack, free_top: CPU tensors it updates in place); see csrc/kv/kv.h")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t>())
      .def("check_ids", &KVHostState::check_ids, py::arg("ids"), py::arg("what"))
      .def("rollback", &KVHostState::rollback, py::arg("ids"), py::arg("new_lens"), py::arg("check_lens"))
      .def("plan_step", &KVHostState::plan_step, py::arg("ids"), py::arg("counts"));
  m.attr("kv_decode_chunk") = kfuse::kv::kDecodeChunk;
  m.def("kv_decode_attention", &kv_decode_attention,
        "Paged decode attention (CPU): q [B, Hq, D], one layer's k_pages/v_pages [num_pages, page_size, Hkv, D], "
        "int32 block_table [max_seqs, P], seq_ids [B], lens [B]; returns out like q",
        py::arg("q"), py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"), py::arg("seq_ids"),
        py::arg("lens"), py::arg("scale"));
  m.def("kv_prefill_attention", &kv_prefill_attention,
        "Paged causal prefill attention (CPU): q packed [sum(q_lens), Hq, D], int32 q_lens [n], the rest as "
        "kv_decode_attention; returns out like q",
        py::arg("q"), py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"), py::arg("seq_ids"),
        py::arg("lens"), py::arg("q_lens"), py::arg("scale"));
}
