// Grouped-query attention of a ragged batch over the KV cache (float32, or bfloat16 for bfloat16
// models: its values widen to float32 as they are read, two vectors per load in lanes.h's even /
// odd order, and all arithmetic is float32), on the CPU, in one call per layer
// (engine/model/cpu_attention.py says why and how it is built).
//
// Every query row is computed the same way whatever else is in the step: its scores sum over the
// head dimension in order, its softmax and its value sum run over its own visible keys in order.
// So a token decoded alone and the same token verified among k drafts get bit-identical outputs,
// which keeps greedy speculation exact in float32.
//
// A long sequence's keys are split into chunks of kChunk at fixed positions (0, kChunk, ...), each
// one work item, merged in order: a few KV heads of one long sequence then fill every thread. A
// row's chunks depend only on its own visible keys, so the identity above holds across the split.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"
#include "lanes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using goodspeed::exp_lanes;
using goodspeed::fma;
using goodspeed::kWidth;
using goodspeed::Lanes;
using goodspeed::load;
using goodspeed::load_in_lane_order;
using goodspeed::load_lanes;
using goodspeed::prefetch_lines;
using goodspeed::store;
using goodspeed::store_in_order;
using goodspeed::to_float;
// Query rows per pass, their accumulators in registers. A pass of scores loads a page's vectors
// and broadcasts q once per row and head dimension: at 4 rows that ran at 0.68 of the multiply-add
// rate on a Zen 4 core, at 6 at 0.98. Verification's rows (3 heads x (1 + k) tokens for the default
// model) take fewer passes: verifying 1-4 drafts over 7,680 tokens ran 1.11-1.17x faster. AVX2's
// 16 registers hold 4 rows.
constexpr int64_t kTile = kWidth == 16 ? 6 : 4;
// tile(std::integral_constant<int, R>{}) for a tile of R = rows (1 .. 6) rows: its size a template
// argument, so that its accumulators are registers.
template <typename Tile>
void with_tile_rows(int64_t rows, Tile tile) {
  switch (rows) {
    case 6: return tile(std::integral_constant<int, 6>{});
    case 5: return tile(std::integral_constant<int, 5>{});
    case 4: return tile(std::integral_constant<int, 4>{});
    case 3: return tile(std::integral_constant<int, 3>{});
    case 2: return tile(std::integral_constant<int, 2>{});
    default: return tile(std::integral_constant<int, 1>{});
  }
}
// Keys per pass of the scores over the head dimension: one page of the cache's K
// (engine/kv_cache.py K_PAGE_TOKENS), so that a pass reads its page's 8 KB (head_dim 64) in order.
constexpr int64_t kKeysPerPass = 32;
// How far ahead of the K page line or the value row being read the kernel asks for lines. On an
// Intel Xeon (AMX host, 2 cores) the hardware prefetcher restarts at every 4 KB page of memory,
// which a bfloat16 K page of head_dim 64 fills exactly: asked for 2 KB ahead, a batch-1 step over
// 7,680 tokens ran 1.1x faster and a batch-8 one 1.16x (1 and 8 KB ahead: less; 4 KB as good in
// bfloat16, a little worse in float32).
constexpr int64_t kAheadBytes = 2048;
constexpr int kVectorsPerPass = kKeysPerPass / kWidth;

