"""The drafter's copy of the heads (engine/speculator/served.py) computes what the trained model does."""

from __future__ import annotations

import pytest
import torch

import engine.speculator.served as served
from engine.speculator.model import MLPSpeculator, SpeculatorConfig
from engine.speculator.served import ServedSpeculator
from tests.speculator.tiny import random_speculator


def trained_like(tie_weights: bool, scale_input: bool) -> MLPSpeculator:
    config = SpeculatorConfig(
        emb_dim=48, vocab_size=101, num_heads=3, inner_dim=64, tie_weights=tie_weights, scale_input=scale_input
    )
    return random_speculator(config).eval()


def chains(heads: MLPSpeculator | ServedSpeculator, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Every head's logits [heads, B, C] along the greedy chain."""
    with torch.inference_mode():
        state, logits = heads.run_head(0, hidden, token_ids)
        return heads.propose_after_head_0(state, logits, 3, lambda _, logits: logits.argmax(-1))[1]


@pytest.mark.parametrize("tie_weights,scale_input", [(False, False), (True, True)])
def test_served_heads_compute_the_trained_heads(
    tie_weights: bool, scale_input: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = trained_like(tie_weights, scale_input)
    hidden, token_ids = torch.randn(5, 48), torch.randint(0, 101, (5,))
    expected = chains(spec, hidden, token_ids)
    # as served on this CPU: bfloat16 products in the engine's kernel (where it is built)
    heads = ServedSpeculator(spec, torch.device("cpu"), torch.float32)
    got = chains(heads, hidden, token_ids)
    scale = float(expected.abs().max())
    assert (got - expected).abs().max() <= 0.03 * scale
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.8
    # without the kernel, products in the target's dtype: the same arithmetic, to float32's rounding
    monkeypatch.setattr(served, "kernel_fits", lambda dtype, device: False)
    heads = ServedSpeculator(spec, torch.device("cpu"), torch.float32)
    assert heads.product_dtype == torch.float32
    torch.testing.assert_close(chains(heads, hidden, token_ids), expected, rtol=1e-5, atol=1e-5)
