"""The element-wise parts of a decoder layer: the residual sum and norm, rotary embedding with the
KV write, and the MLP's SiLU gate.

`LayerOps` runs them as torch operators (any device). On the CPU, `FusedLayerOps` runs each group
as one call of a C++ kernel (csrc/cpu_fused.cpp), and for a step the kernels take whole all
layers in one call (`decoder_layers`, csrc/cpu_layer.cpp): a batch-1 decode step of the default
model was some 3,800 operator calls, a third of its time in dispatch and tiny kernels
(docs/decode-profile.md). Both forms round to the model's dtype at the same points, so they agree
to within the order of a float32 sum; a server runs one of them for every step, so a decoded
token and the same token verified among drafts go through the same one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache
from engine.model.cpu_attention import KernelSeqs
from engine.model.cpu_kernels import cpu_kernels_built
from engine.model.weights import LayerWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, hidden]. Normalise in float32 and scale in the model dtype, as transformers does.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D/2]; rotates the two halves of each head (transformers'
    # rotate_half layout).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LayerOps:
    """torch operators."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta in place (when given), then the norm of x: [T, hidden]."""
        if delta is not None:
            x.add_(delta)
        return rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # gate_up: [T, 2I] -> [T, I]
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        layer_idx: int,
        slot_ids: torch.Tensor,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor:
        """qkv: [T, H + 2 Hkv, D]; rotates q and k, writes k and v to the cache at slot_ids; returns
        q * scale in the dtype attention computes in, [T, H, D]."""
        num_kv_heads = (qkv.shape[1] - num_heads) // 2
        qk = apply_rope(qkv[:, : num_heads + num_kv_heads], cos, sin)  # [T, H + Hkv, D]
        kv_cache.write(layer_idx, slot_ids, qk[:, num_heads:], qkv[:, num_heads + num_kv_heads :])
        return (qk[:, :num_heads] * scale).to(kv_cache.compute_dtype).contiguous()


class FusedLayerOps(LayerOps):
    """One C++ call per group (csrc/cpu_fused.cpp); CPU only, float32 or bfloat16, with the CPU's
    KV cache (float32, or bfloat16 for a bfloat16 model)."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        out: torch.Tensor = torch.ops.goodspeed.add_rms_norm(x, delta, weight, eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.goodspeed.silu_mul(gate_up)
        return out

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        layer_idx: int,
        slot_ids: torch.Tensor,
        num_heads: int,
        scale: float,
    ) -> torch.Tensor:
        k_t, v = kv_cache.k_t_layers[layer_idx], kv_cache.v_layers[layer_idx]
        q: torch.Tensor = torch.ops.goodspeed.rope_write_kv(qkv, cos, sin, k_t, v, slot_ids, num_heads, scale)
        return q

    def decoder_layers(
        self,
        x: torch.Tensor,
        layers: list[LayerWeights],
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        slot_ids: torch.Tensor,
        num_heads: int,
        scale: float,
        kernel_seqs: KernelSeqs,
    ) -> None:
        """Every layer in one C++ call (csrc/cpu_layer.cpp), x [T, hidden] updated in place: for a
        step of at most `whole_layer_rows` tokens, where the attention kernel is built.
        The same kernels in the same order as the per-operator path, without the Python between."""
        torch.ops.goodspeed.decoder_layers(
            x,
            [layer.input_norm for layer in layers],
            [layer.post_norm for layer in layers],
            eps,
            [layer.qkv.blocks for layer in layers],
            layers[0].qkv.num_out,
            [layer.qkv.bias for layer in layers],
            [layer.o_proj.blocks for layer in layers],
            [layer.gate_up.blocks for layer in layers],
            layers[0].gate_up.num_out,
            [layer.down.blocks for layer in layers],
            cos,
            sin,
            kv_cache.k_t_layers,
            kv_cache.v_layers,
            slot_ids,
            num_heads,
            scale,
            kernel_seqs.seqs,
            kernel_seqs.num_sink_tokens,
            kernel_seqs.num_recent_tokens,
        )


def whole_layer_rows(ops: LayerOps, layers: list[LayerWeights]) -> int:
    """The most rows `FusedLayerOps.decoder_layers` takes: those every product of every layer runs
    in the few-rows kernel (0: none; also where a product other than QKV has a bias)."""
    if not isinstance(ops, FusedLayerOps):
        return 0
    products = [product for layer in layers for product in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    if any(product.bias is not None for layer in layers for product in (layer.o_proj, layer.gate_up, layer.down)):
        return 0
    return min(product.max_kernel_rows for product in products)  # 0 wherever the kernel's copy is gone


def layer_ops(dtype: torch.dtype, device: torch.device) -> LayerOps:
    """The fused kernels where they apply and are built, torch's operators elsewhere."""
    is_fusable = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
    return FusedLayerOps() if is_fusable and cpu_kernels_built() else LayerOps()