// scores[r, at + j] = q_r . k_j for R rows over the keys 0 .. num_keys of one segment of a page,
// summed over d in order (a fused multiply-add per d, from 0: the same arithmetic whatever the
// tile and wherever the segment starts). Key j's d-th value is at k_seg[d * page_tokens + j].
//
// v_seg (or nullptr): the same keys' value rows, asked for into L2 as the whole pages' scores go
// (two lines a d cover a page's values at head_dim 64 or 128), so that the value sums read them
// from cache and memory streams K and V at once: a bfloat16 step at batch 1 over 7,680 tokens cost
// 9.1-9.3 ms more than over 256 tokens against 9.7-10.1 without (Intel Xeon, AMX host; 3 pairs).
template <int R, typename T>
void score_tile(const float* const* q_rows, const T* k_seg, int64_t page_tokens, int64_t head_dim,
                int64_t num_keys, float* const* s_rows, int64_t at, const T* v_seg) {
  int64_t j = 0;
  const int64_t v_lines = v_seg ? (num_keys * head_dim * static_cast<int64_t>(sizeof(T)) + 63) / 64 : 0;
  const char* v_bytes = reinterpret_cast<const char*>(v_seg);
  int64_t v_line = 0;
  // a whole page's pass reads it in order, its lines asked for kAheadBytes ahead; the part-pages
  // at a segment's ends take the loops below
  for (; j + kKeysPerPass <= num_keys; j += kKeysPerPass) {
    Lanes acc[R][kVectorsPerPass] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      prefetch_lines(reinterpret_cast<const char*>(k_seg + d * page_tokens + j) + kAheadBytes, kKeysPerPass * sizeof(T));
      for (int i = 0; i < 2 && v_line < v_lines; ++i, ++v_line) __builtin_prefetch(v_bytes + 64 * v_line, 0, 2);
      Lanes k[kVectorsPerPass];
      load_lanes<kVectorsPerPass>(k_seg + d * page_tokens + j, k);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < kVectorsPerPass; ++c) acc[r][c] = fma(q_rows[r][d], k[c], acc[r][c]);
    }
    for (int r = 0; r < R; ++r) store_in_order<T, kVectorsPerPass>(s_rows[r] + at + j, acc[r]);
  }
  for (; j + kWidth <= num_keys; j += kWidth) {
    Lanes acc[R] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const Lanes k = load(k_seg + d * page_tokens + j);
      for (int r = 0; r < R; ++r) acc[r] = fma(q_rows[r][d], k, acc[r]);
    }
    for (int r = 0; r < R; ++r) store(s_rows[r] + at + j, acc[r]);
  }
  if (j == num_keys) return;
  // The last few keys, widened into one zero-padded vector per d, take vector multiply-adds too:
  // as scalar chains of head_dim dependent multiply-adds per key and row they cost a short
  // sequence's step as much as its whole pages (300 keys at batch 1 took 1.4x as long as 288).
  const int64_t num_left = num_keys - j;
  alignas(64) float tail[128 * kWidth];  // head_dim <= 128
  for (int64_t d = 0; d < head_dim; ++d) {
    float* lanes = tail + d * kWidth;
    for (int64_t i = 0; i < num_left; ++i) lanes[i] = to_float(k_seg[d * page_tokens + j + i]);
    std::fill(lanes + num_left, lanes + kWidth, 0.0f);
  }
  Lanes acc[R] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const Lanes k = load(tail + d * kWidth);
    for (int r = 0; r < R; ++r) acc[r] = fma(q_rows[r][d], k, acc[r]);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < num_left; ++i) s_rows[r][at + j + i] = acc[r][i];
}

// A block of keys at a time, every tile of rows over it, so that K is read from memory once.
constexpr int64_t kBlock = 1024;

// K as the cache stores one KV head of it: [pages, D, page_tokens], each page's keys transposed
// and contiguous, a sequence's pages one after another.
template <typename T>
struct PagedK {
  const T* head;
  int64_t page_tokens, head_dim;
  // key `pos`'s segment: its d-th value at segment[d * page_tokens]
  const T* segment(int64_t pos) const {
    return head + (pos / page_tokens) * head_dim * page_tokens + pos % page_tokens;
  }
  int64_t left_in_page(int64_t pos) const { return page_tokens - pos % page_tokens; }
};

