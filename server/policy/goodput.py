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

Several drafters. A request may be offered a proposal by each drafter (an Option); it drafts with
one of them per step. A drafter with a model of its own (a draft model) costs time too: forward 1
feeds every drafting request's unseen tokens, forward j > 1 extends those drafting j or more tokens,
each priced by that drafter's own step-cost model. A forward's constant part is paid once however
many requests share it, so ranking charges a position its sequence's own cost plus an equal share
of the constant among the requests able to use the drafter (again among those that prefer it,
when fewer do), and the walk prices the prefix exactly (the constant is paid as soon as one
request needs the forward; the first forward runs anyway while prompts prefill). Each request takes the
option worth most at the plain step's goodput (tokens minus goodput times seconds, the Dinkelbach
view of a ratio); when that puts a draft model's requests on it, the same walk with those requests
on their best model-free option is priced too, and the better plan wins: at batch 1 that compares
the two drafters exactly. While prompts wait (prefilling, or queued for a slot), a second of any
step is priced at what decode-only steps buy with it (choose_prefix).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from engine.protocol import SHARED_READ_QUERIES, BatchShape
from server.policy.cost_model import DraftCosts, StepCostModel

MIN_GAIN = 0.01  # positions expected to add less than this many tokens are not worth pricing


@dataclass(frozen=True, slots=True)
class Option:
    """One drafter's proposal for a request, as the chooser prices it."""

    drafter: str
    pass_chances: Sequence[float]  # [j]: P(draft token j + 1 is accepted | token j was); len >= max
    max_draft_tokens: int  # what the drafter can propose now, within the bounds
    num_unseen: int = 1  # tokens a draft model's first forward feeds for this request
    max_kv_tokens: int = 0  # the most KV tokens its draft forwards attend to (a window); 0: all


@dataclass(frozen=True, slots=True)
class Candidate:
    req_id: str
    options: Sequence[Option]
    num_kv_tokens: int  # its KV tokens after a plain decode step (what one query token attends to)


@dataclass(frozen=True, slots=True)
class StepBase:
    """The step before any draft token: what every plan pays and yields."""

    shape: BatchShape  # one token per decoding request plus the prefill chunks
    num_generated: float  # tokens it yields: one per decoding request
    max_extra_tokens: int  # room left in the step's token budget
    num_waiting: int = 0  # requests queued for a slot
    # (query, KV tokens) of each prefill chunk: a draft model prefills them in its first forward
    prefill_seqs: tuple[tuple[int, int], ...] = ()
    num_prefilling: int = 0  # requests admitted whose prompt is not all run yet (this step's chunks included)


@dataclass(frozen=True, slots=True)
class Choice:
    draft_tokens: dict[str, int]  # k per request
    drafters: dict[str, str]  # the drafter of each request with k > 0
    goodput: float  # predicted tokens per second with the chosen k
    plain_goodput: float  # ... with k = 0 for every request
    step_s: float  # predicted time of the chosen step, drafting included
    plain_step_s: float  # ... and of the step with k = 0 for every request (a draft model's prefill included)
    draft_s: float = 0.0  # predicted time of the chosen step's draft forwards, prefill included


@dataclass(frozen=True, slots=True)
class Gain:
    """Drafting one more token for a request: what it is expected to yield and what it costs."""

    tokens: float  # expected tokens gained: P(this and every earlier draft token pass)
    extra_s: float  # seconds it adds to the target's step besides its share of f(N)
    req_id: str
    drafter: str = ""
    rank_s: float = 0.0  # seconds ranking charges besides f(N): extra_s and, for a draft model, its share
    # (query tokens, KV tokens) it adds to the draft model's forward `position - 1`; None without one
    draft_seq: tuple[int, int] | None = None
    position: int = 0


@dataclass(slots=True)
class DraftTimer:
    """One draft model's predicted time for the plan being built, forward by forward."""

    model: StepCostModel
    forwards: list[list[tuple[int, int]]] = field(default_factory=list)  # [forward]: (query, KV) per sequence
    times: list[float] = field(default_factory=list)
    total_s: float = 0.0  # all of its forwards

    def add(self, forward: int, seq: tuple[int, int]) -> float:
        """Adds a sequence to a forward; returns how much the drafting time grew."""
        while len(self.forwards) <= forward:
            self.forwards.append([])
            self.times.append(0.0)
        self.forwards[forward].append(seq)
        seconds = self.model.predict(BatchShape.of(self.forwards[forward]))
        grown = seconds - self.times[forward]
        self.times[forward] = seconds
        self.total_s += grown
        return grown


def interpolate(times: Sequence[float], n: float) -> float:
    lo = min(int(n), len(times) - 1)
    hi = min(lo + 1, len(times) - 1)
    return times[lo] + (times[hi] - times[lo]) * (n - lo)


