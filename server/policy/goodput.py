"""Choosing k for every decoding request of a step, to maximise the step's goodput.

Goodput = expected generated tokens / predicted step time (SmartSpec, arXiv 2406.14066). With a
request's chances c_l that draft token l passes given token l - 1 did (see acceptance.py) and
its match rate m (the probability its drafter has a proposal; 1 when the engine said it has
one), drafting position j adds m c_1 ... c_j expected tokens and m query tokens. These gains
fall with j, so for any total number of extra tokens the best allocation takes the best gains
first. The chooser sorts every (request, position) by gain, walks the sorted list accumulating
expected tokens and step time (from the cost model), and keeps the prefix with the highest
goodput: the global optimum of this model, found greedily from all-zero. SmartSpec picks one k
for the whole batch; here every request gets its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MIN_GAIN = 0.01  # positions expected to add less than this many tokens are not worth pricing


@dataclass(frozen=True, slots=True)
class Candidate:
    req_id: str
    pass_chances: Sequence[float]  # [j]: P(draft token j + 1 is accepted | token j was); len >= max
    match_rate: float  # P(the drafter proposes anything)
    max_draft_tokens: int


@dataclass(frozen=True, slots=True)
class StepBase:
    """The step before any draft token: what every plan pays and yields."""

    num_tokens: int  # decode tokens (one per decoding request) plus prefill chunk tokens
    num_seqs: int
    num_context_tokens: int
    num_generated: float  # tokens it yields: one per decoding request
    max_extra_tokens: int  # room left in the step's token budget


@dataclass(frozen=True, slots=True)
class Choice:
    draft_tokens: dict[str, int]
    goodput: float  # predicted tokens per second with the chosen k
    plain_goodput: float  # ... with k = 0 for every request
    step_s: float  # predicted time of the chosen step


def interpolate(times: Sequence[float], n: float) -> float:
    lo = min(int(n), len(times) - 1)
    hi = min(lo + 1, len(times) - 1)
    return times[lo] + (times[hi] - times[lo]) * (n - lo)


def choose(candidates: Sequence[Candidate], base: StepBase, times: Sequence[float], margin: float) -> Choice:
    """times[n]: predicted step time with n query tokens (for this step's B and C).

    margin: speculation must beat plain decoding by this fraction, to absorb model error.
    """
    gains: list[tuple[float, float, float, str]] = []  # (per-token gain, tokens gained, tokens paid, request)
    for c in candidates:
        reach = 1.0
        for chance in c.pass_chances[: c.max_draft_tokens]:
            reach *= chance
            if c.match_rate * reach < MIN_GAIN:
                break
            gains.append((reach, c.match_rate * reach, c.match_rate, c.req_id))
    gains.sort(key=lambda g: -g[0])
    plain_s = interpolate(times, base.num_tokens)
    plain = base.num_generated / plain_s if plain_s > 0 else 0.0
    best, best_len, best_s = plain, 0, plain_s
    generated, tokens = base.num_generated, float(base.num_tokens)
    limit = base.num_tokens + base.max_extra_tokens
    for i, (_, gained, paid, _) in enumerate(gains):
        if tokens + paid > limit:
            break
        generated += gained
        tokens += paid
        step_s = interpolate(times, tokens)
        goodput = generated / step_s if step_s > 0 else 0.0
        if goodput > best:
            best, best_len, best_s = goodput, i + 1, step_s
    chosen: dict[str, int] = {c.req_id: 0 for c in candidates}
    if best > plain * (1 + margin):
        for _, _, _, req_id in gains[:best_len]:
            chosen[req_id] += 1
    else:
        best, best_s = plain, plain_s
    return Choice(chosen, best, plain, best_s)


def max_tokens_needed(base: StepBase, candidates: Sequence[Candidate]) -> int:
    extra = sum(c.max_draft_tokens for c in candidates)
    return base.num_tokens + min(extra, base.max_extra_tokens) + 1


def safe_rate(rate: float) -> float:
    return min(max(rate, 0.0), 0.999) if math.isfinite(rate) else 0.0