// scores[r, 0 .. len] for the keys start .. start + len of the cache, a page's segment at a time.
template <typename T>
void score_run(const float* const* q_rows, int64_t rows, const PagedK<T>& k, int64_t start, int64_t len,
               float* const* s_rows, const T* v_run) {
  for (int64_t b0 = 0; b0 < len;) {
    const int64_t pos = start + b0;
    const int64_t num_keys = std::min({len - b0, kBlock, k.left_in_page(pos)});
    const T* k_seg = k.segment(pos);
    for (int64_t r = 0; r < rows; r += kTile) {
      with_tile_rows(std::min(kTile, rows - r), [&](auto size) {
        score_tile<decltype(size)::value>(&q_rows[r], k_seg, k.page_tokens, k.head_dim, num_keys, &s_rows[r], b0,
                                          r == 0 && v_run ? v_run + b0 * k.head_dim : nullptr);
      });
    }
    b0 += num_keys;
  }
}

// Lines to ask for into L2, one at a time, while the kernel computes on what it has in cache.
struct LineCursor {
  const char* next = nullptr;
  const char* end = nullptr;
  void ask_one() {
    if (next < end) {
      __builtin_prefetch(next, 0, 2);
      next += 64;
    }
  }
};

// o_r += sum_j p[r, j] v_j for R rows over keys first .. first + len of one run (p indexed from
// offset), in order, each row up to its visible end; the C vectors of a value row are loaded once
// for all R rows.
template <int R, int C, typename T>
void value_tile(const float* const* p_rows, const int64_t* visible, const T* v_run, int64_t first, int64_t len,
                int64_t offset, float* const* o_rows, LineCursor& ahead) {
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r) load_in_lane_order<T, C>(o_rows[r], acc[r]);
  for (int64_t j = first; j < first + len; ++j) {
    prefetch_lines(reinterpret_cast<const char*>(v_run + j * C * kWidth) + kAheadBytes, C * kWidth * sizeof(T));
    ahead.ask_one();
    Lanes v[C];
    load_lanes<C>(v_run + j * C * kWidth, v);
    for (int r = 0; r < R; ++r) {
      if (offset + j >= visible[r]) continue;
      const float p = p_rows[r][offset + j];
      for (int c = 0; c < C; ++c) acc[r][c] = fma(p, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) store_in_order<T, C>(o_rows[r], acc[r]);
}

// The value sums of all rows, a block of keys at a time so that every tile of rows finds the
// block's values in cache.
template <int C, typename T>
void values(const float* const* p_rows, int64_t rows, const int64_t* visible, const T* const* v_runs,
            const int64_t* run_len, float* const* o_rows, LineCursor& ahead) {
  // kTile rows of C accumulators each where they fit the registers beside a row of values;
  // otherwise (head_dim 128) 4 rows, as before the wider tile
  constexpr int64_t tile_rows = C * kTile <= 24 ? kTile : 4;
  for (int64_t r = 0; r < rows; ++r) std::fill_n(o_rows[r], C * kWidth, 0.0f);
  int64_t offset = 0;
  for (int run = 0; run < 2; ++run) {
    for (int64_t b0 = 0; b0 < run_len[run]; b0 += kBlock) {
      const int64_t len = std::min(kBlock, run_len[run] - b0);
      for (int64_t r = 0; r < rows; r += tile_rows) {
        with_tile_rows(std::min(tile_rows, rows - r), [&](auto size) {
          value_tile<decltype(size)::value, C>(&p_rows[r], &visible[r], v_runs[run], b0, len, offset, &o_rows[r],
                                               ahead);
        });
      }
    }
    offset += run_len[run];
  }
}

// A thread's buffers, sized for the largest item it has seen: no allocation per item and layer.
struct Workspace {
  std::vector<float> scores, stats;
  std::vector<const float*> q_rows;
  std::vector<float*> s_rows, s_at, o_rows;
  std::vector<int64_t> visible;
  LineCursor next_keys;  // the start of the thread's next item's K

  void fit(int64_t rows, int64_t row_stride) {
    scores.resize(rows * row_stride);  // every score read is written first; the padding is never summed
    q_rows.resize(rows);
    s_rows.resize(rows);
    s_at.resize(rows);
    visible.resize(rows);
  }
};

// The rows' softmax numerators over their visible keys, in place; each row's peak and the sum of
// its numerators (16 partial sums, then the tail, in a fixed order for a given length).
void softmax_numerators(float* const* s_rows, int64_t rows, const int64_t* visible, float* peak, float* total) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = s_rows[r];
    const int64_t vector_end = visible[r] / kWidth * kWidth;
    Lanes peaks = Lanes{} - std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < vector_end; j += kWidth) {
      const Lanes x = load(s + j);
      peaks = x > peaks ? x : peaks;
    }
    float row_peak = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < kWidth; ++l) row_peak = std::max(row_peak, peaks[l]);
    for (int64_t j = vector_end; j < visible[r]; ++j) row_peak = std::max(row_peak, s[j]);
    for (int64_t j = 0; j < visible[r]; j += kWidth) store(s + j, exp_lanes(load(s + j) - row_peak));
    Lanes sums = {};
    for (int64_t j = 0; j < vector_end; j += kWidth) sums += load(s + j);
    float row_total = 0.0f;
    for (int64_t l = 0; l < kWidth; ++l) row_total += sums[l];
    for (int64_t j = vector_end; j < visible[r]; ++j) row_total += s[j];
    peak[r] = row_peak;
    total[r] = row_total;
  }
}

