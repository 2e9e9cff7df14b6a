// The one translation unit that sees torch: checks tensors, maps dtypes, picks the stream,
// and calls the framework-free kernels in csrc/<op>/. User-facing validation (messages that
// name the argument) lives in python/kfuse/ops/<op>.py; the checks here are invariants.
#include <torch/extension.h>

#include <cstring>
#include <numeric>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>

#ifdef KFUSE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "common.h"
#include "cpu_isa.h"
#include "deu/deu.h"
#include "embedding/embedding.h"
#include "kv/kv.h"
#include "lora/lora.h"

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

// A new CPU tensor of zeros; one of 2 MiB or more comes straight from the kernel: its pages are zero already
// (no memset pass), 2 MiB aligned and advised for transparent huge pages, as torch's allocator does under
// THP_MEM_ALLOC_ENABLE=1. For dense embedding gradients, new every step and mostly past glibc's 32 MiB mmap
// threshold: at::zeros page-faulted once every 4 KiB, then wrote every byte. 32 tables of 100k x 128 fp32,
// B 512 bags of 20, 1 thread, forward + backward: 1.74 s and 400k faults a step -> 0.48 s and 800; without
// huge pages (the advice refused or THP off) 0.76 s (bench/results/2026-12-08-cpu-embedding-gradient-pages.md).
// Not used for the sparse gradients' values (a few MB, which glibc reuses from its heap: fresh mappings
// measured 1.2x slower at that shape, 3.3x without huge pages). The storage is not resizable (at::from_blob).
at::Tensor fresh_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kHuge) {
    const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
    void* const mapped = mmap(nullptr, len + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped != MAP_FAILED) {
      char* const base = static_cast<char*>(mapped);
      char* const p = base + (kHuge - reinterpret_cast<uintptr_t>(base) % kHuge) % kHuge;
      if (p > base) munmap(base, p - base);
      munmap(p + len, kHuge - (p - base));
      madvise(p, len, MADV_HUGEPAGE);  // refused where the kernel has no THP: 4 KiB pages then
      return at::from_blob(p, sizes, [len](void* q) { munmap(q, len); }, options);
    }
  }
#endif
  return at::zeros(sizes, options);
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
// state tensors would cost more than the work itself (~0.4 us each). With `flat` (a CUDA cache's
// host mirror: the int32 buffer that table, lens, ref, free_stack and free_top are views of),
// rollback, fork and plan_step also return the writes to replay on the device copy (kv.h:
// take_writes).
class KVHostState {
 public:
  KVHostState(at::Tensor table, at::Tensor lens, at::Tensor npages, at::Tensor active, at::Tensor ref,
              at::Tensor free_stack, at::Tensor free_top, int64_t page_size, std::optional<at::Tensor> flat)
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
    if (flat) {
      const at::Tensor& f = *flat;
      TORCH_CHECK(f.is_cpu() && f.is_contiguous() && f.scalar_type() == at::kInt && f.dim() == 1,
                  "kfuse: flat must be a contiguous 1-D CPU int32 tensor");
      const int32_t* lo = f.const_data_ptr<int32_t>();
      for (int i : {0, 1, 4, 5, 6}) {  // the logged arrays must be views of flat
        const int32_t* p = tensors_[i].const_data_ptr<int32_t>();
        TORCH_CHECK(p >= lo && p + tensors_[i].numel() <= lo + f.numel(), "kfuse: ", names[i],
                    " must be a view of flat");
      }
      flat_ = f;
      st_.base = lo;
      st_.written = &log_;
    }
  }
  void check_ids(const at::Tensor& ids, const std::string& what) const {
    kfuse::kv::check_ids(st_, ptr(ids, "ids"), ids.numel(), what.c_str());
  }
  // An attention call's rows on a CPU cache with no step open (python/kfuse/ops/kv.py _sequences): ids checked
  // as check_ids, then (int32 [2, n]: ids, their committed lengths; the longest length, 0 for none). In Python
  // the lengths' lookup, the stack, the cast and the max took ~30-40 of a decode call's ~110 us of host time
  // (4 sequences, 16 heads of 64, 2-core Zen 3 VM, 2026-12-07).
  py::tuple call_rows(const at::Tensor& ids, const std::string& what) const {
    const int64_t n = ids.numel();
    const int64_t* id = ptr(ids, "ids");
    kfuse::kv::check_ids(st_, id, n, what.c_str());
    at::Tensor rows = at::empty({2, n}, at::kInt);
    int32_t* r = rows.data_ptr<int32_t>();
    int64_t longest = 0;
    for (int64_t i = 0; i < n; ++i) {
      r[i] = static_cast<int32_t>(id[i]);  // checked: in [0, max_seqs)
      r[n + i] = st_.lens[id[i]];
      longest = std::max<int64_t>(longest, r[n + i]);
    }
    return py::make_tuple(rows, longest);
  }
  // Returns the writes (int64 [2, m]: offsets into flat, then their values), or None without flat or
  // with log=false (graphed_rollback: its captured device half recomputes the state instead).
  py::object rollback(const at::Tensor& ids, const at::Tensor& new_lens, bool check_lens, bool log) {
    TORCH_CHECK(ids.numel() == new_lens.numel(), "kfuse: ids and new_lens differ in length");
    log_.clear();
    kfuse::kv::HostState st = st_;
    if (!log) st.written = nullptr;
    kfuse::kv::rollback(st, ptr(ids, "ids"), ptr(new_lens, "new_lens"), ids.numel(), check_lens);
    return log ? writes() : py::none();
  }
  py::object fork(int64_t src, int64_t child, int64_t length) {
    log_.clear();
    kfuse::kv::fork(st_, src, child, length);
    return writes();
  }
  // (plan, m, cow_src, cow_dst): int64 tensors and the number of logged writes. Without flat, plan is
  // the slots (page * page_size + slot of each new token, in ids order). With flat it is everything
  // the device copy needs for the step, to cross in one host-to-device copy (python/kfuse/kv.py
  // _open_step): the m writes (offsets, then values, as rollback's), advance's n writes (the offsets
  // of lens[ids], then lens[ids] + counts: nothing changes a length while a step is open), the slots.
  // token: the caller's number for this plan, which pending_copies(token) then answers for.
  py::tuple plan_step(const at::Tensor& ids, const at::Tensor& counts, int64_t token) {
    TORCH_CHECK(ids.numel() == counts.numel(), "kfuse: ids and counts differ in length");
    log_.clear();
    const int64_t n = ids.numel();
    const int64_t* id = ptr(ids, "ids");
    const int64_t* cnt = ptr(counts, "counts");
    const kfuse::kv::StepPlan p = kfuse::kv::plan_step(st_, id, cnt, n);
    auto t = [](const std::vector<int64_t>& v) { return at::tensor(v, at::kLong); };
    pending_ = {token, p.cow_src, p.cow_dst};  // the state has changed: from here on the plan can be undone
    if (!st_.written) return py::make_tuple(t(p.slots), 0, t(p.cow_src), t(p.cow_dst));
    std::vector<int64_t> off;
    std::vector<int32_t> val;
    kfuse::kv::take_writes(st_, off, val);
    const int64_t m = static_cast<int64_t>(off.size()), total = static_cast<int64_t>(p.slots.size());
    at::Tensor plan = at::empty({2 * m + 2 * n + total}, at::kLong);
    int64_t* o = plan.data_ptr<int64_t>();
    std::copy(off.begin(), off.end(), o);
    std::copy(val.begin(), val.end(), o + m);
    for (int64_t i = 0; i < n; ++i) {
      o[2 * m + i] = (st_.lens + id[i]) - st_.base;
      o[2 * m + n + i] = st_.lens[id[i]] + cnt[i];
    }
    std::copy(p.slots.begin(), p.slots.end(), o + 2 * m + 2 * n);
    return py::make_tuple(plan, m, t(p.cow_src), t(p.cow_dst));
  }
  // The copy-on-write pages (src, dst) of the plan numbered token, or None when the last plan made was another
  // (or none). Why: an interrupt (KeyboardInterrupt, a signal handler's exception) pending when plan_step
  // returns is raised before its caller has the returned value, yet the undo of the plan needs its copies
  // (process hunt, 2026-12-07: pages leaked, a forked sequence's page left unfilled after abort_step).
  py::object pending_copies(int64_t token) const {
    if (pending_.token != token) return py::none();
    return py::make_tuple(at::tensor(pending_.cow_src, at::kLong), at::tensor(pending_.cow_dst, at::kLong));
  }
  // lens[ids] += counts, once for the plan numbered token: a call repeated after an interrupt raised as the
  // first returned changes nothing. Returns no writes: the device copy's went with the step's plan.
  void advance(const at::Tensor& ids, const at::Tensor& counts, int64_t token) {
    TORCH_CHECK(ids.numel() == counts.numel(), "kfuse: ids and counts differ in length");
    if (token == advanced_) return;
    kfuse::kv::advance(st_, ptr(ids, "ids"), ptr(counts, "counts"), ids.numel());
    log_.clear();
    advanced_ = token;
  }

 private:
  static const int64_t* ptr(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), "kfuse: ", name,
                " must be a contiguous 1-D CPU int64 tensor");
    return t.const_data_ptr<int64_t>();
  }
  py::object writes() {
    if (!st_.written) return py::none();
    std::vector<int64_t> off;
    std::vector<int32_t> val;
    kfuse::kv::take_writes(st_, off, val);
    at::Tensor w = at::empty({2, static_cast<int64_t>(off.size())}, at::kLong);
    int64_t* o = w.data_ptr<int64_t>();
    for (size_t i = 0; i < off.size(); ++i) {
      o[i] = off[i];
      o[off.size() + i] = val[i];
    }
    return py::cast(w);
  }
  std::vector<at::Tensor> tensors_;
  at::Tensor flat_;
  std::vector<int64_t> log_;
  kfuse::kv::HostState st_{};
  struct Pending {
    int64_t token = -1;
    std::vector<int64_t> cow_src, cow_dst;
  } pending_;
  int64_t advanced_ = -1;
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
    TORCH_CHECK_VALUE(ids[b] >= 0 && ids[b] < max_seqs && ln[b] >= 0 && ln[b] <= stride * ps, "kfuse: seq_ids[", b,
                      "] = ", ids[b], " or lens[", b, "] = ", ln[b], " out of range");
    for (int64_t j = 0; j < (ln[b] + ps - 1) / ps; ++j) {
      const int32_t page = table[ids[b] * stride + j];
      TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "kfuse: block_table[", ids[b], ", ", j, "] = ", page,
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
    TORCH_CHECK_VALUE(ql[i] >= 0 && ql[i] <= ln[i], "kfuse: q_lens[", i, "] = ", ql[i], " must be in [0, lens[", i,
                      "] = ", ln[i], "]");
    total += ql[i];
  }
  TORCH_CHECK_VALUE(total == q.size(0), "kfuse: q has ", q.size(0), " rows; q_lens sums to ", total);
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  kfuse::kv::prefill_attention_cpu(to_dtype(q), q.const_data_ptr(), k_pages.const_data_ptr(),
                                   v_pages.const_data_ptr(), block_table.const_data_ptr<int32_t>(), a.stride,
                                   seq_ids.const_data_ptr<int32_t>(), ln, ql, out.data_ptr(), n, q.size(1),
                                   a.page_size, a.hkv, a.d, scale, at::get_num_threads());
  return out;
}

