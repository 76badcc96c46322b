from __future__ import annotations

import pytest

from engine.drafters import DraftRequest, NgramDrafter, Offer, make_drafter


def propose(drafter: NgramDrafter, req_id: str, tokens: list[int], k: int) -> list[int]:
    return drafter.propose([DraftRequest(req_id, tokens, k)])[0].token_ids


def test_continues_the_earlier_occurrence_of_the_suffix() -> None:
    drafter = NgramDrafter(min_n=2, max_n=4)
    tokens = [1, 2, 3, 4, 5, 6, 9, 2, 3]
    drafter.add_request("r", tokens, 1000)
    assert propose(drafter, "r", tokens, 3) == [4, 5, 6]


def test_prefers_the_longest_match() -> None:
    drafter = NgramDrafter(min_n=2, max_n=4)
    # "2 3" occurs twice; only the second is preceded by "1", as the suffix "1 2 3" is.
    tokens = [7, 2, 3, 8, 8, 1, 2, 3, 5, 5, 0, 1, 2, 3]
    drafter.add_request("r", tokens, 1000)
    assert propose(drafter, "r", tokens, 2) == [5, 5]


def test_offer_says_the_proposal_length_and_its_match_length() -> None:
    drafter = NgramDrafter(min_n=2, max_n=8)
    tokens = [9, 1, 2, 3, 4, 5, 6, 7, 0, 3, 4]  # the suffix "3 4" matches 2 tokens
    drafter.add_request("r", tokens, 1000)
    assert drafter.offer("r", tokens, 3) == Offer(3, 2)
    tokens += [5, 6, 7, 0, 3]  # "3 4 5 6 7 0 3" now repeats: a 7-token match
    assert drafter.offer("r", tokens, 8) == Offer(6, 7)  # the draft runs to the end of the text
    assert propose(drafter, "r", tokens, 8) == [4, 5, 6, 7, 0, 3]


def test_no_match_no_draft_and_k_zero_costs_nothing() -> None:
    drafter = NgramDrafter(min_n=2, max_n=3)
    tokens = [1, 2, 3, 4]
    drafter.add_request("r", tokens, 1000)
    assert propose(drafter, "r", tokens, 4) == []
    assert drafter.offer("r", tokens, 4) == Offer(0, 0)
    assert propose(drafter, "r", [1, 2, 3, 4, 1, 2], 0) == []


def test_index_follows_generated_tokens() -> None:
    drafter = NgramDrafter(min_n=2, max_n=2)
    tokens = [10, 11, 12]
    drafter.add_request("r", tokens, 1000)
    tokens += [13, 10, 11]  # the engine appends to the same list
    assert propose(drafter, "r", tokens, 8) == [12, 13, 10, 11]


def test_draft_is_at_most_k_tokens_and_requests_are_separate() -> None:
    drafter = NgramDrafter(min_n=1, max_n=3)
    a, b = [5, 6, 7, 8, 9, 5], [5, 1, 1, 1, 5]
    drafter.add_request("a", a, 1000)
    drafter.add_request("b", b, 1000)
    assert propose(drafter, "a", a, 2) == [6, 7]
    assert propose(drafter, "b", b, 2) == [1, 1]
    drafter.remove_request("a")
    assert propose(drafter, "a", a, 2) == []


def test_bad_sizes_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="unknown drafter"):
        make_drafter("medusa")