// The rows of one sequence and one KV head: its n query tokens x G heads as R = n * G rows.
struct Rows {
  const float* q;  // [T, H, D]
  int64_t n, groups, num_heads, head_dim, query_start;
  int64_t num_rows() const { return n * groups; }
  // row r's [head_dim] slot of a [T, H, D] tensor
  int64_t row_offset(int64_t kv_head, int64_t r) const {
    return ((query_start + r / groups) * num_heads + kv_head * groups + r % groups) * head_dim;
  }
};

// One chunk's results for R rows: unnormalised value sums [R, D], then peaks [R], then totals [R].
struct Partial {
  float* base;
  int64_t num_rows, head_dim;
  static int64_t num_floats(int64_t num_rows, int64_t head_dim) { return num_rows * (head_dim + 2); }
  float* o(int64_t r) const { return base + r * head_dim; }
  float* peaks() const { return base + num_rows * head_dim; }
  float* totals() const { return peaks() + num_rows; }
};

inline void normalize(float* o, int64_t head_dim, float total) {
  const float inv_total = 1.0f / total;
  for (int64_t d = 0; d < head_dim; ++d) o[d] *= inv_total;
}

// Row r's output from its chunks' partial results: each rescaled to the largest peak, summed in
// chunk order. A chunk wholly after the row's visible keys has a total of 0 and is skipped; the
// peak's chunk is scaled by exactly 1, so a row whose keys all lie in one chunk gets what one
// unchunked item gives it.
void merge_chunks(const Partial* chunks, int64_t num_chunks, int64_t r, float* o) {
  const int64_t head_dim = chunks[0].head_dim;
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < num_chunks; ++c)
    if (chunks[c].totals()[r] > 0.0f) peak = std::max(peak, chunks[c].peaks()[r]);
  std::fill_n(o, head_dim, 0.0f);
  float total = 0.0f;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (chunks[c].totals()[r] == 0.0f) continue;
    const float scale = std::exp(chunks[c].peaks()[r] - peak);
    const float* chunk_o = chunks[c].o(r);
    total += scale * chunks[c].totals()[r];
    for (int64_t d = 0; d < head_dim; ++d) o[d] += scale * chunk_o[d];
  }
  normalize(o, head_dim, total);
}

