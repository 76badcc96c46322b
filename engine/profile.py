"""Timing synthetic steps of given shapes, for the control plane's step-cost model.

Runs only while no request is in the engine (at start-up). Each shape gets temporary KV regions
(zeroed, so no denormal garbage skews the arithmetic), one untimed run, then `repeats` timed runs
of the forward pass plus the greedy pick, which is most of a real step.
"""

from __future__ import annotations

import time

import torch

from engine.model.transformer import ForwardBatch, SeqSlice
from engine.protocol import ProfileShape, StepSample
from engine.runner import ModelRunner, batch_shape


@torch.inference_mode()
def profile_steps(runner: ModelRunner, shapes: list[ProfileShape], repeats: int) -> list[StepSample]:
    if runner.requests:
        raise RuntimeError("profiling needs an idle engine")
    samples: list[StepSample] = []
    for shape in shapes:
        per_seq = shape.num_context_tokens + shape.num_query_tokens
        if shape.num_seqs * per_seq > runner.allocator.num_free_tokens:
            continue  # this KV cache is too small for the shape
        ids = [f"__profile_{i}" for i in range(shape.num_seqs)]
        regions = [runner.allocator.allocate(req_id, per_seq, runner.kv_cache) for req_id in ids]
        try:
            for region in regions:
                runner.kv_cache.k[:, :, region.start : region.end].zero_()
                runner.kv_cache.v[:, :, region.start : region.end].zero_()
            is_decode = shape.num_query_tokens <= runner.max_draft_tokens + 1
            batch = synthetic_batch(shape, [r.start for r in regions], is_decode, runner.model.device)
            seconds = []
            for i in range(repeats + (not samples)):
                started = time.perf_counter()
                logits = runner.model.forward(batch, runner.kv_cache)
                logits.float().max(dim=-1).indices.tolist()
                if samples or i:  # the very first run only warms caches and allocators
                    seconds.append(time.perf_counter() - started)
        finally:
            for req_id in ids:
                runner.allocator.free(req_id)
        samples.append(StepSample(batch_shape(batch.seqs), sorted(seconds)[len(seconds) // 2]))
    return samples


def synthetic_batch(shape: ProfileShape, kv_starts: list[int], is_decode: bool, device: torch.device) -> ForwardBatch:
    n, cached = shape.num_query_tokens, shape.num_context_tokens
    positions = list(range(cached, cached + n)) * shape.num_seqs
    slots = [start + p for start in kv_starts for p in range(cached, cached + n)]
    seqs = [SeqSlice(i * n, n, start, cached) for i, start in enumerate(kv_starts)]
    # Logits for every verified position of a decode step, for the last token of a prefill chunk.
    first = 0 if is_decode else n - 1
    rows = [i * n + j for i in range(shape.num_seqs) for j in range(first, n)]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    token_ids = [1 + (i % 1000) for i in range(shape.num_seqs * n)]
    return ForwardBatch(tensor(token_ids), tensor(positions), tensor(slots), tensor(rows), seqs)