// ---- embedding -------------------------------------------------------------------------
// One call's tables and bags, checked: tensor invariants here (TORCH_CHECK), the values by
// kfuse::embedding::validate (std::invalid_argument / std::out_of_range: ValueError / IndexError
// naming the argument and the position). Holds the pointer arrays the kernel structs point into,
// so it is neither copied nor moved.
class EmbeddingCall {
 public:
  EmbeddingCall(const std::vector<at::Tensor>& weights, const at::Tensor& indices, const at::Tensor& offsets,
                const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx, int64_t pooling,
                const std::optional<at::Tensor>& psw)
      : feature_table_(feature_table), padding_idx_(padding_idx) {
    TORCH_CHECK(!weights.empty(), "kfuse: weights must hold at least one table");
    const int64_t T = static_cast<int64_t>(weights.size());
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& w = weights[t];
      TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == weights[0].scalar_type(),
                  "kfuse: weights[", t, "] must be a contiguous 2-D CPU tensor of weights[0]'s dtype");
      check_memory(w, "weights");
      ptrs_.push_back(w.data_ptr());
      rows_.push_back(w.size(0));
      dims_.push_back(w.size(1));
    }
    TORCH_CHECK(static_cast<int64_t>(padding_idx.size()) == T, "kfuse: padding_idx must have one entry per table");
    TORCH_CHECK(indices.is_cpu() && indices.dim() == 1 && indices.is_contiguous() && offsets.is_cpu() &&
                    offsets.dim() == 1 && offsets.is_contiguous() && offsets.scalar_type() == indices.scalar_type() &&
                    (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
                "kfuse: indices and offsets must be contiguous 1-D CPU tensors, both int32 or both int64");
    check_memory(indices, "indices");
    check_memory(offsets, "offsets");
    const int64_t F = static_cast<int64_t>(feature_table.size()), N = indices.numel();
    if (psw) {
      TORCH_CHECK(psw->is_cpu() && psw->dim() == 1 && psw->is_contiguous() &&
                      psw->scalar_type() == acc_type(weights[0]),
                  "kfuse: per_sample_weights must be a contiguous 1-D CPU tensor in the accumulation dtype");
      check_memory(*psw, "per_sample_weights");
      if (psw->numel() != N)
        throw std::invalid_argument("per_sample_weights must have one weight per index: " + std::to_string(N) +
                                    " indices, " + std::to_string(psw->numel()) + " weights");
    }
    tables = {to_dtype(weights[0]), T, ptrs_.data(), rows_.data(), dims_.data(), padding_idx_.data()};
    bags = {indices.const_data_ptr(), offsets.const_data_ptr(), indices.scalar_type() == at::kLong, N, F,
            F > 0 ? (offsets.numel() - 1) / F : 0, feature_table_.data(), pooling,
            psw ? psw->const_data_ptr() : nullptr};
    kfuse::embedding::validate(tables, bags, offsets.numel());
    width = kfuse::embedding::out_width(tables, bags);
    options = weights[0].options();
  }
  EmbeddingCall(const EmbeddingCall&) = delete;
  EmbeddingCall& operator=(const EmbeddingCall&) = delete;

  void check_grad_out(const at::Tensor& grad_out) const {
    TORCH_CHECK(grad_out.is_cpu() && grad_out.is_contiguous() && grad_out.dim() == 2 && grad_out.size(0) == bags.B &&
                    grad_out.size(1) == width && grad_out.scalar_type() == options.dtype(),
                "kfuse: grad_out must be a contiguous [", bags.B, ", ", width, "] CPU tensor of the tables' dtype");
    check_memory(grad_out, "grad_out");
  }

  kfuse::embedding::Tables tables{};
  kfuse::embedding::Bags bags{};
  int64_t width = 0;
  at::TensorOptions options;

 private:
  std::vector<void*> ptrs_;
  std::vector<int64_t> rows_, dims_, feature_table_, padding_idx_;
};