// One sequence, one KV head and the keys first .. end of its plain run (or the whole window):
// each row's unnormalised value sum into o_rows[r] (head_dim floats), its peak and its total.
template <typename T>
void attend_keys(const Rows& seq, const PagedK<T>& k, const T* v, int64_t capacity, int64_t kv_head,
                 int64_t kv_start, int64_t num_kv, int64_t num_sink, int64_t num_recent, int64_t first, int64_t end,
                 float* const* o_rows, float* peak, float* total, Workspace& work) {
  // The keys it attends to, as up to two runs of cache positions: keys first .. end, or a
  // window's sinks and recent tokens (one query token per sequence then, never chunked).
  int64_t run_start[2] = {first, 0}, run_len[2] = {end - first, 0};
  if (num_recent > 0 && num_kv > num_sink + num_recent) {
    run_len[0] = num_sink;
    run_start[1] = num_kv - num_recent;
    run_len[1] = num_recent;
  }
  const int64_t num_keys = run_len[0] + run_len[1], head_dim = seq.head_dim;
  const int64_t rows = seq.num_rows();
  // Rows of scores: whole vectors (exp runs on them), one vector more so that rows do not start a
  // multiple of 4 KB apart (a few such rows would evict each other from L1).
  const int64_t row_stride = (num_keys + kWidth - 1) / kWidth * kWidth + kWidth;
  work.fit(rows, row_stride);
  auto& q_rows = work.q_rows;
  auto& visible = work.visible;
  auto &s_rows = work.s_rows, &s_at = work.s_at;
  for (int64_t r = 0; r < rows; ++r) {
    q_rows[r] = seq.q + seq.row_offset(kv_head, r);
    s_rows[r] = work.scores.data() + r * row_stride;
    // query token i sees all of the sequence's keys but the n - 1 - i after it; of this chunk's,
    // those before its own end
    const int64_t sees = num_kv - (seq.n - 1 - r / seq.groups);
    visible[r] = run_len[1] > 0 ? num_keys : std::clamp(sees - first, int64_t{0}, num_keys);
  }
  const T* v_runs[2];
  for (int run = 0; run < 2; ++run) v_runs[run] = v + (kv_head * capacity + kv_start + run_start[run]) * head_dim;

  int64_t offset = 0;
  for (int run = 0; run < 2; ++run) {
    if (run_len[run] == 0) continue;
    for (int64_t r = 0; r < rows; ++r) s_at[r] = s_rows[r] + offset;
    score_run(q_rows.data(), rows, k, kv_start + run_start[run], run_len[run], s_at.data(), v_runs[run]);
    offset += run_len[run];
  }
  softmax_numerators(s_rows.data(), rows, visible.data(), peak, total);
  const float* const* p_rows = const_cast<const float* const*>(s_rows.data());
  if (head_dim == 64) values<64 / kWidth>(p_rows, rows, visible.data(), v_runs, run_len, o_rows, work.next_keys);
  else values<128 / kWidth>(p_rows, rows, visible.data(), v_runs, run_len, o_rows, work.next_keys);
}

constexpr int64_t kChunk = 1024;  // keys per work item of a long sequence
// While an item sums its values (from L2: see score_tile) memory would sit idle, so the thread asks
// for the first kNextKeyBytes of its next item's K, a line per key. With both, a bfloat16 step at
// batch 1 over 7,680 tokens cost 8.6-10.1 ms more than over 256 against 9.1-10.9 with neither
// (Intel Xeon, AMX host; pairs of runs taking turns).
constexpr int64_t kNextKeyBytes = 64 * 1024;
// A key costs its read (K and V rows of one KV head, 512 bytes at head_dim 64) once, and its score
// and value sum once per query token. The read's weight, two query tokens, is an estimate from a
// Zen 4 core's bandwidth and multiply-add rate, not a fit: items of one sequence share a query
// count, so it only moves the split between sequences of different counts.
constexpr int64_t kKeyReadCost = 2;

template <typename T>
struct Element {
  using type = T;
};

// A work item: one sequence, one KV head, one chunk of its keys; partial >= 0 where the sequence
// has several chunks (its rows' partial results start there), else -1 (straight to the output).
struct Item {
  int64_t seq, kv_head, chunk, partial;
};

