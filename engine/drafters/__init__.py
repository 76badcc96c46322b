"""Drafters propose tokens for the target model to verify."""

from __future__ import annotations

from engine.drafters.base import Draft, Drafter, DraftRequest
from engine.drafters.ngram import NgramDrafter
from engine.protocol import Offer


def make_drafter(name: str, ngram_min: int = 2, ngram_max: int = 8) -> Drafter:
    """A drafter that needs no model of its own (the draft model is built by engine/worker.py)."""
    if name == "ngram":
        return NgramDrafter(ngram_min, ngram_max)
    raise ValueError(f"unknown drafter {name!r}; goodspeed builds ngram here (and model from a draft model)")


__all__ = ["Draft", "DraftRequest", "Drafter", "NgramDrafter", "Offer", "make_drafter"]
