"""How often draft tokens are accepted: the first token by the drafter's match length, scaled
per request; later tokens by a server-wide curve per position, also scaled per request.

Acceptance is bursty: when an n-gram match is right the draft is usually right all the way (the
text is being copied), when it is wrong it fails at once. So a draft is modelled as: the first
token passes with chance c_1, each later token j, given the one before passed, with the
conditional rate of position j.

c_1 comes from what the drafter knows when it proposes: how long a match its proposal continues
(the engine reports it with each result). Measured on HumanEval at batch 1 (n-gram, 2..8): a
full 8-token match is right first time 97% of the time, a 2-token match 51%. So the server keeps
a first-token rate per match length, and each request a decayed ratio of its passes to what those
rates predicted for it (started at 1, worth PRIOR_TRIALS expected passes), which catches text
that is easier or harder to copy than usual. Replaying the same drafts, the log loss of c_1 was
0.52 on code editing and 0.59 on completion, against 0.64 and 0.61 for a request's own decayed
rate alone and 0.63 and 0.67 for one server-wide rate.

Later positions follow the server-wide curve, scaled by the request's record there the same way
(its decayed passes past the first token over what the curve predicted, started at 1 and worth
PRIOR_TRIALS expected passes). How far a right draft runs is mostly a property of the drafter and
the text, and a request yields few long drafts, so its own rate alone predicted worse than the
curve on replayed traces (log loss 0.44 against 0.39 on code editing). But the curve alone is
set by whichever requests drafted deepest lately: in the long-context grid, after two prompts
that n-gram lookup copies to the end, the next four's drafts were priced at 512 expected tokens
where 414 passed, and AUTO drafted deeper than n-gram k = 4 and ran at 0.90-0.92x of it. With the
scale, 441 against 411, and AUTO within 0.95x of the best fixed setting at 8 of 8 points in
float32 (docs/long-context.md); editing under load was unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.9  # per observed step: about the last 10 steps dominate a request's ratio
SERVER_DECAY = 0.995  # server-wide: about the last 200 request-steps
PRIOR_TRIALS = 8.0  # a request's ratio starts at 1, worth this many expected passes
MATCH_PRIOR_TRIALS = 2.0  # a match length's rate starts at the server-wide first-token rate
INITIAL_RATE = 0.5  # before the server has seen any draft, unless the drafter says otherwise
MAX_MATCH_LEN = 64  # longer matches share one rate


@dataclass(slots=True)
class Rate:
    """A decayed pass rate: passes / trials, pulled towards a prior when evidence is thin."""

    passed: float = 0.0
    trials: float = 0.0

    def add(self, passed: float, trials: float, decay: float) -> None:
        self.passed = decay * self.passed + passed
        self.trials = decay * self.trials + trials

    def value(self, prior: float, prior_trials: float) -> float:
        return (self.passed + prior_trials * prior) / (self.trials + prior_trials)


def record_scale(ratios: dict[str, Rate], req_id: str) -> float:
    """A request's passes over what the server's rates predicted for it: 1 until it has a record."""
    ratio = ratios.get(req_id)
    return 1.0 if ratio is None else ratio.value(1.0, PRIOR_TRIALS)


@dataclass
class AcceptanceEstimator:
    max_draft_tokens: int = 8
    initial_rate: float = INITIAL_RATE  # every rate's prior before the first draft (the drafter's prior)
    first: Rate = field(default_factory=Rate)  # server-wide, any match length
    first_by_match: dict[int, Rate] = field(default_factory=dict)  # server-wide, per match length
    # req_id -> its decayed first-token passes (passed) over what the match rates predicted (trials)
    ratio_by_request: dict[str, Rate] = field(default_factory=dict)
    # req_id -> the same for later positions, over what the position curve predicted
    rest_ratio_by_request: dict[str, Rate] = field(default_factory=dict)
    rest: Rate = field(default_factory=Rate)  # server-wide P(a further token passes | the one before did)
    # [j]: decayed passes and trials of draft position j + 1, given position j passed
    positions: list[Rate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.positions = [Rate() for _ in range(self.max_draft_tokens)]

    @property
    def server_first_rate(self) -> float:
        return self.first.value(self.initial_rate, 1.0)

    @property
    def server_rest_rate(self) -> float:
        return self.rest.value(self.initial_rate, 1.0)

    def position_rates(self) -> list[float]:
        """Server-wide P(position j + 1 passes | position j passed), j = 0 .. max - 1.

        A position with little evidence leans on the rate of the one before it, not on a fixed
        prior. Acceptance is bursty, so given the position before passed a later one passes about
        as often or more; and a fixed prior below the real rate is never corrected, because a
        chooser that believes it never drafts that deep. It happened: in float32 AUTO held the
        draft model at k = 1 for whole requests (first token passing ~100%, position 2 still at
        the initial 0.5) and ran at 0.8x the draft model's fixed k = 4."""
        rates, prior = [], self.initial_rate
        for position in self.positions:
            prior = position.value(prior, 1.0)
            rates.append(prior)
        return rates

    def first_token_rates(self) -> dict[int, float]:
        """Server-wide P(the first draft token passes) per match length seen."""
        return {m: self.first_token_rate(m) for m in sorted(self.first_by_match)}

    def first_token_rate(self, match_len: int) -> float:
        rate = self.first_by_match.get(min(match_len, MAX_MATCH_LEN))
        server = self.server_first_rate
        return server if rate is None else rate.value(server, MATCH_PRIOR_TRIALS)

    def first_rate(self, req_id: str, match_len: int) -> float:
        """P(the request's next first draft token passes), for a proposal continuing a match of
        match_len tokens: the match length's rate, scaled by the request's record."""
        return min(self.first_token_rate(match_len) * record_scale(self.ratio_by_request, req_id), 0.999)

    def pass_chances(self, req_id: str, match_len: int, max_draft_tokens: int) -> list[float]:
        """P(draft position j + 1 passes | position j passed) for this request, j = 0 .. max - 1:
        the server-wide curve past the first, scaled by the request's record there."""
        curve, scale = self.position_rates(), record_scale(self.rest_ratio_by_request, req_id)
        rest = [min(0.999, curve[j] * scale) for j in range(1, max_draft_tokens)]
        return [self.first_rate(req_id, match_len), *rest]

    def observe(self, req_id: str, match_len: int, num_drafted: int, num_accepted: int) -> None:
        """A decoding step that verified num_drafted draft tokens, proposed from a match of
        match_len tokens, and accepted num_accepted."""
        if num_drafted <= 0:
            return
        is_first_accepted = num_accepted >= 1
        expected = self.first_token_rate(match_len)  # before this outcome moves it
        self.ratio_by_request.setdefault(req_id, Rate()).add(is_first_accepted, expected, DECAY)
        self.first.add(is_first_accepted, 1, SERVER_DECAY)
        self.first_by_match.setdefault(min(match_len, MAX_MATCH_LEN), Rate()).add(is_first_accepted, 1, SERVER_DECAY)
        # Positions were tested up to the first rejection (or the end of the draft).
        num_tested = min(num_accepted + 1, num_drafted)
        if num_tested > 1:
            self.rest.add(num_accepted - 1, num_tested - 1, SERVER_DECAY)
        num_on_curve = min(num_tested, self.max_draft_tokens)
        if num_on_curve > 1:
            curve = self.position_rates()  # before this outcome moves it
            expected_rest = sum(min(0.999, curve[j]) for j in range(1, num_on_curve))
            passed_rest = min(num_accepted, num_on_curve) - 1
            self.rest_ratio_by_request.setdefault(req_id, Rate()).add(passed_rest, expected_rest, DECAY)
        for j in range(num_on_curve):
            self.positions[j].add(j < num_accepted, 1, SERVER_DECAY)

    def forget(self, req_id: str) -> None:
        self.ratio_by_request.pop(req_id, None)
        self.rest_ratio_by_request.pop(req_id, None)