// [B, out_width] in the tables' dtype.
at::Tensor embedding_forward(const std::vector<at::Tensor>& weights, const at::Tensor& indices,
                             const at::Tensor& offsets, const std::vector<int64_t>& feature_table,
                             const std::vector<int64_t>& padding_idx, int64_t pooling,
                             const std::optional<at::Tensor>& per_sample_weights) {
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights);
  at::Tensor out = at::empty({c.bags.B, c.width}, c.options);
  if (out.numel() > 0) kfuse::embedding::forward_cpu(c.tables, c.bags, out.data_ptr(), at::get_num_threads());
  return out;
}

// Per table, in order: (unique rows int64 [U] ascending, their gradients [U, dim] in the accumulation dtype; no
// rows' where !need[t]).
std::vector<std::tuple<at::Tensor, at::Tensor>> sparse_sums(const EmbeddingCall& c, const at::Tensor& grad_out,
                                                            const std::vector<at::Tensor>& weights,
                                                            const std::vector<bool>& need) {
  c.check_grad_out(grad_out);
  TORCH_CHECK(need.size() == weights.size(), "kfuse: need has ", need.size(), " entries for ", weights.size(),
              " tables");
  const int nt = at::get_num_threads();
  const kfuse::embedding::Plan plan = kfuse::embedding::plan_backward(c.tables, c.bags, nt);
  std::vector<std::tuple<at::Tensor, at::Tensor>> result;
  std::vector<void*> grads;
  for (size_t t = 0; t < weights.size(); ++t) {
    const std::vector<int64_t>& r = plan.tables[t].rows;
    at::Tensor rows = at::empty({static_cast<int64_t>(r.size())}, at::kLong);
    std::copy(r.begin(), r.end(), rows.data_ptr<int64_t>());
    at::Tensor g = at::empty({need[t] ? rows.size(0) : 0, weights[t].size(1)}, c.options.dtype(acc_type(weights[0])));
    grads.push_back(need[t] ? g.data_ptr() : nullptr);
    result.emplace_back(rows, g);
  }
  kfuse::embedding::backward_rows_cpu(c.tables, c.bags, plan, grad_out.const_data_ptr(), grads.data(), false, nt);
  return result;
}

// Per table, in order: (unique rows int64 [U] ascending, their gradients [U, dim] in the accumulation
// dtype).
std::vector<std::tuple<at::Tensor, at::Tensor>> embedding_backward_sparse(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& weights, const at::Tensor& indices,
    const at::Tensor& offsets, const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx,
    int64_t pooling, const std::optional<at::Tensor>& per_sample_weights) {
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights);
  return sparse_sums(c, grad_out, weights, std::vector<bool>(weights.size(), true));
}

// Per table, in order: where need[t], the gradient as a coalesced sparse COO tensor of the table's shape and dtype
// (embedding_backward_sparse's rows and sums, rounded to that dtype), else None. Built here, not by
// torch.sparse_coo_tensor in Python: ~14 us a table with warm caches (one table of 100k x 64, 2026-12-07).
std::vector<std::optional<at::Tensor>> embedding_backward_sparse_coo(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& weights, const at::Tensor& indices,
    const at::Tensor& offsets, const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx,
    int64_t pooling, const std::optional<at::Tensor>& per_sample_weights, const std::vector<bool>& need) {
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights);
  const std::vector<std::tuple<at::Tensor, at::Tensor>> sums = sparse_sums(c, grad_out, weights, need);
  std::vector<std::optional<at::Tensor>> result;
  for (size_t t = 0; t < weights.size(); ++t) {
    if (!need[t]) {
      result.push_back(std::nullopt);
      continue;
    }
    const auto& [rows, g] = sums[t];
    const at::Tensor v = g.scalar_type() == weights[t].scalar_type() ? g : g.to(weights[t].scalar_type());
    result.push_back(at::_sparse_coo_tensor_unsafe(rows.unsqueeze(0), v, weights[t].sizes(),
                                                   v.options().layout(at::kSparse), true));
  }
  return result;
}

// Per table, in order: the dense gradient [rows, dim] in the table's dtype where need[t], else None. It
// holds embedding_backward_sparse's sums rounded to that dtype, written in place (no row-sparse copy: a
// hot table's gradient peaked at 2x torch's with one, and fp16/bf16 at 2.45x; memory hunt).
std::vector<std::optional<at::Tensor>> embedding_backward_dense(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& weights, const at::Tensor& indices,
    const at::Tensor& offsets, const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx,
    int64_t pooling, const std::optional<at::Tensor>& per_sample_weights, const std::vector<bool>& need) {
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights);
  c.check_grad_out(grad_out);
  TORCH_CHECK(need.size() == weights.size(), "kfuse: need has ", need.size(), " entries for ", weights.size(),
              " tables");
  const int nt = at::get_num_threads();
  const kfuse::embedding::Plan plan = kfuse::embedding::plan_backward(c.tables, c.bags, nt);
  std::vector<std::optional<at::Tensor>> result;
  std::vector<void*> grads;
  for (size_t t = 0; t < weights.size(); ++t) {
    at::Tensor g = need[t] ? fresh_zeros(weights[t].sizes(), c.options) : at::Tensor();
    grads.push_back(need[t] ? g.data_ptr() : nullptr);
    result.push_back(need[t] ? std::optional<at::Tensor>(g) : std::nullopt);
  }
  kfuse::embedding::backward_rows_cpu(c.tables, c.bags, plan, grad_out.const_data_ptr(), grads.data(), true, nt);
  return result;
}

