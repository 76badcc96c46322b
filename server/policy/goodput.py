"""Choosing k for every decoding request of a step, to maximise the step's goodput.

Goodput (SmartSpec, arXiv 2406.14066) is the step's expected generated tokens over its predicted
time. SmartSpec picks one k for the whole batch; here each request gets its own, because
acceptance differs wildly between requests (one copies text it was shown, another writes
something new).

A request's draft position j adds P(tokens 1..j pass) = c_1 ... c_j expected tokens (see
acceptance.py) and one query token; it costs its share of f (the step time by query tokens) plus
what it adds to attention (more for a long context; the first draft also switches the request to
a verification query). The chooser ranks every (request, position) by expected tokens per second
of that cost, walks the ranking keeping the cost model's step time (not the ranking's estimate),
and takes the prefix with the highest goodput: greedy marginal gains from all-zero. A request's
positions must be taken in order, so where a later position would rank above an earlier one (the
first pays the switch) the run is ranked as one block by its pooled ratio.

Why throughput and not a latency objective: an earlier version minimised T * sum_i 1 / g_i, the
batch's latency if every step looked like this one, so a draft for one request was charged the
other requests' slowdown for as long as they all run. But the drafting request finishes sooner and
its slot goes to the next request: its draft slows the others only during its own (shortened)
life. Counted that way, and whenever finished requests are replaced (a queue, steady arrivals, a
closed loop), what lowers the mean latency is the tokens per second. The latency objective
declined 91% of the drafts predicted to pass 80% or more at 20-30 running requests, where drafting
every proposal (FIXED 1) was faster (docs/goodput-policy.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.protocol import BatchShape
from server.policy.cost_model import DraftCosts

MIN_GAIN = 0.01  # positions expected to add less than this many tokens are not worth pricing


@dataclass(frozen=True, slots=True)
class Candidate:
    req_id: str
    pass_chances: Sequence[float]  # [j]: P(draft token j + 1 is accepted | token j was); len >= max
    max_draft_tokens: int  # what the drafter can propose now, within the bounds
    num_kv_tokens: int  # its KV tokens after a plain decode step (what one query token attends to)


@dataclass(frozen=True, slots=True)
class StepBase:
    """The step before any draft token: what every plan pays and yields."""

    shape: BatchShape  # one token per decoding request plus the prefill chunks
    num_generated: float  # tokens it yields: one per decoding request
    max_extra_tokens: int  # room left in the step's token budget
    num_waiting: int = 0  # requests queued for a slot (logged)


@dataclass(frozen=True, slots=True)
class Choice:
    draft_tokens: dict[str, int]
    goodput: float  # predicted tokens per second with the chosen k
    plain_goodput: float  # ... with k = 0 for every request
    step_s: float  # predicted time of the chosen step
    plain_step_s: float  # ... and of the step with k = 0 for every request


@dataclass(frozen=True, slots=True)
class Gain:
    """Drafting one more token for a request: what it is expected to yield and what it costs."""

    tokens: float  # expected tokens gained: P(this and every earlier draft token pass)
    extra_s: float  # seconds it adds besides its share of f(N)
    req_id: str


def interpolate(times: Sequence[float], n: float) -> float:
    lo = min(int(n), len(times) - 1)
    hi = min(lo + 1, len(times) - 1)
    return times[lo] + (times[hi] - times[lo]) * (n - lo)


def gains_of(c: Candidate, costs: DraftCosts) -> list[Gain]:
    gains = []
    reach = 1.0  # P(reaching draft j)
    for j, chance in enumerate(c.pass_chances[: c.max_draft_tokens], start=1):
        reach *= chance
        if reach < MIN_GAIN:
            break
        # Draft j makes the request's query 1 + j tokens over num_kv_tokens + j keys: it adds one
        # key to attend and num_kv_tokens + 2j query-key pairs; the first one also a mask.
        extra_s = (
            costs.per_context_token
            + costs.per_attention_pair * (c.num_kv_tokens + 2 * j)
            + (costs.per_multi_token_seq if j == 1 else 0.0)
        )
        gains.append(Gain(reach, extra_s, c.req_id))
    return gains


def rank(gains: Sequence[Gain], per_token_s: float) -> list[tuple[float, Gain]]:
    """Each of one request's gains (in position order) with its ranking key: expected tokens per
    second of cost. Adjacent positions whose keys would rise are pooled (pool adjacent
    violators), so the keys never rise along the request and its positions are taken in order."""
    blocks: list[tuple[float, float, int]] = []  # (expected tokens, seconds, number of positions)
    for gain in gains:
        block = (gain.tokens, per_token_s + gain.extra_s, 1)
        while blocks and ratio(block) > ratio(blocks[-1]):
            tokens, seconds, count = blocks.pop()
            block = (tokens + block[0], seconds + block[1], count + block[2])
        blocks.append(block)
    keys = [ratio(block) for block in blocks for _ in range(block[2])]
    return list(zip(keys, gains, strict=True))


def ratio(block: tuple[float, float, int]) -> float:
    tokens, seconds, _ = block
    return tokens / seconds if seconds > 0 else math.inf


def goodput(tokens: float, step_s: float) -> float:
    return tokens / step_s if step_s > 0 else 0.0


def choose(
    candidates: Sequence[Candidate],
    base: StepBase,
    times: Sequence[float],
    costs: DraftCosts,
) -> Choice:
    """times[n]: predicted step time with n query tokens (for this step's other features)."""
    n = base.shape.num_tokens
    per_token_s = interpolate(times, n + 1) - interpolate(times, n)
    ranked = [r for c in candidates for r in rank(gains_of(c, costs), per_token_s)]
    gains = [gain for _, gain in sorted(ranked, key=lambda r: (-r[0], -r[1].tokens))]
    plain_s = interpolate(times, n)
    plain = goodput(base.num_generated, plain_s)
    best, best_len, best_s = plain, 0, plain_s
    generated, tokens, extra_s = base.num_generated, n, 0.0
    for i, gain in enumerate(gains):
        if tokens + 1 > n + base.max_extra_tokens:
            break
        generated += gain.tokens
        tokens += 1
        extra_s += gain.extra_s
        step_s = interpolate(times, tokens) + extra_s
        step_goodput = goodput(generated, step_s)
        if step_goodput > best:
            best, best_len, best_s = step_goodput, i + 1, step_s
    chosen: dict[str, int] = {c.req_id: 0 for c in candidates}
    for gain in gains[:best_len]:
        chosen[gain.req_id] += 1
    return Choice(chosen, best, plain, best_s, plain_s)


def max_tokens_needed(base: StepBase, candidates: Sequence[Candidate]) -> int:
    extra = sum(c.max_draft_tokens for c in candidates)
    return base.shape.num_tokens + min(extra, base.max_extra_tokens) + 1


def safe_rate(rate: float) -> float:
    return min(max(rate, 0.0), 0.999) if math.isfinite(rate) else 0.0
