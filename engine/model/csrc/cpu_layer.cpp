// One decoder layer in one call, for a step the kernels take whole: every product within the
// few-rows kernel's row limit, every sequence short enough for the attention kernel (batch-1
// decoding and verifying). engine/model/layer_ops.py says when and why.
//
// It calls the same kernels in the same order as the per-operator path, so the numbers are the
// same bit for bit; what it saves is the Python and dispatch between some ten calls per layer.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace goodspeed {

// x [T, hidden] (the residual stream, updated in place) += attention(norm(x)), then += mlp(norm(x)).
void decoder_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                   const at::Tensor& qkv_blocks, int64_t num_qkv_out, const c10::optional<at::Tensor>& qkv_bias,
                   const at::Tensor& o_blocks, const at::Tensor& gate_up_blocks, int64_t num_gate_up_out,
                   const at::Tensor& down_blocks, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_t,
                   at::Tensor& v, const at::Tensor& slot_ids, int64_t num_heads, double scale,
                   const at::Tensor& seqs, int64_t num_sink, int64_t num_recent) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), head_dim = k_t.size(1);
  const c10::optional<at::Tensor> no_tensor;
  const at::Tensor h = add_rms_norm_op(x, no_tensor, input_norm, eps);
  const at::Tensor qkv = few_rows_linear_op(h, qkv_blocks, num_qkv_out, qkv_bias).view({num_tokens, -1, head_dim});
  const at::Tensor q = rope_write_kv_op(qkv, cos, sin, k_t, v, slot_ids, num_heads, scale);
  const at::Tensor attn = ragged_attention(q, k_t, v, seqs, num_sink, num_recent).to(x.scalar_type());
  const at::Tensor attn_out = few_rows_linear_op(attn, o_blocks, hidden, no_tensor);
  const at::Tensor h2 = add_rms_norm_op(x, attn_out, post_norm, eps);
  const at::Tensor act = silu_mul_op(few_rows_linear_op(h2, gate_up_blocks, num_gate_up_out, no_tensor));
  x.add_(few_rows_linear_op(act, down_blocks, hidden, no_tensor));
}

}  // namespace goodspeed

TORCH_LIBRARY_FRAGMENT(goodspeed, m) {
  m.def(
      "decoder_layer(Tensor(a!) x, Tensor input_norm, Tensor post_norm, float eps, Tensor qkv_blocks, int num_qkv_out, "
      "Tensor? qkv_bias, Tensor o_blocks, Tensor gate_up_blocks, int num_gate_up_out, Tensor down_blocks, Tensor cos, "
      "Tensor sin, Tensor(b!) k_t, Tensor(c!) v, Tensor slot_ids, int num_heads, float scale, Tensor seqs, "
      "int num_sink, int num_recent) -> ()");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("decoder_layer", &goodspeed::decoder_layer); }