// grad of per_sample_weights: [N] in the accumulation dtype.
at::Tensor embedding_backward_psw(const at::Tensor& grad_out, const std::vector<at::Tensor>& weights,
                                  const at::Tensor& indices, const at::Tensor& offsets,
                                  const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx) {
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, 0, std::nullopt);
  c.check_grad_out(grad_out);
  at::Tensor grad_psw = at::empty({c.bags.N}, c.options.dtype(acc_type(weights[0])));
  if (c.bags.N > 0)
    kfuse::embedding::backward_psw_cpu(c.tables, c.bags, grad_out.const_data_ptr(), grad_psw.data_ptr(),
                                       at::get_num_threads());
  return grad_psw;
}

// The fused optimizer's count of updates (MultiTableEmbeddingBag.optimizer_step), advanced by the call that
// makes update `step`, in the same call: advanced by the caller afterwards, an interrupt raised as the call
// returned left the tables updated and the count not (the next step reused Adam's bias correction and the
// rounding seed; process hunt, 2026-12-07). Checked before anything changes.
int64_t* step_counter(const at::Tensor& sc, int64_t step) {
  TORCH_CHECK(sc.is_cpu() && sc.scalar_type() == at::kLong && sc.numel() == 1 && !sc.is_inference(),
              "kfuse: step_count must be a one-element int64 CPU tensor (not an inference tensor)");
  int64_t* count = sc.data_ptr<int64_t>();
  TORCH_CHECK(*count == step - 1, "kfuse: step_count holds ", *count, "; this update is step ", step);
  return count;
}
void advance_step_counter(const at::Tensor& sc, int64_t* count) {
  ++*count;
  sc.unsafeGetTensorImpl()->bump_version();
}

// dsts[i][rows[i]] = vals[i] for each i, then the step count advanced: the fused optimizer's update where
// Python computes it (the reference backend, rows all-reduced across processes), written in one call.
void embedding_apply_rows(const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& rows,
                          const std::vector<at::Tensor>& vals, const at::Tensor& step_count, int64_t step) {
  TORCH_CHECK(dsts.size() == rows.size() && rows.size() == vals.size(), "kfuse: dsts, rows and vals differ in length");
  int64_t* count = step_counter(step_count, step);
  {
    const at::NoGradGuard no_grad;
    for (size_t i = 0; i < dsts.size(); ++i) dsts[i].index_put_({rows[i]}, vals[i]);
  }
  advance_step_counter(step_count, count);
}

// The backward with a fused optimizer: updates weights (and the states) in place.
void embedding_backward_fused(const at::Tensor& grad_out, const std::vector<at::Tensor>& weights,
                              const at::Tensor& indices, const at::Tensor& offsets,
                              const std::vector<int64_t>& feature_table, const std::vector<int64_t>& padding_idx,
                              int64_t pooling, const std::optional<at::Tensor>& per_sample_weights,
                              const std::string& optimizer, const std::vector<at::Tensor>& states1,
                              const std::vector<at::Tensor>& states2, double lr, double eps, double beta1,
                              double beta2, double weight_decay, int64_t step, int64_t seed,
                              const std::optional<at::Tensor>& step_count) {
  using kfuse::embedding::Optimizer;
  Optimizer kind;
  if (optimizer == "sgd") kind = Optimizer::sgd;
  else if (optimizer == "rowwise_adagrad") kind = Optimizer::rowwise_adagrad;
  else if (optimizer == "adam") kind = Optimizer::adam;
  else throw std::invalid_argument("optimizer must be 'sgd', 'rowwise_adagrad' or 'adam'; got '" + optimizer + "'");
  if (step < 1) throw std::invalid_argument("step must be >= 1 (the update count, this one included); got " +
                                            std::to_string(step));
  int64_t* count = step_count ? step_counter(*step_count, step) : nullptr;
  const EmbeddingCall c(weights, indices, offsets, feature_table, padding_idx, pooling, per_sample_weights);
  c.check_grad_out(grad_out);
  // States: rowwise_adagrad one per row [rows], adam m and v [rows, dim], in the accumulation dtype.
  const size_t n1 = kind == Optimizer::sgd ? 0 : weights.size(), n2 = kind == Optimizer::adam ? weights.size() : 0;
  TORCH_CHECK(states1.size() == n1 && states2.size() == n2, "kfuse: ", optimizer, " takes ", n1, " states1 and ", n2,
              " states2 tensors (one per table); got ", states1.size(), " and ", states2.size());
  std::vector<void*> s1, s2;
  auto check_state = [&](const at::Tensor& s, const at::Tensor& w, bool per_row, const char* name) {
    TORCH_CHECK(s.is_cpu() && s.is_contiguous() && s.scalar_type() == acc_type(w) &&
                    (per_row ? s.dim() == 1 && s.size(0) == w.size(0) : s.sizes() == w.sizes()),
                "kfuse: each of ", name, " must be a contiguous CPU tensor in the accumulation dtype, ",
                per_row ? "[rows] of its table" : "shaped like its table");
    check_memory(s, name);
    return s.data_ptr();
  };
  for (size_t t = 0; t < n1; ++t)
    s1.push_back(check_state(states1[t], weights[t], kind == Optimizer::rowwise_adagrad, "states1"));
  for (size_t t = 0; t < n2; ++t) s2.push_back(check_state(states2[t], weights[t], false, "states2"));
  const kfuse::embedding::OptimizerArgs opt{kind, lr, eps, beta1, beta2, weight_decay, step,
                                            static_cast<uint32_t>(seed), n1 ? s1.data() : nullptr,
                                            n2 ? s2.data() : nullptr};
  const int nt = at::get_num_threads();
  const kfuse::embedding::Plan plan = kfuse::embedding::plan_backward(c.tables, c.bags, nt);
  kfuse::embedding::backward_fused_cpu(c.tables, c.bags, plan, grad_out.const_data_ptr(), opt, nt);
  if (count) advance_step_counter(*step_count, count);
}

// A plain strided tensor: not nested, and no dispatch key that makes it something else (a lazy negation or
// conjugation, a functorch or functionalization wrapper, Python dispatch, a zero tensor).
bool plain_strided(const at::Tensor& t) {
  static const c10::DispatchKeySet other({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                          c10::DispatchKey::Functionalize, c10::DispatchKey::Conjugate,
                                          c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor,
                                          c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::Batched,
                                          c10::DispatchKey::FuncTorchGradWrapper});
  return t.layout() == at::kStrided && !t.is_nested() && !t.key_set().has_any(other);
}

