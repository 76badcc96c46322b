"""How often draft tokens are accepted: per request (decayed averages) and server-wide (per position).

Each request's acceptance rate a is estimated under the usual i.i.d. model, where k drafted
tokens yield a accepted with probability a^a (1 - a) (or a^k when all pass): its maximum
likelihood is accepted / (accepted + rejections), kept here as decayed sums so recent steps
count more. A request starts from the server-wide rate (a prior worth PRIOR_TRIALS trials) and
moves towards its own evidence. (Whether the drafter has anything to propose is not estimated:
the engine reports it after every step, see RequestOutput.num_draftable.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

DECAY = 0.9  # per observed step: about the last 10 steps dominate a request's estimate
SERVER_DECAY = 0.995  # server-wide: about the last 200 request-steps
PRIOR_TRIALS = 2.0
INITIAL_RATE = 0.5  # before the server has seen any draft


@dataclass(slots=True)
class RequestAcceptance:
    accepted: float = 0.0  # decayed sum of accepted draft tokens
    trials: float = 0.0  # decayed sum of accepted tokens plus rejections


@dataclass
class AcceptanceEstimator:
    """(Per-position counts, server-wide, are kept by server/stats.py for GetStats and Prometheus.)"""

    requests: dict[str, RequestAcceptance] = field(default_factory=dict)
    accepted: float = 0.0  # server-wide decayed sums, the prior of new requests
    trials: float = 0.0

    @property
    def server_rate(self) -> float:
        return (self.accepted + INITIAL_RATE) / (self.trials + 1.0)

    def rate(self, req_id: str) -> float:
        """The request's per-token acceptance probability."""
        own = self.requests.get(req_id)
        prior = self.server_rate
        if own is None:
            return prior
        return (own.accepted + PRIOR_TRIALS * prior) / (own.trials + PRIOR_TRIALS)

    def observe(self, req_id: str, num_drafted: int, num_accepted: int) -> None:
        """A decoding step that verified num_drafted draft tokens and accepted num_accepted."""
        if num_drafted <= 0:
            return
        own = self.requests.setdefault(req_id, RequestAcceptance())
        trials = num_accepted + (num_accepted < num_drafted)
        own.accepted = DECAY * own.accepted + num_accepted
        own.trials = DECAY * own.trials + trials
        self.accepted = SERVER_DECAY * self.accepted + num_accepted
        self.trials = SERVER_DECAY * self.trials + trials

    def forget(self, req_id: str) -> None:
        self.requests.pop(req_id, None)
