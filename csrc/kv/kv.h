// KV-cache kernel entry points (framework-free: raw pointers and sizes; bindings.cpp checks the
// tensors). Layouts, as python/kfuse/kv.py documents them:
//   pools       [num_pages, page_size, num_kv_heads, head_dim] (one layer's slice), contiguous
//   block_table int32 [max_seqs, max_pages_per_seq], row-major, -1 = no page
//   seq_lens    int32 [max_seqs]; refcount int32 [num_pages]; free_stack int32 [num_pages + 1],
//   free_top int32 [1] (free pages are free_stack[:free_top], the last allocated first).
#pragma once

#include <cstdint>
#include <vector>

#include "../common.h"

namespace kfuse {
namespace kv {

// ---- cache metadata (kv_cache_cpu.cpp) ----------------------------------------------------
// The host-side metadata of a cache (a CPU cache's own state, or a CUDA cache's host mirror),
// int32 arrays as above plus npages [max_seqs] (table entries in use per row: a prefix) and
// active [max_seqs] (0/1). Ids, lengths and counts are int64 [n].
//
// Write log (a CUDA cache's host mirror): table, lens, ref, free_stack and free_top lie in one int32
// buffer starting at `base` (the device keeps the same layout); when `written` is set, rollback,
// fork, plan_step and advance append the offset of every int32 they write there (advance's are
// not replayed: its writes are known when the step opens), so the device copy replays the
// operation as one scatter of final values (take_writes) instead of recomputing it.
struct HostState {
  int32_t* table;
  int64_t max_pages;  // columns of table
  int32_t* lens;
  int32_t* npages;
  const uint8_t* active;
  int64_t max_seqs;
  int32_t* ref;
  int32_t* free_stack;
  int32_t* free_top;
  int64_t num_pages;
  int64_t page_size;
  const int32_t* base = nullptr;
  std::vector<int64_t>* written = nullptr;
};

// The log's (offsets, values) after an operation: offsets sorted and distinct, each with its
// final value base[offset]; clears the log.
void take_writes(const HostState& st, std::vector<int64_t>& offsets, std::vector<int32_t>& values);

// Checks that ids are in range (else std::out_of_range), active and distinct (else
// std::invalid_argument); messages start with `what`.
void check_ids(const HostState& st, const int64_t* ids, int64_t n, const char* what);

// Rollback: lens[ids[i]] = new_lens[i], table entries past each new last page set to -1, their
// refcounts decremented, pages reaching 0 pushed on the free stack (ordered by the flat index
// i * max_pages + j of each page's last dropped occurrence, as the device half orders them).
// check_lens: 0 <= new_lens[i] <= lens[ids[i]] is checked (abort_step passes the committed
// lengths with pages of the open step past them); without it 0 <= new_lens[i] <= the pages it holds.
// O(n + dropped pages).
void rollback(const HostState& st, const int64_t* ids, const int64_t* new_lens, int64_t n, bool check_lens);

// Fork: child (active, with no pages) gets src's first ceil(length / page_size) pages, whose
// refcounts rise by one, and length `length` (0 <= length <= lens[src], else std::invalid_argument
// before any change). O(pages shared).
void fork(const HostState& st, int64_t src, int64_t child, int64_t length);

// Opens a step: allocates the pages that counts[i] new tokens of ids[i] need (popping the free
// stack; a shared, partially filled last page is replaced by a fresh one: copy-on-write) and
// says where each token goes. lens are not changed (advance does that). O(n + new tokens).
struct StepPlan {
  std::vector<int64_t> slots;             // per new token, in ids order: page * page_size + position % page_size
  std::vector<int64_t> cow_src, cow_dst;  // pages to copy (K/V of every layer)
};
StepPlan plan_step(const HostState& st, const int64_t* ids, const int64_t* counts, int64_t n);

// Commits a step: lens[ids[i]] += counts[i] (logged). ids in range (else std::out_of_range) and
// 0 <= counts[i], lens + counts within the row's capacity (else std::invalid_argument), checked before
// any write; activity and distinctness are the caller's (those of the step it opened). O(n).
void advance(const HostState& st, const int64_t* ids, const int64_t* counts, int64_t n);

// ---- attention (kv_attention_cpu.cpp) -----------------------------------------------------
// q, out [tokens, num_q_heads, head_dim] and the pools (as above) share dtype; num_q_heads is a
// multiple of num_kv_heads; block_table rows have table_stride entries; seq_ids (table rows), lens
// and q_lens are int32 [batch] / [num_seqs]. Every entry a length needs is a valid page (the caller
// checks). Accumulation in float (double for f64). num_threads: the OpenMP team size
// (at::get_num_threads(), passed by the caller, as for deu).

// Decode chunk: a sequence's positions are split into chunks of this many (one task per chunk and
// KV head), merged in chunk order. A constant, never derived from the batch or the thread count,
// so a sequence's output bits depend only on itself. 512: decode of 2 x 4096 tokens (Hq 8, Hkv 2,
// D 64, fp32) took 0.49 ms on 2 threads against 0.67 ms with 256 and 0.59 ms with 1024 (1 thread:
// 1.43, 1.48, 1.29 ms); a 4k context still gives 8 tasks per KV head.
constexpr int64_t kDecodeChunk = 512;

// out[b, h] = softmax(q[b, h] . K[b, :lens[b]]^T * scale) . V[b, :lens[b]]; zeros for length 0.
void decode_attention_cpu(DType dtype, const void* q, const void* k_pages, const void* v_pages,
                          const int32_t* block_table, int64_t table_stride, const int32_t* seq_ids,
                          const int32_t* lens, void* out, int64_t batch, int64_t num_q_heads, int64_t page_size,
                          int64_t num_kv_heads, int64_t head_dim, double scale, int num_threads);
// q packed [sum(q_lens), num_q_heads, head_dim]: sequence i's rows are its last q_lens[i] <= lens[i]
// positions, each attending causally to positions 0 .. its own.
void prefill_attention_cpu(DType dtype, const void* q, const void* k_pages, const void* v_pages,
                           const int32_t* block_table, int64_t table_stride, const int32_t* seq_ids,
                           const int32_t* lens, const int32_t* q_lens, void* out, int64_t num_seqs,
                           int64_t num_q_heads, int64_t page_size, int64_t num_kv_heads, int64_t head_dim,
                           double scale, int num_threads);

}  // namespace kv
}  // namespace kfuse