// An ordinary tensor the kernels read in place: plain strided (above) and contiguous.
bool ordinary(const at::Tensor& t) { return plain_strided(t) && t.is_contiguous(); }

// The plain tensor behind `obj` (a torch.Tensor or nn.Parameter, not a subclass, plain strided, on a CPU or CUDA
// device), or nullptr.
const at::Tensor* plain_tensor(const py::handle& obj) {
  if (!THPVariable_CheckExact(obj.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj.ptr());
  return plain_strided(t) && (t.is_cpu() || t.is_cuda()) ? &t : nullptr;
}

// The LoRA op's eager-path gate (python/kfuse/ops/lora.py _gate): the tensor checks of its validation and of its
// route in one call, where in Python they took ~25-30 us of a call run after a GEMM had streamed W through the
// caches (M = 1, 1024 x 1024 fp32, 2 threads: 109 against 80 us with them skipped; the GEMMs themselves 69).
// 0 unless x, weight, lora_A, lora_B (and bias, lora_bias when not None) are plain tensors (plain_tensor) on one
// device, no jit trace or torch dispatch mode is active, and every check of lora_linear's validation holds: x
// float16/bfloat16/float32/float64 [..., K]; weight x's dtype, [N, K] ([K, N] with fan_in_fan_out); lora_A [r, K]
// (r >= 1) float32 or x's dtype; lora_B [N, r] lora_A's dtype; bias [N] x's dtype; lora_bias [N] lora_A's dtype.
// Then 2 when autograd must record the call (grad mode on and an input requires grad), else 1. A 0 says nothing
// about the call: the full path validates it (and names what is wrong) and routes it.
int64_t lora_gate(const py::handle& x_obj, const py::handle& w_obj, const py::handle& a_obj, const py::handle& b_obj,
                  const py::handle& bias_obj, const py::handle& lbias_obj, bool fan_in_fan_out) {
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0) return 0;
  const at::Tensor* x = plain_tensor(x_obj);
  const at::Tensor* w = plain_tensor(w_obj);
  const at::Tensor* a = plain_tensor(a_obj);
  const at::Tensor* b = plain_tensor(b_obj);
  const at::Tensor* bias = bias_obj.is_none() ? nullptr : plain_tensor(bias_obj);
  const at::Tensor* lbias = lbias_obj.is_none() ? nullptr : plain_tensor(lbias_obj);
  if (!x || !w || !a || !b || (!bias_obj.is_none() && !bias) || (!lbias_obj.is_none() && !lbias)) return 0;
  const auto dt = x->scalar_type();
  if (dt != at::kHalf && dt != at::kBFloat16 && dt != at::kFloat && dt != at::kDouble) return 0;
  if (x->dim() < 1 || w->dim() != 2 || a->dim() != 2 || b->dim() != 2) return 0;
  const int64_t K = x->size(-1), N = w->size(fan_in_fan_out ? 1 : 0), r = a->size(0);
  const auto adt = a->scalar_type();
  if (w->scalar_type() != dt || w->size(fan_in_fan_out ? 0 : 1) != K || a->size(1) != K || r < 1 ||
      (adt != at::kFloat && adt != dt) || b->scalar_type() != adt || b->size(0) != N || b->size(1) != r)
    return 0;
  if (bias && (bias->dim() != 1 || bias->size(0) != N || bias->scalar_type() != dt)) return 0;
  if (lbias && (lbias->dim() != 1 || lbias->size(0) != N || lbias->scalar_type() != adt)) return 0;
  const at::Device dev = x->device();
  for (const at::Tensor* t : {w, a, b, bias, lbias})
    if (t && t->device() != dev) return 0;
  if (c10::GradMode::is_enabled())
    for (const at::Tensor* t : {x, w, a, b, bias, lbias})
      if (t && t->requires_grad()) return 2;
  return 1;
}

// The multi-adapter LoRA op's eager-path gate (python/kfuse/ops/lora.py _multi_gate), as lora_gate for
// lora_linear_multi: 1 when x, weight, A_stack, B_stack, scalings, ranks, adapter_ids (and bias when not None) are
// plain tensors on one device, no jit trace or torch dispatch mode is active, no input requires grad under grad mode
// (the op is forward-only: the full path warns and runs the reference), and every check of _validate_multi holds:
// x float16/bfloat16/float32/float64 [..., K]; weight x's dtype, [N, K] ([K, N] with fan_in_fan_out); A_stack
// [L, r_max, K] float32 or x's dtype; B_stack [L, N, r_max] A_stack's dtype; scalings [L] floating; ranks [L]
// int32/int64; adapter_ids int32/int64, x.shape[:-1] or [M] (M = the product of x.shape[:-1]); bias [N] x's dtype.
// Else 0, which says nothing about the call: the full path validates it (naming what is wrong) and routes it. The
// values of ids and ranks are not looked at (the op checks CPU ones after the gate).
int64_t lora_multi_gate(const py::handle& x_obj, const py::handle& w_obj, const py::handle& a_obj,
                        const py::handle& b_obj, const py::handle& s_obj, const py::handle& r_obj,
                        const py::handle& ids_obj, const py::handle& bias_obj, bool fan_in_fan_out) {
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0) return 0;
  const at::Tensor* x = plain_tensor(x_obj);
  const at::Tensor* w = plain_tensor(w_obj);
  const at::Tensor* a = plain_tensor(a_obj);
  const at::Tensor* b = plain_tensor(b_obj);
  const at::Tensor* sc = plain_tensor(s_obj);
  const at::Tensor* rk = plain_tensor(r_obj);
  const at::Tensor* ids = plain_tensor(ids_obj);
  const at::Tensor* bias = bias_obj.is_none() ? nullptr : plain_tensor(bias_obj);
  if (!x || !w || !a || !b || !sc || !rk || !ids || (!bias_obj.is_none() && !bias)) return 0;
  const auto dt = x->scalar_type();
  if (dt != at::kHalf && dt != at::kBFloat16 && dt != at::kFloat && dt != at::kDouble) return 0;
  if (x->dim() < 1 || w->dim() != 2 || a->dim() != 3 || b->dim() != 3 || sc->dim() != 1 || rk->dim() != 1)
    return 0;
  const int64_t K = x->size(-1), N = w->size(fan_in_fan_out ? 1 : 0), L = a->size(0), r_max = a->size(1);
  const auto adt = a->scalar_type();
  if (w->scalar_type() != dt || w->size(fan_in_fan_out ? 0 : 1) != K || a->size(2) != K ||
      (adt != at::kFloat && adt != dt) || b->scalar_type() != adt || b->size(0) != L || b->size(1) != N ||
      b->size(2) != r_max)
    return 0;
  if (sc->size(0) != L || !at::isFloatingType(sc->scalar_type()) || rk->size(0) != L) return 0;
  const auto is_int = [](at::ScalarType t) { return t == at::kInt || t == at::kLong; };
  if (!is_int(rk->scalar_type()) || !is_int(ids->scalar_type())) return 0;
  const auto lead = x->sizes().slice(0, x->dim() - 1);
  if (ids->sizes() != lead && !(ids->dim() == 1 && ids->size(0) == c10::multiply_integers(lead))) return 0;
  if (bias && (bias->dim() != 1 || bias->size(0) != N || bias->scalar_type() != dt)) return 0;
  const at::Device dev = x->device();
  for (const at::Tensor* t : {w, a, b, sc, rk, ids, bias})
    if (t && t->device() != dev) return 0;
  if (c10::GradMode::is_enabled())
    for (const at::Tensor* t : {x, w, a, b, sc, bias})
      if (t && t->requires_grad()) return 0;
  return 1;
}

