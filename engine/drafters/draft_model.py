"""Drafting with a small model of the target's family (Leviathan et al., arXiv 2211.17192).

The draft model runs through our own forward pass with a preallocated KV cache of its own, one
region per request sized like the target's. It sees what the target sees: prompt chunks are fed
in the same steps as the target prefills them, and the tokens it has not seen yet (the bonus or
recovered token of the last step, or every token of the steps in which the request did not
draft) are fed at its next forward, together with the first draft position. Then k - 1
one-token forwards, batched over the requests still drafting. After verification its cache rolls
back to the accepted length by a length change, as the target's does.

Greedy requests draft the argmax, which verification treats as one-hot. Sampled requests draw
from the draft model's own distribution (same temperature, top-k and top-p) with noise keyed by
(seed, position) on a stream of its own, and pass that distribution on, so verification runs
real rejection sampling with q != one-hot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.drafters.base import Draft, Drafter, DraftRequest, pick_draft_tokens
from engine.kv_cache import KVCache, Region, RegionAllocator
from engine.model.spec import ModelSpec
from engine.model.transformer import ForwardBatch, SeqInput, Transformer
from engine.protocol import BatchShape, Offer

DRAFT_NOISE_STREAM = 0x0D4AF7  # salts the request seed: draft sampling must not reuse the target's noise


class DraftModelMismatchError(ValueError):
    """The draft model cannot draft for this target: its token ids mean other tokens."""


@dataclass(slots=True)
class DraftSequence:
    region: Region
    num_computed: int = 0  # tokens of the request whose K/V are in the draft cache, all of them right
    proposed_from: int = 0  # the request's length when it last drafted
    # filled while proposing, one entry per draft token
    token_ids: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)


class DraftModelDrafter(Drafter):
    name = "model"
    sees_prefill = True
    runs_model = True

    def __init__(self, model: Transformer, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.allocator = RegionAllocator(kv_cache.capacity_tokens)
        self.seqs: dict[str, DraftSequence] = {}
        self.forwards: list[BatchShape] = []  # of the forwards since take_forwards

    def add_request(self, req_id: str, token_ids: list[int], num_tokens: int) -> None:
        self.seqs[req_id] = DraftSequence(self.allocator.allocate(req_id, num_tokens, self.kv_cache))

    def remove_request(self, req_id: str) -> None:
        if self.seqs.pop(req_id, None) is not None:
            self.allocator.free(req_id)

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafting = [r for r in requests if r.num_draft_tokens > 0 and r.req_id in self.seqs]
        self._feed(requests, {r.req_id for r in drafting})
        for j in range(1, max((r.num_draft_tokens for r in drafting), default=0)):
            self._extend([r for r in drafting if r.num_draft_tokens > j])
        drafts = []
        for request in requests:
            seq = self.seqs.get(request.req_id)
            if seq is None or request.num_draft_tokens <= 0:
                drafts.append(Draft())
                continue
            probs = None if request.sampling.is_greedy else torch.stack(seq.probs)
            drafts.append(Draft(seq.token_ids, probs))
            seq.token_ids, seq.probs = [], []
        return drafts

    def take_forwards(self) -> list[BatchShape]:
        forwards, self.forwards = self.forwards, []
        return forwards

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        """It can always propose; first it must read what it has not seen (priced by the policy)."""
        seq = self.seqs.get(req_id)
        num_unseen = len(token_ids) - seq.num_computed if seq is not None else 0
        return Offer(num_draft_tokens, num_unseen=num_unseen)

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        """Rolls the draft cache back to the accepted tokens: the rest of its K/V are rejected drafts'."""
        seq = self.seqs.get(req_id)
        if seq is not None:
            seq.num_computed = min(seq.num_computed, seq.proposed_from + num_accepted)

    def _feed(self, requests: list[DraftRequest], drafting: set[str]) -> None:
        """One forward over every request's unseen tokens: prefill chunks, and for the drafting ones
        what the last steps added, whose last logits give the first draft token."""
        inputs, fed = [], []
        for request in requests:
            seq = self.seqs.get(request.req_id)
            is_drafting = request.req_id in drafting
            end = len(request.token_ids) if is_drafting else request.num_visible
            if seq is None or end <= seq.num_computed:
                continue
            new_ids = request.token_ids[seq.num_computed : end]
            inputs.append(SeqInput(new_ids, seq.region.start, seq.num_computed, int(is_drafting)))
            fed.append((request, seq, end))
        if not inputs:
            return
        logits = self._forward(inputs)
        picks = []
        for request, seq, end in fed:
            seq.num_computed = end
            if request.req_id in drafting:
                seq.proposed_from = end
                picks.append((request, seq, end))
        self._take(picks, logits)

    def _extend(self, requests: list[DraftRequest]) -> None:
        """One more draft token for each: feeds the last one, samples the next."""
        seqs = [self.seqs[r.req_id] for r in requests]
        inputs = [SeqInput(seq.token_ids[-1:], seq.region.start, seq.num_computed, 1) for seq in seqs]
        logits = self._forward(inputs)
        for seq in seqs:
            seq.num_computed += 1
        self._take([(r, seq, seq.num_computed) for r, seq in zip(requests, seqs, strict=True)], logits)

    def _forward(self, inputs: list[SeqInput]) -> torch.Tensor:
        batch = ForwardBatch.of(inputs, self.model.device)
        self.forwards.append(batch.shape())
        return self.model.forward(batch, self.kv_cache)

    def _take(self, picks: list[tuple[DraftRequest, DraftSequence, int]], logits: torch.Tensor) -> None:
        """logits: [len(picks), V], row i for the token at picks[i]'s position -> each one's next
        draft token (and, when sampled, its distribution)."""
        tokens = pick_draft_tokens(logits, [(r.sampling, position) for r, _, position in picks], DRAFT_NOISE_STREAM)
        for (_, seq, _), (token_id, probs) in zip(picks, tokens, strict=True):
            seq.token_ids.append(token_id)
            if probs is not None:
                seq.probs.append(probs)


def check_compatible(target: ModelSpec, target_path: str | Path, draft: ModelSpec, draft_path: str | Path) -> None:
    """Raises DraftModelMismatchError unless the draft's token ids mean what the target's do."""
    if draft.vocab_size != target.vocab_size:
        raise DraftModelMismatchError(
            f"the draft model's vocabulary has {draft.vocab_size} entries, the target's {target.vocab_size}: "
            "a draft model must share the target's tokenizer"
        )
    if draft.max_position_embeddings < target.max_position_embeddings:
        raise DraftModelMismatchError(
            f"the draft model's context ({draft.max_position_embeddings} tokens) is shorter than the target's "
            f"({target.max_position_embeddings})"
        )
    target_vocab, draft_vocab = tokenizer_vocab(target_path), tokenizer_vocab(draft_path)
    if target_vocab is None and draft_vocab is None:
        return  # no tokenizer on either side (test models): the sizes agree, which is all there is
    if target_vocab != draft_vocab:
        differ = len(set((target_vocab or {}).items()) ^ set((draft_vocab or {}).items()))
        raise DraftModelMismatchError(
            f"the draft model's tokenizer differs from the target's ({differ} token-id pairs differ): "
            "a draft model must share the target's tokenizer"
        )


def tokenizer_vocab(path: str | Path) -> dict[str, int] | None:
    """token -> id of a model directory's tokenizer.json (the added tokens included), or None."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    vocab: dict[str, int] = dict(data.get("model", {}).get("vocab", {}))
    vocab.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
    return vocab
