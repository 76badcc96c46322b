"""How often draft tokens are accepted: per request (a decayed first-token rate) and server-wide
(per position).

Acceptance is bursty: when an n-gram match is right the draft is usually right all the way (the
text is being copied), when it is wrong it fails at once. Measured on code editing, the first
draft token passes 73% of the time but each later one, given the previous passed, 79-97%; an
i.i.d. rate fitted to that would call an eighth token hopeless where a third of drafts get there.
So a draft is modelled as: the first token passes with the request's own rate, each later token
j with the server-wide conditional rate of position j. The request's rate is a decayed average
(recent steps count more), started from the server-wide first-token rate as a prior worth
PRIOR_TRIALS trials.

Why the later positions are not per request: replaying recorded traces, a per-request
continuation rate predicted worse than the server-wide curve (log loss 0.44 against 0.39 on code
editing, equal on completion). How far a right draft runs is a property of the drafter and the
text, and a request yields too few long drafts to estimate it; its tokens predicted at 0.5-0.7
passed 88-96% of the time, and cutting drafts there cost more than it saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.9  # per observed step: about the last 10 steps dominate a request's estimate
SERVER_DECAY = 0.995  # server-wide: about the last 200 request-steps
PRIOR_TRIALS = 4.0
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


@dataclass
class AcceptanceEstimator:
    max_draft_tokens: int = 8
    first_by_request: dict[str, Rate] = field(default_factory=dict)
    first: Rate = field(default_factory=Rate)  # server-wide
    rest: Rate = field(default_factory=Rate)  # server-wide P(a further token passes | the one before did)
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

    def first_rate(self, req_id: str) -> float:
        """P(the request's first draft token passes): its own rate, pulled towards the server's."""
        own = self.first_by_request.get(req_id)
        server = self.server_first_rate
        return server if own is None else own.value(server, PRIOR_TRIALS)

    def pass_chances(self, req_id: str, max_draft_tokens: int) -> list[float]:
        """P(draft position j + 1 passes | position j passed) for this request, j = 0 .. max - 1."""
        curve = self.position_rates()
        return [self.first_rate(req_id)] + [min(0.999, curve[j]) for j in range(1, max_draft_tokens)]

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        """A decoding step that verified num_drafted draft tokens and accepted num_accepted."""
        if num_drafted <= 0:
            return
        is_first_accepted = num_accepted >= 1
        self.first_by_request.setdefault(req_id, Rate()).add(is_first_accepted, 1, DECAY)
        self.first.add(is_first_accepted, 1, SERVER_DECAY)
        # Later positions were tested up to the first rejection (or the end of the draft).
        tested_rest = min(num_accepted + 1, num_drafted) - 1
        if tested_rest > 0:
            self.rest.add(num_accepted - 1, tested_rest, SERVER_DECAY)
        for j in range(min(num_accepted + 1, num_drafted, self.max_draft_tokens)):
            self.positions[j].add(j < num_accepted, 1, SERVER_DECAY)

    def forget(self, req_id: str) -> None:
        self.first_by_request.pop(req_id, None)
