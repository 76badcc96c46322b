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


def make_tiny_qwen2(
    path: Path,
    seed: int = 0,
    vocab_size: int = 128,
    num_layers: int = 2,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    qkv_bias_std: float = 0.0,
) -> None:
    """A tiny random qwen2. Models made with the same vocab_size share token ids, so any two of
    them make a target and draft pair. transformers starts q/k/v biases at 0; qkv_bias_std > 0
    draws them, so a forward pass that dropped them would show."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=vocab_size - 1,
        bos_token_id=1,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Qwen2ForCausalLM(config)
    if qkv_bias_std > 0:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, qkv_bias_std)
    model.save_pretrained(path)


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


def make_tiny_markov_llama(path: Path, sharpness: float = 30.0) -> None:
    """A tiny llama whose next token depends on the current token only: attention and MLP outputs
    are zero, so each position's hidden state is its own token's embedding. A drafter can learn
    such a model in seconds, which a test of speculative sampling needs (drafts must pass often
    for a wrong q to show). sharpness scales the output layer: the larger, the more peaked."""
    import torch
    from transformers import LlamaForCausalLM

    make_tiny_llama(path)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.mul_(sharpness)
    model.save_pretrained(path)
