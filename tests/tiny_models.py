"""Tiny random models in the Hugging Face format, for tests about mechanics rather than outputs."""

from __future__ import annotations

from pathlib import Path


def make_tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=127,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(path)
