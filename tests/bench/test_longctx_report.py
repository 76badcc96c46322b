"""bench longctx's end-to-end figures: medians over runs, each run's speedup over plain's run of its turn."""

from __future__ import annotations

import pytest

from bench.longctx import VariantTotals


def totals(
    decode_tok_s: list[float], outputs: list[list[list[int]]], mean_request_s: list[float] | None = None
) -> VariantTotals:
    request_s = mean_request_s or [1.0] * len(decode_tok_s)
    return VariantTotals(max_new_tokens=4, decode_tok_s=decode_tok_s, mean_request_s=request_s, outputs=outputs)


def test_a_slow_spell_in_one_run_moves_neither_the_speed_nor_the_speedup() -> None:
    same = [[[1, 2, 3]]] * 3
    plain = totals([100.0, 50.0, 100.0], same)  # plain's second run hit a slow spell
    variant = totals([150.0, 160.0, 140.0], same)
    report = variant.report(plain)
    assert report["decode_tok_s"] == 150.0
    # per turn 1.5, 3.2, 1.4: the median, where summing the runs would have said 450 / 250 = 1.8
    assert report["speedup"] == 1.5
    assert report["decode_tok_s_runs"] == [150.0, 160.0, 140.0]
    assert report["num_diverged"] == 0


def test_outputs_are_compared_with_plains_first_run_in_every_run() -> None:
    plain = totals([10.0, 10.0], [[[1, 2], [3, 4]], [[1, 2], [3, 4]]])
    variant = totals([20.0, 20.0], [[[1, 2], [3, 4]], [[1, 2], [3, 5]]])
    assert variant.report(plain)["num_diverged"] == 1


def test_requests_that_end_sooner_show_in_the_latency_speedup_not_in_the_batch_speed() -> None:
    """A variant may end most requests sooner and the last one later: the batch's decode tok/s
    waits for the last request, the mean request time does not."""
    same = [[[1, 2, 3]]] * 2
    plain = totals([100.0, 100.0], same, mean_request_s=[2.0, 2.2])
    variant = totals([95.0, 97.0], same, mean_request_s=[1.6, 2.0])
    report = variant.report(plain)
    assert report["speedup"] == pytest.approx(0.96)  # the median of 0.95 and 0.97
    assert report["latency_speedup"] == pytest.approx((2.0 / 1.6 + 2.2 / 2.0) / 2)
    assert report["mean_request_s"] == pytest.approx(1.8)
