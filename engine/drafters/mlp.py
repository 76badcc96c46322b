"""Drafting with a trained MLP speculator (engine/speculator): no KV cache, no second model.

Each request drafts from the target's final-norm hidden state that produced its last token (the
runner keeps that row of the step's forward, so no extra forward runs) and that token: head 0
guesses the token after it, head j the one after head j - 1's pick. Heads run batched over every
request assigned to the speculator, as many heads as the longest draft asks for. The heads name
only the target's most frequent tokens plus an "other" class; "other" is never proposed.
"""

from __future__ import annotations

import torch

from engine.drafters.base import Draft, Drafter, DraftRequest, pick_draft_tokens
from engine.protocol import BatchShape, Offer
from engine.speculator.store import TrainedSpeculator

MLP_NOISE_STREAM = 0x31F5EC  # salts the request seed: its own noise, apart from the target's and other drafters'


class MLPDrafter(Drafter):
    name = "mlp"
    runs_model = True

    def __init__(self, speculator: TrainedSpeculator, target_vocab_size: int, target_hidden_size: int) -> None:
        if (
            speculator.model.config.emb_dim != target_hidden_size
            or int(speculator.token_ids.max()) >= target_vocab_size
        ):
            raise ValueError(
                f"the speculator was trained for another model: its hidden size {speculator.model.config.emb_dim} "
                f"and largest token id {int(speculator.token_ids.max())}, the target's hidden size "
                f"{target_hidden_size} and vocabulary {target_vocab_size}; train one for this model"
            )
        self.speculator = speculator
        self.model = speculator.model
        device = speculator.token_ids.device
        self.token_ids = speculator.token_ids  # [C - 1]: class -> target id
        self.classes = speculator.to_classes(target_vocab_size).to(device)  # [V]: target id -> class
        self.target_vocab_size = target_vocab_size
        self.forwards: list[BatchShape] = []

    @property
    def num_heads(self) -> int:
        return self.speculator.num_heads

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafting = [r for r in requests if r.num_draft_tokens > 0 and r.last_hidden is not None]
        if not drafting:
            return [Draft() for _ in requests]
        num_tokens = min(max(r.num_draft_tokens for r in drafting), self.num_heads)
        param = next(self.model.parameters())
        states = torch.stack([r.last_hidden for r in drafting if r.last_hidden is not None]).to(param.dtype)
        last = torch.tensor([r.token_ids[-1] for r in drafting], dtype=torch.long, device=param.device)
        is_sampled = not all(r.sampling.is_greedy for r in drafting)
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]

        def pick(head: int, logits: torch.Tensor) -> torch.Tensor:
            # logits: [B, C] -> each request's class for this head
            logits = logits.float()
            logits[:, -1] = float("-inf")  # "other" names no token
            if not is_sampled:
                return logits.max(dim=-1).indices
            full = logits.new_full((len(drafting), self.target_vocab_size), float("-inf"))
            full[:, self.token_ids] = logits[:, :-1]  # [B, V], -inf where the heads name nothing
            picks = [(r.sampling, len(r.token_ids) + head) for r in drafting]
            chosen = pick_draft_tokens(full, picks, MLP_NOISE_STREAM)
            for row, (_, p) in enumerate(chosen):
                if p is not None:
                    probs[row].append(p)
            return self.classes[torch.tensor([token_id for token_id, _ in chosen], device=logits.device)]

        classes, _ = self.model.propose(states, self.classes[last], num_tokens, pick)
        drafted = self.token_ids[classes].tolist()  # [B, num_tokens]
        self.forwards += [BatchShape.of([(1, 1)] * len(drafting))] * num_tokens
        by_req = {
            r.req_id: Draft(ids[: r.num_draft_tokens], torch.stack(p[: r.num_draft_tokens]) if p else None)
            for r, ids, p in zip(drafting, drafted, probs, strict=True)
        }
        return [by_req.get(r.req_id, Draft()) for r in requests]

    def take_forwards(self) -> list[BatchShape]:
        """Its heads, one "forward" each, as one query token per request over one KV token: the
        cost model fits a constant plus a cost per request to them."""
        forwards, self.forwards = self.forwards, []
        return forwards

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        """It can always propose once the request has generated a token (offers are made then)."""
        return Offer(min(num_draft_tokens, self.num_heads), num_unseen=1, max_kv_tokens=1)
