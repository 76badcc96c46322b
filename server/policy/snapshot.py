"""What the speculation policy knows, frozen after a step, for GetStats and the Prometheus gauges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from server.policy.settings import PolicySettings


@dataclass(frozen=True, slots=True)
class DrafterSnapshot:
    first_rate: float  # server-wide P(its first draft token is accepted)
    continuation_rate: float  # server-wide P(a further draft token of its is accepted | the one before was)
    first_token_rates: Mapping[int, float]  # P(its first draft token accepted) by the proposal's match length
    cost_coefficients: Mapping[str, float]  # its drafting-cost model's (a drafter that runs a model), else empty
    cost_model_error: float = 0.0  # ... and that model's recent mean |predicted - measured| / measured time


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    settings: PolicySettings
    first_rate: float  # server-wide P(a first draft token is accepted)
    continuation_rate: float  # server-wide P(a further draft token is accepted | the one before was)
    position_rates: tuple[float, ...]  # [j]: P(position j + 1 accepted | position j accepted)
    first_token_rates: Mapping[int, float]  # P(first draft token accepted) by the proposal's match length
    drafters: Mapping[str, DrafterSnapshot]  # per drafter; the fields above are the first drafter's
    goodput: float  # predicted tokens per second of the last AUTO step, as chosen (0 before one)
    plain_goodput: float  # ... had every request got k = 0
    cost_coefficients: Mapping[str, float]  # the step-cost model's, seconds per unit of each feature
    cost_model_error: float  # recent mean |predicted - measured| / measured step time
    num_probes: int  # k = 1 probes of requests kept at k = 0
