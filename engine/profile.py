"""Timing synthetic steps of given shapes, for the control plane's step-cost model.

Runs only while no request is in the engine (at start-up). Each shape gets temporary KV regions
(zeroed, so no denormal garbage skews the arithmetic), one untimed run, then `repeats` timed runs
of the forward pass plus the greedy pick, which is most of a real step.
"""

from __future__ import annotations

import time

import torch

from engine.drafters.base import DraftRequest
from engine.drafters.draft_model import DraftModelDrafter
from engine.drafters.mlp import MLPDrafter
from engine.drafters.self_spec import SelfSpecDrafter
from engine.model.transformer import AttentionWindow, ForwardBatch, SeqInput
from engine.protocol import ProfileShape, StepSample
from engine.runner import ModelRunner


@torch.inference_mode()
def profile_steps(runner: ModelRunner, shapes: list[ProfileShape], repeats: int, drafter: str = "") -> list[StepSample]:
    """Times the target's forward, or with drafter named, that drafter's model's forward (which
    needs logits for one row per sequence: the feed's last token, or the token it extends)."""
    if runner.seqs:
        raise RuntimeError("profiling needs an idle engine")
    model, kv_cache, allocator = runner.model, runner.kv_cache, runner.allocator
    window = None
    if drafter:
        draft = runner.drafters.get(drafter)
        if isinstance(draft, DraftModelDrafter):
            model, kv_cache, allocator = draft.model, draft.kv_cache, draft.allocator
        elif isinstance(draft, MLPDrafter):
            # every batch size up to the largest: its cost model has a dozen features to fit
            max_seqs = max((shape.num_seqs + shape.num_plain_seqs for shape in shapes), default=0)
            return profile_heads(draft, list(range(1, max_seqs + 1)), repeats)
        elif isinstance(draft, SelfSpecDrafter):
            # The target's own forward over the window, one token per sequence: a shape's tokens
            # become as many one-token sequences (its forwards at that batch size), each with a
            # context just past the window, the only kind it drafts for (it offers nothing to a
            # shorter request): sinks and recent rows are copied into one block, as at 8K tokens.
            window = draft.window
            # A draft forward has one token per request, so no more sequences than the largest batch.
            max_seqs = max((shape.num_seqs + shape.num_plain_seqs for shape in shapes), default=0)
            one_token = dict.fromkeys(as_one_token_seqs(shape, window) for shape in shapes)
            shapes = [shape for shape in one_token if shape.num_seqs <= max_seqs]
        else:
            raise ValueError(f"the engine has no drafter named {drafter!r} that runs a model to profile")
    samples: list[StepSample] = []
    for shape in shapes:
        queries = [shape.num_query_tokens] * shape.num_seqs + [1] * shape.num_plain_seqs
        if sum(shape.num_context_tokens + n for n in queries) > allocator.num_free_tokens:
            continue  # this KV cache is too small for the shape
        ids = [f"__profile_{i}" for i in range(len(queries))]
        regions = [
            allocator.allocate(req_id, shape.num_context_tokens + n, kv_cache)
            for req_id, n in zip(ids, queries, strict=True)
        ]
        try:
            for region in regions:
                rows = slice(region.start, region.end)
                kv_cache.v[:, :, rows].zero_()
                kv_cache.set_k_rows(rows, kv_cache.v[:, :, rows])
            is_verify = not drafter and shape.num_query_tokens <= runner.max_draft_tokens + 1
            starts = [r.start for r in regions]
            batch = synthetic_batch(
                queries, shape.num_context_tokens, starts, is_verify, model.spec.vocab_size, model.device, window
            )
            seconds = []
            for i in range(repeats + (not samples)):
                started = time.perf_counter()
                logits = model.forward(batch, kv_cache)
                logits.float().max(dim=-1).indices.tolist()
                if samples or i:  # the very first run only warms caches and allocators
                    seconds.append(time.perf_counter() - started)
        finally:
            for req_id in ids:
                allocator.free(req_id)
        samples.append(StepSample(batch.shape(), sorted(seconds)[len(seconds) // 2]))
    return samples


def synthetic_batch(
    queries: list[int],
    cached: int,
    kv_starts: list[int],
    is_verify: bool,
    vocab_size: int,
    device: torch.device,
    window: AttentionWindow | None = None,
) -> ForwardBatch:
    """queries[i] query tokens for sequence i, each after `cached` tokens already in its KV region.
    Logits for every position of a verification, else for the last token of each sequence."""
    inputs, num_tokens = [], 0
    for n, start in zip(queries, kv_starts, strict=True):
        token_ids = [1 + i % min(1000, vocab_size - 1) for i in range(num_tokens, num_tokens + n)]
        inputs.append(SeqInput(token_ids, start, cached, n if is_verify else 1))
        num_tokens += n
    return ForwardBatch.of(inputs, device, window)


def as_one_token_seqs(shape: ProfileShape, window: AttentionWindow) -> ProfileShape:
    num_seqs = shape.num_seqs * shape.num_query_tokens + shape.num_plain_seqs
    return ProfileShape(num_seqs, 1, window.num_tokens)


def profile_heads(drafter: MLPDrafter, batch_sizes: list[int], repeats: int) -> list[StepSample]:
    """An MLP speculator's heads at each batch size, one sample per head as the shapes it reports
    (greedy: the sampled path adds a softmax per row, which the online refit sees)."""
    hidden_size = drafter.model.config.emb_dim
    device = drafter.token_ids.device
    samples = []
    for num_seqs in batch_sizes:
        requests = [
            DraftRequest(
                f"__profile_{i}", [1 + i], drafter.num_heads, last_hidden=torch.randn(hidden_size, device=device)
            )
            for i in range(num_seqs)
        ]
        seconds = []
        for i in range(repeats + 1):
            for request in requests:  # so every head runs, head 0 too (in a step it runs with the offers)
                drafter.remove_request(request.req_id)
            started = time.perf_counter()
            drafter.propose(requests)
            if i:  # the first run only warms caches and allocators
                seconds.append((time.perf_counter() - started) / drafter.num_heads)
        for request in requests:
            drafter.remove_request(request.req_id)
        shapes = drafter.take_forwards()
        samples.append(StepSample(shapes[0], sorted(seconds)[len(seconds) // 2]))
    return samples
