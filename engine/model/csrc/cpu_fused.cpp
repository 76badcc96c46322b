// The element-wise parts of a decoder layer in one call each, on the CPU, float32 or bfloat16
// (engine/model/fused.py says when they are used and why).
//
// A decode step of a small model is a few hundred tiny operators: a norm alone is five (a cast,
// the norm, a cast back, the weight's product, the residual's sum), each some microseconds of
// dispatch for a few hundred values. Each function here does the work of one such group and rounds
// to the model's dtype wherever torch's operators would, so the result is torch's to within the
// order of a float32 sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"
#include "lanes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using goodspeed::exp_lanes;
using goodspeed::kWidth;
using goodspeed::Lanes;
using goodspeed::load;
using goodspeed::load_row;
using goodspeed::round_lanes;
using goodspeed::store;
using goodspeed::store_row;
constexpr int64_t kRowsPerTask = 8;  // a decode step's few rows stay on one thread

// v rounded to T, as a torch operator with a T output rounds it
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// x += delta (when given, rounded to T), then out = weight * round(x / rms(x)), row by row; a
// vector at a time, the last dim % kWidth values one at a time.
template <typename T>
void add_rms_norm(T* x, const T* delta, const T* weight, T* out, int64_t num_rows, int64_t dim, float eps) {
  const int64_t vector_end = dim / kWidth * kWidth;
  at::parallel_for(0, num_rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* row = x + r * dim;
      if (delta != nullptr) {
        const T* d = delta + r * dim;
        for (int64_t i = 0; i < vector_end; i += kWidth) store_row(row + i, load_row(row + i) + load_row(d + i));
        for (int64_t i = vector_end; i < dim; ++i)
          row[i] = static_cast<T>(static_cast<float>(row[i]) + static_cast<float>(d[i]));
      }
      Lanes sums{};
      for (int64_t i = 0; i < vector_end; i += kWidth) {
        const Lanes v = load_row(row + i);
        sums += v * v;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < kWidth; ++j) sum += sums[j];
      for (int64_t i = vector_end; i < dim; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
      const float rstd = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
      T* o = out + r * dim;
      for (int64_t i = 0; i < vector_end; i += kWidth)
        store_row(o + i, load_row(weight + i) * round_lanes<T>(load_row(row + i) * rstd));
      for (int64_t i = vector_end; i < dim; ++i)
        o[i] = static_cast<T>(static_cast<float>(weight[i]) * round_to<T>(static_cast<float>(row[i]) * rstd));
    }
  });
}

// out = round(silu(gate)) * up, gate and up the two halves of each row of gate_up, a vector at a
// time (exp_lanes: with expf a value at a time, a row of 1536 took about twice as long).
template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t num_rows, int64_t dim) {
  const int64_t vector_end = dim / kWidth * kWidth;
  at::parallel_for(0, num_rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * dim;
      const T* up = gate + dim;
      T* o = out + r * dim;
      for (int64_t i = 0; i < vector_end; i += kWidth) {
        const Lanes g = load_row(gate + i);
        store_row(o + i, round_lanes<T>(g / (1.f + exp_lanes(-g))) * load_row(up + i));
      }
      if (vector_end < dim) {  // the last values through a padded vector, computed as the rest
        float gate_f[kWidth] = {}, silu[kWidth];
        for (int64_t i = vector_end; i < dim; ++i) gate_f[i - vector_end] = static_cast<float>(gate[i]);
        const Lanes g = load(gate_f);
        store(silu, round_lanes<T>(g / (1.f + exp_lanes(-g))));
        for (int64_t i = vector_end; i < dim; ++i) o[i] = static_cast<T>(silu[i - vector_end] * static_cast<float>(up[i]));
      }
    }
  });
}