// The cpu backend's dropout mask (lora.h): bool [M, K], True = kept. The arguments are checked in Python
// (ops/lora.py); these checks are invariants.
at::Tensor lora_dropout_keep(int64_t seed, int64_t M, int64_t K, double p) {
  TORCH_CHECK(seed >= 0 && M >= 0 && K >= 0 && p >= 0.0 && p < 1.0, "kfuse.lora_dropout_keep: bad arguments");
  at::Tensor keep = at::empty({M, K}, at::TensorOptions().dtype(at::kBool));
  if (keep.numel() > 0)
    kfuse::lora::dropout_keep_cpu(static_cast<uint64_t>(seed), M, K, static_cast<float>(p), keep.data_ptr<bool>(),
                                  at::get_num_threads());
  return keep;
}

// Each of srcs times the cpu backend's dropout mask (lora.h dropout_mul_cpu: one draw for all), in place where
// inplace[j], else into a new tensor; returns the results. srcs: contiguous float32/float64 CPU tensors of one shape
// [M, K] and dtype.
std::vector<at::Tensor> lora_dropout_mul(int64_t seed, const std::vector<at::Tensor>& srcs, double p,
                                         const std::vector<bool>& inplace) {
  TORCH_CHECK(seed >= 0 && p >= 0.0 && p < 1.0 && !srcs.empty() && srcs.size() == inplace.size(),
              "kfuse.lora_dropout_mul: bad arguments");
  const at::Tensor& first = srcs[0];
  for (const at::Tensor& t : srcs)
    TORCH_CHECK(t.dim() == 2 && t.device().is_cpu() && t.is_contiguous() && t.sizes() == first.sizes() &&
                    t.scalar_type() == first.scalar_type() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "kfuse.lora_dropout_mul: srcs must be contiguous float32/float64 CPU tensors of one shape [M, K] "
                "and dtype");
  std::vector<at::Tensor> dsts;
  for (size_t j = 0; j < srcs.size(); ++j) dsts.push_back(inplace[j] ? srcs[j] : at::empty_like(srcs[j]));
  if (first.numel() > 0) {
    const int n = static_cast<int>(srcs.size());
    const auto run = [&](auto zero) {
      using T = decltype(zero);
      std::vector<const T*> s;
      std::vector<T*> d;
      for (int j = 0; j < n; ++j) {
        s.push_back(srcs[j].data_ptr<T>());
        d.push_back(dsts[j].data_ptr<T>());
      }
      kfuse::lora::dropout_mul_cpu(static_cast<uint64_t>(seed), first.size(0), first.size(1), static_cast<float>(p),
                                   n, s.data(), d.data(), at::get_num_threads());
    };
    if (first.scalar_type() == at::kFloat) run(0.0f);
    else run(0.0);
  }
  return dsts;
}

// The embedding ops' per-table checks in one pass (python/kfuse/ops/embedding.py _check_weights): in Python
// they took ~0.9 us a table, and the route's and the metadata cache's per-table reads as much again: ~55 of
// the op's ~105 us of host time at FBGEMM's 32 tables (bench/host_launchers.py, 2-core CPU). None unless
// every table is a torch.Tensor or nn.Parameter (not a subclass) holding an ordinary tensor (above): 2-D, on a
// CPU or CUDA device, weights[0]'s dtype and device, at least one column; the caller's Python checks then name
// the table, or route the call. Otherwise (grad_table, key): the first table that requires grad (-1: none) and
// each table's (address, rows, columns), flattened.
py::object embedding_tables(const py::list& weights) {
  const Py_ssize_t n = PyList_GET_SIZE(weights.ptr());
  if (n == 0) return py::none();
  py::tuple key(3 * n);
  int64_t grad_table = -1;
  const at::Tensor* first = nullptr;
  for (Py_ssize_t t = 0; t < n; ++t) {
    PyObject* obj = PyList_GET_ITEM(weights.ptr(), t);  // borrowed: the list holds it
    if (!THPVariable_CheckExact(obj)) return py::none();
    const at::Tensor& w = THPVariable_Unpack(obj);
    if (w.dim() != 2 || !(w.is_cpu() || w.is_cuda()) || w.size(1) < 1 || !ordinary(w)) return py::none();
    if (first == nullptr) {
      first = &w;
    } else if (w.scalar_type() != first->scalar_type() || w.device() != first->device()) {
      return py::none();
    }
    if (grad_table < 0 && w.requires_grad()) grad_table = t;
    PyTuple_SET_ITEM(key.ptr(), 3 * t, PyLong_FromVoidPtr(const_cast<void*>(w.const_data_ptr())));
    PyTuple_SET_ITEM(key.ptr(), 3 * t + 1, PyLong_FromLongLong(w.size(0)));
    PyTuple_SET_ITEM(key.ptr(), 3 * t + 2, PyLong_FromLongLong(w.size(1)));
  }
  return py::make_tuple(grad_table, key);
}

