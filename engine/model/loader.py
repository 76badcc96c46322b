"""Builds our Transformer from a transformers checkpoint directory (or hub id)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.model.spec import ModelSpec
from engine.model.transformer import Transformer
from engine.model.weights import from_hf_model


def load_transformer(path: str | Path, dtype: torch.dtype, device: torch.device) -> Transformer:
    """Loads the weights through transformers, then keeps only the rearranged tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    spec = ModelSpec.from_hf_config(config)  # fails early, before reading weights, on other families
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    weights = from_hf_model(hf_model, spec, dtype, device)
    del hf_model
    return Transformer(spec, weights)
