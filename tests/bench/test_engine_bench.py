"""The engine benchmark's drafter timer (it passes every call through and counts the time) and its tallies."""

from __future__ import annotations

import pytest
import torch

from api.speculation import SpeculationMode
from bench.engine import (
    AUTO,
    PLAIN,
    WITHOUT_MLP,
    TimedDrafter,
    VariantStats,
    our_variants,
    record,
    shares_beside_triads,
)
from bench.roofline import roofline_tokens_per_s
from engine.drafters.base import DraftRequest
from engine.drafters.ngram import NgramDrafter
from engine.model.spec import ModelSpec

SMOLLM2_135M = ModelSpec("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 8192, False, True)


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


def test_decoding_is_timed_after_each_first_token() -> None:
    """The roofline is about decoding: prefill (until the first token) stays out of decode tok/s."""
    stats = VariantStats(PLAIN)
    record(stats, [1, 2, 3, 4, 5], 1.0, 5, 0, 0, first_token_s=0.6)  # 4 tokens in the last 0.4 s
    record(stats, [6, 7, 8], 0.5, 3, 0, 0, first_token_s=0.1)  # 2 tokens in 0.4 s
    record(stats, [9], 0.2, 1, 0, 0, first_token_s=0.2)  # one token: nothing decoded after it
    assert stats.tokens_per_s == pytest.approx(9 / 1.7)
    assert stats.decode_tokens_per_s == pytest.approx(6 / 0.8)
    reference = VariantStats("transformers plain")
    record(reference, [1, 2], 1.0, 0, 0, 0)  # no first-token time: no decode rate
    assert reference.summary()["decode_tokens_per_s"] is None


def test_each_request_is_set_against_the_triad_taken_around_it() -> None:
    """Shares per request, each over the roofline of its own triad, not one reading for all."""
    stats = VariantStats(PLAIN)
    record(stats, [1, 2, 3, 4, 5], 1.0, 5, 0, 0, first_token_s=0.6)  # 10 tok/s after the first token
    record(stats, [6, 7, 8], 0.5, 3, 0, 0, first_token_s=0.1)  # 5 tok/s
    stats.triads_gbs += [20.0, 40.0]
    bound_at_20 = roofline_tokens_per_s(SMOLLM2_135M, torch.float32, 20.0)
    beside = shares_beside_triads(stats, SMOLLM2_135M, torch.float32)
    assert beside["shares"] == [round(10 / bound_at_20, 3), round(5 / (2 * bound_at_20), 3)]
    assert beside["median"] == pytest.approx((10 / bound_at_20 + 5 / (2 * bound_at_20)) / 2, abs=1e-3)
    assert beside["triads_gbs"] == [20.0, 40.0]


def test_auto_is_also_run_without_the_speculator_where_there_is_one() -> None:
    """What the speculator adds to AUTO: AUTO over an engine served without it, beside AUTO with it."""
    with_mlp = our_variants(["ngram", "self", "mlp"], [8], [], [1, 2, 3])
    auto, without = with_mlp["ours auto (ngram, self, mlp)"], with_mlp["ours auto (ngram, self)"]
    assert (auto.mode, auto.server) == (SpeculationMode.AUTO, AUTO)
    assert (without.mode, without.server) == (SpeculationMode.AUTO, WITHOUT_MLP)
    assert [name for name in with_mlp if "mlp speculator" in name] == [f"ours mlp speculator k={k}" for k in (1, 2, 3)]
    assert not any(v.server == WITHOUT_MLP for v in our_variants(["ngram", "self"], [8], [], []).values())
    assert not any(v.server == WITHOUT_MLP for v in our_variants(["mlp"], [], [], [1]).values())