// The embedding ops' eager CPU fast path (python/kfuse/ops/embedding.py _cpu_fast): the checks that choose it
// and the forward in one call, where the same checks in Python took ~24 us of a call run after a kernel had
// streamed megabytes through the caches (bench/results/2026-12-06-cpu-embedding-single-table.md). None unless
// every table is an ordinary 2-D CPU tensor (as embedding_tables) of one dtype that needs no gradient (grad
// mode off, or none requires it), indices and offsets are ordinary 1-D CPU tensors of one integer dtype, and no
// jit trace or torch dispatch mode is active; then embedding_forward of one feature per table, no padding and
// no per-sample weights. offsets: [T * B + 1], or [T * B] with append_last (len(indices) is then the last).
// Bad values raise as embedding_forward's do (the caller then runs the full path, which names them). With saved,
// (out, indices [N], offsets [T * B + 1], per-sample weights [N] in the accumulation dtype or None): what the
// backward reads (python/kfuse/ops/embedding.py _CpuFastEmbeddingBag, which calls this with grad mode off).
py::object embedding_forward_fast(const py::list& weights, const py::handle& indices, const py::handle& offsets,
                                  int64_t pooling, bool append_last, const py::handle& per_sample_weights,
                                  bool saved) {
  if (torch::jit::tracer::isTracing() || c10::impl::TorchDispatchModeTLS::stack_len() > 0) return py::none();
  const Py_ssize_t n = PyList_GET_SIZE(weights.ptr());
  const bool fixed = offsets.is_none();  // 2-D indices [B, L]: bags of L (one table)
  if (n == 0 || (fixed && n != 1) || !THPVariable_CheckExact(indices.ptr()) ||
      (!fixed && !THPVariable_CheckExact(offsets.ptr())))
    return py::none();
  const bool grad = c10::GradMode::is_enabled();
  std::vector<at::Tensor> ws;
  ws.reserve(n);
  for (Py_ssize_t t = 0; t < n; ++t) {
    PyObject* obj = PyList_GET_ITEM(weights.ptr(), t);
    if (!THPVariable_CheckExact(obj)) return py::none();
    const at::Tensor& w = THPVariable_Unpack(obj);
    if (w.dim() != 2 || !w.is_cpu() || w.size(1) < 1 || !ordinary(w) || (grad && w.requires_grad()) ||
        (t > 0 && w.scalar_type() != ws[0].scalar_type()))
      return py::none();
    ws.push_back(w);
  }
  const at::Tensor& input = THPVariable_Unpack(indices.ptr());
  if (input.dim() != (fixed ? 2 : 1) || !input.is_cpu() || !ordinary(input) ||
      (input.scalar_type() != at::kInt && input.scalar_type() != at::kLong))
    return py::none();
  // Per-sample weights (sum pooling): input's shape, the table's dtype (torch's rule), read in the accumulation
  // dtype. Before, such calls and 2-D input took the Python path: 1.6-3.4x torch's time at small sizes (CPU
  // hunt, 2026-12-07).
  std::optional<at::Tensor> psw;
  if (!per_sample_weights.is_none()) {
    if (pooling != 0 || !THPVariable_CheckExact(per_sample_weights.ptr())) return py::none();
    const at::Tensor& p = THPVariable_Unpack(per_sample_weights.ptr());
    if (!p.is_cpu() || !ordinary(p) || p.sizes() != input.sizes() || p.scalar_type() != ws[0].scalar_type() ||
        (grad && p.requires_grad()))
      return py::none();
    psw = p.reshape({-1}).to(acc_type(ws[0]));
  }
  const at::Tensor idx = fixed ? input.reshape({-1}) : input;
  at::Tensor offs;
  if (fixed) {  // bag b: [b L, (b + 1) L)
    const int64_t B = input.size(0), L = input.size(1);
    offs = L > 0 ? at::arange(0, B * L + 1, L, input.options()) : at::zeros({B + 1}, input.options());
  } else {
    const at::Tensor& off = THPVariable_Unpack(offsets.ptr());
    if (off.dim() != 1 || !off.is_cpu() || !ordinary(off) || idx.scalar_type() != off.scalar_type()) return py::none();
    offs = off;
    if (append_last) {  // B starts, then len(indices): what torch's include_last_offset=False means
      // (memcpy: narrow + copy_ + fill_ took 2.9 us of a 7 us call)
      const int64_t b = off.numel();
      offs = at::empty({b + 1}, off.options());
      if (b > 0) std::memcpy(offs.data_ptr(), off.const_data_ptr(), b * off.element_size());  // (null when empty)
      if (off.scalar_type() == at::kLong) offs.data_ptr<int64_t>()[b] = idx.numel();
      else offs.data_ptr<int32_t>()[b] = static_cast<int32_t>(idx.numel());
    }
  }
  std::vector<int64_t> feature_table(n), padding_idx(n, -1);
  std::iota(feature_table.begin(), feature_table.end(), int64_t(0));
  at::Tensor out;
  {
    py::gil_scoped_release release;
    out = embedding_forward(ws, idx, offs, feature_table, padding_idx, pooling, psw);
  }
  if (saved) return py::make_tuple(out, idx, offs, psw ? py::cast(*psw) : py::none());
  return py::cast(out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kfuse compiled kernels (CPU always; CUDA when built with it)";
  // The kernels run without the GIL, as torch's own ops do: Python threads (a server's, a data loader's)
  // go on while one runs (they stalled for its whole length). Their arguments are C++ types, converted
  // before the release. KVHostState's methods keep it: they build Python objects, and are short.
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("has_cuda", []() {
#ifdef KFUSE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_isa", []() { return std::string(kfuse::cpu::isa_name()); },
        "The ISA whose entries the CPU kernels with one per ISA run: avx512, avx2 or base (KFUSE_CPU_ISA lowers it).");
  m.def("sources_hash", []() { return std::string(KFUSE_SOURCES_HASH); },
        "Hash of csrc/ at build time; kfuse compares it with the tree to detect a stale build.");
  m.def("deu_forward", &deu_forward, release,
        "DEU along dim of a contiguous x, coeffs [N, 5] (N = x.shape[dim]); returns y, written into out "
        "(contiguous, like x) when given",
        py::arg("x"), py::arg("coeffs"), py::arg("dim"), py::arg("out") = py::none());
  m.def("deu_backward", &deu_backward, release,
        "DEU backward along dim of contiguous grad_y and x; returns (grad_x like x, grad_coeffs [N, 5])",
        py::arg("grad_y"), py::arg("x"), py::arg("coeffs"), py::arg("dim"));
  py::class_<KVHostState>(m, "KVHostState",
                          "The host-side metadata of a PagedKVCache (block_table, seq_lens, npages, active, "
                          "page_refcount, free_stack, free_top: CPU tensors it updates in place); see csrc/kv/kv.h")
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                    std::optional<at::Tensor>>(),
           py::arg("table"), py::arg("lens"), py::arg("npages"), py::arg("active"), py::arg("ref"),
           py::arg("free_stack"), py::arg("free_top"), py::arg("page_size"), py::arg("flat") = py::none())
      .def("check_ids", &KVHostState::check_ids, py::arg("ids"), py::arg("what"))
      .def("call_rows", &KVHostState::call_rows, py::arg("ids"), py::arg("what"))
      .def("rollback", &KVHostState::rollback, py::arg("ids"), py::arg("new_lens"), py::arg("check_lens"),
           py::arg("log") = true)
      .def("fork", &KVHostState::fork, py::arg("src"), py::arg("child"), py::arg("length"))
      .def("plan_step", &KVHostState::plan_step, py::arg("ids"), py::arg("counts"), py::arg("token"))
      .def("pending_copies", &KVHostState::pending_copies, py::arg("token"))
      .def("advance", &KVHostState::advance, py::arg("ids"), py::arg("counts"), py::arg("token"));
  m.attr("kv_decode_chunk") = kfuse::kv::kDecodeChunk;
  m.def("kv_decode_attention", &kv_decode_attention, release,
        "Paged decode attention (CPU): q [B, Hq, D], one layer's k_pages/v_pages [num_pages, page_size, Hkv, D], "
        "int32 block_table [max_seqs, P], seq_ids [B], lens [B]; returns out like q",
        py::arg("q"), py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"), py::arg("seq_ids"),
        py::arg("lens"), py::arg("scale"));
  m.def("kv_prefill_attention", &kv_prefill_attention, release,
        "Paged causal prefill attention (CPU): q packed [sum(q_lens), Hq, D], int32 q_lens [n], the rest as "
        "kv_decode_attention; returns out like q",
        py::arg("q"), py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"), py::arg("seq_ids"),
        py::arg("lens"), py::arg("q_lens"), py::arg("scale"));
  m.def("embedding_tables", &embedding_tables,
        "The embedding ops' table checks in one pass: None unless every table is an ordinary 2-D contiguous "
        "tensor of weights[0]'s dtype and device; else (first table requiring grad or -1, (address, rows, "
        "columns) of each table, flattened)",
        py::arg("weights"));
  m.def("lora_gate", &lora_gate,
        "The LoRA op's eager-path gate: 0 unless x, weight, lora_A, lora_B, bias, lora_bias are plain tensors on one "
        "device that pass every check of lora_linear's validation and no jit trace or dispatch mode is on; else 2 "
        "when autograd must record the call, 1 when not",
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("lora_bias"),
        py::arg("fan_in_fan_out"));
  m.def("lora_multi_gate", &lora_multi_gate,
        "The multi-adapter LoRA op's eager-path gate: 1 when its tensors are plain, on one device, pass every check "
        "of lora_linear_multi's validation, none requires grad under grad mode, and no jit trace or dispatch mode is "
        "on; else 0",
        py::arg("x"), py::arg("weight"), py::arg("A_stack"), py::arg("B_stack"), py::arg("scalings"),
        py::arg("ranks"), py::arg("adapter_ids"), py::arg("bias"), py::arg("fan_in_fan_out"));
  m.def("lora_dropout_keep", &lora_dropout_keep, release,
        "The LoRA cpu backend's dropout mask: bool [M, K], True where u(Philox4x32-10(seed, m * ceil(K/4) + k/4) "
        "word k % 4) >= p, the Triton kernels' draw",
        py::arg("seed"), py::arg("M"), py::arg("K"), py::arg("p"));
  m.def("lora_dropout_mul", &lora_dropout_mul, release,
        "Each of srcs times the LoRA cpu backend's dropout mask (lora_dropout_keep's, made row by row once for all, "
        "never stored), in place where inplace[j], else new; srcs contiguous float32/float64 [M, K] CPU tensors of "
        "one shape and dtype",
        py::arg("seed"), py::arg("srcs"), py::arg("p"), py::arg("inplace"));
  m.def("embedding_forward_fast", &embedding_forward_fast,
        "The embedding ops' eager CPU fast path: None unless every table, indices and offsets are ordinary CPU "
        "tensors, no table needs a gradient, and no jit trace or dispatch mode is on; else the forward of one "
        "feature per table, no padding (offsets [T * B], + len(indices) with append_last; None: one table and 2-D "
        "indices [B, L]), per-sample weights in input's shape and the tables' dtype (sum) or None; with saved, "
        "(out, flat indices, offsets [T * B + 1], flat per-sample weights in the accumulation dtype or None)",
        py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("pooling"), py::arg("append_last"),
        py::arg("per_sample_weights"), py::arg("saved") = false);
  m.def("embedding_forward", &embedding_forward, release,
        "Multi-table embedding bags (CPU): weights [T] tables [rows_t, dim_t] of one dtype, indices [N] and offsets "
        "[F * B + 1] (int32 or int64, feature-major), feature_table [F], padding_idx [T] (-1 = none), pooling "
        "(0 sum, 1 mean), per_sample_weights [N] in the accumulation dtype or None; returns [B, out_width]",
        py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"), py::arg("padding_idx"),
        py::arg("pooling"), py::arg("per_sample_weights"));
  m.def("embedding_backward_sparse", &embedding_backward_sparse, release,
        "Row-sparse gradient of each table: a list of (unique rows int64 [U] ascending, grads [U, dim_t] in the "
        "accumulation dtype); deterministic",
        py::arg("grad_out"), py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"),
        py::arg("padding_idx"), py::arg("pooling"), py::arg("per_sample_weights"));
  m.def("embedding_backward_sparse_coo", &embedding_backward_sparse_coo, release,
        "Sparse gradient of each table where need[t] (else None): a coalesced sparse COO tensor of the table's shape "
        "and dtype holding embedding_backward_sparse's rows and sums rounded to it; deterministic",
        py::arg("grad_out"), py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"),
        py::arg("padding_idx"), py::arg("pooling"), py::arg("per_sample_weights"), py::arg("need"));
  m.def("embedding_backward_dense", &embedding_backward_dense, release,
        "Dense gradient of each table where need[t] (else None): [rows_t, dim_t] in the tables' dtype, the row-sparse "
        "sums of embedding_backward_sparse rounded to it, zero elsewhere; deterministic",
        py::arg("grad_out"), py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"),
        py::arg("padding_idx"), py::arg("pooling"), py::arg("per_sample_weights"), py::arg("need"));
  m.def("embedding_backward_psw", &embedding_backward_psw, release,
        "Gradient of per_sample_weights (sum pooling): [N] in the accumulation dtype",
        py::arg("grad_out"), py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"),
        py::arg("padding_idx"));
  m.def("embedding_apply_rows", &embedding_apply_rows, release,
        "dsts[i][rows[i]] = vals[i] for each i (any device; no autograd), then step_count (int64 CPU, holding "
        "step - 1) advanced, in one call",
        py::arg("dsts"), py::arg("rows"), py::arg("vals"), py::arg("step_count"), py::arg("step"));
  m.def("embedding_backward_fused", &embedding_backward_fused, release,
        "Backward with a fused optimizer ('sgd', 'rowwise_adagrad' with states1 [rows_t], 'adam' with states1 = m "
        "and states2 = v [rows_t, dim_t]; states in the accumulation dtype): updates weights and states in place; "
        "fp16/bf16 tables round stochastically from (seed, step, table, row, col); step_count (int64 CPU, holding "
        "step - 1) is advanced with the update",
        py::arg("grad_out"), py::arg("weights"), py::arg("indices"), py::arg("offsets"), py::arg("feature_table"),
        py::arg("padding_idx"), py::arg("pooling"), py::arg("per_sample_weights"), py::arg("optimizer"),
        py::arg("states1"), py::arg("states2"), py::arg("lr"), py::arg("eps"), py::arg("beta1"), py::arg("beta2"),
        py::arg("weight_decay"), py::arg("step"), py::arg("seed"), py::arg("step_count") = py::none());
}
