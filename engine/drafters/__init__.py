"""Drafters propose tokens for the target model to verify."""

from __future__ import annotations

from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.drafters.ngram import NgramDrafter
from engine.protocol import Offer


class NoDrafter(Drafter):
    """Never proposes anything: every step is plain decoding."""

    name = "none"

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft() for _ in requests]

    def offer(self, req_id: str, token_ids: list[int], num_draft_tokens: int) -> Offer:
        return Offer()


def make_drafter(name: str, ngram_min: int = 2, ngram_max: int = 8) -> Drafter:
    if name == "ngram":
        return NgramDrafter(ngram_min, ngram_max)
    if name == "none":
        return NoDrafter()
    raise ValueError(f"unknown drafter {name!r}; goodspeed has ngram and none")


__all__ = ["Draft", "DraftRequest", "Drafter", "NgramDrafter", "NoDrafter", "Offer", "make_drafter"]
