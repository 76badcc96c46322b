"""Weights of a transformers llama/qwen2 model, rearranged for our forward pass.

q, k and v are fused into one matrix and gate and up into another, so a layer runs four
matrix products over the step's tokens instead of seven.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.model.linear import Linear, fastest_single_row_form, prepack_works, single_row_forms
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


def from_hf_model(hf_model: Any, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Takes the tensors out of a transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`."""
    prepack = prepack_works(dtype, device)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype).contiguous()

    # lm_head, the largest product, stands for all: which form is fastest at one row is a property
    # of the machine's kernels. The forms round differently in float32: the log says which one won.
    lm_head = Linear(take(hf_model.lm_head.weight), None, prepack, single_row="dense")
    single_row = fastest_single_row_form(lm_head, single_row_forms(dtype, device, prepack))
    lm_head.use_single_row(single_row)
    logging.getLogger("goodspeed.engine").info(
        "linear products: %s for single rows, %s for more", single_row, "packed" if prepack else "dense"
    )

    def linear(*parts: Any, bias_parts: tuple[Any, ...] = ()) -> Linear:
        weight = take(torch.cat([p.weight for p in parts]))
        bias = take(torch.cat([p.bias for p in bias_parts])) if bias_parts else None
        return Linear(weight, bias, prepack, single_row)

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
