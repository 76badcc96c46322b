"""The shapes of the start-up profile that warms the step-cost model before the first request
(the server times them on the engine and hands the samples to `SpeculationPolicy.warm`)."""

from __future__ import annotations

from engine.protocol import ProfileShape

MAX_PROFILE_TOKENS = 128  # bigger steps are slow to time and the online refit covers them
LONG_CONTEXT_TOKENS = 4096
REPEATS = 3  # timed runs per shape; the median is kept (a busy neighbour slows single runs)


def profile_shapes(max_seqs: int, max_draft_tokens: int, prefill_tokens: int) -> list[ProfileShape]:
    """Decode and verify steps of 1 to 32 sequences, short and long contexts; mixed batches where
    a quarter or half of 8 or 16 sequences verify drafts; one prefill chunk."""
    shapes = []
    for context, batch_sizes in ((64, (1, 2, 4)), (512, (1, 2, 4, 8, 16, 32))):
        for num_seqs in batch_sizes:
            for num_query in (1, 2, 4, 8):
                fits = num_seqs <= max_seqs and num_query <= max_draft_tokens + 1
                if fits and num_seqs * num_query <= MAX_PROFILE_TOKENS:
                    shapes.append(ProfileShape(num_seqs, num_query, context))
    # In uniform batches every sequence verifies or none does, so the cost of turning one decode
    # into a verification cannot be told from the cost of its extra tokens; the chooser prices
    # exactly that. (Without these, a first draft at 8 sequences was priced at 4.8 ms against
    # 1.0-3.1 ms timed directly: docs/goodput-policy.md.)
    for num_seqs in (8, 16):
        for num_verifying in (num_seqs // 4, num_seqs // 2):
            for num_query in (2, 4):
                if num_seqs <= max_seqs and num_query <= max_draft_tokens + 1:
                    shapes.append(ProfileShape(num_verifying, num_query, 512, num_seqs - num_verifying))
    # Six query tokens at batch 1, where the cost model's knot at 6 is (the product kernel's
    # groups of rows end there, cost_model.py): without them the knot's slope is guessed.
    if max_draft_tokens + 1 >= 6:
        shapes += [ProfileShape(1, 6, context) for context in (64, 512)]
    shapes.append(ProfileShape(1, min(prefill_tokens, MAX_PROFILE_TOKENS), 0))
    # Long contexts: attention over KV that no cache holds costs more per query-key pair than at
    # 512 tokens, so without these the model under-prices verifying and prefilling there (a
    # prefill chunk beside a decode at 8K tokens took longer than its predicted time). Skipped
    # where the KV cache cannot hold them.
    # Verifications of several lengths there too, by up to 8 sequences: they tell a query-key
    # pair's cost from a KV token's, and a deep query's from the first two (without those by 4
    # and 8 sequences, verifying 3 drafts at 7,680 tokens and batch 8 was priced 1.3-1.5x its time
    # beside a plain step: docs/long-context.md).
    long_shapes = ((1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (1, 8), (2, 4), (4, 4), (4, 8), (8, 2), (8, 4), (1, 64))
    for num_seqs, num_query in long_shapes:
        if num_seqs <= max_seqs and (num_query <= max_draft_tokens + 1 or num_query == 64):
            shapes.append(ProfileShape(num_seqs, num_query, LONG_CONTEXT_TOKENS))
    return shapes
