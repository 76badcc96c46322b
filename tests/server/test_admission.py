"""Backfilling admission: properties over random queues (hypothesis), and the start estimate."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from server.admission import Job, Pace, estimate_start, reserve, select

jobs = st.builds(
    lambda num_tokens, max_steps: Job(num_tokens, max_steps, max_steps / 2),
    st.integers(1, 1000),
    st.integers(1, 1000),
)
ends = st.lists(st.tuples(st.integers(1, 1000).map(float), st.integers(1, 1000)), max_size=8)


@settings(max_examples=500, deadline=None)
@given(
    queue=st.lists(jobs, max_size=12), running=ends, num_free_tokens=st.integers(0, 1000), num_slots=st.integers(0, 8)
)
def test_select_fits_the_budget_and_never_delays_the_blocked_head(
    queue: list[Job], running: list[tuple[float, int]], num_free_tokens: int, num_slots: int
) -> None:
    chosen = select(queue, running, num_free_tokens, num_slots)
    assert chosen == sorted(set(chosen))
    assert sum(queue[i].num_tokens for i in chosen) <= num_free_tokens and len(chosen) <= num_slots
    # The head is the first job that did not fit when its turn came; every job before it started.
    free, head = num_free_tokens, None
    for i, job in enumerate(queue):
        if len([c for c in chosen if c < i]) >= num_slots:
            break
        if i not in chosen:
            assert job.num_tokens > free, "a job that fitted was passed over before any head"
            head = i
            break
        free -= job.num_tokens
    if head is None:
        return
    before = [i for i in chosen if i < head]
    after = [i for i in chosen if i > head]
    at_turn = reserve(
        queue[head],
        [*running, *((queue[i].max_steps, queue[i].num_tokens) for i in before)],
        num_free_tokens - sum(queue[i].num_tokens for i in before),
        num_slots - len(before),
        0.0,
    )
    later = reserve(
        queue[head],
        [*running, *((queue[i].max_steps, queue[i].num_tokens) for i in before + after)],
        num_free_tokens - sum(queue[i].num_tokens for i in before + after),
        num_slots - len(before) - len(after),
        0.0,
    )
    assert later.start <= at_turn.start


def test_the_first_job_that_fits_always_starts_first() -> None:
    queue = [Job(300, 10, 5), Job(800, 10, 5), Job(10, 5, 5)]
    assert select(queue, [(100.0, 500)], num_free_tokens=500, num_free_slots=4) == [0, 2]


def test_estimate_waits_for_the_expected_end_of_what_holds_the_kv() -> None:
    running = [Job(900, max_steps=400, expected_steps=120)]
    new = Job(200, max_steps=10, expected_steps=10)
    assert estimate_start(new, [], running, num_free_tokens=100, num_free_slots=3) == 120
    assert estimate_start(Job(50, 10, 10), [], running, num_free_tokens=100, num_free_slots=3) == 0
    assert estimate_start(new, [], running, 100, 3, give_up_at=50) == math.inf
    # behind a queued request that needs all of it, then ends after its own expected steps
    ahead = [Job(1000, max_steps=500, expected_steps=30)]
    assert estimate_start(new, ahead, running, num_free_tokens=100, num_free_slots=3) == 150
    # it runs on the event loop: past a bound on the work it does not guess
    many = [Job(1000, max_steps=500, expected_steps=1) for _ in range(10)]
    assert estimate_start(new, many, running, num_free_tokens=100, num_free_slots=3, max_events=5) is None


def test_pace_takes_its_first_step_time_as_it_comes_then_smooths() -> None:
    pace = Pace()
    pace.observe_step(0.04)
    assert pace.step_s == 0.04
    pace.observe_step(0.14)
    assert 0.04 < pace.step_s < 0.06
    pace.observe_length(10, 100)
    assert pace.length_share < 1.0
