"""A tiny corpus and a few-second speculator training run on a tiny random model (mechanics only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.speculator.model import MLPSpeculator, SpeculatorConfig
from engine.speculator.train import train_speculator
from engine.speculator.train_config import TrainConfig

NUM_PACKAGES = 30  # enough that a few small ones are held out (none may hold over 5% of the files)


def make_corpus(root: Path) -> Path:
    """A site-packages-like directory of small, repetitive Python packages."""
    site = root / "site-packages"
    for n in range(NUM_PACKAGES):
        package = site / f"pkg{n}"
        package.mkdir(parents=True, exist_ok=True)
        (package / "mod.py").write_text("".join(f"def f{i}(x):\n    return x + {i % 7}\n\n" for i in range(80 + n)))
    return site


def encode_bytes(text: str) -> list[int]:
    """A tokenizer for a 128-token vocabulary: bytes modulo 127 (127 is the tiny models' EOS)."""
    return [b % 127 for b in text.encode()]


def tiny_config(model: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "model": str(model),
        "num_heads": 3,
        "num_classes": 48,
        "chunk_tokens": 64,
        "num_code_chunks": 64,
        "num_held_out_chunks": 8,
        "num_prompts": 16,
        "num_held_out_prompts": 4,
        "prompt_tokens": 16,
        "new_tokens": 24,
        "generation_batch": 8,
        "stage1_steps": 60,
        "stage2_steps": 80,
        "batch_records": 8,
        "time_budget_s": 300.0,
        "dtype": "float32",
    }
    return TrainConfig(**(settings | overrides))


def train_tiny(model: Path, corpus: Path, **overrides: Any) -> dict[str, Any]:
    return train_speculator(tiny_config(model, **overrides), None, encode=encode_bytes, source_dirs=[corpus])


def save_markov_speculator(model: Path, sharpness: float) -> None:
    """Saves, for a model from make_tiny_markov_llama, a speculator built by hand whose every head
    gives the target's own next-token logits times sharpness, from the token it is fed: its q is
    the target's p at sharpness 1, and sharper above. Each head's state is its input token one-hot
    (width = classes): the projection of the previous state is zero, the embedding the identity,
    and after the norm and GELU the head reads the target's logits row of that token."""
    import math

    import torch

    from engine.model.layer_ops import rms_norm
    from engine.model.loader import load_transformer
    from engine.speculator.location import speculator_dir
    from engine.speculator.model import MLPSpeculator, SpeculatorConfig
    from engine.speculator.store import TrainedSpeculator, save

    target = load_transformer(model, torch.float32, torch.device("cpu"), show_progress=False)
    w, vocab = target.weights, target.spec.vocab_size
    num_classes = vocab + 1  # every token, and "other", never named
    with torch.no_grad():
        logits = w.lm_head(rms_norm(w.embed, w.final_norm, target.spec.rms_norm_eps))  # [V, V]: next after each token
        config = SpeculatorConfig(target.spec.hidden_size, num_classes, num_heads=2, inner_dim=num_classes)
        spec = MLPSpeculator(config)
        one_hot_state = torch.nn.functional.gelu(torch.tensor(math.sqrt(num_classes))).item()  # after norm and GELU
        for i in range(config.num_heads):
            spec.proj[i].weight.zero_()
            spec.emb[i].weight.copy_(torch.eye(num_classes))
            head = torch.zeros(num_classes, num_classes)
            head[:vocab, :vocab] = logits.T * sharpness / one_hot_state
            spec.head[i].weight.copy_(head)
    save(speculator_dir(str(model)), TrainedSpeculator(spec, torch.arange(vocab), {"model": str(model)}))


def random_speculator(config: SpeculatorConfig, seed: int = 0) -> MLPSpeculator:
    """Random heads whose layer norms are moved off weight 1, bias 0, so that a test sees them."""
    torch.manual_seed(seed)
    spec = MLPSpeculator(config)
    with torch.no_grad():
        for ln in spec.ln:
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    return spec
