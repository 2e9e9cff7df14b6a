// Cache metadata on the host: the state of a CPU cache, or the host mirror of a CUDA one
// (python/kfuse/kv.py). Every function checks the whole request first and throws
// std::invalid_argument / std::out_of_range (ValueError / IndexError in Python) before it changes
// anything, so a bad request leaves the cache exactly as it was.
//
// Why C++: rollback of 256 sequences took 0.73 ms (256 tokens of context) to 2.45 ms (2048) in
// the Python host mirror (a loop over every dropped page), 37-123x the 20 us target; the same work
// over flat int32 arrays is O(sequences + dropped pages) machine instructions.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv.h"

namespace kfuse {
namespace kv {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

[[noreturn]] void value_error(const std::string& msg) { throw std::invalid_argument(msg); }

// Writes `v` to `*p`, logging its offset when the state keeps a write log (p lies in base's buffer).
inline void put(const HostState& st, int32_t* p, int32_t v) {
  *p = v;
  if (st.written) st.written->push_back(p - st.base);
}

}  // namespace

void take_writes(const HostState& st, std::vector<int64_t>& offsets, std::vector<int32_t>& values) {
  offsets.clear();
  values.clear();
  if (!st.written) return;
  offsets.swap(*st.written);
  std::sort(offsets.begin(), offsets.end());
  offsets.erase(std::unique(offsets.begin(), offsets.end()), offsets.end());
  values.reserve(offsets.size());
  for (int64_t o : offsets) values.push_back(st.base[o]);
}

void check_ids(const HostState& st, const int64_t* ids, int64_t n, const char* what) {
  std::vector<uint8_t> seen(static_cast<size_t>(st.max_seqs), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = ids[i];
    if (s < 0 || s >= st.max_seqs)
      throw std::out_of_range(std::string(what) + ": sequence id " + std::to_string(s) + " out of range [0, " +
                              std::to_string(st.max_seqs) + ")");
    if (!st.active[s])
      value_error(std::string(what) + ": sequence " + std::to_string(s) + " is not active (never added, or freed)");
    if (seen[s]) value_error(std::string(what) + ": duplicate sequence id " + std::to_string(s));
    seen[s] = 1;
  }
}

void rollback(const HostState& st, const int64_t* ids, const int64_t* new_lens, int64_t n, bool check_lens) {
  check_ids(st, ids, n, "seq_ids");
  for (int64_t i = 0; i < n; ++i) {
    // Without check_lens still within the pages the row holds: a negative length indexed the row from page
    // -2, a longer one set npages past them (a later rollback then decremented ref[-1]: another row's
    // length; registered-ops hunt, review).
    const int64_t hi = check_lens ? st.lens[ids[i]] : int64_t(st.npages[ids[i]]) * st.page_size;
    if (new_lens[i] < 0 || new_lens[i] > hi)
      value_error("new_lens: " + std::to_string(new_lens[i]) + " for sequence " + std::to_string(ids[i]) +
                  " is outside [0, " + (check_lens ? "current length " : "its pages' capacity ") +
                  std::to_string(hi) + "]");
  }
  const int64_t P = st.max_pages;
  // 1. Drop references past each new last page.
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* row = st.table + ids[i] * P;
    for (int64_t j = ceil_div(new_lens[i], st.page_size); j < st.npages[ids[i]]; ++j)
      put(st, &st.ref[row[j]], st.ref[row[j]] - 1);
  }
  // 2. Push the pages that reached 0, in the order the device half (kv.py: _rollback_device) pushes
  // them: by the flat index i * P + j of each page's last dropped occurrence. Walking backwards,
  // the first sighting of a page is its last occurrence; -1 marks it as taken until step 3.
  std::vector<int32_t> freed;
  for (int64_t i = n - 1; i >= 0; --i) {
    const int32_t* row = st.table + ids[i] * P;
    for (int64_t j = st.npages[ids[i]] - 1; j >= ceil_div(new_lens[i], st.page_size); --j) {
      if (st.ref[row[j]] == 0) {
        st.ref[row[j]] = -1;
        freed.push_back(row[j]);
      }
    }
  }
  int32_t top = *st.free_top;
  for (auto it = freed.rbegin(); it != freed.rend(); ++it) {
    st.ref[*it] = 0;  // logged as a write in step 1 already
    put(st, &st.free_stack[top++], *it);
  }
  put(st, st.free_top, top);
  // 3. Cut the rows and set the lengths.
  for (int64_t i = 0; i < n; ++i) {
    int32_t* row = st.table + ids[i] * P;
    const int64_t keep = ceil_div(new_lens[i], st.page_size);
    for (int64_t j = keep; j < st.npages[ids[i]]; ++j) put(st, &row[j], -1);
    st.npages[ids[i]] = static_cast<int32_t>(keep);  // host-only
    put(st, &st.lens[ids[i]], static_cast<int32_t>(new_lens[i]));
  }
}

