"""Timing synthetic steps of given shapes, for the control plane's step-cost model.

Runs only while no request is in the engine (at start-up). Each shape gets temporary KV regions
(zeroed, so no denormal garbage skews the arithmetic), one untimed run, then `repeats` timed runs
of the forward pass plus the greedy pick, which is most of a real step.
"""

from __future__ import annotations

import time

import torch

from engine.model.transformer import ForwardBatch, SeqInput
from engine.protocol import ProfileShape, StepSample
from engine.runner import ModelRunner, batch_shape


@torch.inference_mode()
def profile_steps(runner: ModelRunner, shapes: list[ProfileShape], repeats: int) -> list[StepSample]:
    if runner.seqs:
        raise RuntimeError("profiling needs an idle engine")
    samples: list[StepSample] = []
    for shape in shapes:
        queries = [shape.num_query_tokens] * shape.num_seqs + [1] * shape.num_plain_seqs
        if sum(shape.num_context_tokens + n for n in queries) > runner.allocator.num_free_tokens:
            continue  # this KV cache is too small for the shape
        ids = [f"__profile_{i}" for i in range(len(queries))]
        regions = [
            runner.allocator.allocate(req_id, shape.num_context_tokens + n, runner.kv_cache)
            for req_id, n in zip(ids, queries, strict=True)
        ]
        try:
            for region in regions:
                runner.kv_cache.k[:, :, region.start : region.end].zero_()
                runner.kv_cache.v[:, :, region.start : region.end].zero_()
            is_decode = shape.num_query_tokens <= runner.max_draft_tokens + 1
            starts = [r.start for r in regions]
            batch = synthetic_batch(queries, shape.num_context_tokens, starts, is_decode, runner.model.device)
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


def synthetic_batch(
    queries: list[int], cached: int, kv_starts: list[int], is_decode: bool, device: torch.device
) -> ForwardBatch:
    """queries[i] query tokens for sequence i, each after `cached` tokens already in its KV region.
    Logits for every verified position of a decode step, for the last token of a prefill chunk."""
    inputs, num_tokens = [], 0
    for n, start in zip(queries, kv_starts, strict=True):
        token_ids = [1 + (i % 1000) for i in range(num_tokens, num_tokens + n)]
        inputs.append(SeqInput(token_ids, start, cached, n if is_decode else 1))
        num_tokens += n
    return ForwardBatch.of(inputs, device)
