// Grouped-query attention of a ragged batch over the float32 KV cache, on the CPU, in one call
// per layer (engine/model/cpu_attention.py says why and how it is built).
//
// Every query row is computed the same way whatever else is in the step: its scores sum over the
// head dimension in order, its softmax and its value sum run over its own visible keys in order.
// So a token decoded alone and the same token verified among k drafts get bit-identical outputs,
// which keeps greedy speculation exact in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

typedef float Lanes __attribute__((vector_size(64)));  // 16 floats: one cache line, one AVX-512 register
constexpr int64_t kWidth = 16;
constexpr int64_t kTile = 4;  // query rows per pass: their accumulators stay in registers

typedef int32_t IntLanes __attribute__((vector_size(64)));

// exp(x) for x <= 0, 16 at a time: 2^(x log2 e) split into an integer power (exponent bits) and a
// degree-6 polynomial of the fraction. Relative error about 2e-7, like float32's own exp.
inline Lanes exp_nonpositive(Lanes x) {
  const Lanes lowest = Lanes{} - 87.0f;
  x = x < lowest ? lowest : x;
  const Lanes t = x * 1.4426950408889634f;
  IntLanes whole = __builtin_convertvector(t, IntLanes);  // rounds towards zero ...
  whole += (__builtin_convertvector(whole, Lanes) > t);   // ... so one less where that was up (true is -1)
  const Lanes f = t - __builtin_convertvector(whole, Lanes);
  Lanes p = Lanes{} + 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6184375e-3f;
  p = p * f + 5.5503324e-2f;
  p = p * f + 2.4022648e-1f;
  p = p * f + 6.9314720e-1f;
  p = p * f + 1.0f;
  return p * reinterpret_cast<Lanes>((whole + 127) << 23);
}

inline Lanes load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store(float* p, Lanes x) { std::memcpy(p, &x, sizeof(x)); }

// scores[r, j] = q_r . k_j for R rows over keys first .. end of one run, summed over d in order
// (a fused multiply-add per d, from 0: the same arithmetic whatever the tile).
template <int R>
void score_tile(const float* const* q_rows, const float* k_run, int64_t capacity, int64_t head_dim, int64_t first,
                int64_t end, float* const* s_rows) {
  int64_t j = first;
  for (; j + kWidth <= end; j += kWidth) {
    Lanes acc[R] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      // K's rows are capacity apart: each chunk reads one line from each of head_dim rows, a pattern
      // the hardware prefetcher does not follow, so the lines a few chunks ahead are asked for here
      __builtin_prefetch(k_run + d * capacity + j + 4 * kWidth);
      const Lanes k = load(k_run + d * capacity + j);
      for (int r = 0; r < R; ++r) acc[r] += q_rows[r][d] * k;
    }
    for (int r = 0; r < R; ++r) store(s_rows[r] + j, acc[r]);
  }
  for (; j < end; ++j)
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) acc = std::fma(q_rows[r][d], k_run[d * capacity + j], acc);
      s_rows[r][j] = acc;
    }
}

// A block of keys at a time, every tile of rows over it, so that K is read from memory once.
constexpr int64_t kBlock = 1024;

void score_run(const float* const* q_rows, int64_t rows, const float* k_run, int64_t capacity, int64_t head_dim,
               int64_t len, float* const* s_rows) {
  for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
    const int64_t end = std::min(len, b0 + kBlock);
    for (int64_t r = 0; r < rows; r += kTile) {
      auto tile = [&](auto size) {
        score_tile<decltype(size)::value>(&q_rows[r], k_run, capacity, head_dim, b0, end, &s_rows[r]);
      };
      switch (std::min(kTile, rows - r)) {
        case 4: tile(std::integral_constant<int, 4>{}); break;
        case 3: tile(std::integral_constant<int, 3>{}); break;
        case 2: tile(std::integral_constant<int, 2>{}); break;
        default: tile(std::integral_constant<int, 1>{}); break;
      }
    }
  }
}

