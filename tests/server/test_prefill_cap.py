"""The time bound on prefill beside decoding requests, and its correction by measured times."""

from __future__ import annotations

import pytest

from engine.protocol import BatchShape
from server.prefill_cap import PrefillCap, largest_within

DECODE = BatchShape.of([(1, 100)])


def predict(shape: BatchShape) -> float:
    return 0.010 + 0.001 * shape.num_tokens


def test_the_bound_is_the_slowdown_times_the_decode_step_and_off_at_zero() -> None:
    assert PrefillCap(2.0).max_step_s(predict, DECODE) == pytest.approx(0.022)
    assert PrefillCap(0.0).max_step_s(predict, DECODE) is None
    assert PrefillCap(2.0).max_step_s(lambda shape: None, DECODE) is None  # no fitted model yet


def test_steps_that_ran_slower_than_predicted_tighten_the_bound() -> None:
    cap = PrefillCap(2.0)
    for _ in range(60):  # prefill steps take 1.5x their prediction, decode-only steps 1.2x
        cap.observe(0.020, 0.030, is_prefilling=True)
        cap.observe(0.011, 0.0132, is_prefilling=False)
    # measured prefill step <= 2 x measured decode step: 1.5 p <= 2 x 1.2 x 0.011
    assert cap.max_step_s(predict, DECODE) == pytest.approx(2 * 0.011 * 1.2 / 1.5, rel=1e-3)
    cap.observe(None, 0.5, is_prefilling=True)  # nothing predicted: nothing learned
    cap.observe(0.02, 0.0, is_prefilling=True)
    assert cap.prefill_bias == pytest.approx(1.5, rel=1e-3)


@pytest.mark.parametrize(("limit", "minimum", "expected"), [(10.0, 1, 10), (5.5, 1, 5), (0.1, 1, 1), (0.1, 0, 0)])
def test_largest_within_bisects_a_growing_cost(limit: float, minimum: int, expected: int) -> None:
    assert largest_within(10, float, limit, minimum) == expected


def test_steps_over_the_bound_are_made_up_by_steps_without_prefill() -> None:
    cap = PrefillCap(2.0)
    decode_s, one_token_s = 0.010, 0.025  # the smallest chunk makes the step 2.5x: over the bound
    steps = []
    for _ in range(100):
        assert cap.max_step_s(lambda shape: decode_s, DECODE) == pytest.approx(0.020)
        is_prefilling = not cap.is_overrun  # the scheduler runs no chunk while there is an overrun
        measured_s = one_token_s if is_prefilling else decode_s
        cap.observe(measured_s, measured_s, is_prefilling)
        steps.append(measured_s)
    assert steps[:4] == [one_token_s, decode_s, one_token_s, decode_s]  # 5 ms over, then 10 ms made up
    assert sum(steps) / len(steps) <= 2.0 * decode_s
    cap.observe(one_token_s, one_token_s, is_prefilling=True)
    cap.forgive()  # nothing decodes any more
    assert not cap.is_overrun


def test_decode_steps_made_long_by_drafts_still_pay_an_overrun_off() -> None:
    cap = PrefillCap(2.0)
    assert cap.max_step_s(lambda shape: 0.010, DECODE) == pytest.approx(0.020)
    cap.observe(0.030, 0.030, is_prefilling=True)  # 10 ms over
    cap.observe(0.030, 0.030, is_prefilling=False)  # 3x the plain decode step: long drafts
    assert cap.overrun_s == pytest.approx(0.0)  # each step without prefill pays off a plain step's room


def test_beside_drafts_the_bound_is_on_the_drafted_step() -> None:
    cap = PrefillCap(2.0)
    assert cap.max_step_s(lambda shape: 0.010, DECODE) == pytest.approx(0.020)
    assert cap.bound_s(0.016) == pytest.approx(0.032)  # decodes whose drafts make their step 16 ms
    cap.observe(0.032, 0.032, is_prefilling=True, draft_s=0.006)  # within 2 x (10 + 6) ms
    assert not cap.is_overrun
    cap.observe(0.040, 0.040, is_prefilling=True, draft_s=0.008)  # 4 ms over 2 x (10 + 8) ms
    assert cap.overrun_s == pytest.approx(0.004)
