"""The engine benchmark's drafter timer: it passes every call through and counts the time."""

from __future__ import annotations

from bench.engine import TimedDrafter
from engine.drafters.base import DraftRequest
from engine.drafters.ngram import NgramDrafter


def test_timed_drafter_passes_calls_through_and_adds_up_their_time() -> None:
    inner = NgramDrafter(min_n=2, max_n=4)
    timed = TimedDrafter(inner)
    tokens = [1, 2, 3, 4, 9, 1, 2, 3]
    timed.add_request("a", tokens, 100)

    offer = timed.offer("a", tokens, 3)
    [draft] = timed.propose([DraftRequest("a", tokens, 3)])

    assert offer.num_tokens == 3 and offer.match_len == 3  # [4, 9, 1] follows the earlier "1 2 3"
    assert draft.token_ids == [4, 9, 1]
    assert timed.name == "ngram" and timed.seconds > 0.0
    timed.remove_request("a")
    assert "a" not in inner.indexes