// The items each thread runs, balanced by cost: an even split of the list by count would give one
// thread a verifying sequence's items and the other a decoding one's (at 7,680 tokens, one
// sequence verifying 8 drafts beside one decoding took 1.7x as long as two verifying 4 each).
// Longest first onto the least loaded thread; each thread's items then in list order, so that
// a thread reads one sequence's KV in order. Which thread runs an item does not change its result.
template <typename Cost>
std::vector<std::vector<int64_t>> balanced(const std::vector<Item>& items, Cost cost) {
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  std::vector<int64_t> costs(num_items), order(num_items);
  for (int64_t i = 0; i < num_items; ++i) costs[i] = cost(items[i]), order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  std::vector<std::vector<int64_t>> items_of_thread(num_threads);
  std::vector<int64_t> loads(num_threads, 0);
  for (const int64_t i : order) {
    const int64_t t = std::min_element(loads.begin(), loads.end()) - loads.begin();
    items_of_thread[t].push_back(i);
    loads[t] += costs[i];
  }
  for (auto& thread_items : items_of_thread) std::sort(thread_items.begin(), thread_items.end());
  return items_of_thread;
}

}  // namespace

namespace goodspeed {

// q: [T, H, D] float32, scaled; k_t: [Hkv, pages, D, page_tokens] and v: [Hkv, capacity, D], one
// layer's cache, float32 or bfloat16; seqs: [S, 4] int64 (query_start, num_query, kv_start,
// num_kv); a window of num_sink + num_recent keys when num_recent > 0. Returns [T, H * D].
at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, const at::Tensor& seqs,
                            int64_t num_sink, int64_t num_recent) {
  TORCH_CHECK(q.dtype() == at::kFloat, "q float32 only");
  TORCH_CHECK(k_t.dtype() == v.dtype() && (k_t.dtype() == at::kFloat || k_t.dtype() == at::kBFloat16),
              "a float32 or bfloat16 cache, K and V alike");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "head dimension 64 or 128 only");
  TORCH_CHECK(q.is_contiguous() && k_t.is_contiguous() && v.is_contiguous() && seqs.is_contiguous(),
              "contiguous inputs only");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(k_t.dim() == 4 && k_t.size(2) == head_dim && v.size(1) <= k_t.size(1) * k_t.size(3),
              "k_t [Hkv, pages, D, page_tokens] holding v's capacity");
  const int64_t num_kv_heads = k_t.size(0), capacity = v.size(1), groups = num_heads / num_kv_heads;
  const int64_t num_pages = k_t.size(1), page_tokens = k_t.size(3);
  at::Tensor out = at::empty({num_tokens, num_heads * head_dim}, q.options());
  const int64_t* info = seqs.data_ptr<int64_t>();
  const float* q_data = q.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const bool windowed = num_recent > 0;
  auto num_chunks = [&](const int64_t* seq) {
    const bool is_window = windowed && seq[3] > num_sink + num_recent;
    return is_window ? int64_t{1} : std::max<int64_t>(1, (seq[3] + kChunk - 1) / kChunk);
  };
  // Partial results, one Partial per item of a chunked sequence, its chunks' one after another.
  std::vector<Item> items;
  int64_t partial_floats = 0;
  for (int64_t s = 0; s < seqs.size(0); ++s) {
    const int64_t* seq = info + s * 4;
    const int64_t chunks = num_chunks(seq);
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t c = 0; c < chunks; ++c) {
        items.push_back({s, h, c, chunks > 1 ? partial_floats : -1});
        if (chunks > 1) partial_floats += Partial::num_floats(seq[1] * groups, head_dim);
      }
  }
  std::vector<float> partials(partial_floats);
  const std::vector<std::vector<int64_t>> items_of_thread = balanced(items, [&](const Item& item) {
    const int64_t* seq = info + item.seq * 4;
    const bool is_window = windowed && seq[3] > num_sink + num_recent;
    const int64_t num_keys =
        is_window ? num_sink + num_recent : std::min(seq[3], (item.chunk + 1) * kChunk) - item.chunk * kChunk;
    return num_keys * (seq[1] + kKeyReadCost);
  });
  auto rows_of = [&](const Item& item) {
    const int64_t* seq = info + item.seq * 4;
    return Rows{q_data, seq[1], groups, num_heads, head_dim, seq[0]};
  };
  auto partial_of = [&](const Item& item, int64_t chunk) {
    const int64_t num_rows = rows_of(item).num_rows();
    const int64_t offset = item.partial + chunk * Partial::num_floats(num_rows, head_dim);
    return Partial{partials.data() + offset, num_rows, head_dim};
  };

  // T: the cache's element, float or a bfloat16's bits (uint16_t)
  auto attend_items = [&](auto element) {
    using T = typename decltype(element)::type;
    const T* k_data = static_cast<const T*>(k_t.data_ptr());
    const T* v_data = static_cast<const T*>(v.data_ptr());
    auto head_keys = [&](int64_t kv_head) {
      return PagedK<T>{k_data + kv_head * num_pages * head_dim * page_tokens, page_tokens, head_dim};
    };
    at::parallel_for(0, static_cast<int64_t>(items_of_thread.size()), 1, [&](int64_t begin, int64_t end) {
      Workspace work;
      for (int64_t t = begin; t < end; ++t)
        for (size_t n = 0; n < items_of_thread[t].size(); ++n) {
          const Item& item = items[items_of_thread[t][n]];
          const int64_t* seq = info + item.seq * 4;
          work.next_keys = {};
          if (n + 1 < items_of_thread[t].size()) {
            const Item& next = items[items_of_thread[t][n + 1]];
            const int64_t* next_seq = info + next.seq * 4;
            const char* first_key =
                reinterpret_cast<const char*>(head_keys(next.kv_head).segment(next_seq[2] + next.chunk * kChunk));
            work.next_keys = {first_key, first_key + kNextKeyBytes};
          }
          const Rows rows = rows_of(item);
          const int64_t num_rows = rows.num_rows();
          work.o_rows.resize(num_rows);
          float* peaks;  // then the totals
          if (item.partial >= 0) {  // a chunk: into its Partial
            const Partial result = partial_of(item, 0);
            for (int64_t r = 0; r < num_rows; ++r) work.o_rows[r] = result.o(r);
            peaks = result.peaks();
          } else {  // a whole sequence: straight into the output
            for (int64_t r = 0; r < num_rows; ++r) work.o_rows[r] = out_data + rows.row_offset(item.kv_head, r);
            work.stats.resize(2 * num_rows);
            peaks = work.stats.data();
          }
          const int64_t first = item.chunk * kChunk, last = std::min(seq[3], first + kChunk);
          const PagedK<T> k = head_keys(item.kv_head);
          attend_keys(rows, k, v_data, capacity, item.kv_head, seq[2], seq[3], num_sink, num_recent, first, last,
                      work.o_rows.data(), peaks, peaks + num_rows, work);
          if (item.partial < 0)
            for (int64_t r = 0; r < num_rows; ++r) normalize(work.o_rows[r], head_dim, peaks[num_rows + r]);
        }
    });
  };
  if (k_t.dtype() == at::kBFloat16) attend_items(Element<uint16_t>{});
  else attend_items(Element<float>{});
  if (partial_floats == 0) return out;  // no sequence was chunked: nothing to merge
  // each chunked sequence's rows from its chunks, once all are done
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<Partial> chunks;
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      if (item.partial < 0 || item.chunk > 0) continue;
      const Rows rows = rows_of(item);
      chunks.clear();
      for (int64_t c = 0; c < num_chunks(info + item.seq * 4); ++c) chunks.push_back(partial_of(item, c));
      const int64_t num_chunks_done = static_cast<int64_t>(chunks.size());
      for (int64_t r = 0; r < rows.num_rows(); ++r)
        merge_chunks(chunks.data(), num_chunks_done, r, out_data + rows.row_offset(item.kv_head, r));
    }
  });
  return out;
}

}  // namespace goodspeed

TORCH_LIBRARY(goodspeed, m) {
  m.def("ragged_attention(Tensor q, Tensor k_t, Tensor v, Tensor seqs, int num_sink, int num_recent) -> Tensor");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("ragged_attention", &goodspeed::ragged_attention); }
