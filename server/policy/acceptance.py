"""How often draft tokens are accepted: per request (decayed averages) and server-wide (per position).

Acceptance is bursty: when an n-gram match is right the draft is usually right all the way (the
text is being copied), when it is wrong it fails at once. Measured on code editing, the first
draft token passes 77% of the time but each later one, given the previous passed, 82-100%; an
i.i.d. rate fitted to that would call an eighth token hopeless (0.77^8 = 12%) where 42% pass. So a
request's drafts are modelled with two rates: `first` for the first token and `rest` for each
further token given the one before passed. Both are decayed sums (recent steps count more),
started from the server-wide rates as a prior worth PRIOR_TRIALS trials. The server-wide
conditional rate of every position is kept too, for GetStats and as the prior.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.9  # per observed step: about the last 10 steps dominate a request's estimate
SERVER_DECAY = 0.995  # server-wide: about the last 200 request-steps
PRIOR_TRIALS = 2.0
INITIAL_RATE = 0.5  # before the server has seen any draft


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


@dataclass(slots=True)
class RequestAcceptance:
    first: Rate = field(default_factory=Rate)
    rest: Rate = field(default_factory=Rate)


@dataclass
class AcceptanceEstimator:
    max_draft_tokens: int = 8
    requests: dict[str, RequestAcceptance] = field(default_factory=dict)
    first: Rate = field(default_factory=Rate)  # server-wide
    rest: Rate = field(default_factory=Rate)
    # [j]: decayed passes and trials of draft position j + 1, given position j passed
    positions: list[Rate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.positions = [Rate() for _ in range(self.max_draft_tokens)]

    @property
    def server_first_rate(self) -> float:
        return self.first.value(INITIAL_RATE, 1.0)

    @property
    def server_rest_rate(self) -> float:
        return self.rest.value(INITIAL_RATE, 1.0)

    def position_rates(self) -> list[float]:
        """Server-wide P(position j + 1 passes | position j passed), j = 0 .. max - 1."""
        return [p.value(INITIAL_RATE, 1.0) for p in self.positions]

    def rates(self, req_id: str) -> tuple[float, float]:
        """(first, rest) for a request: P(first draft token passes), P(each further one passes)."""
        own = self.requests.get(req_id)
        first, rest = self.server_first_rate, self.server_rest_rate
        if own is None:
            return first, rest
        return own.first.value(first, PRIOR_TRIALS), own.rest.value(rest, PRIOR_TRIALS)

    def pass_chances(self, req_id: str, max_draft_tokens: int) -> list[float]:
        """P(draft position j + 1 passes | position j passed) for this request, j = 0 .. max - 1.

        The first from the request's own first rate; later positions follow the server-wide
        curve (later tokens of a right draft pass even more often), scaled by how the request's
        continuation rate compares with the server's.
        """
        first, rest = self.rates(req_id)
        scale = rest / self.server_rest_rate
        curve = self.position_rates()
        return [first] + [min(0.999, curve[j] * scale) for j in range(1, max_draft_tokens)]

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        """A decoding step that verified num_drafted draft tokens and accepted num_accepted."""
        if num_drafted <= 0:
            return
        own = self.requests.setdefault(req_id, RequestAcceptance())
        is_first_accepted = num_accepted >= 1
        own.first.add(is_first_accepted, 1, DECAY)
        self.first.add(is_first_accepted, 1, SERVER_DECAY)
        # Later positions were tested up to the first rejection (or the end of the draft).
        tested_rest = min(num_accepted + 1, num_drafted) - 1
        if tested_rest > 0:
            own.rest.add(num_accepted - 1, tested_rest, DECAY)
            self.rest.add(num_accepted - 1, tested_rest, SERVER_DECAY)
        for j in range(min(num_accepted + 1, num_drafted, self.max_draft_tokens)):
            self.positions[j].add(j < num_accepted, 1, SERVER_DECAY)

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
