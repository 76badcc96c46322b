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


def make_tiny_qwen2(path: Path, seed: int = 0, vocab_size: int = 128, num_layers: int = 2) -> None:
    """A tiny random qwen2 (q/k/v biases). Models made with the same vocab_size share token ids,
    so any two of them make a target and draft pair."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=vocab_size - 1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(path)


def perturb_model(source: Path, path: Path, scale: float, seed: int = 0) -> None:
    """A copy of a tiny model with noise of scale x each tensor's spread added: a draft model
    that agrees with its target often, but not always."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * scale * tensor.std().clamp(min=1e-3))
    model.save_pretrained(path)