void fork(const HostState& st, int64_t src, int64_t child, int64_t length) {
  const int64_t ids[2] = {src, child};
  check_ids(st, ids, 2, "fork");
  if (length < 0 || length > st.lens[src])
    value_error("length: " + std::to_string(length) + " is outside [0, length of sequence " + std::to_string(src) +
                " = " + std::to_string(st.lens[src]) + "]");
  if (st.npages[child] != 0 || st.lens[child] != 0)
    value_error("fork: sequence " + std::to_string(child) + " must be empty to become a child");
  const int64_t P = st.max_pages, keep = ceil_div(length, st.page_size);
  const int32_t* srow = st.table + src * P;
  int32_t* crow = st.table + child * P;
  for (int64_t j = 0; j < keep; ++j) {  // the pages of one row are distinct
    put(st, &crow[j], srow[j]);
    put(st, &st.ref[srow[j]], st.ref[srow[j]] + 1);
  }
  st.npages[child] = static_cast<int32_t>(keep);  // host-only
  put(st, &st.lens[child], static_cast<int32_t>(length));
}

StepPlan plan_step(const HostState& st, const int64_t* ids, const int64_t* counts, int64_t n) {
  check_ids(st, ids, n, "seq_ids");
  const int64_t ps = st.page_size, P = st.max_pages, cap = P * ps;
  int64_t need = 0, total = 0;
  std::vector<int32_t> shared;  // the shared partial last pages written this step, one entry per writer
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = ids[i], c = counts[i], len = st.lens[s];
    if (c < 0) value_error("counts must be >= 0; got " + std::to_string(c) + " for sequence " + std::to_string(s));
    // c > cap - len, not len + c > cap: a count near 2^63 would wrap the sum and pass.
    if (c > cap - len)
      value_error("counts: sequence " + std::to_string(s) + " has " + std::to_string(len) + " tokens and " +
                  std::to_string(c) + " more would pass max_pages_per_seq*page_size = " + std::to_string(cap));
    const int64_t end = len + c;
    if (c == 0) continue;
    total += c;
    need += ceil_div(end, ps) - st.npages[s];
    if (len % ps && st.ref[st.table[s * P + len / ps]] > 1) shared.push_back(st.table[s * P + len / ps]);
  }
  // Copy-on-write: of h writers into a page of refcount r, the first min(h, r - 1) copy it and
  // the last holder, if it writes too, finds refcount 1 and writes in place (the loop below).
  // Counting one page per writer refused a parent and its fork appending in one step near a full pool.
  std::sort(shared.begin(), shared.end());
  for (size_t i = 0, j = 0; i < shared.size(); i = j) {
    while (j < shared.size() && shared[j] == shared[i]) ++j;
    need += std::min<int64_t>(static_cast<int64_t>(j - i), st.ref[shared[i]] - 1);
  }
  const int64_t top = *st.free_top;
  if (need > top)
    value_error("counts: the step needs " + std::to_string(need) + " new pages; only " + std::to_string(top) +
                " of " + std::to_string(st.num_pages) + " are free (pool exhausted)");
  StepPlan plan;
  plan.slots.reserve(total);
  int32_t t = static_cast<int32_t>(top);
  auto set_entry = [&](int64_t s, int64_t j, int32_t page) {
    put(st, &st.table[s * P + j], page);
    put(st, &st.ref[page], st.ref[page] + 1);
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = ids[i], c = counts[i], len = st.lens[s], end = len + c;
    if (c == 0) continue;
    int32_t* row = st.table + s * P;
    if (len % ps && st.ref[row[len / ps]] > 1) {  // the partial last page is shared: copy it first
      const int32_t old = row[len / ps], fresh = st.free_stack[--t];
      plan.cow_src.push_back(old);
      plan.cow_dst.push_back(fresh);
      put(st, &st.ref[old], st.ref[old] - 1);
      set_entry(s, len / ps, fresh);
    }
    for (int64_t j = st.npages[s]; j < ceil_div(end, ps); ++j) set_entry(s, j, st.free_stack[--t]);
    st.npages[s] = static_cast<int32_t>(ceil_div(end, ps));
    for (int64_t pos = len; pos < end; ++pos) plan.slots.push_back(row[pos / ps] * ps + pos % ps);
  }
  // Only when pages were taken: an unchanged free_top in the log would cost a step that allocates
  // nothing (most decode steps) a host-to-device copy and a scatter on a CUDA cache.
  if (t != top) put(st, st.free_top, t);
  return plan;
}

void advance(const HostState& st, const int64_t* ids, const int64_t* counts, int64_t n) {
  // Ids in range and lengths within the rows' capacity, before any write (an id past max_seqs wrote out of
  // bounds, a negative one another row's table entry, a negative count a negative length; registered-ops
  // hunt). O(n): kfuse's own caller passes the ids and counts of the step it checked when it opened it.
  const int64_t cap = st.max_pages * st.page_size;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= st.max_seqs)
      throw std::out_of_range("seq_ids: sequence id " + std::to_string(ids[i]) + " out of range [0, " +
                              std::to_string(st.max_seqs) + ")");
    if (counts[i] < 0 || counts[i] > cap - st.lens[ids[i]])  // (not lens + counts: it could wrap)
      value_error("counts: " + std::to_string(counts[i]) + " new tokens for sequence " + std::to_string(ids[i]) +
                  " (length " + std::to_string(st.lens[ids[i]]) + ") is outside [0, capacity " +
                  std::to_string(cap) + " - length]");
  }
  for (int64_t i = 0; i < n; ++i) put(st, &st.lens[ids[i]], static_cast<int32_t>(st.lens[ids[i]] + counts[i]));
}

}  // namespace kv
}  // namespace kfuse
