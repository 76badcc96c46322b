"""Self-speculation over a sink + window view of the target's own KV (MagicDec, arXiv 2408.11049).

The target drafts for itself: k one-token forwards, batched over the requests assigned to it,
each attending only to the first num_sink_tokens of its context and the last num_recent_tokens.
MagicDec's premise: once contexts are long, a decode step is bound by reading the KV cache, and a
draft forward costs about what a short-context step costs whatever the context, so speculation
pays more as the batch grows, not less. (On a 2-core CPU the first half holds, the second only in
part: verifying k tokens at long context costs well over a plain step; `goodspeed bench longctx`.)

No second KV cache. Draft token j's K/V are written to the row that verification writes next:
the step feeds the last token and the k drafts at the same positions with full attention, and
each layer writes its new K/V before it reads any, so every row a draft wrote is overwritten
before it is read; rows past the accepted tokens lie past the request's length. A draft's K/V
(from windowed attention in layers >= 1) are thus never reused, which is the point: a second,
compressed cache would have to be kept in step with the target's, rolled back and caught up; the
target's own rows are right by construction. There is no state per request at all.

Positions are the tokens' own: no re-indexing into the window, unlike MagicDec's code, which
re-rotates the kept keys to 0 .. budget - 1. The cache holds keys rotated at their own positions;
re-indexing would need a re-rotated copy of the window in every layer of every forward, and
every distance a draft sees is one the model sees in full attention (a request never exceeds
the model's trained context, `max_position_embeddings`). The window slides with the sequence:
it is always the last num_recent_tokens rows, the query's own included.
"""

from __future__ import annotations

import torch

from engine.drafters.base import Draft, Drafter, DraftRequest, pick_draft_tokens
from engine.kv_cache import KVCache
from engine.model.transformer import AttentionWindow, ForwardBatch, SeqInput, Transformer
from engine.protocol import BatchShape, Offer

SELF_NOISE_STREAM = 0x5E1F5D  # salts the request seed: its own noise, apart from the target's and a draft model's


class SelfSpecDrafter(Drafter):
    name = "self"
    runs_model = True
    # The target itself, with the window missing only what lies between the sinks and the last
    # rows: 0.87-1.00 of its tokens passed at 1K-8K tokens, in both dtypes (`bench longctx`);
    # MagicDec reports about 0.8. At 0.5, a server that had not yet seen a self draft never tried one.
    prior_acceptance = 0.9

    def __init__(self, model: Transformer, kv_cache: KVCache, window: AttentionWindow) -> None:
        """model, kv_cache: the target's."""
        self.model, self.kv_cache, self.window = model, kv_cache, window
        self.forwards: list[BatchShape] = []  # of the forwards since take_forwards

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafting = [r for r in requests if r.num_draft_tokens > 0]
        token_ids: dict[str, list[int]] = {r.req_id: [] for r in drafting}
        probs: dict[str, list[torch.Tensor]] = {r.req_id: [] for r in drafting}
        for j in range(max((r.num_draft_tokens for r in drafting), default=0)):
            active = [r for r in drafting if r.num_draft_tokens > j]
            # The target's cache holds every token but the last (fed by the coming step); draft j
            # feeds the token before it at position len - 1 + j, over the window.
            inputs = [
                SeqInput([token_ids[r.req_id][-1] if j else r.token_ids[-1]], r.kv_start, len(r.token_ids) - 1 + j, 1)
                for r in active
            ]
            batch = ForwardBatch.of(inputs, self.model.device, self.window)
            self.forwards.append(batch.shape())
            logits = self.model.forward(batch, self.kv_cache)
            picks = [(r.sampling, len(r.token_ids) + j) for r in active]
            for r, (token_id, p) in zip(active, pick_draft_tokens(logits, picks, SELF_NOISE_STREAM), strict=True):
                token_ids[r.req_id].append(token_id)
                if p is not None:
                    probs[r.req_id].append(p)
        return [
            Draft(token_ids[r.req_id], torch.stack(probs[r.req_id]) if probs[r.req_id] else None)
            if r.req_id in token_ids
            else Draft()
            for r in requests
        ]

    def take_forwards(self) -> list[BatchShape]:
        forwards, self.forwards = self.forwards, []
        return forwards

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        """Once the context outgrows the window it can always propose, has nothing to catch up on
        (it reads the target's own KV), and attends to the window only. Before, a draft would be
        a full forward of the target, dearer than the plain step it hopes to save: it offers
        nothing, so AUTO neither picks nor probes it at short context (a FIXED request naming it
        still gets its drafts)."""
        if len(token_ids) <= self.window.num_tokens:
            return Offer()
        return Offer(num_draft_tokens, num_unseen=1, max_kv_tokens=self.window.num_tokens)