// One head of D values rotated by transformers' rotate_half layout into out, each product and sum
// rounded to T as torch's operators on T tensors round them; a vector at a time where half is a
// multiple of one.
template <typename T>
inline void rotate(const T* in, float* out, const T* cos, const T* sin, int64_t half) {
  const int64_t vector_end = half % kWidth == 0 ? half : 0;
  for (int64_t i = 0; i < vector_end; i += kWidth) {
    const Lanes x1 = load_row(in + i), x2 = load_row(in + i + half);
    const Lanes c = load_row(cos + i), s = load_row(sin + i);
    store(out + i, round_lanes<T>(round_lanes<T>(x1 * c) - round_lanes<T>(x2 * s)));
    store(out + i + half, round_lanes<T>(round_lanes<T>(x2 * c) + round_lanes<T>(x1 * s)));
  }
  for (int64_t i = vector_end; i < half; ++i) {
    const float x1 = static_cast<float>(in[i]), x2 = static_cast<float>(in[i + half]);
    const float c = static_cast<float>(cos[i]), s = static_cast<float>(sin[i]);
    out[i] = round_to<T>(round_to<T>(x1 * c) - round_to<T>(x2 * s));
    out[i + half] = round_to<T>(round_to<T>(x2 * c) + round_to<T>(x1 * s));
  }
}

// qkv [T, H + 2 Hkv, D]: rotates q and k, writes k and v to the cache at slot_ids (k transposed
// a page at a time: k_t [Hkv, pages, D, page_tokens], v [Hkv, capacity, D]); returns
// round(q * scale) as float32. KV: the cache's element, float32, or bfloat16 for a bfloat16 model,
// whose rotated k and v are bfloat16 values already (so the cache holds them exactly).
template <typename T, typename KV>
void rope_write_kv(const T* qkv, const T* cos, const T* sin, KV* k_t, KV* v, const int64_t* slot_ids, float* q,
                   int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_pages,
                   int64_t page_tokens, int64_t capacity, float scale) {
  const int64_t half = head_dim / 2, row = (num_heads + 2 * num_kv_heads) * head_dim;
  at::parallel_for(0, num_tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    float rotated[256];  // one head (head_dim <= 256, checked)
    for (int64_t t = begin; t < end; ++t) {
      const T* token = qkv + t * row;
      const T* c = cos + t * half;
      const T* s = sin + t * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        rotate(token + h * head_dim, rotated, c, s, half);
        float* out = q + (t * num_heads + h) * head_dim;
        const int64_t vector_end = head_dim / kWidth * kWidth;
        for (int64_t i = 0; i < vector_end; i += kWidth) store(out + i, round_lanes<T>(load(rotated + i) * scale));
        for (int64_t i = vector_end; i < head_dim; ++i) out[i] = round_to<T>(rotated[i] * scale);
      }
      const int64_t slot = slot_ids[t];
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        rotate(token + (num_heads + h) * head_dim, rotated, c, s, half);
        KV* k_head = k_t + ((h * num_pages + slot / page_tokens) * head_dim) * page_tokens + slot % page_tokens;
        for (int64_t i = 0; i < head_dim; ++i) k_head[i * page_tokens] = static_cast<KV>(rotated[i]);
        const T* v_in = token + (num_heads + num_kv_heads + h) * head_dim;
        KV* v_out = v + (h * capacity + slot) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) v_out[i] = static_cast<KV>(static_cast<float>(v_in[i]));
      }
    }
  });
}

// The two element types check_rows lets through (no double: the vector helpers take float lanes).
#define DISPATCH_FLOAT_OR_BFLOAT16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, ": a contiguous [T, dim] tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16");
}

}  // namespace

