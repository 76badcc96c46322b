"""Choosing k for every decoding request of a step, to minimise the requests' expected latency.

SmartSpec (arXiv 2406.14066) maximises goodput: expected generated tokens / predicted step time.
That maximises throughput, but when acceptance differs between requests it is not what their
latency wants: a step that drafts 8 tokens for the one request copying text makes every other
request in the batch wait longer for its single token (docs/goodput-policy.md has the run that
showed it: about the same throughput as k = 1 for everyone, a longer mean latency).

So the chooser minimises the latency the step's plan implies, in a fluid approximation: if every
step looked like this one, request i (expected g_i tokens per step) would take T / g_i seconds
per token, and the running requests together sum_i T / g_i. Requests in the waiting queue wait
for slots, which free at a rate set by the throughput sum_i g_i / T: the w-th in line waits about
w requests' worth, so W waiting requests add (W (W + 1) / 2 + W B) T / sum_i g_i in the same
units. The plan's cost is

    J = T * (sum_i 1 / g_i + Q / sum_i g_i),    Q = W (W + 1) / 2 + W B.

With equal acceptance everywhere J is B^2 / goodput (the same choice as SmartSpec); with a long
queue the second term dominates and it maximises throughput; in between, it spreads drafts over
requests rather than piling them on the best one.

A request's draft position j adds P(tokens 1..j pass) = c_1 ... c_j to g_i (see acceptance.py)
and one query token; it costs its share of f (the step time by query tokens) plus what it adds to
attention (more for a long context; the first draft also switches the request to a verification
query). The chooser ranks every (request, position) by what it cuts from J's bracket per second
of that cost, walks the ranking keeping the cost model's step time (not the ranking's estimate),
and takes the prefix with the lowest J: greedy marginal gains from all-zero. A request's
positions must be taken in order, so where a later position would rank above an earlier one (the
first pays the switch) the run is ranked as one block by its pooled ratio.
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
    num_waiting: int = 0  # requests queued for a slot

    @property
    def queue_weight(self) -> float:
        """Q in the module doc: the waiting requests' latency, in units of T / sum_i g_i."""
        return self.num_waiting * (self.num_waiting + 1) / 2 + self.num_waiting * self.shape.num_seqs


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
    speedup: float  # how much it cuts the request's 1 / g_i
    extra_s: float  # seconds it adds besides its share of f(N)
    req_id: str


def interpolate(times: Sequence[float], n: float) -> float:
    lo = min(int(n), len(times) - 1)
    hi = min(lo + 1, len(times) - 1)
    return times[lo] + (times[hi] - times[lo]) * (n - lo)


def gains_of(c: Candidate, costs: DraftCosts) -> list[Gain]:
    gains = []
    reach, generated = 1.0, 1.0  # P(reaching draft j); the request's expected tokens so far
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
        gains.append(Gain(reach, 1 / generated - 1 / (generated + reach), extra_s, c.req_id))
        generated += reach
    return gains


def rank(gains: Sequence[Gain], per_token_s: float, queue_per_token: float = 0.0) -> list[tuple[float, Gain]]:
    """Each of one request's gains (in position order) with its ranking key: what it cuts from
    J's bracket (its speedup, and queue_per_token per expected token for the queue's share) per
    second of cost. Adjacent positions whose keys would rise are pooled (pool adjacent
    violators), so the keys never rise along the request and its positions are taken in order."""
    blocks: list[tuple[float, float, int]] = []  # (cut, seconds, number of positions)
    for gain in gains:
        block = (gain.speedup + queue_per_token * gain.tokens, per_token_s + gain.extra_s, 1)
        while blocks and ratio(block) > ratio(blocks[-1]):
            cut, seconds, count = blocks.pop()
            block = (cut + block[0], seconds + block[1], count + block[2])
        blocks.append(block)
    keys = [ratio(block) for block in blocks for _ in range(block[2])]
    return list(zip(keys, gains, strict=True))


def ratio(block: tuple[float, float, int]) -> float:
    cut, seconds, _ = block
    return cut / seconds if seconds > 0 else math.inf


def latency_cost(step_s: float, slowness: float, generated: float, queue_weight: float) -> float:
    """J in the module doc; slowness is sum_i 1 / g_i, generated sum_i g_i."""
    return step_s * (slowness + (queue_weight / generated if generated > 0 else 0.0))


def choose(
    candidates: Sequence[Candidate], base: StepBase, times: Sequence[float], costs: DraftCosts, margin: float
) -> Choice:
    """times[n]: predicted step time with n query tokens (for this step's other features).

    margin: speculation must cut the latency cost by this fraction, to absorb model error.
    """
    n = base.shape.num_tokens
    per_token_s = interpolate(times, n + 1) - interpolate(times, n)
    # The queue's term, linearised at the plain step: d(Q / G) = Q / G^2 per expected token.
    queue_per_token = base.queue_weight / max(base.num_generated, 1.0) ** 2
    ranked = [r for c in candidates for r in rank(gains_of(c, costs), per_token_s, queue_per_token)]
    gains = [gain for _, gain in sorted(ranked, key=lambda r: (-r[0], -r[1].tokens))]
    # Every running request counts 1 in sum_i 1 / g_i at k = 0: a decode yields one token, and a
    # prefilling request's wait grows with T like the others'.
    slowness, generated = float(base.shape.num_seqs), base.num_generated
    plain_s = interpolate(times, n)
    plain_cost = latency_cost(plain_s, slowness, generated, base.queue_weight)
    best_cost, best_len, best_s, best_generated = plain_cost, 0, plain_s, generated
    tokens, extra_s = n, 0.0
    for i, gain in enumerate(gains):
        if tokens + 1 > n + base.max_extra_tokens:
            break
        slowness -= gain.speedup
        generated += gain.tokens
        tokens += 1
        extra_s += gain.extra_s
        step_s = interpolate(times, tokens) + extra_s
        cost = latency_cost(step_s, slowness, generated, base.queue_weight)
        if cost < best_cost:
            best_cost, best_len, best_s, best_generated = cost, i + 1, step_s, generated
    chosen: dict[str, int] = {c.req_id: 0 for c in candidates}
    if best_cost < plain_cost * (1 - margin):
        for gain in gains[:best_len]:
            chosen[gain.req_id] += 1
    else:
        best_s, best_generated = plain_s, base.num_generated
    plain = base.num_generated / plain_s if plain_s > 0 else 0.0
    return Choice(chosen, best_generated / best_s if best_s > 0 else 0.0, plain, best_s, plain_s)


def max_tokens_needed(base: StepBase, candidates: Sequence[Candidate]) -> int:
    extra = sum(c.max_draft_tokens for c in candidates)
    return base.shape.num_tokens + min(extra, base.max_extra_tokens) + 1


def safe_rate(rate: float) -> float:
    return min(max(rate, 0.0), 0.999) if math.isfinite(rate) else 0.0
