"""Weights of a transformers llama/qwen2 model, rearranged for our forward pass.

q, k and v are fused into one matrix and gate and up into another, so a layer runs four
matrix products over the step's tokens instead of seven.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.model.linear import MAX_KERNEL_ROWS, Linear, kernel_fits, prepack_works
from engine.model.spec import ModelSpec


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [hidden] -> [(H + 2 * Hkv) * D], with bias for qwen2
    o_proj: Linear  # [H * D] -> [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [hidden] -> [2 * intermediate]
    down: Linear  # [intermediate] -> [hidden]


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: Linear  # [hidden] -> [vocab]
    inv_freq: torch.Tensor  # [D / 2], float32
    rope_scale: float  # transformers' attention_scaling, 1.0 for default rope

    def products(self) -> list[Linear]:
        return [
            product for layer in self.layers for product in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
        ] + [self.lm_head]


def from_hf_model(hf_model: Any, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Takes the tensors out of a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`."""
    prepack = prepack_works(dtype, device)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype).contiguous()

    # Up to how many rows the kernel runs is timed on the whole model once it is built (row_limit.py).
    max_rows = MAX_KERNEL_ROWS if kernel_fits(dtype, device) else 0
    lm_head = Linear(take(hf_model.lm_head.weight), None, prepack, max_rows)

    def linear(*parts: Any, bias_parts: tuple[Any, ...] = ()) -> Linear:
        weight = take(torch.cat([p.weight for p in parts]))
        bias = take(torch.cat([p.bias for p in bias_parts])) if bias_parts else None
        return Linear(weight, bias, prepack, max_rows)

    body = hf_model.model
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        layers.append(
            LayerWeights(
                input_norm=take(layer.input_layernorm.weight),
                qkv=linear(*qkv_parts, bias_parts=qkv_parts if spec.has_qkv_bias else ()),
                o_proj=linear(attn.o_proj),
                post_norm=take(layer.post_attention_layernorm.weight),
                gate_up=linear(mlp.gate_proj, mlp.up_proj),
                down=linear(mlp.down_proj),
            )
        )
    rotary = body.rotary_emb
    return ModelWeights(
        embed=take(body.embed_tokens.weight),
        layers=layers,
        final_norm=take(body.norm.weight),
        lm_head=lm_head,
        inv_freq=rotary.inv_freq.detach().to(device=device, dtype=torch.float32),
        rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
    )