// o_r += sum_j p[r, j] v_j for R rows over keys first .. first + len of one run (p indexed from
// offset), in order, each row up to its visible end; the C vectors of a value row are loaded once
// for all R rows.
template <int R, int C>
void value_tile(const float* const* p_rows, const int64_t* visible, const float* v_run, int64_t first, int64_t len,
                int64_t offset, float* const* o_rows) {
  Lanes acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = load(o_rows[r] + c * kWidth);
  for (int64_t j = first; j < first + len; ++j) {
    Lanes v[C];
    for (int c = 0; c < C; ++c) v[c] = load(v_run + j * C * kWidth + c * kWidth);
    for (int r = 0; r < R; ++r) {
      if (offset + j >= visible[r]) continue;
      const float p = p_rows[r][offset + j];
      for (int c = 0; c < C; ++c) acc[r][c] += p * v[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(o_rows[r] + c * kWidth, acc[r][c]);
}

// The value sums of all rows, a block of keys at a time so that every tile of rows finds the
// block's values in cache.
template <int C>
void values(const float* const* p_rows, int64_t rows, const int64_t* visible, const float* const* v_runs,
            const int64_t* run_len, float* const* o_rows) {
  for (int64_t r = 0; r < rows; ++r) std::fill_n(o_rows[r], C * kWidth, 0.0f);
  int64_t offset = 0;
  for (int run = 0; run < 2; ++run) {
    for (int64_t b0 = 0; b0 < run_len[run]; b0 += kBlock) {
      const int64_t len = std::min(kBlock, run_len[run] - b0);
      for (int64_t r = 0; r < rows; r += kTile) {
        auto tile = [&](auto size) {
          value_tile<decltype(size)::value, C>(&p_rows[r], &visible[r], v_runs[run], b0, len, offset, &o_rows[r]);
        };
        switch (std::min(kTile, rows - r)) {
          case 4: tile(std::integral_constant<int, 4>{}); break;
          case 3: tile(std::integral_constant<int, 3>{}); break;
          case 2: tile(std::integral_constant<int, 2>{}); break;
          default: tile(std::integral_constant<int, 1>{}); break;
        }
      }
    }
    offset += run_len[run];
  }
}

// A thread's buffers, sized for the largest item it has seen: no allocation per item and layer.
struct Workspace {
  std::vector<float> scores, inv_sum;
  std::vector<const float*> q_rows;
  std::vector<float*> s_rows, s_at, o_rows;
  std::vector<int64_t> visible;

  void fit(int64_t rows, int64_t row_stride) {
    scores.resize(rows * row_stride);  // every score read is written first; the padding is never summed
    inv_sum.resize(rows);
    q_rows.resize(rows);
    s_rows.resize(rows);
    s_at.resize(rows);
    o_rows.resize(rows);
    visible.resize(rows);
  }
};

// One sequence and one KV head: its n query tokens x G heads as R = n * G rows.
void attend_one(const float* q, const float* k_t, const float* v, float* out, int64_t n, int64_t groups,
                int64_t num_heads, int64_t head_dim, int64_t capacity, int64_t kv_head, int64_t query_start,
                int64_t kv_start, int64_t num_kv, int64_t num_sink, int64_t num_recent, Workspace& work) {
  // The keys it attends to, as up to two runs of cache positions: all of them, or a window's
  // sinks and recent tokens (one query token per sequence then).
  int64_t run_start[2] = {0, 0}, run_len[2] = {num_kv, 0};
  if (num_recent > 0 && num_kv > num_sink + num_recent) {
    run_len[0] = num_sink;
    run_start[1] = num_kv - num_recent;
    run_len[1] = num_recent;
  }
  const int64_t num_keys = run_len[0] + run_len[1];
  const int64_t rows = n * groups;
  // Rows of scores: whole vectors (exp runs on them), one vector more so that rows do not start a
  // multiple of 4 KB apart (a few such rows would evict each other from L1).
  const int64_t row_stride = (num_keys + kWidth - 1) / kWidth * kWidth + kWidth;
  work.fit(rows, row_stride);
  auto& q_rows = work.q_rows;
  auto& visible = work.visible;
  auto &s_rows = work.s_rows, &s_at = work.s_at, &o_rows = work.o_rows;
  const float* v_runs[2];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = query_start + r / groups, head = kv_head * groups + r % groups;
    q_rows[r] = q + (token * num_heads + head) * head_dim;
    o_rows[r] = out + (token * num_heads + head) * head_dim;
    s_rows[r] = work.scores.data() + r * row_stride;
    visible[r] = num_keys - (n - 1 - r / groups);  // query token i sees all but the n - 1 - i after it
  }
  const float* k_head = k_t + kv_head * head_dim * capacity + kv_start;
  for (int run = 0; run < 2; ++run) v_runs[run] = v + (kv_head * capacity + kv_start + run_start[run]) * head_dim;

  int64_t offset = 0;
  for (int run = 0; run < 2; ++run) {
    if (run_len[run] == 0) continue;
    for (int64_t r = 0; r < rows; ++r) s_at[r] = s_rows[r] + offset;
    score_run(q_rows.data(), rows, k_head + run_start[run], capacity, head_dim, run_len[run], s_at.data());
    offset += run_len[run];
  }

  auto& inv_sum = work.inv_sum;
  for (int64_t r = 0; r < rows; ++r) {
    float* s = s_rows[r];
    const int64_t vector_end = visible[r] / kWidth * kWidth;
    Lanes peaks = Lanes{} - std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < vector_end; j += kWidth) {
      const Lanes x = load(s + j);
      peaks = x > peaks ? x : peaks;
    }
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < kWidth; ++l) peak = std::max(peak, peaks[l]);
    for (int64_t j = vector_end; j < visible[r]; ++j) peak = std::max(peak, s[j]);
    for (int64_t j = 0; j < visible[r]; j += kWidth) store(s + j, exp_nonpositive(load(s + j) - peak));
    // the denominator: 16 partial sums, then the tail, in a fixed order for a given length
    Lanes sums = {};
    for (int64_t j = 0; j < vector_end; j += kWidth) sums += load(s + j);
    float total = 0.0f;
    for (int64_t l = 0; l < kWidth; ++l) total += sums[l];
    for (int64_t j = vector_end; j < visible[r]; ++j) total += s[j];
    inv_sum[r] = 1.0f / total;
  }

  const float* const* p_rows = const_cast<const float* const*>(s_rows.data());
  if (head_dim == 64) values<4>(p_rows, rows, visible.data(), v_runs, run_len, o_rows.data());
  else values<8>(p_rows, rows, visible.data(), v_runs, run_len, o_rows.data());
  for (int64_t r2 = 0; r2 < rows; ++r2)
    for (int64_t d = 0; d < head_dim; ++d) o_rows[r2][d] *= inv_sum[r2];
}

}  // namespace