def gains_of(
    c: Candidate, option: Option, costs: DraftCosts, draft_model: StepCostModel | None = None, num_sharing: int = 1
) -> list[Gain]:
    gains = []
    reach = 1.0  # P(reaching draft j)
    for j, chance in enumerate(option.pass_chances[: option.max_draft_tokens], start=1):
        reach *= chance
        if reach < MIN_GAIN:
            break
        # Draft j makes the request's query 1 + j tokens over num_kv_tokens + j keys: it adds one
        # key to attend and num_kv_tokens + 2j query-key pairs, of which num_kv_tokens + 2j - S
        # are a deep query's once 1 + j > S (SHARED_READ_QUERIES); the first one also adds a mask.
        num_deep_pairs = c.num_kv_tokens + 2 * j - SHARED_READ_QUERIES if j + 1 > SHARED_READ_QUERIES else 0
        extra_s = (
            costs.per_context_token
            + costs.per_attention_pair * (c.num_kv_tokens + 2 * j)
            + costs.per_deep_query_pair * num_deep_pairs
            + (costs.per_multi_token_seq if j == 1 else 0.0)
        )
        if draft_model is None:
            gains.append(Gain(reach, extra_s, c.req_id, option.drafter, extra_s))
            continue
        # Draft j comes from the draft model's forward j - 1: the first feeds what it has not
        # seen, each later one the draft token before.
        num_kv = c.num_kv_tokens + j - 1
        seq = (option.num_unseen if j == 1 else 1, min(num_kv, option.max_kv_tokens or num_kv))
        own_s = draft_model.predict(BatchShape.of([seq])) - draft_model.fixed_s
        rank_s = extra_s + own_s + draft_model.fixed_s / num_sharing
        gains.append(Gain(reach, extra_s, c.req_id, option.drafter, rank_s, seq, j))
    return gains


def rank(gains: Sequence[Gain], per_token_s: float) -> list[tuple[float, Gain]]:
    """Each of one request's gains (in position order) with its ranking key: expected tokens per
    second of cost. Adjacent positions whose keys would rise are pooled (pool adjacent
    violators), so the keys never rise along the request and its positions are taken in order."""
    blocks: list[tuple[float, float, int]] = []  # (expected tokens, seconds, number of positions)
    for gain in gains:
        block = (gain.tokens, per_token_s + gain.rank_s, 1)
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


def worth(gains: Sequence[Gain], per_token_s: float, rate: float) -> float:
    """The most a request's gains are worth at a goodput of rate: expected tokens less rate times
    their seconds, over the best prefix of positions (0 for none)."""
    best = total = 0.0
    for gain in gains:
        total += gain.tokens - rate * (per_token_s + gain.rank_s)
        best = max(best, total)
    return best


def choose(
    candidates: Sequence[Candidate],
    base: StepBase,
    times: Sequence[float],
    costs: DraftCosts,
    draft_models: Mapping[str, StepCostModel] | None = None,
    time_value: float = 0.0,
    prefilling: Collection[str] = (),
) -> Choice:
    """times[n]: predicted step time with n query tokens (for this step's other features);
    draft_models: the step-cost model of each drafter that runs a model (the rest cost nothing);
    time_value: tokens per second that the plan's extra time must at least buy (0: none), for a
    step whose prefill makes its own goodput a poor price of time (see choose_prefix);
    prefilling: the draft models that prefill with the target (a draft model's own cache; not
    self-speculation, which reads the target's)."""
    draft_models = draft_models or {}
    n = base.shape.num_tokens
    per_token_s = interpolate(times, n + 1) - interpolate(times, n)

    def timers() -> dict[str, DraftTimer]:
        return seeded_timers(draft_models, base, prefilling)

    plain_s = interpolate(times, n) + sum(t.total_s for t in timers().values())
    plain = goodput(base.num_generated, plain_s)
    able = {
        name: sum(any(o.drafter == name and o.max_draft_tokens > 0 for o in c.options) for c in candidates)
        for name in draft_models
    }
    preferred = prefer(candidates, costs, draft_models, able, per_token_s, plain)
    # A forward's constant was shared among every request able to use the draft model; if fewer
    # prefer it, each of them bears a larger share: price once more with that count.
    preferring = {name: sum(bool(g) and g[0].drafter == name for g in preferred.values()) for name in draft_models}
    if any(0 < preferring[name] < able[name] for name in draft_models):
        preferred = prefer(candidates, costs, draft_models, preferring, per_token_s, plain)
    choice = _walk(candidates, preferred, base, times, per_token_s, timers(), plain, plain_s, time_value)
    if any(gains and gains[0].drafter in draft_models for gains in preferred.values()):
        model_free = {
            c.req_id: max(
                (gains_of(c, o, costs) for o in c.options if o.drafter not in draft_models and o.max_draft_tokens),
                key=lambda gains: worth(gains, per_token_s, plain),
                default=[],
            )
            for c in candidates
        }
        other = _walk(candidates, model_free, base, times, per_token_s, timers(), plain, plain_s, time_value)
        price = max(time_value, choice.goodput, other.goodput)  # as in choose_prefix
        if (other.goodput - price) * other.step_s > (choice.goodput - price) * choice.step_s:
            choice = other
    return choice


