"""The memory roofline of batch-1 decoding: what a step would take if it only read the weights
once at the bandwidth a triad measured, and plain decoding's share of it (bench engine,
step-profile, grpc)."""

from __future__ import annotations

import statistics

import torch

from engine.model.spec import ModelSpec

# Triads around what is timed: a shared host's bandwidth moved between 18 and 27 GB/s within one
# workload's two minutes, so one reading at the start is a poor denominator.
TRIAD_REPEATS = 2


def roofline_tokens_per_s(spec: ModelSpec, dtype: torch.dtype, bandwidth_gbs: float) -> float:
    """Batch-1 decoding if a step took only the time to read every weight matrix once (the layers'
    projections and the output layer; embedding rows and norms are negligible) at bandwidth_gbs."""
    attention = spec.hidden_size * (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    attention += spec.num_heads * spec.head_dim * spec.hidden_size
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    num_params = spec.num_layers * (attention + mlp) + spec.vocab_size * spec.hidden_size
    return bandwidth_gbs * 1e9 / (num_params * dtype.itemsize)


def spread(shares: list[float]) -> dict[str, float]:
    """Median, least and most of some shares of the roofline, rounded for a report."""
    return {"median": round(statistics.median(shares), 3), "min": round(min(shares), 3), "max": round(max(shares), 3)}