namespace goodspeed {

// q: [T, H, D] float32, scaled; k_t: [Hkv, D, capacity] and v: [Hkv, capacity, D], one layer's
// float32 cache; seqs: [S, 4] int64 (query_start, num_query, kv_start, num_kv); a window of
// num_sink + num_recent keys when num_recent > 0. Returns [T, H * D].
at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, const at::Tensor& seqs,
                            int64_t num_sink, int64_t num_recent) {
  TORCH_CHECK(q.dtype() == at::kFloat && k_t.dtype() == at::kFloat && v.dtype() == at::kFloat, "float32 only");
  TORCH_CHECK(q.size(2) == 64 || q.size(2) == 128, "head dimension 64 or 128 only");
  TORCH_CHECK(q.is_contiguous() && k_t.is_contiguous() && v.is_contiguous() && seqs.is_contiguous(), "contiguous inputs only");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t num_kv_heads = k_t.size(0), capacity = k_t.size(2), groups = num_heads / num_kv_heads;
  at::Tensor out = at::empty({num_tokens, num_heads * head_dim}, q.options());
  const int64_t* info = seqs.data_ptr<int64_t>();
  const int64_t num_items = seqs.size(0) * num_kv_heads;
  const float *q_data = q.data_ptr<float>(), *k_data = k_t.data_ptr<float>(), *v_data = v.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    Workspace work;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t* seq = info + (item / num_kv_heads) * 4;
      attend_one(q_data, k_data, v_data, out_data, seq[1], groups, num_heads, head_dim, capacity,
                 item % num_kv_heads, seq[0], seq[2], seq[3], num_sink, num_recent, work);
    }
  });
  return out;
}

}  // namespace goodspeed

TORCH_LIBRARY(goodspeed, m) {
  m.def("ragged_attention(Tensor q, Tensor k_t, Tensor v, Tensor seqs, int num_sink, int num_recent) -> Tensor");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("ragged_attention", &goodspeed::ragged_attention); }