def prefer(
    candidates: Sequence[Candidate],
    costs: DraftCosts,
    draft_models: Mapping[str, StepCostModel],
    num_sharing: Mapping[str, int],
    per_token_s: float,
    rate: float,
) -> dict[str, list[Gain]]:
    """Each request's gains with the option worth most at the goodput rate (none if it has none)."""
    preferred = {}
    for c in candidates:
        priced = [
            gains_of(c, o, costs, draft_models.get(o.drafter), max(1, num_sharing.get(o.drafter, 1)))
            for o in c.options
            if o.max_draft_tokens > 0
        ]
        preferred[c.req_id] = max(priced, key=lambda gains: worth(gains, per_token_s, rate), default=[])
    return preferred


def seeded_timers(
    draft_models: Mapping[str, StepCostModel], base: StepBase, prefilling: Collection[str]
) -> dict[str, DraftTimer]:
    """A timer per draft model; the first forward of each one in prefilling holds the step's
    prefill chunks: it prefills with the target, so that forward runs (its constant paid) anyway."""
    timers = {name: DraftTimer(model) for name, model in draft_models.items()}
    for name in timers.keys() & set(prefilling):
        for seq in base.prefill_seqs:
            timers[name].add(0, seq)
    return timers


def _walk(
    candidates: Sequence[Candidate],
    gains_by_request: Mapping[str, list[Gain]],
    base: StepBase,
    times: Sequence[float],
    per_token_s: float,
    timers: Mapping[str, DraftTimer],
    plain: float,
    plain_s: float,
    time_value: float = 0.0,
) -> Choice:
    """Ranks the gains and takes the best prefix (choose_prefix), drafting included; timers: a
    fresh one per draft model, seeded with the step's prefill."""
    ranked = [r for gains in gains_by_request.values() for r in rank(gains, per_token_s)]
    gains = [gain for _, gain in sorted(ranked, key=lambda r: (-r[0], -r[1].tokens))]
    draft_s = sum(timer.total_s for timer in timers.values())
    prefixes = [(base.num_generated, plain_s, draft_s)]  # (expected tokens, step seconds, drafting seconds)
    n = base.shape.num_tokens
    generated, tokens, extra_s = base.num_generated, n, 0.0
    for gain in gains:
        if tokens + 1 > n + base.max_extra_tokens:
            break
        generated += gain.tokens
        tokens += 1
        extra_s += gain.extra_s
        if gain.draft_seq is not None:
            draft_s += timers[gain.drafter].add(gain.position - 1, gain.draft_seq)
        prefixes.append((generated, interpolate(times, tokens) + extra_s + draft_s, draft_s))
    best_len = choose_prefix([(g, s) for g, s, _ in prefixes], time_value)
    best_generated, best_s, best_draft_s = prefixes[best_len]
    chosen: dict[str, int] = {c.req_id: 0 for c in candidates}
    drafters: dict[str, str] = {}
    for gain in gains[:best_len]:
        chosen[gain.req_id] += 1
        drafters[gain.req_id] = gain.drafter
    return Choice(chosen, drafters, goodput(best_generated, best_s), plain, best_s, plain_s, best_draft_s)


def choose_prefix(prefixes: Sequence[tuple[float, float]], time_value: float = 0.0) -> int:
    """prefixes[i]: (expected tokens, seconds) of the step with the first i gains -> the i to take.

    The one with the highest goodput, unless time_value is higher still: then each second is worth
    time_value tokens (what decoding steps buy with it), and the prefix worth most at that price,
    tokens - time_value x seconds, wins (Dinkelbach's form; at time_value = the best goodput the two
    agree). A step that prefills is long whatever it drafts, so its own goodput is low and would
    buy an expensive draft (a draft model's k forwards) that yields fewer tokens per second than
    the same time spent on decoding steps."""
    best = max(range(len(prefixes)), key=lambda i: (goodput(*prefixes[i]), -i))
    if time_value <= goodput(*prefixes[best]):
        return best
    return max(range(len(prefixes)), key=lambda i: (prefixes[i][0] - time_value * prefixes[i][1], -i))


def max_tokens_needed(base: StepBase, candidates: Sequence[Candidate]) -> int:
    extra = sum(max((o.max_draft_tokens for o in c.options), default=0) for c in candidates)
    return base.shape.num_tokens + min(extra, base.max_extra_tokens) + 1


def safe_rate(rate: float) -> float:
    return min(max(rate, 0.0), 0.999) if math.isfinite(rate) else 0.0
