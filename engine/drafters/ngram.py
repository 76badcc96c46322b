"""Prompt-lookup drafting: continue the longest earlier match of the sequence's suffix.

For each request an index maps every n-gram of length min_n to the positions right after its
occurrences in the prompt and generated tokens. To propose, the last min_n tokens are looked up,
each candidate's match is extended backwards up to max_n tokens, and the tokens that followed
the longest match are proposed (the most recent such match on ties). No model runs: a draft
costs microseconds and its distribution is one-hot.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.protocol import Offer, SamplingParams

# Candidates examined per lookup, most recent first: bounds the cost on very repetitive text.
MAX_CANDIDATES = 64


@dataclass(slots=True)
class NgramIndex:
    min_n: int
    # n-gram of length min_n -> positions i such that tokens[i - min_n : i] is that n-gram
    continuations: dict[tuple[int, ...], list[int]] = field(default_factory=lambda: defaultdict(list))
    num_indexed: int = 0  # positions below this are in the index

    def update(self, token_ids: list[int]) -> None:
        # Index positions up to len - 1: a match ending at the very end has nothing after it.
        end = len(token_ids) - 1
        for i in range(max(self.num_indexed, self.min_n), end + 1):
            self.continuations[tuple(token_ids[i - self.min_n : i])].append(i)
        self.num_indexed = max(self.num_indexed, end + 1)

    def lookup(self, token_ids: list[int], max_n: int, num_draft_tokens: int) -> tuple[list[int], int]:
        """The proposal and the length of the match it continues (0: none)."""
        self.update(token_ids)
        length = len(token_ids)
        if length <= self.min_n:
            return [], 0
        candidates = self.continuations.get(tuple(token_ids[length - self.min_n :]))
        if not candidates:
            return [], 0
        best_start, best_len = -1, 0
        for start in reversed(candidates[-MAX_CANDIDATES:]):
            if start >= length:
                continue
            match_len = self.min_n
            while (
                match_len < max_n
                and start - match_len - 1 >= 0
                and token_ids[start - match_len - 1] == token_ids[length - match_len - 1]
            ):
                match_len += 1
            if match_len > best_len:
                best_start, best_len = start, match_len
                if match_len == max_n:
                    break
        if best_len == 0:
            return [], 0
        return token_ids[best_start : best_start + num_draft_tokens], best_len


@dataclass(frozen=True, slots=True)
class Lookup:
    """A request's latest lookup, kept until its sequence grows."""

    num_tokens: int  # the sequence's length when looked up
    num_asked: int  # draft tokens asked for
    proposal: list[int]
    match_len: int


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 8) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.indexes: dict[str, NgramIndex] = {}
        self.last: dict[str, Lookup] = {}

    def add_request(self, req_id: str, token_ids: list[int], num_tokens: int) -> None:
        index = NgramIndex(self.min_n)
        index.update(token_ids)
        self.indexes[req_id] = index

    def remove_request(self, req_id: str) -> None:
        self.indexes.pop(req_id, None)
        self.last.pop(req_id, None)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for request in requests:
            if request.num_draft_tokens <= 0:
                drafts.append(Draft())
                continue
            proposal, _ = self._lookup(request.req_id, request.token_ids, request.num_draft_tokens)
            drafts.append(Draft(proposal))
        return drafts

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        proposal, match_len = self._lookup(req_id, token_ids, num_draft_tokens)
        return Offer(len(proposal), match_len)

    def offered_tokens(self, req_id: str, num_tokens: int, sampling: SamplingParams) -> list[int]:
        last = self.last.get(req_id)
        return last.proposal if last is not None and last.num_tokens == num_tokens else []

    def _lookup(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> tuple[list[int], int]:
        """The proposal and its match length, remembered until the sequence grows: asking what it
        would be after a step, then proposing in the next, costs one lookup."""
        index = self.indexes.get(req_id)
        if index is None:
            return [], 0
        last = self.last.get(req_id)
        if last is not None and last.num_tokens == len(token_ids) and last.num_asked >= num_draft_tokens:
            return last.proposal[:num_draft_tokens], last.match_len
        proposal, match_len = index.lookup(token_ids, self.max_n, num_draft_tokens)
        self.last[req_id] = Lookup(len(token_ids), num_draft_tokens, proposal, match_len)
        return proposal, match_len
