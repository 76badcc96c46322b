"""Turning logits into tokens: temperature, top-k, top-p, and seeded sampling.

Randomness is keyed by (request seed, token position): the noise used to sample position t of a
request is the same whatever the batch around it and however many draft tokens were verified
with it. So a seeded request gives the same output alone or in a batch, and with a model-free
drafter it gives the same output with speculation on or off.
"""

from __future__ import annotations

import torch

from engine.protocol import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position), folded to 63 bits for torch.Generator."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def position_noise(
    seed: int, first_position: int, num_positions: int, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Exp(1) noise [n, vocab + 1] for positions first_position .. first_position + n - 1.

    Columns [:vocab] drive the exponential race (sampling); column [vocab] gives the uniform u of a
    rejection test as exp(-E).
    """
    rows = []
    for position in range(first_position, first_position + num_positions):
        generator = torch.Generator(device=device)
        generator.manual_seed(mix_seed(seed, position))
        rows.append(torch.empty(vocab_size + 1, device=device).exponential_(generator=generator))
    return torch.stack(rows)


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [n, V] -> probs [n, V] in float32 after temperature, top-k and top-p."""
    logits = logits.float()
    # Shifting the largest logit to 0 first keeps a tiny temperature from overflowing to inf (and
    # softmax to NaN): the others go to -inf, which is greedy, ties split evenly.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    vocab_size = logits.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        is_dropped = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(is_dropped, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs: [n, V], noise: [n, V + 1] -> token ids [n], by the exponential race argmax(p / E)."""
    return torch.argmax(probs / noise[:, : probs.shape[-1]], dim=-1)
