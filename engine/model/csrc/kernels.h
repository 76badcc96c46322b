// The engine's CPU kernels, for one another's use (each .cpp registers its own as torch operators).
#pragma once

#include <ATen/ATen.h>

namespace goodspeed {

at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k_t, const at::Tensor& v, const at::Tensor& seqs,
                            int64_t num_sink, int64_t num_recent);
at::Tensor few_rows_linear_op(const at::Tensor& x, const at::Tensor& blocks, int64_t num_out,
                              const c10::optional<at::Tensor>& bias);
at::Tensor add_rms_norm_op(at::Tensor& x, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                           double eps);
at::Tensor silu_mul_op(const at::Tensor& gate_up);
at::Tensor rope_write_kv_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_t,
                            at::Tensor& v, const at::Tensor& slot_ids, int64_t num_heads, double scale);

}  // namespace goodspeed
