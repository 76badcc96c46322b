// Every decoder layer in one call, for a step the kernels take whole: every product within the
// few-rows kernel's row limit (batch-1 decoding and verifying, small batches; the attention
// kernel takes every sequence). engine/model/layer_ops.py says when and why.
//
// It calls the same kernels in the same order as the per-operator path, so the numbers are the
// same bit for bit; what it saves is the Python and dispatch between some ten calls per layer,
// and between the layers (a call per layer from Python cost about 0.3 ms of a 13 ms step).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace goodspeed {
namespace {

// x [T, hidden] (the residual stream, updated in place) += attention(norm(x)), then += mlp(norm(x)).
void decoder_layer(at::Tensor& x, const at::Tensor& input_norm, const at::Tensor& post_norm, double eps,
                   const at::Tensor& qkv_blocks, int64_t num_qkv_out, const c10::optional<at::Tensor>& qkv_bias,
                   const at::Tensor& o_blocks, const at::Tensor& gate_up_blocks, int64_t num_gate_up_out,
                   const at::Tensor& down_blocks, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_t,
                   at::Tensor& v, const at::Tensor& slot_ids, int64_t num_heads, double scale,
                   const at::Tensor& seqs, int64_t num_sink, int64_t num_recent) {
  const int64_t num_tokens = x.size(0), hidden = x.size(1), head_dim = v.size(2);
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

}  // namespace

// decoder_layer for each layer in turn; the lists hold one entry per layer.
void decoder_layers(at::Tensor& x, at::TensorList input_norms, at::TensorList post_norms, double eps,
                    at::TensorList qkv_blocks, int64_t num_qkv_out, const c10::List<c10::optional<at::Tensor>>& qkv_biases,
                    at::TensorList o_blocks, at::TensorList gate_up_blocks, int64_t num_gate_up_out,
                    at::TensorList down_blocks, const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_t,
                    at::TensorList v, const at::Tensor& slot_ids, int64_t num_heads, double scale,
                    const at::Tensor& seqs, int64_t num_sink, int64_t num_recent) {
  const size_t num_layers = input_norms.size();
  for (const size_t size : {post_norms.size(), qkv_blocks.size(), qkv_biases.size(), o_blocks.size(),
                            gate_up_blocks.size(), down_blocks.size(), k_t.size(), v.size()})
    TORCH_CHECK(size == num_layers, "decoder_layers: one entry per layer in every list");
  for (size_t i = 0; i < num_layers; ++i) {
    at::Tensor layer_k_t = k_t[i], layer_v = v[i];
    decoder_layer(x, input_norms[i], post_norms[i], eps, qkv_blocks[i], num_qkv_out, qkv_biases.get(i), o_blocks[i],
                  gate_up_blocks[i], num_gate_up_out, down_blocks[i], cos, sin, layer_k_t, layer_v, slot_ids, num_heads,
                  scale, seqs, num_sink, num_recent);
  }
}

}  // namespace goodspeed

TORCH_LIBRARY_FRAGMENT(goodspeed, m) {
  m.def(
      "decoder_layers(Tensor(a!) x, Tensor[] input_norms, Tensor[] post_norms, float eps, Tensor[] qkv_blocks, "
      "int num_qkv_out, Tensor?[] qkv_biases, Tensor[] o_blocks, Tensor[] gate_up_blocks, int num_gate_up_out, "
      "Tensor[] down_blocks, Tensor cos, Tensor sin, Tensor(b!)[] k_t, Tensor(c!)[] v, Tensor slot_ids, "
      "int num_heads, float scale, Tensor seqs, int num_sink, int num_recent) -> ()");
}

TORCH_LIBRARY_IMPL(goodspeed, CPU, m) { m.impl("decoder_layers", &goodspeed::decoder_layers); }
