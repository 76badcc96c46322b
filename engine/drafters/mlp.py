"""Drafting with a trained MLP speculator (engine/speculator): no KV cache, no second model.

Each request drafts from the target's final-norm hidden state that produced its last token (the
runner keeps that row of the step's forward, so no extra forward runs) and that token: head 0
guesses the token after it, head j the one after head j - 1's pick. Head 0 runs right after
each step, batched over the requests the runner asks it to offer to (AUTO's, less those n-gram
lookup is sure of: StepPlan.sure_match_lens), and its confidence goes with the offer, so the
policy drafts where the speculator is likely right; the other heads run batched over the requests
assigned to the speculator, as many as the longest draft asks for. The heads name only the
target's most frequent tokens plus an "other" class; "other" is never proposed. The heads run from
a copy laid out for serving (engine/speculator/served.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.drafters.base import Draft, Drafter, DraftRequest, pick_draft_tokens
from engine.protocol import BatchShape, Offer, SamplingParams
from engine.speculator.served import ServedSpeculator
from engine.speculator.store import TrainedSpeculator

MLP_NOISE_STREAM = 0x31F5EC  # salts the request seed: its own noise, apart from the target's and other drafters'
CONFIDENCE_BUCKETS = 10


@dataclass(frozen=True, slots=True)
class FirstHead:
    """Head 0's work for a request at one position, done when offering and reused to draft."""

    num_tokens: int  # the request's length when it ran
    state: torch.Tensor  # [width]: what head 1 reads
    logits: torch.Tensor  # [C]
    confidence_bucket: int
    top_token_id: int  # its greedy pick


class MLPDrafter(Drafter):
    name = "mlp"
    runs_model = True
    offers_run_model = True  # head 0, for its confidence

    def __init__(
        self,
        speculator: TrainedSpeculator,
        target_vocab_size: int,
        target_hidden_size: int,
        target_dtype: torch.dtype = torch.float32,
    ) -> None:
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
        self.heads = ServedSpeculator(self.model, device, target_dtype)
        self.token_ids = speculator.token_ids  # [C - 1]: class -> target id
        self.classes = speculator.to_classes(target_vocab_size).to(device)  # [V]: target id -> class
        self.target_vocab_size = target_vocab_size
        self.forwards: list[BatchShape] = []
        self.first_heads: dict[str, FirstHead] = {}

    @property
    def num_heads(self) -> int:
        return self.speculator.num_heads

    @torch.inference_mode()
    def offers(self, requests: list[DraftRequest]) -> list[Offer]:
        """Runs head 0 over every request that just emitted, batched, and offers with its
        confidence; propose() starts from these heads."""
        ready = [r for r in requests if r.last_hidden is not None]
        if ready:
            self._run_first_head(ready)
        return [self.offer(r.req_id, r.token_ids, r.num_draft_tokens) for r in requests]

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        """It can always propose once the request has generated a token; match_len carries head
        0's confidence bucket when offers() has run it for this position (0: not known)."""
        first = self._first_head_of(req_id, token_ids)
        bucket = first.confidence_bucket if first else 0
        return Offer(min(num_draft_tokens, self.num_heads), match_len=bucket, num_unseen=1, max_kv_tokens=1)

    def remove_request(self, req_id: str) -> None:
        self.first_heads.pop(req_id, None)

    def offered_tokens(self, req_id: str, num_tokens: int, sampling: SamplingParams) -> list[int]:
        """Head 0's greedy pick, the one token known without running the other heads; when
        sampling the draft is drawn from the heads' distribution, so a pick says nothing exact."""
        first = self.first_heads.get(req_id)
        if first is None or first.num_tokens != num_tokens or not sampling.is_greedy:
            return []
        return [first.top_token_id]

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafting = [r for r in requests if r.num_draft_tokens > 0 and r.last_hidden is not None]
        if not drafting:
            return [Draft() for _ in requests]
        missing = [r for r in drafting if self._first_head_of(r.req_id, r.token_ids) is None]
        if missing:  # offers() did not run for them (a caller outside the runner's step)
            self._run_first_head(missing)
            self.forwards.append(BatchShape.of([(1, 1)] * len(missing)))
        firsts = [self.first_heads[r.req_id] for r in drafting]
        num_tokens = min(max(r.num_draft_tokens for r in drafting), self.num_heads)
        is_sampled = not all(r.sampling.is_greedy for r in drafting)
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]

        def pick(head: int, logits: torch.Tensor) -> torch.Tensor:
            # logits: [B, C] -> each request's class for this head
            logits = logits.float().clone()
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

        state, logits = torch.stack([f.state for f in firsts]), torch.stack([f.logits for f in firsts])
        classes, _ = self.heads.propose_after_head_0(state, logits, num_tokens, pick)
        drafted = self.token_ids[classes].tolist()  # [B, num_tokens]
        self.forwards += [BatchShape.of([(1, 1)] * len(drafting))] * (num_tokens - 1)
        by_req = {
            r.req_id: Draft(ids[: r.num_draft_tokens], torch.stack(p[: r.num_draft_tokens]) if p else None)
            for r, ids, p in zip(drafting, drafted, probs, strict=True)
        }
        return [by_req.get(r.req_id, Draft()) for r in requests]

    def take_forwards(self) -> list[BatchShape]:
        """The heads its last propose ran, one "forward" each, as one query token per request over
        one KV token: the cost model fits a constant plus a cost per request to them. Head 0 ran
        with the offers, in the step before (priced in that step's time), or here for a request
        it had not offered to (then counted here)."""
        forwards, self.forwards = self.forwards, []
        return forwards

    def _first_head_of(self, req_id: str, token_ids: list[int]) -> FirstHead | None:
        first = self.first_heads.get(req_id)
        return first if first is not None and first.num_tokens == len(token_ids) else None

    def _run_first_head(self, requests: list[DraftRequest]) -> None:
        hidden = torch.stack([r.last_hidden for r in requests if r.last_hidden is not None])
        last = self.classes[torch.tensor([r.token_ids[-1] for r in requests], device=self.classes.device)]
        state, logits = self.heads.run_head(0, hidden, last)  # [B, width], [B, C]
        top = logits.softmax(dim=-1)[:, :-1].max(dim=-1)  # the named token it would pick
        top_ids = self.token_ids[top.indices].tolist()
        for row, (r, probability) in enumerate(zip(requests, top.values.tolist(), strict=True)):
            self.first_heads[r.req_id] = FirstHead(
                len(r.token_ids), state[row], logits[row], confidence_bucket(probability), top_ids[row]
            )


def confidence_bucket(probability: float) -> int:
    """1..CONFIDENCE_BUCKETS by head 0's probability of its pick. The policy learns a first-token
    pass rate per bucket, as per n-gram match length (where 0 means no notion, so buckets start
    at 1). Measured on held-out generations (docs/speculator.md), a pick at [0.8, 1] passed 89% of
    the time and one under 0.2 passed 6%."""
    return 1 + min(int(probability * CONFIDENCE_BUCKETS), CONFIDENCE_BUCKETS - 1)