namespace goodspeed {

at::Tensor add_rms_norm_op(at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                           double eps) {
  check_rows(x, "add_rms_norm: x");
  const at::Tensor w = weight.contiguous();
  TORCH_CHECK(w.numel() == x.size(1) && w.scalar_type() == x.scalar_type(), "add_rms_norm: weight [dim] of x's dtype");
  const at::Tensor d = delta.has_value() ? delta->contiguous() : at::Tensor();
  TORCH_CHECK(!d.defined() || (d.sizes() == x.sizes() && d.scalar_type() == x.scalar_type()),
              "add_rms_norm: delta of x's shape and dtype");
  at::Tensor out = at::empty_like(x);
  DISPATCH_FLOAT_OR_BFLOAT16(x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm(x.data_ptr<scalar_t>(), d.defined() ? d.data_ptr<scalar_t>() : nullptr, w.data_ptr<scalar_t>(),
                 out.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

at::Tensor silu_mul_op(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul: gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: gate_up [T, 2 * dim]");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  DISPATCH_FLOAT_OR_BFLOAT16(gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out.size(0), out.size(1));
  });
  return out;
}

at::Tensor rope_write_kv_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_t,
                            at::Tensor& v, const at::Tensor& slot_ids, int64_t num_heads, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "rope_write_kv: qkv [T, H + 2 Hkv, D], contiguous");
  const int64_t num_tokens = qkv.size(0), head_dim = qkv.size(2);
  const int64_t num_kv_heads = (qkv.size(1) - num_heads) / 2;
  TORCH_CHECK(num_kv_heads > 0 && num_heads + 2 * num_kv_heads == qkv.size(1), "rope_write_kv: H + 2 Hkv heads");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 256, "rope_write_kv: an even head_dim of at most 256");
  const bool is_bf16_cache = k_t.scalar_type() == at::kBFloat16;
  TORCH_CHECK(k_t.dim() == 4 && k_t.is_contiguous() && k_t.size(0) == num_kv_heads && k_t.size(2) == head_dim &&
                  (k_t.scalar_type() == at::kFloat || (is_bf16_cache && qkv.scalar_type() == at::kBFloat16)),
              "rope_write_kv: k_t [Hkv, pages, D, page_tokens] float32 (or bfloat16 for bfloat16 qkv), contiguous");
  const int64_t num_pages = k_t.size(1), page_tokens = k_t.size(3), capacity = v.size(1);
  TORCH_CHECK(v.dim() == 3 && v.is_contiguous() && v.size(0) == num_kv_heads && capacity <= num_pages * page_tokens &&
                  v.size(2) == head_dim && v.scalar_type() == k_t.scalar_type(),
              "rope_write_kv: v [Hkv, capacity, D] of k_t's dtype, contiguous, within k_t's pages");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous(), slots = slot_ids.contiguous();
  TORCH_CHECK(c.numel() == num_tokens * head_dim / 2 && s.numel() == c.numel() &&
                  c.scalar_type() == qkv.scalar_type() && s.scalar_type() == qkv.scalar_type(),
              "rope_write_kv: cos and sin [T, D / 2] of qkv's dtype");
  TORCH_CHECK(slots.numel() == num_tokens && slots.scalar_type() == at::kLong, "rope_write_kv: slot_ids [T] int64");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "rope_write_kv: slot ", slot[t], " outside the cache");
  at::Tensor q = at::empty({num_tokens, num_heads, head_dim}, qkv.options().dtype(at::kFloat));
  DISPATCH_FLOAT_OR_BFLOAT16(qkv.scalar_type(), "rope_write_kv", [&] {
    auto write = [&](auto* k_data, auto* v_data) {
      rope_write_kv(qkv.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), k_data, v_data, slot,
                    q.data_ptr<float>(), num_tokens, num_heads, num_kv_heads, head_dim, num_pages, page_tokens,
                    capacity, static_cast<float>(scale));
    };
    if (is_bf16_cache) write(k_t.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
    else write(k_t.data_ptr<float>(), v.data_ptr<float>());
  });
  return q;
}

}  // namespace goodspeed

TORCH_LIBRARY_FRAGMENT(goodspeed, m) {
  m.def("add_rms_norm(Tensor(a!) x, Tensor? delta, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rope_write_kv(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_t, Tensor(b!) v, Tensor slot_ids, int num_heads, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) {
  m.impl("add_rms_norm", &goodspeed::add_rms_norm_op);
  m.impl("silu_mul", &goodspeed::silu_mul_op);
  m.impl("rope_write_kv", &goodspeed::rope_write_kv_op);
}
