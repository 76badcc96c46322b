"""Which waiting requests start now (EASY backfilling over the KV budget), and when one could start.

The engine reserves a request's prompt plus its max_new_tokens of KV up front, so a long request
at the head of the queue may wait minutes for KV to free up. Strict first come, first served
holds every request behind it for as long; free overtaking can starve it. Backfilling, as batch
schedulers do it, gives the blocked head a reservation instead: the step at which, by upper
bounds of the running requests' ends, enough KV and a batch slot are free for it. A later request
may start before the head if it will have ended by then, or if it fits in the KV and slots the
head leaves over. So the head never waits past its reservation, and a short request does not
wait behind it.

Time is counted in engine steps. Upper bounds: a request ends at the latest after its prefill
chunks and max_new_tokens steps at one token each; speculation and end-of-sequence only make it
sooner. The start-time *estimate*, which refuses a request whose deadline it cannot meet, runs
the same rule forward over *expected* ends (the measured share of max_new_tokens that finished
requests used), so it does not refuse on a worst case.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_STEP_S = 0.1  # until the first step is measured
SMOOTHING = 0.05  # weight of each new measurement in the running means
MAX_EVENTS = 300  # a start estimate simulates at most this many request ends (about 2 ms)


@dataclass(slots=True)
class Pace:
    """How fast requests progress, as measured: turns steps into seconds and max lengths into expected ones."""

    step_s: float = DEFAULT_STEP_S  # mean engine step time
    length_share: float = 1.0  # mean share of max_new_tokens that finished requests generated
    num_steps: int = 0

    def observe_step(self, step_s: float) -> None:
        self.step_s = step_s if self.num_steps == 0 else self.step_s + SMOOTHING * (step_s - self.step_s)
        self.num_steps += 1

    def observe_length(self, num_generated: int, max_new_tokens: int) -> None:
        self.length_share += SMOOTHING * (min(1.0, num_generated / max_new_tokens) - self.length_share)


@dataclass(frozen=True, slots=True)
class Job:
    """A request as admission sees it."""

    num_tokens: int  # KV it reserves: prompt + max_new_tokens
    max_steps: float  # steps it has left at most
    expected_steps: float  # steps it has left by the measured pace


@dataclass(frozen=True, slots=True)
class Reservation:
    """The blocked head's start, and what later requests may take without delaying it."""

    start: float  # step
    num_spare_tokens: int  # KV still free once the head has started then
    num_spare_slots: int


# A running request for admission: (upper bound of its end step, KV tokens it frees then).
Ending = tuple[float, int]


def reserve(head: Job, ends: Sequence[Ending], num_free_tokens: int, num_free_slots: int, now: float) -> Reservation:
    """The first step at which, by upper-bound ends, KV and a slot are free for head."""
    start = now
    for end, num_tokens in sorted(ends):
        if num_free_tokens >= head.num_tokens and num_free_slots >= 1:
            break
        start, num_free_tokens, num_free_slots = end, num_free_tokens + num_tokens, num_free_slots + 1
    return Reservation(start, num_free_tokens - head.num_tokens, num_free_slots - 1)


def may_backfill(job: Job, reservation: Reservation, now: float) -> tuple[bool, Reservation]:
    """Whether job may start now without delaying the head, and the reservation that remains."""
    if now + job.max_steps <= reservation.start:
        return True, reservation  # it will have ended before the head starts
    if job.num_tokens <= reservation.num_spare_tokens and reservation.num_spare_slots >= 1:
        return True, Reservation(
            reservation.start, reservation.num_spare_tokens - job.num_tokens, reservation.num_spare_slots - 1
        )
    return False, reservation


def select(
    queue: Sequence[Job], ends: Sequence[Ending], num_free_tokens: int, num_free_slots: int, now: float = 0.0
) -> list[int]:
    """Indices of the queued jobs that start now: in order, the first that does not fit reserving."""
    chosen: list[int] = []
    ends = list(ends)
    reservation: Reservation | None = None
    for i, job in enumerate(queue):
        if num_free_slots < 1:
            break
        if job.num_tokens > num_free_tokens:
            if reservation is None:
                reservation = reserve(job, ends, num_free_tokens, num_free_slots, now)
            continue
        if reservation is not None:
            is_allowed, reservation = may_backfill(job, reservation, now)
            if not is_allowed:
                continue
        chosen.append(i)
        num_free_tokens -= job.num_tokens
        num_free_slots -= 1
        ends.append((now + job.max_steps, job.num_tokens))
    return chosen


def estimate_start(
    new: Job,
    ahead: Sequence[Job],
    running: Sequence[Job],
    num_free_tokens: int,
    num_free_slots: int,
    give_up_at: float = math.inf,
    max_events: int = MAX_EVENTS,
) -> float | None:
    """Steps until `new` starts, queued behind `ahead`, if requests end when expected.

    Runs `select` at each expected end; returns math.inf once past give_up_at (the caller's
    deadline, in steps), and None (unknown) after max_events ends: it runs on the event loop.
    """
    queue = [*ahead, new]
    # (expected end, upper-bound end, KV tokens) of everything running, in the order they end
    active = [(job.expected_steps, job.max_steps, job.num_tokens) for job in running]
    heapq.heapify(active)
    now = 0.0
    for _ in range(max_events):
        if now > give_up_at:
            return math.inf
        ends = [(max_end, num_tokens) for _, max_end, num_tokens in active]
        chosen = select(queue, ends, num_free_tokens, num_free_slots, now)
        for i in chosen:
            job = queue[i]
            if job is new:
                return now
            num_free_tokens -= job.num_tokens
            num_free_slots -= 1
            heapq.heappush(active, (now + job.expected_steps, now + job.max_steps, job.num_tokens))
        started = set(chosen)
        queue = [job for i, job in enumerate(queue) if i not in started]
        if not active:
            return math.inf  # nothing will free anything: new is larger than the whole budget
        now, _, num_tokens = heapq.heappop(active)
        num_free_tokens += num_tokens
        num_free_slots += 1
    return None
